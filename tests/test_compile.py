"""`train.compile`: each decoder block compiled in place (regional compilation). The compiled run
trains the same adapter as the eager one, with gradient checkpointing and under DDP too; the first
step's compile time is reported apart; FSDP is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_recipe
from test_reliability import copy_task, same_adapter, train_here, two_processes, write
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.core.errors import RecipeError
from shardtune.core.progress import Reporter
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import compile_blocks, train

runner = CliRunner()


@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("mos", True)])
def test_compiled_blocks_train_the_same_adapter(tmp_path, capsys, method, checkpointing):
    """LoRA takes the fused layer inside the compiled graph; MoS gathers its shards there (and with
    gradient checkpointing the blocks are recomputed by the compiled code)."""
    sections = {"adapter": {"method": method, **TINY_OPTIONS[method]}}
    settings = {
        "max_steps": 4,
        "batch_size": 8,
        "lr": 1e-2,
        "seed": 0,
        "gradient_checkpointing": checkpointing,
    }
    eager = train(recipe_from_dict(tiny_recipe(tmp_path / "eager", **sections, train=settings)))
    compiled = train(
        recipe_from_dict(tiny_recipe(tmp_path / "compiled", **sections, train={**settings, "compile": True})),
        Reporter(quiet=False),
    )
    # same keys (Module.compile keeps the parameter names), values within fused-kernel rounding
    same_adapter(tmp_path / "eager" / "run", tmp_path / "compiled" / "run", atol=1e-5)
    assert compiled.eval_loss == pytest.approx(eager.eval_loss, rel=1e-5)
    assert eager.compile_seconds == 0 and compiled.compile_seconds > 0
    written = json.loads((tmp_path / "compiled" / "run" / "result.json").read_text())
    assert written["compile_seconds"] == compiled.compile_seconds
    err = capsys.readouterr().err
    assert "train.compile: LlamaDecoderLayer blocks compile on the first step" in err
    assert "train.compile: first step" in err and "(compiling included)" in err
    torch._dynamo.reset()


def test_every_decoder_block_is_compiled_and_a_model_without_blocks_is_refused():
    from shardtune.models.loading import build_tiny_model

    model = build_tiny_model("tiny-llama")
    assert compile_blocks(model) == ["LlamaDecoderLayer"]
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == model.config.num_hidden_layers
    with pytest.raises(RecipeError, match="train.compile: this model names no decoder blocks to compile"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    torch._dynamo.reset()


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_refused_before_training(tmp_path, monkeypatch):
    import shardtune.training.loop

    monkeypatch.setattr(shardtune.training.loop.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, train={"compile": True}))
    with pytest.raises(RecipeError, match=r"train.compile: compiling on the CPU needs a C\+\+ compiler"):
        train(recipe)


def test_compile_with_fsdp_is_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny_recipe(tmp_path, train={"compile": True, "strategy": "fsdp"})))
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "train: compile: true does not work with strategy: fsdp" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_blocks_under_ddp_train_what_one_eager_process_trains(tmp_path):
    sections = {
        "adapter": {"method": "lora", **TINY_OPTIONS["lora"]},
        "data": {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False},
        "train": {"max_steps": 4, "batch_size": 8},
    }
    one = write(tmp_path, "one", **sections)
    two = write(tmp_path, "two", **{**sections, "train": {"max_steps": 4, "batch_size": 4, "compile": True}})
    train_here(one)
    two_processes(two)
    same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-4)
    assert json.loads((tmp_path / "two" / "result.json").read_text())["compile_seconds"] > 0


def test_no_working_cpp_compiler_is_one_line_naming_train_compile(tmp_path):
    """torch.compile on a CPU machine without a working C++ compiler (inductor's own error, in a
    process of its own so that no compiler check is cached): the recipe key, what to do, exit 2."""
    import os
    import subprocess
    import sys

    import yaml

    recipe = tiny_recipe(tmp_path, train={"max_steps": 2, "compile": True})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {
        **os.environ,
        "CXX": "/bin/false",
        "CC": "/bin/false",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "shardtune", "train", str(tmp_path / "r.yaml"), "-q"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: train.compile: torch.compile failed on this machine (") and "C++" in line
    assert "set train.compile: false" in line and not (tmp_path / "run" / "adapter.safetensors").exists()
