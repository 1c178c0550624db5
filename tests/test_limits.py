"""Sizes without bound are refused in one line before any work starts (exit 2): a count, a length or
a process number far beyond what the machine or the data can hold would otherwise run for hours,
start that many processes, or loop for ever."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.core.errors import BadInput
from shardtune.data.tasks import TASKS, Task

ROOT = Path(__file__).parents[1]
runner = CliRunner()


@pytest.fixture
def run(two_step_run):
    """The session's 2-step tiny run (tests/conftest.py), read only."""
    return two_step_run


CASES = {
    "eval --samples 1e20 (a whole number)": (
        lambda run, r: ["eval", str(run), "--samples", "100000000000000000000"],
        "--samples",
    ),
    "eval --samples 1e9": (lambda run, r: ["eval", str(run), "--samples", "1000000000"], "--samples"),
    "generate --max-new-tokens 1e6": (
        lambda run, r: ["generate", "-a", str(run), "hi", "--max-new-tokens", "1000000"],
        "--max-new-tokens",
    ),
    "eval.max_new_tokens 1e6": (
        lambda run, r: ["train", r, "--set", "eval.max_new_tokens=1000000", "--set", "eval.score=true"],
        "eval.max_new_tokens: must be at most 65536",
    ),
    "train.max_steps 1e14": (
        lambda run, r: ["train", r, "--set", "train.max_steps=100000000000000"],
        "train.max_steps: must be at most 1000000000",
    ),
    "train.epochs 1e300": (
        lambda run, r: ["train", r, "--set", "train.max_steps=null", "--set", "train.epochs=1e300"],
        "train.epochs: must be at most 1e+09, got 1e+300",
    ),
    "train.epochs 1e8": (
        # (the steps a pass takes are known once the data is read: said then, before training)
        lambda run, r: ["train", r, "-q", "--set", "train.max_steps=null", "--set", "train.epochs=1e8"],
        "train.epochs: 1e+08 passes of 16 steps come to 1,600,000,000 optimizer steps; at most",
    ),
    "data.eval_samples 1e11": (
        lambda run, r: ["train", r, "--set", "data.eval_samples=100000000000"],
        "data.eval_samples: must be at most 1000000",
    ),
    "--nproc 1e5": (
        lambda run, r: ["train", r, "--nproc", "100000"],
        "--nproc 100000: this machine runs at most",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unbounded_sizes_are_one_line_before_any_work(tmp_path, run, case):
    make, message = CASES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, output={"dir": str(tmp_path / "new")})))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "shardtune", *make(run, str(recipe))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - started < 60
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not (tmp_path / "new").exists()


def test_a_task_that_runs_out_of_distinct_items_says_so_at_once():
    """A small input space (here 10 prompts) asked for more distinct items than it has: one line in
    well under a second, for any count up to the largest allowed (not 20 draws per item asked)."""
    tiny = Task("ten", "ten prompts", lambda rng: (f"p{rng.randrange(10)}", "x"), unique=True)
    started = time.monotonic()
    with pytest.raises(BadInput, match="fewer than 1,000,000 distinct items .* ran out after 10"):
        tiny.generate(1_000_000, seed=0)
    assert time.monotonic() - started < 2
    assert len(tiny.generate(10, seed=0)) == 10  # all of them, when that many are asked
    with pytest.raises(BadInput, match="beside the ones excluded"):
        TASKS["sort"].generate(5, 0, exclude={p for p, _ in TASKS["sort"].generate(5, 0)}) and tiny.generate(
            3, 0, exclude={"p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8"}
        )


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_killed_write_leaves_temporary_copies_that_the_next_run_removes(tmp_path, run, command):
    """A merge or export killed while writing leaves ``.OUT.new-XXXXXXXX`` (a full-size copy) or,
    while replacing, ``.OUT.old-XXXXXXXX``. The next run of the command into OUT removes those (it
    holds OUT's lock, so no live writer owns them) and nothing else: other names, other outputs'
    leftovers, files, and links of that form are the user's or another output's."""
    out = tmp_path / "out"
    leftovers = [tmp_path / ".out.new-ab12cd_9", tmp_path / ".out.old-zz00zz00"]
    for left in leftovers:
        left.mkdir()
        (left / "model.safetensors").write_bytes(b"\0" * 4096)
    from shardtune.core.fileio import write_marker

    write_marker(leftovers[1], "merge", ["model.safetensors"])  # an earlier output, set aside
    unmarked_old = tmp_path / ".out.old-aa11bb22"  # the name of one, but no output of shardtune's
    unmarked_old.mkdir()
    (unmarked_old / "f").write_text("x")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    kept = [
        unmarked_old,
        tmp_path / ".out.new-ab12cd",  # not tempfile's eight characters
        tmp_path / ".out.new-ab12cd_9x",
        tmp_path / ".other.new-ab12cd_9",  # another output's
        tmp_path / "out.new-ab12cd_9",  # not hidden
        tmp_path / ".out.NEW-ab12cd_9",
    ]
    for path in kept[1:]:
        path.mkdir()
        (path / "f").write_text("x")
    a_file = tmp_path / ".out.new-fileform"
    a_file.write_text("a file, not a directory")
    link = tmp_path / ".out.new-linkform"
    link.symlink_to(theirs)
    args = {
        "merge": ["merge", str(run), "--out", str(out), "--dtype", "fp32"],
        "export": ["export", str(run), "--out", str(out)],
    }
    assert runner.invoke(app, args[command]).exit_code == 0
    assert not any(left.exists() for left in leftovers)
    assert all((path / "f").read_text() == "x" for path in kept)
    assert a_file.read_text() == "a file, not a directory" and link.is_symlink()
    assert (theirs / "keep.txt").read_text() == "mine"
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p not in kept + [a_file, link]
    ]


LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{b}: &{b} [{', '.join(['*' + a] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
)
HOSTILE_YAML = {
    "billion laughs": (LAUGHS, "more than 100,000 values once its aliases are expanded"),
    "an alias inside itself": (
        "model: &m {name: tiny-llama, again: *m}\n",
        "an alias names a section that holds it",
    ),
    "a list inside itself": ("data: &d [1, *d]\n", "(a loop)"),
    "deep nesting": ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than any recipe"),
    "deep but parseable": ("model: " + "[" * 100 + "]" * 100 + "\n", "at most 64 levels"),
}


@pytest.mark.parametrize("case", list(HOSTILE_YAML))
def test_hostile_yaml_is_one_line_naming_the_file(tmp_path, case):
    text, message = HOSTILE_YAML[case]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    started = time.monotonic()
    for args in (["train", str(path)], ["train", str(path), "--dry-run"]):
        result = runner.invoke(app, args)
        err = result.stderr.strip()
        assert result.exit_code == 2, (result.exit_code, err[-500:])
        assert (
            err.startswith(f"error: {path}: invalid YAML: ") and message in err and len(err.splitlines()) == 1
        )
    assert time.monotonic() - started < 10
