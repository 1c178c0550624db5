"""A reader that stops early (`shardtune CMD | head -1`) is done, not an error: every command that
prints exits 0 with nothing on stderr beyond what it says anyway, and finishes the files it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def shardtune(args: list, cwd: Path, close_reader: bool) -> tuple[int, str]:
    """Exit code and stderr of `shardtune ARGS`, its stdout read whole or closed before it writes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardtune", *map(str, args)],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if close_reader:
        proc.stdout.close()  # the reader is gone before the first line
        err = proc.stderr.read()
    else:
        _, err = proc.communicate()
    return proc.wait(timeout=300), err


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A trained tiny run (runs/r) and its recipe (r.yaml), in a scratch directory."""
    where = tmp_path_factory.mktemp("pipes")
    raw = tiny_recipe(where, train={"max_steps": 2}, output={"dir": str(where / "runs" / "r")})
    (where / "r.yaml").write_text(yaml.safe_dump(raw))
    code, err = shardtune(["train", "r.yaml", "-q"], where, close_reader=False)
    assert code == 0, err
    return where


# Every command that prints on stdout; {n} makes a new output path for each run.
COMMANDS = {
    "train": ["train", "r.yaml", "-q", "--set", "output.dir=runs/t{n}"],
    "train --json": ["train", "r.yaml", "-q", "--json", "--set", "output.dir=runs/j{n}"],
    "generate": ["generate", "-a", "runs/r", "hello", "--max-new-tokens", "2"],
    "eval": ["eval", "runs/r", "--samples", "2"],
    "routing": ["routing", "runs/r"],
    "merge": ["merge", "runs/r", "--out", "merged{n}", "--dtype", "fp32"],
    "export": ["export", "runs/r", "--out", "exported{n}"],
    "prune": ["prune", "tiny-llama", "--out", "pruned{n}", "--pattern", "2:4"],
    "params": ["params", "--model", "tiny-llama", "--compare"],
    "compare": ["compare", "r.yaml", "--methods", "lora,fossil", "-q", "--set", "output.dir=runs/c{n}"],
    "init": ["init", "tiny", "copy{n}.yaml"],
    "recipes": ["recipes"],
    "models": ["models"],
    "methods": ["methods"],
    "tasks": ["tasks"],
    "--help": ["--help"],
    "--version": ["--version"],
}
WRITES = {"train": "runs/t{n}/adapter.safetensors", "train --json": "runs/j{n}/result.json",
          "merge": "merged{n}/config.json", "export": "exported{n}/adapter_config.json",
          "prune": "pruned{n}/config.json", "compare": "runs/c{n}/compare/compare.json", "init": "copy{n}.yaml"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_a_reader_that_leaves_at_once_is_done_not_an_error(place, name):
    code, err = shardtune([a.format(n=1) for a in COMMANDS[name]], place, close_reader=True)
    assert code == 0, err
    for alarm in ("Traceback", "error", "Exception", "BrokenPipe", "Broken pipe"):  # talk only, if any
        assert alarm not in err, err
    if name in WRITES:  # the command still finishes what it writes
        assert (place / WRITES[name].format(n=1)).is_file()


@pytest.mark.parametrize("args", [["models"], ["recipes", "--json"], ["--help"], ["methods"]], ids=" ".join)
def test_head_under_pipefail_gets_exit_0_every_time(args):
    """As a shell script runs it: `set -o pipefail; shardtune models | head -1`, twenty times."""
    line = " ".join(["shardtune", *args, "| head -1 > /dev/null"])
    script = f"set -o pipefail; for i in $(seq 20); do {line} || exit $?; done"
    bin_dir = str(Path(sys.executable).parent)
    done = subprocess.run(
        ["bash", "-c", script],
        env={**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}"},
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_a_json_reader_that_leaves_early_is_done(place):
    """`--json | head -c 5`: the reader leaves mid-object; the run is whole all the same."""
    bin_dir = str(Path(sys.executable).parent)
    script = "set -o pipefail; shardtune train r.yaml -q --json --set output.dir=runs/h | head -c 5"
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=place,
        env={**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}"},
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stderr) == (0, "") and len(done.stdout) == 5 and done.stdout[0] == "{"
    assert json.loads((place / "runs" / "h" / "result.json").read_text())["steps"] == 2


BOXES = set("─│┃━┏┓┗┛╭╮╰╯┡┩╇╈┼")


def test_tables_in_a_pipe_are_plain_text_under_one_header_line(place):
    """Not a terminal: no box drawing, one header line, the same columns, rows 2+ spaces apart; titles
    are words (no Python reprs such as `step None` or `{'rank': 4}`)."""
    from typer.testing import CliRunner

    from shardtune.cli import app

    runner = CliRunner()
    params = runner.invoke(app, ["params", "--model", "tiny-llama", "--compare", "--rank", "4"])
    lines = params.stdout.splitlines()
    assert lines[0] == "trainable parameters on tiny-llama (rank 4)"
    assert lines[1].split() == ["method", "trainable", "%", "of", "base", "×", "LoRA", "why", "not"]
    assert lines[2].split()[:2] == ["lora", "1,792"] and not BOXES & set(params.stdout)
    assert all(line == line.rstrip() for line in lines)

    evaluated = runner.invoke(app, ["eval", str(place / "runs" / "r"), "--samples", "2"])
    lines = evaluated.stdout.splitlines()
    assert lines[0] == f"{place / 'runs' / 'r'}: lora adapter at step 2; data: repeat"
    assert lines[1].split() == ["model", "eval", "loss", "perplexity", "score"]
    assert lines[2].startswith("adapter ") and not BOXES & set(evaluated.stdout)
    for output in (params.stdout, evaluated.stdout):
        assert "None" not in output and "{" not in output


def test_library_progress_bars_stay_off_outside_a_terminal():
    """tqdm bars (the GGUF conversion, hub downloads) draw with carriage returns: not into a pipe or a
    log file. The root command turns them off before the libraries load; the libraries' own bars here
    then print nothing."""
    code = (
        "from shardtune.cli import app; app(['models'], standalone_mode=False)\n"
        "from tqdm import tqdm; list(tqdm(range(3), desc='plain tqdm'))\n"
        "from transformers.utils import logging; list(logging.tqdm(range(3), desc='transformers'))\n"
        "from huggingface_hub.utils import tqdm as hub_tqdm; list(hub_tqdm(range(3), desc='hub'))\n"
    )
    env = {k: v for k, v in ENV.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("smollm2-135m-instruct")
    assert done.stderr == ""
