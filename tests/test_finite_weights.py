"""Non-finite adapters are never written and never read: the weights themselves are checked before a
checkpoint, ``best/`` or the final adapter is written (exit 3, nothing written from them), a checkpoint
with a broken optimizer state is refused before a resume writes anything, and every command that
reads an adapter refuses NaN, infinity or integer factors in one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from shardtune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at 2 (and its PEFT export), copied by each test."""
    tmp = tmp_path_factory.mktemp("finite")
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp, train={"max_steps": 4, "save_every": 2})))
    assert runner.invoke(app, ["train", str(path), "-q"]).exit_code == 0
    assert runner.invoke(app, ["export", str(tmp / "run"), "--out", str(tmp / "peft")]).exit_code == 0
    return tmp


def one_line_error(result, expected: str, code: int = 2) -> str:
    err = result.stderr.strip()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def poison_at():
    """``poison_at(n)``: after the n-th optimizer step, the first adapter parameter becomes NaN."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handles = []

    def arm(n: int, value: float = float("nan")):
        steps = {"done": 0}

        def hook(optimizer, args, kwargs):
            steps["done"] += 1
            if steps["done"] == n:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(value)

        handles.append(register_optimizer_step_post_hook(hook))

    yield arm
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_made_non_finite_by_the_last_step_are_not_written(tmp_path, poison_at, value):
    """The loss of the last step was computed before its update: finite. The update broke the
    weights: exit 3, no adapter and no result.json."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, train={"max_steps": 4})))
    poison_at(4, value)
    err = one_line_error(runner.invoke(app, ["train", str(path), "-q"]), "adapter weights became NaN", 3)
    assert "by step 4" in err and "lower train.lr" in err
    run = tmp_path / "run"
    assert (run / "recipe.yaml").is_file()  # the run started: the refusal came at its end
    assert not (run / "adapter.safetensors").exists() and not (run / "result.json").exists()


def test_weights_broken_at_a_save_step_write_no_checkpoint(tmp_path, poison_at):
    path = tmp_path / "r.yaml"
    raw = tiny_recipe(tmp_path, train={"max_steps": 6, "save_every": 2}, logging={"every": 100})
    path.write_text(yaml.safe_dump(raw))
    poison_at(4)
    err = one_line_error(runner.invoke(app, ["train", str(path), "-q"]), "became NaN or infinite", 3)
    run = tmp_path / "run"
    assert (run / "checkpoint-2").is_dir() and not (run / "checkpoint-4").exists()
    assert f"last good checkpoint: {run / 'checkpoint-2'}" in err


def test_keep_best_never_writes_a_non_finite_best(tmp_path, poison_at):
    """eval at every step with keep_best: the weights broken by step 2 stop the run before best/ is
    written from them (best/ keeps step 1's adapter, finite)."""
    path = tmp_path / "r.yaml"
    raw = tiny_recipe(tmp_path, train={"max_steps": 4}, eval={"every": 1}, output={"keep_best": True})
    path.write_text(yaml.safe_dump(raw))
    poison_at(2, float("inf"))
    one_line_error(runner.invoke(app, ["train", str(path), "-q"]), "became NaN or infinite", 3)
    best = tmp_path / "run" / "best" / "adapter.safetensors"
    assert not best.exists() or all(torch.isfinite(t).all() for t in load_file(best).values())


@pytest.mark.parametrize(
    "name,how",
    [
        ("exp_avg", "nan"),
        ("exp_avg_sq", "negative"),
        ("exp_avg_sq", "inf"),
        ("step", "negative"),
    ],
)
def test_resume_refuses_a_broken_optimizer_state_before_writing(tmp_path, trained, name, how):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    state_file = run / "checkpoint-2" / "optimizer.safetensors"
    state = load_file(state_file)
    key = next(k for k in sorted(state) if k.endswith(f".{name}"))
    state[key] = {"nan": state[key] * float("nan"), "inf": state[key] + float("inf")}.get(
        how, -(state[key].abs() + 1)
    )
    save_file(state, state_file)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["output"]["dir"] = str(run)
    recipe["train"]["max_steps"] = 6
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--resume", "-q"])
    word = "NaN or infinity" if how in ("nan", "inf") else "negative numbers"
    err = one_line_error(result, word)
    assert str(state_file) in err and repr(key) in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def damage_rng(run: Path) -> tuple[Path, str]:
    path = run / "checkpoint-2" / "rng.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, path)  # a zeroed generator
    return path, "tensor 'torch_cpu' is not a valid CPU random state"


