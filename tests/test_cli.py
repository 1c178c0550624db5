"""The command line: help texts, exit codes, one-line errors, --json, --dry-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def write_recipe(tmp_path, **sections):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, **sections)))
    return path


def test_help_texts():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "train" in result.output and "shard-sharing" in result.output
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for word in ("RECIPE", "--set", "--dry-run", "--json", "Exit codes"):
        assert word in result.output


def test_version_and_listings():
    assert runner.invoke(app, ["--version"]).output.startswith("shardtune ")
    from shardtune.adapters import METHODS

    listed = json.loads(runner.invoke(app, ["methods", "--json"]).output)
    assert listed.keys() == METHODS.keys()
    assert set(METHODS) == {
        "lora",
        "fossil",
        "mos",
        "sharelora",
        "lors",
        "vera",
        "vblora",
        "tiedlora",
        "prolora",
    }
    assert "tiny-llama" in json.loads(runner.invoke(app, ["models", "--json"]).output)
    assert "reverse" in json.loads(runner.invoke(app, ["tasks", "--json"]).output)


def test_train_json_and_dry_run(tmp_path):
    path = write_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(path), "--set", "adapter.rank=2", "--dry-run"])
    assert result.exit_code == 0 and "rank: 2" in result.output
    result = runner.invoke(app, ["train", str(path), "--set", "adapter.method=fossil", "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["method"] == "fossil" and summary["steps"] == 12
    assert (tmp_path / "run" / "adapter.safetensors").is_file()


def test_plain_progress_lines_when_not_a_tty(tmp_path):
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path))])
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1", "4", "8", "12"]
    assert "eval loss" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "adapter.rank=-3"], "error: adapter.rank: must be a positive integer, got -3"),
        (["--set", "model.name=no-such-model"], "error: model.name: 'no-such-model' is not a builtin alias"),
        (["--set", "data.task=nope"], "error: data.task: unknown task 'nope'"),
        (["--set", "adapter.targets=[qq_proj]"], "error: adapter.targets: 'qq_proj' matches no linear layer"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path)), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output + result.stderr


def test_missing_recipe_file_exit_2(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing.yaml'}: recipe file not found"


def test_an_internal_error_is_one_line_with_the_traceback_in_train_log(tmp_path, monkeypatch):
    import shardtune.training.loop

    def broken(*args, **kwargs):
        raise RuntimeError("the model loader broke\nsecond line")

    monkeypatch.setattr(shardtune.training.loop, "load_model", broken)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path)), "-q"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: internal error: RuntimeError: the model loader broke (details in the run's train.log; "
        "SHARDTUNE_DEBUG=1 shows the traceback)"
    )
    log = (tmp_path / "run" / "train.log").read_text()
    assert "training failed" in log and "Traceback" in log and "second line" in log


def test_console_script_real_process(tmp_path):
    """The installed entry point, in a real process: one line on stderr, exit code 2, no traceback."""
    path = write_recipe(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "shardtune", "train", str(path), "--set", "adapter.rank=-3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: adapter.rank: must be a positive integer, got -3"
    assert proc.stdout == ""


def test_tiny_recipe_runs_from_cli(tmp_path):
    """`shardtune train recipes/tiny.yaml` finishes (in seconds on CPU) and learns."""
    result = runner.invoke(
        app,
        ["train", str(ROOT / "recipes" / "tiny.yaml"), "--set", f"output.dir={tmp_path / 'tiny'}", "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    first = json.loads((tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert summary["final_loss"] < 0.3 * first


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Argmax decoding without ``generate``: the chat-rendered prompt, then one token at a time until EOS."""
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    new = []
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_and_eval_commands(tmp_path):
    path = write_recipe(
        tmp_path,
        adapter={"method": "fossil", "rank": 8},
        data={"task": "repeat", "num_samples": 512, "eval_samples": 16},
        train={"max_steps": 80, "batch_size": 16},
        eval={"score": True, "score_base": True, "max_new_tokens": 12},
    )
    result = runner.invoke(app, ["train", str(path), "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["task_score_base"] == 0.0
    assert summary["task_score"] is not None and summary["task_score"] > summary["task_score_base"]

    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--base", "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["adapter"]["eval_loss"] < evaluated["base"]["eval_loss"]
    assert evaluated["adapter"]["task_score"] == pytest.approx(summary["task_score"])
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--base"])
    assert result.exit_code == 0 and "score" in result.output and "base" in result.output

    result = runner.invoke(
        app, ["generate", "-a", str(tmp_path / "run"), "twice xy =", "twice zz =", "--json"]
    )
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["prompt"] for a in answers] == ["twice xy =", "twice zz ="]
    from shardtune.artifacts.checkpoint import load_adapted_model
    from shardtune.models.loading import load_model

    tuned, tok, _ = load_adapted_model(tmp_path / "run")
    for a in answers:  # greedy decoding of the chat-rendered prompt, one token at a time, written here
        assert a["answer"] == greedy_answer(tuned, tok, a["prompt"], 128)
    result = runner.invoke(
        app, ["generate", "--model", "tiny-llama", "hello", "--max-new-tokens", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    base, tok = load_model("tiny-llama")
    assert json.loads(result.stdout)[0]["answer"] == greedy_answer(base, tok, "hello", 3)
    assert greedy_answer(base, tok, "twice xy =", 128) != answers[0]["answer"]  # the adapter was used

    result = runner.invoke(app, ["generate", "hello"])
    assert result.exit_code == 2 and "give --adapter" in result.stderr
    result = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run or adapter directory" in result.stderr


def test_compare_methods_side_by_side(tmp_path):
    path = write_recipe(
        tmp_path,
        data={"task": "repeat", "num_samples": 64, "eval_samples": 4},
        train={"max_steps": 4},
        eval={"score": True, "max_new_tokens": 6},
    )
    result = runner.invoke(
        app,
        [
            "compare",
            str(path),
            "--methods",
            "lora,fossil,mos",
            "--set",
            "adapter.rank=2",
            "--plot",
            str(tmp_path / "curves.png"),
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    assert rows.keys() == {"lora", "fossil", "mos"}
    assert (
        rows["mos"]["trainable_parameters"] == rows["lora"]["trainable_parameters"]
    )  # MoS R=2 == LoRA r=2 budget
    assert rows["fossil"]["trainable_parameters"] < rows["lora"]["trainable_parameters"]
    assert all(
        r["eval_loss"] is not None and r["task_score"] is not None and r["seconds_per_step"] > 0
        for r in rows.values()
    )
    saved = json.loads((tmp_path / "run" / "compare" / "compare.json").read_text())
    assert [s for s, _ in saved["curves"]["lora"]] == [1, 4]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_set_reaches_the_methods_that_have_the_option(tmp_path):
    """On a LoRA recipe, --set adapter.mode=mini is FOSSIL's option: FOSSIL's run gets it, LoRA's does
    not; an option none of the compared methods has is refused (it would change nothing)."""
    path = write_recipe(
        tmp_path, data={"task": "repeat", "num_samples": 16, "eval_samples": 4}, train={"max_steps": 1}
    )
    args = ["compare", str(path), "--methods", "fossil,lora", "-q", "--json"]
    result = runner.invoke(app, [*args, "--set", "adapter.mode=mini", "--set", "adapter.mini_r=4"])
    assert result.exit_code == 0, result.output
    fossil = yaml.safe_load((tmp_path / "run" / "compare" / "fossil" / "recipe.yaml").read_text())
    lora = yaml.safe_load((tmp_path / "run" / "compare" / "lora" / "recipe.yaml").read_text())
    assert (fossil["adapter"]["mode"], fossil["adapter"]["mini_r"]) == ("mini", 4)
    assert "mode" not in lora["adapter"]
    refused = runner.invoke(app, ["compare", str(path), "--methods", "fossil", "--set", "adapter.alpha=32"])
    assert refused.exit_code == 2
    assert (
        refused.stderr
        == "error: --set adapter.alpha=32: none of the compared methods (fossil) has this option\n"
    )
    result = runner.invoke(app, ["compare", str(path), "--methods", "lora,dora"])
    assert result.exit_code == 2 and "unknown method 'dora'" in result.stderr
    result = runner.invoke(app, ["compare", str(path), "--methods", "lora,vblora"])  # b = 256 ∤ 64
    assert result.exit_code == 2
    assert "--methods: vblora does not fit this model: adapter.vector_length: must divide" in result.stderr


@pytest.mark.slow
def test_compare_defaults_to_every_method_that_fits(tmp_path):
    from shardtune.adapters import METHODS

    path = write_recipe(
        tmp_path, data={"task": "repeat", "num_samples": 32, "eval_samples": 4}, train={"max_steps": 2}
    )
    result = runner.invoke(app, ["compare", str(path), "--set", "adapter.rank=2", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["method"] for r in json.loads(result.stdout.strip().splitlines()[-1])}
    assert rows == set(METHODS) - {"vblora"}  # VB-LoRA's default vector length 256 does not divide 64
    saved = json.loads((tmp_path / "run" / "compare" / "compare.json").read_text())
    assert "adapter.vector_length" in saved["skipped"]["vblora"]
    assert "vblora — left out: adapter.vector_length" in result.stderr


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_launched_process_leaves_with_its_exit_code_and_bad_input_is_said_once(
    rank, tmp_path, monkeypatch, capsys
):
    """Under a launcher, `main` ends with os._exit(code), past the interpreter's teardown; of bad input
    every process meets alike, only the main process (rank 0) prints the line."""
    from shardtune import cli

    class Left(Exception):
        pass

    def leave(code):
        raise Left(code)

    monkeypatch.setattr(cli.os, "_exit", leave)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sys, "argv", ["shardtune", "train", str(tmp_path / "none.yaml")])
    with pytest.raises(Left) as left:
        cli.main()
    assert left.value.args == (2,)
    err = capsys.readouterr().err
    assert ("none.yaml" in err) == (rank == "0") and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["shardtune", "--version"])
    with pytest.raises(Left) as left:
        cli.main()
    assert left.value.args == (0,) and capsys.readouterr().out.startswith("shardtune ")


def test_json_output_is_strict_json(capsys):
    """A loss over nothing is NaN in Python, which JSON has not: null."""
    from shardtune.cli.common import print_json

    print_json({"loss": float("nan"), "rows": [float("inf"), 1.5, {"x": -float("inf")}], "n": 3})
    assert capsys.readouterr().out == '{"loss": null, "rows": [null, 1.5, {"x": null}], "n": 3}\n'


def test_a_finished_command_is_not_turned_into_exit_130_by_a_late_ctrl_c(monkeypatch, capsys):
    """From the command line (``main``), once a command has done its work, SIGINT is ignored: its
    output is complete and its exit code 0 stays true. A library caller's Ctrl-C is left alone."""
    import signal

    from shardtune.cli import common, main

    before = signal.getsignal(signal.SIGINT)
    try:
        assert runner.invoke(app, ["methods"]).exit_code == 0
        assert signal.getsignal(signal.SIGINT) == before  # in-process (tests, libraries): untouched
        monkeypatch.setattr(sys, "argv", ["shardtune", "methods"])
        monkeypatch.setattr(common, "DONE_IGNORES_CTRL_C", False)
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code == 0 and "lora" in capsys.readouterr().out
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
