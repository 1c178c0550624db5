"""Reliability: resume after SIGKILL, SIGTERM, NaN, gradient checkpointing, several processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file

from shardtune.errors import Diverged
from shardtune.recipe import recipe_from_dict
from shardtune.train import train

ROOT = Path(__file__).parents[1]


def write(tmp_path, name, **sections) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, output={"dir": str(tmp_path / name)}, **sections)))
    return path


def shardtune(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "shardtune", "train", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=1e-5, msg=k)


LONG = {
    "adapter": {"method": "lora", "rank": 4, "dropout": 0.1},  # dropout: the RNG state must be restored
    "train": {"max_steps": 160, "save_every": 10, "batch_size": 4, "grad_accum": 2},
    "data": {"num_samples": 200},
}


def test_sigkill_then_resume_gives_the_same_adapter(tmp_path):
    reference = write(tmp_path, "ref", **LONG)
    killed = write(tmp_path, "killed", **LONG)
    assert shardtune(reference, "-q").wait(timeout=300) == 0

    proc = shardtune(killed, "-q")
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-30").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()  # it really died mid-run

    resumed = shardtune(killed, "--resume", "-q")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    same_adapter(tmp_path / "ref", tmp_path / "killed")


def test_resume_from_a_named_checkpoint(tmp_path):
    recipe = write(
        tmp_path, "run", adapter={"method": "fossil", "rank": 4}, train={"max_steps": 12, "save_every": 4}
    )
    assert shardtune(recipe, "-q").wait(timeout=300) == 0
    first = load_file(tmp_path / "run" / "adapter.safetensors")
    proc = shardtune(recipe, "--resume", tmp_path / "run" / "checkpoint-8", "-q")
    assert proc.wait(timeout=300) == 0
    again = load_file(tmp_path / "run" / "adapter.safetensors")
    for k in first:
        torch.testing.assert_close(first[k], again[k], atol=1e-6, rtol=1e-5)


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    recipe = write(tmp_path, "run", **LONG)
    proc = shardtune(recipe)
    deadline = time.time() + 120
    while (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        or not (tmp_path / "run" / "metrics.jsonl").read_text()
    ):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert list((tmp_path / "run").glob("checkpoint-*"))
    assert shardtune(recipe, "--resume", "-q").wait(timeout=300) == 0


def test_nan_loss_stops_with_exit_3_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, train={"max_steps": 12, "save_every": 3}))
    from transformers import LlamaForCausalLM

    real_forward = LlamaForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 5 and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    with pytest.raises(Diverged, match=r"loss became nan at step 5.*checkpoint-3") as err:
        train(recipe)
    assert err.value.exit_code == 3
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter.safetensors").values())


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    base = {"adapter": {"method": "sharelora", "rank": 4}, "train": {"max_steps": 5}}
    train(recipe_from_dict(tiny_recipe(tmp_path / "a", **base)))
    gc = {**base, "train": {"max_steps": 5, "gradient_checkpointing": True}}
    train(recipe_from_dict(tiny_recipe(tmp_path / "b", **gc)))
    same_adapter(tmp_path / "a" / "run", tmp_path / "b" / "run")


@pytest.mark.parametrize("method", ["lora", "mos", "sharelora"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, method):
    """2 gloo processes × batch 4 == 1 process × batch 8 (equal-length examples: equal token weights)."""
    rows = [
        {"prompt": f"copy {a}{b}{c} =", "completion": f" {a}{b}{c}"}
        for a in "abcd"
        for b in "abcd"
        for c in "abcd"
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    from conftest import TINY_OPTIONS

    sections = {
        "adapter": {"method": method, **TINY_OPTIONS[method]},
        "data": {"task": None, "path": str(data), "eval_samples": 0, "chat_template": False},
        "train": {"max_steps": 6, "batch_size": 8},
    }
    one = write(tmp_path, "one", **sections)
    two = write(tmp_path, "two", **{**sections, "train": {"max_steps": 6, "batch_size": 4}})
    assert shardtune(one, "-q").wait(timeout=300) == 0
    proc = shardtune(two, "--nproc", "2", "-q", env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # all-reduce sums in another order; a wrong global batch or data split differs by ~1e-2
    same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-4)
    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count("adapter written") == 1  # only the main process writes files and logs


def test_unconnected_processes_are_refused(tmp_path, monkeypatch):
    from shardtune.errors import BadInput

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BadInput, match="2 processes were launched but they are not connected"):
        train(recipe_from_dict(tiny_recipe(tmp_path)))