def damage_metrics(how: str):
    def damage(run: Path) -> tuple[Path, str]:
        path = run / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        lines.insert(1, {"garbage": "garbage\n", "step": '{"step": "x"}\n', "list": "[1, 2]\n"}[how])
        path.write_text("".join(lines))
        return path, "line 2 is not a metrics record"

    return damage


@pytest.mark.parametrize(
    "damage",
    [damage_rng, damage_metrics("garbage"), damage_metrics("step"), damage_metrics("list")],
    ids=["rng-zeroed", "metrics-garbage", "metrics-step", "metrics-list"],
)
def test_resume_names_damaged_run_state_before_writing(tmp_path, trained, damage):
    """Every file a resume reads is checked first: a damaged one is one line naming it, and nothing in
    the run is written (not the log, not the metrics)."""
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    path, what = damage(run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["output"]["dir"] = str(run)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--resume", "-q"])
    err = one_line_error(result, what)
    assert err.startswith(f"error: {path}: ")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_metrics_line_cut_short_by_a_kill_is_no_damage(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 9, "lo')
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["output"]["dir"] = str(run)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert all(line.endswith("}") for line in (run / "metrics.jsonl").read_text().splitlines())


def broken_copy(tmp_path: Path, source: Path, file: str, make) -> Path:
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    tensors = load_file(copy / file)
    first = sorted(tensors)[0]
    tensors[first] = make(tensors[first])
    save_file(tensors, copy / file)
    return copy


READERS = {
    "merge": lambda a, out: ["merge", str(a), "--out", str(out), "--dtype", "fp32"],
    "export": lambda a, out: ["export", str(a), "--out", str(out)],
    "export-native": lambda a, out: ["export", str(a), "--format", "shardtune", "--out", str(out)],
    "eval": lambda a, out: ["eval", str(a), "--samples", "2", "--data", str(a.parent.parent / "data.jsonl")],
    "generate": lambda a, out: ["generate", "-a", str(a), "hello", "--max-new-tokens", "2"],
}
BREAKS = {
    "nan": (lambda t: t * float("nan"), "holds NaN or infinity"),
    "inf": (lambda t: t + float("inf"), "holds NaN or infinity"),
    "int": (lambda t: t.to(torch.int32), "expected floating point"),
    "bool": (lambda t: t != 0, "expected floating point"),
}


# (a PEFT adapter is not exported to shardtune's format: its own one-line error, tested elsewhere)
READ_CASES = [(c, s) for c in READERS for s in ("run", "peft") if (c, s) != ("export-native", "peft")]


@pytest.mark.parametrize("command,source", READ_CASES, ids=[f"{c}-{s}" for c, s in READ_CASES])
def test_every_command_refuses_a_non_finite_or_integer_adapter(tmp_path, trained, command, source):
    file = "adapter.safetensors" if source == "run" else "adapter_model.safetensors"
    rows = [{"prompt": f"say {i}", "completion": f" {i}"} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for broken, (make, message) in BREAKS.items():
        adapter = broken_copy(tmp_path / broken, trained / source, file, make)
        out = tmp_path / broken / "out"
        err = one_line_error(runner.invoke(app, READERS[command](adapter, out)), message)
        assert str(adapter / file) in err
        assert not out.exists()


def test_init_from_refuses_a_non_finite_adapter(tmp_path, trained):
    adapter = broken_copy(tmp_path, trained / "run", "adapter.safetensors", BREAKS["nan"][0])
    raw = tiny_recipe(tmp_path, adapter={"init_from": str(adapter)}, train={"max_steps": 2})
    raw["output"]["dir"] = str(tmp_path / "new")
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "r.yaml"), "-q"]), "holds NaN or infinity")
    assert not (tmp_path / "new").exists()
