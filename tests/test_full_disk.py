"""A real full disk and a real read-only file system: each writer (a run's checkpoints and final
adapter, merge, export in both formats, the tokenized-data cache) on a tmpfs mounted for the test,
of a few sizes, and remounted read-only. After the failure what is there is either the earlier
complete state or nothing new, the error is one line (exit 5), and a run resumes from what it kept.

Mounting needs root (the CI machines run the suite as root); elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.core.fileio import MARKER

runner = CliRunner()
CHECKPOINT_FILES = {
    "adapter.safetensors", "adapter.json", "recipe.yaml", "trainer_state.json", "optimizer.safetensors", "rng.safetensors",
}  # fmt: skip


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


pytestmark = pytest.mark.skipif(_can_mount() is not None, reason=str(_can_mount()))


@contextlib.contextmanager
def small_disk(where: Path, size: int):
    """A tmpfs of ``size`` bytes (rounded up to pages) mounted at ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def read_only(where: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True)
    assert done.returncode == 0, done.stderr


def one_line(result, code: int = 5) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.output[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], lines
    return lines[0]


def files(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 8-step run (checkpoints at 2, 4, 6) on an ordinary disk, and its size."""
    tmp = tmp_path_factory.mktemp("reference")
    raw = tiny_recipe(tmp, train={"max_steps": 8, "save_every": 2})
    raw["train"]["keep_checkpoints"] = 5
    (tmp / "r.yaml").write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", str(tmp / "r.yaml"), "-q"]).exit_code == 0
    size = sum(p.stat().st_size for p in (tmp / "run").rglob("*") if p.is_file())
    return tmp, raw, size


@pytest.mark.parametrize("share", [0.15, 0.4, 0.8])
def test_a_run_on_a_disk_that_fills_keeps_whole_checkpoints_and_resumes_from_them(tmp_path, reference, share):
    tmp, raw, size = reference
    disk = tmp_path / "disk"
    with small_disk(disk, int(size * share)):
        recipe = {**raw, "output": {**raw["output"], "dir": str(disk / "run")}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "-q"])
        line = one_line(result)
        assert "no space left" in line and "[ENOSPC]" in line
        kept = tmp_path / "kept"
        shutil.copytree(disk / "run", kept) if (disk / "run").exists() else kept.mkdir()
    checkpoints = sorted(kept.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert (len(checkpoints) > 0) == (share > 0.3)  # (the smallest disk fills before the first one)
    for checkpoint in checkpoints:  # each one whole: a checkpoint is there complete or not at all
        assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES, checkpoint
    own = {".shardtune-output.json", ".shardtune.lock"}  # the run's marker and lock: not leftovers
    assert not [
        p for p in kept.rglob("*") if p.name not in own and (".tmp" in p.name or p.name.startswith("."))
    ]
    assert not (kept / "adapter.safetensors").exists() or (kept / "adapter.json").exists()
    if not checkpoints:
        return
    resumed = {**raw, "output": {**raw["output"], "dir": str(kept)}}
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(resumed))
    again = runner.invoke(app, ["train", str(tmp_path / "resume.yaml"), "--resume", "-q"])
    assert again.exit_code == 0, again.output
    final, expected = load_file(kept / "adapter.safetensors"), load_file(tmp / "run" / "adapter.safetensors")
    assert final.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args",
    [
        ["merge", "RUN", "--out", "OUT"],
        ["export", "RUN", "--out", "OUT"],
        ["export", "RUN", "--format", "shardtune", "--out", "OUT"],
    ],
    ids=["merge", "export-peft", "export-native"],
)
@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_an_output_on_a_full_or_read_only_disk_leaves_nothing(tmp_path, reference, args, trouble):
    tmp, _, _ = reference
    disk = tmp_path / "disk"
    with small_disk(disk, 8192 if trouble == "full" else 1024 * 1024):
        (disk / "mine.txt").write_text("the user's")
        if trouble == "read-only":
            read_only(disk)
        before = files(disk)
        command = [str(tmp / "run") if a == "RUN" else str(disk / "out") if a == "OUT" else a for a in args]
        line = one_line(runner.invoke(app, command))
        assert ("[ENOSPC]" if trouble == "full" else "[EROFS]") in line and "--out" in line
        assert files(disk) == before  # nothing new, nothing partial


def test_a_cache_on_a_full_disk_only_warns_and_leaves_no_partial_entry(tmp_path, reference, monkeypatch):
    tmp, raw, _ = reference
    disk = tmp_path / "cache"
    with small_disk(disk, 4096):
        monkeypatch.setenv("SHARDTUNE_CACHE", str(disk))
        recipe = {**raw, "train": {**raw["train"], "max_steps": 1}, "output": {"dir": str(tmp_path / "run")}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        result = runner.invoke(app, ["train", str(tmp_path / "r.yaml")])
        assert result.exit_code == 0, result.output
        assert "could not cache the tokenized data" in result.stderr
        entries = [p for p in (disk / "tokenized").iterdir()] if (disk / "tokenized").exists() else []
        for entry in entries:  # an entry is there whole, or not at all
            assert {p.name for p in entry.iterdir()} == {"rows.safetensors", "rows.json", MARKER}, entry


def test_a_read_only_shardtune_cache_is_one_line_naming_it(tmp_path, monkeypatch):
    """The embedded model is converted into SHARDTUNE_CACHE on first use: a read-only one is exit 5,
    naming the cache and what to set."""
    disk = tmp_path / "cache"
    with small_disk(disk, 1024 * 1024):
        read_only(disk)
        monkeypatch.setenv("SHARDTUNE_CACHE", str(disk))
        line = one_line(runner.invoke(app, ["params", "-m", "smollm2-135m-instruct"]))
        assert "[EROFS]" in line and "SHARDTUNE_CACHE" in line and str(disk) in line


@pytest.mark.parametrize("where", ["run", "."], ids=["new-directory", "the-mount-itself"])
def test_a_run_on_a_read_only_disk_is_one_line_and_writes_nothing(tmp_path, reference, where):
    _, raw, _ = reference
    disk = tmp_path / "disk"
    with small_disk(disk, 1024 * 1024):
        read_only(disk)
        recipe = {**raw, "output": {**raw["output"], "dir": str(disk / where)}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        line = one_line(runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "-q"]))
        assert line.startswith("error: output.dir: ") and "[EROFS]" in line
        assert files(disk) == {}
