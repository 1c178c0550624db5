"""The machine refusing a write (a file size limit, a full or read-only disk, permissions) is one line
naming what was written and what to do, exit 5 (docs/cli.md), never "internal error"; nothing
partial is left."""

from __future__ import annotations

import errno
import resource
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


@pytest.fixture
def run(two_step_run):
    """The session's 2-step tiny run (tests/conftest.py), read only."""
    return two_step_run


def limited(*args: str, max_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    """shardtune with RLIMIT_FSIZE: a write past ``max_bytes`` fails with EFBIG (Python ignores
    SIGXFSZ), as on a machine whose `ulimit -f` is set."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run(
        [sys.executable, "-m", "shardtune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


def one_line(done, *expected: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 5, (done.returncode, done.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], lines
    assert all(text in lines[0] for text in expected), lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_file_size_limit_while_writing_an_output_is_exit_5_and_leaves_nothing(tmp_path, run, command):
    out = tmp_path / "out"
    args = {
        "merge": ["merge", str(run), "--out", str(out), "--dtype", "fp32"],
        "export": ["export", str(run), "--out", str(out)],
    }
    done = limited(*args[command], max_bytes=16 * 1024, cwd=tmp_path)
    one_line(done, "--out", "file size limit", "[EFBIG]")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no hidden copy, no lock


def test_a_file_size_limit_while_training_is_exit_5_and_leaves_no_partial_checkpoint(tmp_path):
    """The first checkpoint (its optimizer state is the largest file) cannot be written: exit 5 naming
    the run directory, no checkpoint and no hidden temporary copy; the same command without the limit
    then trains the run (the failed one is a run shardtune may replace)."""
    recipe = tmp_path / "r.yaml"
    raw = tiny_recipe(tmp_path, train={"max_steps": 4, "save_every": 2}, adapter={"rank": 32})
    recipe.write_text(yaml.safe_dump(raw))
    done = limited("train", str(recipe), "-q", max_bytes=150 * 1024, cwd=tmp_path)
    run = tmp_path / "run"
    one_line(done, f"output.dir: writing {run}", "file size limit", "[EFBIG]")
    assert not list(run.glob("checkpoint-*")) and not (run / "adapter.safetensors").exists()
    assert not [p for p in run.rglob(".*") if p.name not in (".shardtune-output.json", ".shardtune.lock")]
    again = subprocess.run(
        [sys.executable, "-m", "shardtune", "train", str(recipe), "-q", "--set", "output.overwrite=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert (run / "adapter.safetensors").is_file() and (run / "checkpoint-2").is_dir()


@pytest.mark.parametrize(
    "raised,expected",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/x/adapter.safetensors"),
            "no space left on the device",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/x/adapter.safetensors"),
            "read-only; write elsewhere",
        ),
        (OSError(errno.EACCES, "Permission denied", "/x/adapter.safetensors"), "permission denied"),
        (
            RuntimeError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                '"No space left on device" })'
            ),
            "[ENOSPC]",
        ),
    ],
)
def test_every_environment_failure_is_named_never_internal(tmp_path, run, monkeypatch, raised, expected):
    """Whatever writer meets it (here the export's safetensors writer), and however the library
    reports it (an OSError with its errno, or only the system's words in its message)."""
    import shardtune.artifacts.export as export

    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(export, "save_file", failing)
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "out")])
    err = result.stderr.strip()
    assert result.exit_code == 5 and len(err.splitlines()) == 1 and expected in err, (result.exit_code, err)
    assert "internal error" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Every writing subcommand against every failure of the machine, at each place a write can fail: the
# open of a file (Python's writes) and the rename that puts a finished file in place (every atomic
# write, the safetensors files included). Each combination meets another errno, so that all of them
# are met across the matrix.

