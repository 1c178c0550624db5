"""Safety at the edges: shardtune never destroys what it did not write; recipes are strict; runs cannot
collide; broken artifacts are one line; resume and signals behave; files others can read.

Every refused case asserts the exit code, the one-line message, and that nothing was touched: a hash of
every file around (the working directory, its parent, the home directory, the input run) is the same
before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.core.fileio import MARKER, exclusive_lock, lock_beside
from shardtune.models.loading import cache_dir

ROOT = Path(__file__).parents[1]
runner = CliRunner()


# ---------------------------------------------------------------------------------------------------
# Fixtures: a trained run, and a place around it full of things that must survive


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small trained run (4 steps) with a checkpoint at step 2, to copy into each test's place."""
    tmp = tmp_path_factory.mktemp("trained")
    path = tmp / "r.yaml"
    raw = tiny_recipe(tmp, train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 5})
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(path), "-q"])
    assert result.exit_code == 0, result.output
    return tmp / "run"


class Place:
    """tmp/ (parent_sentinel) ├ work/ = cwd (sentinel) ├ home/ = $HOME (home_sentinel) ├ runs/run
    (a copy of the trained run) ├ foreign/notes.txt ├ afile.txt ├ link → foreign ├ data.jsonl"""

    def __init__(self, tmp: Path, trained: Path, monkeypatch):
        self.tmp = tmp
        self.work, self.home = tmp / "work", tmp / "home"
        for d in (self.work, self.home, tmp / "foreign", tmp / "runs"):
            d.mkdir()
        (tmp / "parent_sentinel").write_text("parent")
        (self.work / "sentinel").write_text("cwd")
        (self.home / "home_sentinel").write_text("home")
        (tmp / "foreign" / "notes.txt").write_text("mine")
        (tmp / "afile.txt").write_text("a file")
        (tmp / "link").symlink_to(tmp / "foreign")
        rows = [{"prompt": f"say {i}", "completion": f" {i}"} for i in range(20)]
        (tmp / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        self.run = tmp / "runs" / "run"
        shutil.copytree(trained, self.run)
        monkeypatch.chdir(self.work)
        # shardtune's own cache (tokenized rows, converted models) stays where it was: it is not part
        # of the user's files under tmp, and CI runs without $SHARDTUNE_CACHE, so it would follow $HOME.
        monkeypatch.setenv("SHARDTUNE_CACHE", str(cache_dir()))
        monkeypatch.setenv("HOME", str(self.home))

    def snapshot(self) -> dict[str, str]:
        """Every file under tmp (hidden ones too) → hash of its bytes; directories as entries."""
        found = {}
        for path in sorted(self.tmp.rglob("*")):
            rel = str(path.relative_to(self.tmp))
            if path.is_symlink():
                found[rel] = "link→" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
        return found

    def recipe(self, **sections) -> str:
        path = self.tmp / "recipe.yaml"
        raw = tiny_recipe(self.tmp, **sections)
        path.write_text(yaml.safe_dump(raw))
        return str(path)


@pytest.fixture
def place(tmp_path, trained, monkeypatch):
    return Place(tmp_path, trained, monkeypatch)


def refused(args: list[str], expected: str, code: int = 2):
    result = runner.invoke(app, args)
    err = result.stderr.strip()
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert err.startswith("error: ") and expected in err, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    return err


# ---------------------------------------------------------------------------------------------------
# Output directories: replace only shardtune's own output

TARGETS = {
    # id: (target relative to the place, message)
    "the current directory": (lambda p: ".", "is the current directory"),
    "the parent directory": (lambda p: "..", "a parent of the current directory"),
    "an ancestor": (lambda p: str(p.tmp.parent), "a parent of the current directory"),
    "the root": (lambda p: "/", "filesystem root"),
    "the home directory": (lambda p: str(p.home), "your home directory"),
    "a tilde": (lambda p: "~", "your home directory"),
    "an existing file": (lambda p: str(p.tmp / "afile.txt"), "is an existing file"),
    "a foreign directory": (lambda p: str(p.tmp / "foreign"), "shardtune did not write"),
    "a symbolic link": (lambda p: str(p.tmp / "link"), "symbolic link"),
    "an empty name": (lambda p: "", "is empty"),
    "a blank name": (lambda p: "   ", "is empty"),
    "inside a file": (lambda p: str(p.tmp / "afile.txt" / "out"), "which is a file"),
}
RUN_INPUT_TARGETS = {
    "the input run": (lambda p: str(p.run), "is the input"),
    "inside the input run": (lambda p: str(p.run / "out"), "is inside the input"),
    "around the input run": (lambda p: str(p.tmp / "runs"), "holds the input"),
    "a checkpoint of the input": (lambda p: str(p.run / "checkpoint-2"), "is inside the input"),
}
COMMANDS = {
    "export": lambda p, t: ["export", str(p.run), "--out", t, "--overwrite"],
    "export-native": lambda p, t: ["export", str(p.run), "--format", "shardtune", "--out", t, "--overwrite"],
    "merge": lambda p, t: ["merge", str(p.run), "--out", t, "--overwrite", "--dtype", "fp32"],
    "prune": lambda p, t: ["prune", "tiny-llama", "--out", t, "--overwrite", "--pattern", "2:4"],
}
OUTPUT_CASES = [(c, t) for c in COMMANDS for t in TARGETS] + [
    (c, t) for c in ("export", "merge") for t in RUN_INPUT_TARGETS
]


@pytest.mark.parametrize("command,target", OUTPUT_CASES, ids=[f"{c} into {t}" for c, t in OUTPUT_CASES])
def test_commands_refuse_targets_they_must_not_write(place, command, target):
    make_target, message = {**TARGETS, **RUN_INPUT_TARGETS}[target]
    before = place.snapshot()
    refused(COMMANDS[command](place, make_target(place)), message)
    assert place.snapshot() == before


LINK_COMMANDS = {**COMMANDS, "train": None}


@pytest.mark.parametrize("command", list(LINK_COMMANDS))
def test_a_target_through_a_link_and_dotdot_is_checked_where_it_is_written(place, command):
    """``runs/latest/../x`` with ``runs/latest`` → ``store/target``: the kernel writes ``store/x``, not
    the ``runs/x`` the text spells. An earlier output of this command at ``runs/x`` must not let the
    user's ``store/x`` be replaced; with no ``store/x``, the output is written there whole, and every
    byte outside it is unchanged."""
    runs, store = place.tmp / "runs", place.tmp / "store"
    (store / "target").mkdir(parents=True)
    (runs / "latest").symlink_to(store / "target")
    mine = store / "x"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")

    def args(target: Path | str) -> list[str]:
        if command == "train":
            recipe = place.recipe(train={"max_steps": 2})
            return ["train", recipe, "-q", "--set", f"output.dir={target}", "--set", "output.overwrite=true"]
        return COMMANDS[command](place, str(target))

    if command == "train":
        shutil.copytree(place.run, runs / "x")  # an earlier run, where the text points
    else:
        assert runner.invoke(app, args(runs / "x")).exit_code == 0
    through = args(f"{runs}/latest/../x")
    before = place.snapshot()
    refused(through, "shardtune did not write")
    assert place.snapshot() == before

    shutil.rmtree(mine)
    before = place.snapshot()
    result = runner.invoke(app, through)
    assert result.exit_code == 0, result.output
    after = place.snapshot()
    outside = {k: v for k, v in after.items() if k != "store/x" and not k.startswith("store/x/")}
    assert outside == before
    assert (mine / MARKER).is_file() and len([k for k in after if k.startswith("store/x/")]) >= 2


@pytest.mark.parametrize("inside", ["train.log", "metrics.jsonl", "logs", "best"])
def test_resume_never_writes_through_a_link_inside_the_run(place, inside):
    """A link in the run directory (to a file or folder of the user's) is refused before anything is
    written: the run's files are its own."""
    recipe = place.recipe(output={"dir": str(place.run)}, train={"max_steps": 6, "save_every": 2})
    link = place.run / inside
    if link.exists():
        shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.symlink_to(place.tmp / ("foreign" if inside in ("logs", "best") else "foreign/notes.txt"))
    before = place.snapshot()
    refused(["train", recipe, "--resume"], f"{link} is a symbolic link inside the run directory")
    assert place.snapshot() == before


TRAIN_TARGETS = [
    "the current directory",
    "the parent directory",
    "the home directory",
    "an existing file",
    "a foreign directory",
    "a symbolic link",
    "an empty name",
    "a blank name",
]


@pytest.mark.parametrize("target", TRAIN_TARGETS)
def test_train_refuses_output_dirs_it_must_not_write(place, target):
    make_target, message = TARGETS[target]
    recipe = place.recipe()
    before = place.snapshot()
    args = ["train", recipe, "--set", f"output.dir={make_target(place)!r}", "--set", "output.overwrite=true"]
    refused(args, message)
    assert place.snapshot() == before


def test_train_refuses_its_data_file_and_a_directory_inside_its_model(place):
    recipe = place.recipe(data={"task": None, "path": str(place.tmp / "data.jsonl"), "eval_samples": 2})
    before = place.snapshot()
    refused(["train", recipe, "--set", f"output.dir={place.tmp / 'data.jsonl'}"], "is the input")
    assert place.snapshot() == before
    assert runner.invoke(app, ["prune", "tiny-llama", "--out", str(place.tmp / "sparse")]).exit_code == 0
    args = ["train", place.recipe(), "--set", f"model.name={place.tmp / 'sparse'}"]
    before = place.snapshot()
    refused([*args, "--set", f"output.dir={place.tmp / 'sparse' / 'run'}"], "is inside the input")
    assert place.snapshot() == before


def test_compare_refuses_a_foreign_compare_directory_and_plots_never_overwrite_a_users_file(place):
    recipe = place.recipe(output={"dir": str(place.tmp / "cmp")}, train={"max_steps": 2})
    (place.tmp / "cmp" / "compare").mkdir(parents=True)
    (place.tmp / "cmp" / "compare" / "mine.txt").write_text("keep")
    (place.tmp / "figure.png").write_bytes(b"\x89PNG not shardtune's")
    before = place.snapshot()
    refused(["compare", recipe, "--methods", "lora"], "shardtune did not write")
    (place.tmp / "cmp" / "compare" / "mine.txt").unlink()
    before = place.snapshot()
    refused(
        ["compare", recipe, "--methods", "lora", "--plot", str(place.tmp / "figure.png")], "shardtune did not"
    )
    refused(
        ["routing", str(place.run), "--plot", str(place.tmp / "figure.png")], "shardtune did not write it"
    )
    refused(["routing", str(place.run), "--plot", str(place.tmp / "foreign")], "is a directory")
    refused(["routing", str(place.run), "--plot", str(place.run / "heat.png")], "is inside the input")
    assert place.snapshot() == before
    plot = str(place.tmp / "ours.png")
    assert runner.invoke(app, ["compare", recipe, "--methods", "lora", "--plot", plot, "-q"]).exit_code == 0
    assert runner.invoke(app, ["routing", str(place.run), "--plot", plot]).exit_code == 0  # ours: replaced
    refused(["compare", recipe, "--methods", "lora"], "already holds an earlier comparison")


def test_the_model_cache_never_replaces_a_users_directory(place, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(place.tmp / "cache"))
    mine = place.tmp / "cache" / "models" / "smollm2-135m-instruct"
    mine.mkdir(parents=True)
    (mine / "weights-i-made.bin").write_text("x")
    before = place.snapshot()
    refused(["params", "-m", "smollm2-135m-instruct"], "SHARDTUNE_CACHE: ")
    assert place.snapshot() == before


def test_a_shardtune_output_is_replaced_only_with_overwrite_and_leaves_nothing_behind(place):
    out = place.tmp / "peft"
    assert runner.invoke(app, ["export", str(place.run), "--out", str(out)]).exit_code == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "export-peft"
    first = (out / "adapter_model.safetensors").read_bytes()
    refused(
        ["export", str(place.run), "--out", str(out)], "already holds an exported adapter; pass --overwrite"
    )
    # replaced by a different adapter (the checkpoint at step 2)
    args = ["export", str(place.run / "checkpoint-2"), "--out", str(out), "--overwrite"]
    assert runner.invoke(app, args).exit_code == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first
    leftovers = [p.name for p in place.tmp.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary tree, set-aside tree or lock left beside it


def test_a_shardtune_output_holding_a_users_file_is_never_replaced(place):
    out = place.tmp / "merged"
    assert runner.invoke(app, ["merge", str(place.run), "--out", str(out), "--dtype", "fp32"]).exit_code == 0
    (out / "my-notes.md").write_text("do not lose me")
    before = place.snapshot()
    refused(
        ["merge", str(place.run), "--out", str(out), "--overwrite"],
        "holds 'my-notes.md', which shardtune did not write",
    )
    assert place.snapshot() == before


def _put(relative: str, copy_of: str | None = None):
    """A user's addition to a run: a file at ``relative``, or a copy of the run's ``copy_of`` there."""

    def put(run: Path) -> None:
        target = run / relative
        if copy_of is not None:
            shutil.copytree(run / copy_of, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("mine")

    return put


# What a user may put into a run, each at a place whose name is like shardtune's own: the run is then
# never replaced (a replaced run's whole tree is deleted once the new one is in place).
USERS_ADDITIONS = {
    "a file in a checkpoint": (_put("checkpoint-2/NOTES.md"), "'checkpoint-2/NOTES.md'"),
    "a copy of a checkpoint": (_put("checkpoint-best", copy_of="checkpoint-2"), "'checkpoint-best/'"),
    "a file named like a checkpoint": (_put("checkpoint-notes.txt"), "'checkpoint-notes.txt'"),
    "a file in logs/": (_put("logs/NOTES.md"), "'logs/NOTES.md'"),
    "a file named like a temporary one": (_put(".train.log.bak"), "'.train.log.bak'"),
    "a directory in a checkpoint": (_put("checkpoint-4/mine/a.txt"), "'checkpoint-4/mine/'"),
    "a compare/ of their own": (_put("compare/results.csv"), "'compare/'"),
    # named like a checkpoint, then more: a number is digits only
    "a copy named checkpoint-N-best": (
        _put("checkpoint-2-best", copy_of="checkpoint-2"),
        "'checkpoint-2-best/'",
    ),
    "a copy named checkpoint-N.bak": (
        _put("checkpoint-2.bak", copy_of="checkpoint-2"),
        "'checkpoint-2.bak/'",
    ),
    # like shardtune's temporary names (.NAME.old-<8 random>, .NAME.<8 random>.tmp), but not them
    "a file named .NAME.old-mine": (_put(".train.log.old-mine"), "'.train.log.old-mine'"),
    "a file named .NAME.backup.tmp": (_put(".recipe.yaml.backup.tmp"), "'.recipe.yaml.backup.tmp'"),
}


@pytest.mark.parametrize("addition", list(USERS_ADDITIONS))
def test_a_run_holding_a_users_file_at_any_depth_is_never_replaced(place, addition):
    put, named = USERS_ADDITIONS[addition]
    put(place.run)
    args = ["train", place.recipe(output={"dir": str(place.run), "overwrite": True}), "-q"]
    before = place.snapshot()
    refused(args, f"holds {named}, which shardtune did not write")
    assert place.snapshot() == before


def test_an_export_holding_a_users_file_in_a_subdirectory_is_never_replaced(place):
    out = place.tmp / "exported"
    assert runner.invoke(app, ["export", str(place.run), "--out", str(out)]).exit_code == 0
    (out / "notes").mkdir()
    (out / "notes" / "mine.md").write_text("do not lose me")
    before = place.snapshot()
    refused(["export", str(place.run), "--out", str(out), "--overwrite"], "holds 'notes/'")
    assert place.snapshot() == before


def test_a_run_with_tensorboard_logs_and_checkpoints_is_replaced_with_overwrite(place):
    raw = {"output": {"dir": str(place.tmp / "tb")}, "logging": {"every": 2, "report_to": ["tensorboard"]}}
    raw["train"] = {"max_steps": 4, "save_every": 2}
    assert runner.invoke(app, ["train", place.recipe(**raw), "-q"]).exit_code == 0
    assert (
        list((place.tmp / "tb" / "logs").rglob("hparams.yml"))
        and (place.tmp / "tb" / "checkpoint-2").is_dir()
    )
    raw["output"]["overwrite"] = True
    result = runner.invoke(app, ["train", place.recipe(**raw), "-q"])
    assert result.exit_code == 0, result.output


# An output is replaced only by the command that wrote its kind (an export either format).
OTHER_KINDS = {
    "merge over an export": (
        lambda p: ["export", str(p.run), "--out", str(p.tmp / "o")],
        lambda p: ["merge", str(p.run), "--out", str(p.tmp / "o"), "--overwrite", "--dtype", "fp32"],
        "(export-peft), not a merged model",
    ),
    "export over another run": (
        lambda p: ["train", p.recipe(output={"dir": str(p.tmp / "other")}), "-q"],
        lambda p: ["export", str(p.run), "--out", str(p.tmp / "other"), "--overwrite"],
        "(run), not an exported adapter",
    ),
    "prune over a merge": (
        lambda p: ["merge", str(p.run), "--out", str(p.tmp / "o"), "--dtype", "fp32"],
        lambda p: ["prune", "tiny-llama", "--out", str(p.tmp / "o"), "--overwrite", "--pattern", "2:4"],
        "(merge), not a pruned model",
    ),
    "a run over an export": (
        lambda p: ["export", str(p.run), "--out", str(p.tmp / "o")],
        lambda p: ["train", p.recipe(output={"dir": str(p.tmp / "o"), "overwrite": True}), "-q"],
        "(export-peft), not a run",
    ),
}


@pytest.mark.parametrize("case", list(OTHER_KINDS))
def test_an_output_is_replaced_only_by_the_kind_of_command_that_wrote_it(place, case):
    first, second, message = OTHER_KINDS[case]
    assert runner.invoke(app, first(place)).exit_code == 0
    args = second(place)  # (writes the recipe of a run first)
    before = place.snapshot()
    refused(args, message)
    assert place.snapshot() == before


def test_merge_never_replaces_the_model_cache(place, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(place.tmp / "cache"))
    assert runner.invoke(app, ["export", str(place.run), "--out", str(place.tmp / "e")]).exit_code == 0
    cached = place.tmp / "cache" / "models" / "tiny-llama"
    assert (cached / MARKER).is_file()  # export saved the tiny base there, for PEFT to load
    before = place.snapshot()
    refused(
        ["merge", str(place.run), "--out", str(cached), "--overwrite", "--dtype", "fp32"],
        "(model-cache), not a merged model",
    )
    assert place.snapshot() == before


def test_an_export_may_replace_an_export_of_the_other_format(place):
    out = str(place.tmp / "e")
    assert runner.invoke(app, ["export", str(place.run), "--out", out]).exit_code == 0
    result = runner.invoke(
        app, ["export", str(place.run), "--out", out, "--format", "shardtune", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((Path(out) / MARKER).read_text())["kind"] == "export-shardtune"


def test_an_empty_out_directory_keeps_its_mode_and_group(place):
    """A shared (setgid) or read-only directory the user made for the output stays one."""
    import stat as st

    shared, read_only = place.tmp / "shared", place.tmp / "read-only"
    shared.mkdir(mode=0o2770)
    shared.chmod(0o2770)  # (mkdir's mode passes through the umask)
    read_only.mkdir()
    read_only.chmod(0o555)
    for out in (shared, read_only):
        mode = st.S_IMODE(out.stat().st_mode)
        assert runner.invoke(app, ["export", str(place.run), "--out", str(out)]).exit_code == 0
        assert (out / "adapter_model.safetensors").is_file()
        assert st.S_IMODE(out.stat().st_mode) == mode, oct(mode)
    read_only.chmod(0o755)


def test_only_checkpoint_and_ascii_digits_is_a_checkpoint(tmp_path):
    from shardtune.artifacts.checkpoint import ADAPTER_CONFIG, list_checkpoints

    for name in ("checkpoint-3", "checkpoint-12", "checkpoint-²", "checkpoint-2-best", "checkpoint-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ADAPTER_CONFIG).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-12"]


def test_rotating_checkpoints_deletes_only_what_shardtune_wrote(tmp_path, caplog):
    from shardtune.artifacts.checkpoint import CHECKPOINT_FILES, rotate_checkpoints

    ours, theirs, newest = (tmp_path / f"checkpoint-{n}" for n in (1, 2, 3))
    for d in (ours, theirs, newest):
        d.mkdir()
        for name in CHECKPOINT_FILES:
            (d / name).write_text("x")
    (theirs / "NOTES.md").write_text("mine")
    with caplog.at_level("WARNING", logger="shardtune"):
        rotate_checkpoints(tmp_path, keep=1)
    assert not ours.exists()
    assert sorted(p.name for p in theirs.iterdir()) == ["NOTES.md"]
    assert sorted(p.name for p in newest.iterdir()) == sorted(CHECKPOINT_FILES)
    assert "kept" in caplog.text and "NOTES.md, which shardtune did not write" in caplog.text


def test_an_interrupted_write_leaves_the_old_output_whole(place, monkeypatch):
    out = place.tmp / "peft"
    assert runner.invoke(app, ["export", str(place.run), "--out", str(out)]).exit_code == 0
    before = place.snapshot()
    import shardtune.artifacts.export

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shardtune.artifacts.export, "save_file", broken)
    refused(["export", str(place.run), "--out", str(out), "--overwrite"], "no space left on the device", 5)
    assert place.snapshot() == before


@pytest.mark.parametrize(
    "crash_at", ["exchange", "delete-old", "fallback-first-rename", "fallback-second-rename"]
)
def test_a_crash_while_replacing_leaves_the_old_or_the_new_tree_whole(tmp_path, monkeypatch, crash_at):
    """replace_directory: interrupted at any step, the target (or, on systems without an atomic
    exchange, the set-aside sibling) holds one whole tree."""
    from shardtune.core import fileio

    final, new = tmp_path / "out", tmp_path / ".out.new-x"
    for d, word in ((final, "old"), (new, "new")):
        d.mkdir()
        for i in range(3):
            (d / f"f{i}").write_text(word)

    def trees() -> list[set[str]]:
        found = []
        for d in [final, *tmp_path.glob(".out.*")]:
            if d.is_dir() and any(d.iterdir()):  # (an empty placeholder holds no tree)
                found.append({f.read_text() for f in d.iterdir()})
        return found

    real_rename, calls = os.rename, {"n": 0}

    def crashing_rename(a, b):
        calls["n"] += 1
        if (crash_at, calls["n"]) in (("fallback-first-rename", 2), ("fallback-second-rename", 3)):
            raise KeyboardInterrupt
        return real_rename(a, b)

    if crash_at == "exchange":
        monkeypatch.setattr(fileio, "exchange", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    elif crash_at == "delete-old":
        monkeypatch.setattr(
            fileio.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        )
    else:
        monkeypatch.setattr(fileio, "exchange", lambda a, b: False)
        monkeypatch.setattr(fileio.os, "rename", crashing_rename)
    with pytest.raises(KeyboardInterrupt):
        fileio.replace_directory(new, final)
    assert all(t in ({"old"}, {"new"}) for t in trees())  # nothing mixed, nothing half-written
    if crash_at in ("exchange", "delete-old", "fallback-first-rename"):
        assert final.is_dir() and len(list(final.iterdir())) == 3  # the target itself is whole
    assert {"old"} in trees() or final.is_dir()


# ---------------------------------------------------------------------------------------------------
# Two runs, one directory: a lock that names its holder, never left stale


def test_a_held_run_directory_refuses_a_second_writer_naming_the_holder(place):
    recipe = place.recipe(output={"dir": str(place.run), "overwrite": True})
    with exclusive_lock(place.run / ".shardtune.lock", "test", "run"):
        before = place.snapshot()
        err = refused(["train", recipe], "is in use by another shardtune run")
        assert f"pid {os.getpid()}" in err
        err = refused(["train", recipe, "--resume"], "is in use by another shardtune run")
        assert place.snapshot() == before


def test_a_held_export_target_refuses_a_second_writer(place):
    out = place.tmp / "peft"
    with exclusive_lock(lock_beside(out), "test", "out", remove=True):
        refused(["export", str(place.run), "--out", str(out)], "is in use by another shardtune run")
    assert not out.exists() and not lock_beside(out).exists()


def shardtune_process(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "shardtune", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


def test_two_runs_into_one_directory_then_a_kill_never_blocks_resume(tmp_path):
    raw = tiny_recipe(tmp_path, train={"max_steps": 300, "save_every": 5, "batch_size": 4})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    first = shardtune_process("train", path, "-q")
    wait_for(tmp_path / "run" / "checkpoint-5", first)
    first.send_signal(signal.SIGSTOP)  # it holds the lock and cannot finish meanwhile (a loaded machine)
    second = shardtune_process("train", path, "-q", "--set", "output.overwrite=true")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert re.fullmatch(
        rf"error: output\.dir: run directory .* is in use by another shardtune run \(pid {first.pid}: .*shardtune train .*\n",
        err,
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = shardtune_process("train", path, "-q", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err  # the kernel dropped the dead run's lock
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 300


def test_overwrite_keeps_the_earlier_run_until_the_new_one_is_ready(place):
    recipe = place.recipe(output={"dir": str(place.run), "overwrite": True})
    before = place.snapshot()
    refused(["train", recipe, "--set", "data.task=no-such-task"], "unknown task")  # fails in setup
    assert place.snapshot() == before  # the earlier run is untouched
    assert runner.invoke(app, ["train", recipe, "-q", "--set", "train.max_steps=3"]).exit_code == 0
    assert json.loads((place.run / "result.json").read_text())["steps"] == 3
    assert not (place.run / "checkpoint-2").exists()  # the earlier run's checkpoints went with it
    assert [p.name for p in place.run.parent.iterdir()] == ["run"]  # nothing set aside remains


def test_a_killed_replacing_run_keeps_the_earlier_run_whole_until_its_resume_finishes(tmp_path):
    raw = tiny_recipe(tmp_path, train={"max_steps": 4})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert shardtune_process("train", path, "-q").wait(timeout=300) == 0
    earlier = load_file(tmp_path / "run" / "adapter.safetensors")
    args = ["--set", "output.overwrite=true", "--set", "train.max_steps=400", "--set", "train.save_every=5"]
    proc = shardtune_process("train", path, "-q", *args)
    wait_for(tmp_path / "run" / "checkpoint-5", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    aside = list(tmp_path.glob(".run.replaced-*"))
    assert len(aside) == 1
    kept = load_file(aside[0] / "adapter.safetensors")
    assert all(torch.equal(kept[k], earlier[k]) for k in earlier)  # the earlier run, whole
    args[3] = "train.max_steps=7"
    assert shardtune_process("train", path, "-q", "--resume", *args).wait(timeout=300) == 0
    assert list(tmp_path.glob(".run.replaced-*")) == []  # deleted once the new run finished


# ---------------------------------------------------------------------------------------------------
# Strict recipe values

RECIPE_CASES = {
    "a boolean rank": ({"adapter": {"rank": True}}, "adapter.rank: must be an integer, got True (a boolean)"),
    "a rank as a string": ({"adapter": {"rank": "8"}}, "adapter.rank: must be an integer, got '8' (a string"),
    "lr as a string": ({"train": {"lr": "0.0002"}}, "train.lr: must be a number, got '0.0002' (a string"),
    "an infinite lr": ({"train": {"lr": float("inf")}}, "train.lr: must be a finite number, got inf"),
    "a NaN gradient clip": (
        {"train": {"max_grad_norm": float("nan")}},
        "train.max_grad_norm: must be a finite number",
    ),
    "a boolean batch size": ({"train": {"batch_size": False}}, "train.batch_size: must be an integer"),
    "betas above 1": (
        {"train": {"betas": [0.9, 1.5]}},
        "train.betas: each beta must be in [0, 1), got [0.9, 1.5]",
    ),
    "a negative beta": ({"train": {"betas": [-0.1, 0.9]}}, "train.betas: each beta must be in [0, 1)"),
    "an absurd max_length": ({"data": {"max_length": 10**9}}, "data.max_length: must be at most 1048576"),
    "absurd generated data": ({"data": {"num_samples": 10**12}}, "data.num_samples: must be at most 1000000"),
    "a number for a name": ({"model": {"name": 7}}, "model.name: must be a string, got 7"),
    "an empty output.dir": ({"output": {"dir": ""}}, "output.dir: is empty"),
    "a string for a boolean": ({"train": {"cpu": "yes please"}}, "train.cpu: must be true or false"),
    # numbers the libraries below take in a limited range: refused before training starts
    "a negative seed": ({"train": {"seed": -1}}, "train.seed: must be at least 0, got -1"),
    "a seed NumPy cannot take": ({"train": {"seed": 2**32}}, "train.seed: must be at most 4294967295"),
    "a routing seed beyond 64 bits": (
        {"adapter": {"method": "mos", "rank": 4, "routing_seed": 2**70}},
        "adapter.routing_seed: 1180591620717411303424 is too large for any setting (at most 64 bits)",
    ),
    "a projection seed torch cannot take": (
        {"adapter": {"method": "vera", "projection_seed": 2**64}},
        "adapter.projection_seed: 18446744073709551616 is too large",
    ),
    "any integer beyond 64 bits": (
        {"data": {"num_samples": 2**64}},
        "data.num_samples: 18446744073709551616 is",
    ),
    "an integer beyond 64 bits in a list": (
        {"train": {"betas": [0.9, 2**80]}},
        "train.betas.1: 1208925819614629174706176 is too large",
    ),
    # a union's members (list[str], literal['auto']) are no recipe keys: never named as one
    "a number for targets": ({"adapter": {"targets": 5}}, "error: adapter.targets: must be a list, got 5"),
    "numbers in targets": (
        {"adapter": {"targets": [1, 2]}},
        "error: adapter.targets.0: must be a string, got 1",
    ),
    "an unknown chat template": (
        {"data": {"chat_template": "yes"}},
        "error: data.chat_template: must be one of",
    ),
    "a target regex that does not compile": (
        {"adapter": {"targets": "("}},
        "error: adapter.targets: invalid regular expression '(': missing ), unterminated subpattern",
    ),
    "an absurd timeout": ({"train": {"timeout_s": 1e300}}, "train.timeout_s: must be at most 2.592e+06"),
}


def test_unbalanced_quotes_in_launch_args_are_one_line(place):
    refused(["train", place.recipe(), "--launch-args", '"unclosed'], "--launch-args: No closing quotation")


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_values_are_strict(place, case):
    sections, message = RECIPE_CASES[case]
    recipe = place.recipe(**sections)
    before = place.snapshot()
    refused(["train", recipe, "--dry-run"], message)
    assert place.snapshot() == before


def test_numbers_written_as_yaml_writes_them_are_numbers(place):
    from shardtune.recipe.schema import ModelSection, parse_yaml, recipe_from_dict, recipe_to_yaml

    # and strings that look like numbers to YAML 1.2 stay strings through the resolved recipe.yaml
    raw = yaml.safe_load(Path(place.recipe()).read_text())
    raw["model"].update(name="org/model", revision="1e5")  # (a revision needs a hub id)
    again = parse_yaml(recipe_to_yaml(recipe_from_dict(raw)))
    assert again["model"]["revision"] == "1e5" and ModelSection.model_validate(again["model"])
    path = Path(place.recipe())
    path.write_text(path.read_text().replace("lr: 0.01", "lr: 2e-4"))
    result = runner.invoke(app, ["train", str(path), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"]["lr"] == 2e-4
    result = runner.invoke(
        app, ["train", str(path), "--dry-run", "--json", "--set", "train.warmup_steps=1e1"]
    )
    assert result.exit_code == 2 and "must be an integer, got 10.0" in result.stderr


def test_a_key_given_twice_is_named_with_its_lines(place):
    path = place.tmp / "dup.yaml"
    path.write_text(Path(place.recipe()).read_text() + "train:\n  lr: 0.5\n")
    refused(["train", str(path)], "key 'train' appears twice in one section (lines")
    text = (
        "model:\n  name: tiny-llama\nadapter:\n  method: lora\n  rank: 4\n  rank: 8\ndata:\n  task: repeat\n"
    )
    path.write_text(text)
    refused(["train", str(path)], "key 'rank' appears twice in one section (lines 5 and 6)")


def test_a_recipe_path_that_is_a_directory_or_a_link_loop_says_so(place):
    refused(["train", str(place.tmp / "foreign")], "is a directory, not a recipe file")
    loop = place.tmp / "loop.yaml"
    loop.symlink_to(loop)
    refused(["train", str(loop)], "a loop of symbolic links")
    dangling = place.tmp / "dangling.yaml"
    dangling.symlink_to(place.tmp / "nowhere.yaml")
    refused(["train", str(dangling)], "a symbolic link to nothing")


@pytest.mark.parametrize(
    "method,rank,largest",
    [("fossil", 100000, 64), ("lora", 1000, 32), ("mos", 64, 32), ("sharelora", 40, 32), ("lors", 33, 32)],
)
def test_a_rank_larger_than_the_layers_names_the_largest_that_fits(place, method, rank, largest):
    from conftest import TINY_OPTIONS

    adapter = {"method": method, **TINY_OPTIONS[method], "rank": rank, "targets": "all-linear"}
    recipe = place.recipe(adapter=adapter)
    before = place.snapshot()
    refused(["train", recipe], f"the largest rank that fits every target is {largest}")
    refused(["params", "-m", "tiny-llama", "--method", method, "--rank", str(rank)], f"is {largest}")
    assert place.snapshot() == before


def test_an_absurd_mos_budget_is_refused_like_a_rank(place):
    adapter = {"method": "mos", "rank": 4, "equivalent_rank": 100000, "private_rank": 1}
    refused(
        [
            "params",
            "-m",
            "tiny-llama",
            "--method",
            "mos",
            "--set",
            "rank=4",
            "--set",
            "equivalent_rank=100000",
        ],
        "adapter.equivalent_rank: 100000 is larger",
    )
    recipe = place.recipe(adapter=adapter)
    refused(["train", recipe], "adapter.equivalent_rank: 100000 is larger than the layers it adapts allow")


def test_eval_samples_must_leave_examples_to_train_on(place):
    data = {"task": None, "path": str(place.tmp / "data.jsonl")}
    for n in (20, 25):
        refused(
            ["train", place.recipe(data={**data, "eval_samples": n})],
            f"data.eval_samples: {n} is not less than the 20 examples",
        )


def test_max_length_beyond_the_models_context(place):
    refused(
        ["train", place.recipe(data={"max_length": 4096})], "longer than the model's context of 1024 tokens"
    )


def test_chat_roles_the_template_does_not_know(place):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}]}] * 5
    (place.tmp / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = {"task": None, "path": str(place.tmp / "chat.jsonl"), "eval_samples": 1}
    refused(
        ["train", place.recipe(data=data)], "message 2 has role 'asistant'; chat templates know system, user"
    )


def test_a_ragged_csv_names_its_line(place):
    (place.tmp / "d.csv").write_text('prompt,completion\n"a, b",c\nd,e\nf,g,h\ni,j\n')
    data = {"task": None, "path": str(place.tmp / "d.csv"), "eval_samples": 1}
    refused(["train", place.recipe(data=data)], "d.csv line 4 has 3 fields; the header has 2")


# ---------------------------------------------------------------------------------------------------
# Broken artifacts: one line naming the file, nothing written


def _empty(p):
    p.write_bytes(b"")


def _truncated(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p):
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + os.urandom(64))


def _edit(**changes):
    def edit(p):
        meta = json.loads(p.read_text())
        for key, value in changes.items():
            node, *path = key.split(".")
            target = meta
            for part in [node, *path][:-1]:
                target = target[part]
            if value is None:
                target.pop([node, *path][-1])
            else:
                target[[node, *path][-1]] = value
        p.write_text(json.dumps(meta))

    return edit


BREAKAGES = {
    "empty weights": ("adapter.safetensors", _empty, "adapter.safetensors: empty file"),
    "truncated weights": ("adapter.safetensors", _truncated, "adapter.safetensors: corrupt or truncated"),
    "garbage weights": ("adapter.safetensors", _garbage, "adapter.safetensors: corrupt or truncated"),
    "missing weights": ("adapter.safetensors", Path.unlink, "adapter.safetensors: file not found"),
    "another method": ("adapter.json", _edit(method="fossil"), "adapter.json: key 'method' says 'fossil'"),
    "another rank": ("adapter.json", _edit(**{"options.rank": 2}), "adapter.safetensors: tensor"),
    "a missing key": ("adapter.json", _edit(base_model=None), "adapter.json: missing key 'base_model'"),
    "an unknown option": ("adapter.json", _edit(**{"options.ranks": 2}), "invalid adapter option 'ranks'"),
    "corrupt json": ("adapter.json", lambda p: p.write_text("{oops"), "adapter.json: corrupt adapter config"),
    "missing config": ("adapter.json", Path.unlink, "not a shardtune adapter directory"),
}
READERS = {
    "eval": lambda p, d: ["eval", str(d)],
    "generate": lambda p, d: ["generate", "-a", str(d), "hi"],
    "merge": lambda p, d: ["merge", str(d), "--out", str(p.tmp / "out")],
    "export": lambda p, d: ["export", str(d), "--out", str(p.tmp / "out")],
    "routing": lambda p, d: ["routing", str(d)],
    "resume": lambda p, d: ["train", p.recipe(output={"dir": str(p.run)}), "--resume-from", str(d)],
}
ARTIFACT_CASES = [(r, b) for r in READERS for b in BREAKAGES]
# A resumed run builds its adapter from the recipe: an edited adapter.json disagrees with the recipe.
RESUME_MESSAGES = {
    "another rank": "adapter.json: the checkpoint's adapter has rank = 2 but the recipe says",
    "missing config": "checkpoint-2 is not a checkpoint directory (no adapter.json)",
}


@pytest.mark.parametrize("reader,breakage", ARTIFACT_CASES, ids=[f"{r} of {b}" for r, b in ARTIFACT_CASES])
def test_broken_artifacts_are_one_line_naming_the_file_and_nothing_is_written(place, reader, breakage):
    name, breaks, message = BREAKAGES[breakage]
    if reader == "resume":
        message = RESUME_MESSAGES.get(breakage, message)
    directory = place.run / "checkpoint-2" if reader == "resume" else place.run
    breaks(directory / name)
    args = READERS[reader](place, directory)  # (writes the recipe of a resume first)
    before = place.snapshot()
    refused(args, message)
    assert place.snapshot() == before


@pytest.mark.parametrize("how", [_truncated, Path.unlink], ids=["truncated", "missing"])
@pytest.mark.parametrize("name", ["optimizer.safetensors", "rng.safetensors", "trainer_state.json"])
def test_resume_from_a_checkpoint_with_a_broken_training_state(place, name, how):
    checkpoint = place.run / "checkpoint-2"
    how(checkpoint / name)
    recipe = place.recipe(output={"dir": str(place.run)})
    before = place.snapshot()
    refused(["train", recipe, "--resume"], name)
    assert place.snapshot() == before


def test_resume_with_another_adapter_than_the_checkpoints(place):
    recipe = place.recipe(output={"dir": str(place.run)})
    before = place.snapshot()
    refused(["train", recipe, "--resume", "--set", "adapter.rank=8"], "the checkpoint's adapter has rank = 4")
    refused(["train", recipe, "--resume", "--set", "adapter.alpha=2"], "recipe says adapter.alpha = 2.0")
    assert place.snapshot() == before


def test_eval_of_a_run_without_its_recipe(place):
    (place.run / "recipe.yaml").unlink()
    before = place.snapshot()
    refused(["eval", str(place.run)], "no recipe.yaml")
    assert place.snapshot() == before


# ---------------------------------------------------------------------------------------------------
# Resume and signals


def test_after_a_resume_each_step_is_in_the_metrics_once_and_no_warning_is_printed(place):
    recipe = place.recipe(
        output={"dir": str(place.tmp / "r")},
        train={"max_steps": 8, "save_every": 2, "keep_checkpoints": 10},
        logging={"every": 1},
    )
    assert runner.invoke(app, ["train", recipe, "-q"]).exit_code == 0
    metrics = place.tmp / "r" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 9))
    # as after a kill at step 8: resume from step 4 in place
    result = runner.invoke(
        app, ["train", recipe, "-q", "--json", "--resume-from", str(place.tmp / "r" / "checkpoint-2")]
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no library warning (e.g. torch's lr_scheduler order) under -q/--json
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 9))


def test_sigterm_names_the_command_that_resumes_exactly_with_the_overrides(tmp_path):
    raw = tiny_recipe(tmp_path, adapter={"method": "lora", "rank": 4, "dropout": 0.1})
    raw["train"].update({"max_steps": 400, "save_every": 5, "batch_size": 4})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    overrides = ["--set", "train.lr=0.02", "--set", "train.max_steps=60"]
    reference = shardtune_process("train", path, "-q", *overrides, "--set", f"output.dir={tmp_path / 'ref'}")
    assert reference.wait(timeout=300) == 0
    proc = shardtune_process("train", path, "-q", *overrides)
    wait_for(tmp_path / "run" / "checkpoint-5", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    command = re.search(r"continue with: (shardtune train \S+ --resume)$", err.strip()).group(1)
    assert command == f"shardtune train {tmp_path / 'run' / 'recipe.yaml'} --resume"
    resumed = shardtune_process(*command.split()[1:])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    ref, got = (
        load_file(tmp_path / "ref" / "adapter.safetensors"),
        load_file(tmp_path / "run" / "adapter.safetensors"),
    )
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # bit for bit, overrides included


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_the_first_optimizer_step_changes_the_adapter(place, schedule):
    recipe = place.recipe(
        output={"dir": str(place.tmp / "one")},
        train={"max_steps": 1, "warmup_steps": 10, "schedule": schedule},
    )
    assert runner.invoke(app, ["train", recipe, "-q"]).exit_code == 0
    tensors = load_file(place.tmp / "one" / "adapter.safetensors")
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # B starts at zero
    (lr,) = [
        json.loads(line)["lr"] for line in (place.tmp / "one" / "metrics.jsonl").read_text().splitlines()
    ]
    assert lr == pytest.approx(0.01 / 10)


def test_rank_without_world_size_is_one_process(place, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = runner.invoke(app, ["train", place.recipe(output={"dir": str(place.tmp / "r")}), "--json", "-q"])
    assert result.exit_code == 0 and json.loads(result.stdout)["steps"] == 12
    refused(["eval", str(place.tmp / "none")], "no such run")  # the error is said, not left to "rank 0"


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_shardtune_debug_off_values_keep_the_one_line(place, monkeypatch, value):
    import shardtune.training.loop

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(shardtune.training.loop, "load_model", broken)
    monkeypatch.setenv("SHARDTUNE_DEBUG", value)
    refused(
        ["train", place.recipe(output={"dir": str(place.tmp / "r")})], "internal error: RuntimeError: boom", 1
    )


# ---------------------------------------------------------------------------------------------------
# Files others can read


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_follow_the_umask(place, mask):
    previous = os.umask(mask)
    try:
        recipe = place.recipe(output={"dir": str(place.tmp / "r")}, train={"max_steps": 2, "save_every": 1})
        assert runner.invoke(app, ["train", recipe, "-q"]).exit_code == 0
        export = ["export", str(place.tmp / "r"), "--out", str(place.tmp / "peft")]
        assert runner.invoke(app, export).exit_code == 0
        merge = ["merge", str(place.tmp / "r"), "--out", str(place.tmp / "merged")]
        assert runner.invoke(app, merge).exit_code == 0
    finally:
        os.umask(previous)
    run = place.tmp / "r"
    files = [run / "adapter.safetensors", run / "adapter.json", run / "recipe.yaml", run / "result.json"]
    files += [run / "checkpoint-1" / "optimizer.safetensors", place.tmp / "peft" / "adapter_config.json"]
    files += [place.tmp / "peft" / "adapter_model.safetensors", place.tmp / "merged" / "model.safetensors"]
    dirs = [run, run / "checkpoint-1", place.tmp / "peft", place.tmp / "merged"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    for d in dirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask, d


def test_at_least_30_new_cases():
    import inspect

    module = sys.modules[__name__]
    count = 0
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if name.startswith("test_"):
            marks = getattr(fn, "pytestmark", [])
            count += max([len(m.args[1]) for m in marks if m.name == "parametrize"] or [1])
    assert count >= 30, count


# ---------------------------------------------------------------------------------------------------
# A local base model: safetensors only, and a broken weights file is one line


def _pickled_only(model_dir: Path) -> None:
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()


BASE_BREAKAGES = {
    "pickled weights only": (_pickled_only, "has only pickled weights (pytorch_model.bin)"),
    "truncated weights": (
        lambda d: _truncated(d / "model.safetensors"),
        "model.safetensors: corrupt or truncated",
    ),
    "empty weights": (
        lambda d: (d / "model.safetensors").write_bytes(b""),
        "model.safetensors: corrupt or truncated",
    ),
}
BASE_READERS = {
    "train": lambda p, m: ["train", p.recipe(model={"name": m}, output={"dir": str(p.tmp / "new")})],
    "generate": lambda p, m: ["generate", "-m", m, "hi"],
    "merge": lambda p, m: ["merge", str(p.run), "--base-model", m, "--out", str(p.tmp / "out")],
    "prune": lambda p, m: ["prune", m, "--out", str(p.tmp / "out"), "--pattern", "2:4"],
}
BASE_CASES = [(r, b) for r in BASE_READERS for b in BASE_BREAKAGES]


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory) -> Path:
    """tiny-llama saved as a model directory (safetensors weights, config, tokenizer)."""
    from shardtune.models.loading import load_model

    where = tmp_path_factory.mktemp("base") / "tiny"
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


@pytest.mark.parametrize("reader,breakage", BASE_CASES, ids=[f"{r} of {b}" for r, b in BASE_CASES])
def test_a_local_base_model_loads_from_safetensors_only_and_broken_weights_are_one_line(
    place, saved_base, reader, breakage
):
    model_dir = place.tmp / "base"
    shutil.copytree(saved_base, model_dir)
    breaks, message = BASE_BREAKAGES[breakage]
    breaks(model_dir)
    args = BASE_READERS[reader](place, str(model_dir))
    before = place.snapshot()
    refused(args, message)
    assert place.snapshot() == before


def test_the_saved_base_loads_whole(place, saved_base):
    result = runner.invoke(app, ["generate", "-m", str(saved_base), "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "methods,message",
    [
        ("", "--methods: names no method"),
        (" , ", "--methods: names no method"),
        ("lora,lora", "--methods: lora is given twice"),
        ("lora,,fossil", "has an empty name between its commas"),
    ],
)
def test_compare_needs_each_method_once(place, methods, message):
    recipe = place.recipe(output={"dir": str(place.tmp / "cmp")})
    before = place.snapshot()
    refused(["compare", recipe, "--methods", methods], message)
    assert place.snapshot() == before


def test_resume_with_another_method_names_the_method(place):
    recipe = place.recipe(output={"dir": str(place.run)}, adapter={"method": "fossil", "rank": 4})
    refused(
        ["train", recipe, "--resume-from", str(place.run / "checkpoint-2")],
        "the checkpoint's adapter has method = 'lora' but the recipe says adapter.method = 'fossil'",
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["hi", "--temperature", "inf"], "--temperature: must be a finite number, got inf"),
        ([""], "PROMPT: prompt 1 is empty"),
        (["hi", "  "], "PROMPT: prompt 2 is empty"),
    ],
)
def test_generate_refuses_what_it_cannot_answer(place, args, message):
    before = place.snapshot()
    refused(["generate", "-a", str(place.run), *args], message)
    assert place.snapshot() == before


def test_rotating_checkpoints_never_follows_a_link_named_like_a_checkpoint(tmp_path):
    """checkpoint-1 → a user's directory of checkpoint-like files: rotation deletes nothing there."""
    from shardtune.artifacts.checkpoint import CHECKPOINT_FILES, rotate_checkpoints

    theirs = tmp_path / "elsewhere"
    theirs.mkdir()
    for name in CHECKPOINT_FILES:
        (theirs / name).write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-1").symlink_to(theirs)
    for step in (2, 3):
        (run / f"checkpoint-{step}").mkdir()
        for name in CHECKPOINT_FILES:
            (run / f"checkpoint-{step}" / name).write_text("x")
    rotate_checkpoints(run, keep=1)
    assert sorted(p.name for p in theirs.iterdir()) == sorted(CHECKPOINT_FILES)
    assert (run / "checkpoint-1").is_symlink() and not (run / "checkpoint-2").exists()


def test_init_through_a_link_and_dotdot_never_replaces_the_users_file(place):
    """`init NAME runs/latest/../x.yaml` (runs/latest → store/target) writes store/x.yaml, the file the
    kernel reaches: a copy init wrote at runs/x.yaml does not make the user's store/x.yaml replaceable."""
    runs, store = place.tmp / "runs", place.tmp / "store"
    (store / "target").mkdir(parents=True)
    (runs / "latest").symlink_to(store / "target")
    assert runner.invoke(app, ["init", "tiny", str(runs / "x.yaml")]).exit_code == 0  # init's own copy
    (store / "x.yaml").write_text("my recipe\n")
    before = place.snapshot()
    refused(["init", "tiny", f"{runs}/latest/../x.yaml", "--overwrite"], "shardtune did not write it")
    assert place.snapshot() == before
    (store / "x.yaml").unlink()
    assert runner.invoke(app, ["init", "tiny", f"{runs}/latest/../x.yaml"]).exit_code == 0
    after = place.snapshot()
    assert (store / "x.yaml").read_text().startswith("# ") and after["runs/x.yaml"] == before["runs/x.yaml"]