FAULTS = [
    "ENOSPC",
    "EDQUOT",
    "EROFS",
    "EFBIG",
    "EACCES",
    "EPERM",
    "ENOTDIR",
    "ELOOP",
    "EIO",
    "EMFILE",
    "ENFILE",
]
WRITERS = {
    "train": lambda run, out: ["train", "RECIPE", "-q"],
    "merge": lambda run, out: ["merge", str(run), "--out", str(out), "--dtype", "fp32"],
    "export-peft": lambda run, out: ["export", str(run), "--out", str(out)],
    "export-native": lambda run, out: ["export", str(run), "--format", "shardtune", "--out", str(out)],
    "prune": lambda run, out: ["prune", "tiny-llama", "--out", str(out), "--sparsity", "0.5"],
}
MATRIX = [(writer, point) for writer in WRITERS for point in ("open", "rename")]


@pytest.mark.parametrize("writer,point", MATRIX, ids=[f"{w}-{p}" for w, p in MATRIX])
def test_every_writer_meets_every_machine_failure_with_one_line_and_nothing_partial(
    tmp_path, run, monkeypatch, writer, point
):
    import builtins
    import os

    fault = FAULTS[MATRIX.index((writer, point)) % len(FAULTS)]
    target = tmp_path / "target"
    target.mkdir()
    (target / "users-file.txt").write_text("not shardtune's")
    out = target / "out"
    args = WRITERS[writer](run, out)
    if writer == "train":
        raw = tiny_recipe(target, train={"max_steps": 4, "save_every": 2})
        raw["output"]["dir"] = str(out)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
        args = [str(tmp_path / "r.yaml") if a == "RECIPE" else a for a in args]
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    code = getattr(errno, fault)

    def inside(path) -> bool:
        try:
            return str(target) in os.fsdecode(path)
        except TypeError:
            return False

    if point == "open":  # Python's file writes, however they are opened (open, pathlib, tempfile)
        import io

        real_open, real_os_open = builtins.open, os.open

        def failing_open(file, mode="r", *a, **kw):
            if isinstance(mode, str) and any(m in mode for m in "wax+") and inside(file):
                raise OSError(code, os.strerror(code), os.fsdecode(file))
            return real_open(file, mode, *a, **kw)

        def failing_os_open(path, flags, *a, **kw):
            if (
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                and inside(path)
                and not os.fsdecode(path).endswith(".lock")
            ):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real_os_open(path, flags, *a, **kw)

        monkeypatch.setattr(builtins, "open", failing_open)
        monkeypatch.setattr(io, "open", failing_open)
        monkeypatch.setattr(os, "open", failing_os_open)
    else:
        real_replace, real_rename = os.replace, os.rename

        def failing(real):
            def move(src, dst, *a, **kw):
                if inside(dst) and not os.fsdecode(dst).endswith((".lock", ".shardtune-output.json")):
                    raise OSError(code, os.strerror(code), os.fsdecode(dst))
                return real(src, dst, *a, **kw)

            return move

        monkeypatch.setattr(os, "replace", failing(real_replace))
        monkeypatch.setattr(os, "rename", failing(real_rename))
    result = runner.invoke(app, args)
    monkeypatch.undo()
    err = result.stderr.strip()
    assert result.exit_code == 5, (writer, point, fault, result.exit_code, err[-1500:])
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and f"[{fault}]" in err, err
    assert "internal error" not in err and "Traceback" not in result.output
    # nothing partial: the user's file untouched; an output absent, or a run without a half-written file
    assert {p: p.read_bytes() for p in before} == before and (target / "users-file.txt").exists()
    if writer != "train":
        assert not out.exists(), sorted(p.name for p in target.rglob("*"))
    else:
        assert not (out / "adapter.safetensors").exists() and not list(out.glob("checkpoint-*"))
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_data_file_that_is_a_loop_of_links_is_one_line(tmp_path):
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    raw = tiny_recipe(tmp_path, data={"task": None, "path": str(tmp_path / "loop.jsonl"), "eval_samples": 4})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "-q"])
    err = result.stderr.strip()
    assert result.exit_code == 5 and len(err.splitlines()) == 1, (result.exit_code, err)
    assert "loop.jsonl" in err and "[ELOOP]" in err and "internal error" not in err
