"""train.strategy: deepspeed — DeepSpeed ZeRO (stages 1-3, offload) through Accelerate's plugin, run on
CPUs: DeepSpeed's CPU accelerator, its processes connected over gloo (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from conftest import TINY_OPTIONS, copy_task
from safetensors.torch import load_file
from test_reliability import same_adapter, train_here, two_processes, write

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'shardtune[deepspeed]')")

pytestmark = pytest.mark.xdist_group("deepspeed")  # its processes on one worker, one run at a time

STORES = {"mos": 14, "sharelora": 7, "vblora": 1, "vera": 2, "lora": 0, "fossil": 0}  # (VeRA's: buffers)


def sections(tmp_path, method: str, **train) -> dict:
    return {
        "adapter": {"method": method, **TINY_OPTIONS[method]},
        "data": {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False},
        "train": {"max_steps": 6, "batch_size": 8, **train},
    }


@pytest.mark.parametrize(
    "method,stage,offload",
    [
        ("lora", 1, False),  # (with gradient accumulation: 2 processes × batch 2 × 2 micro-batches)
        ("mos", 2, False),  # the MoS pools: one entry each of the flat vector, gathered by the root
        ("mos", 3, True),  # pools partitioned, assembled after DeepSpeed gathers them; state in CPU memory
        ("sharelora", 3, False),  # one A per layer type, used by every layer
        ("vblora", 3, False),  # the one bank
        ("vera", 2, True),  # frozen projections at the root: buffers, not partitioned
        ("fossil", 3, False),  # the fused forward reads the base weight itself (a ZeRO-3 leaf)
    ],
)
def test_zero_on_two_processes_trains_what_one_process_trains(tmp_path, method, stage, offload):
    """2 processes × batch 4 under ZeRO == 1 process × batch 8 (plain), every shared store partitioned
    once; nothing on stdout or stderr under -q."""
    one = write(tmp_path, "one", **sections(tmp_path, method))
    zero = {"stage": stage, "offload_optimizer": offload, "offload_params": offload and stage == 3}
    if (
        stage == 3
    ):  # every weight partitioned (DeepSpeed keeps tensors under 1e5 elements whole: all of these)
        zero["persistence_threshold"] = 0
    batch = {"batch_size": 2, "grad_accum": 2} if stage == 1 else {"batch_size": 4}
    two = write(tmp_path, "two", **sections(tmp_path, method, **batch, strategy="deepspeed", deepspeed=zero))
    train_here(one)
    done = two_processes(two)
    assert done.stdout == "" and done.stderr == ""
    same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-4)  # a wrong split or batch: ~1e-2

    run = tmp_path / "two"
    log = (run / "train.log").read_text()
    layout = json.loads(re.search(r"deepspeed layout: (\{.*\})", log).group(1))
    trainable = json.loads((run / "result.json").read_text())["trainable_parameters"]
    stores = sum(k.startswith("shardtune_stores.") for k in load_file(run / "adapter.safetensors"))
    assert stores == STORES[method]
    # each trainable tensor once (a store used by every layer too), and nothing else
    assert layout["stage"] == stage and layout["offload_optimizer"] == offload
    assert layout["tensors"] == layout["distinct"] == layout["trainable_tensors"]
    assert layout["elements"] == trainable
    assert layout["partitioned"] == (layout["parameters"] if stage == 3 else 0)
    if stage == 3:  # each layer gathers what it reads at once, the stores with the root: no read on its own
        assert "deepspeed gathered on access: 0 parameters" in log
    assert (
        f"DeepSpeed ZeRO-{stage} over 2 processes: the adapter's {layout['tensors']} tensors "
        f"({trainable:,} parameters, each once" in log
    )
    assert log.count("adapter written") == 1


def test_zero_checkpoints_resume_under_any_stage_ddp_and_one_process(tmp_path):
    """A ZeRO checkpoint holds whole tensors and per-parameter moments: resumed under another stage it
    ends where the uninterrupted run ended; on one process (DDP) too; and a one-process checkpoint
    resumes under ZeRO."""
    method = "mos"
    ref = {
        "max_steps": 8,
        "batch_size": 4,
        "save_every": 4,
        "lr_ratio_b": 4.0,  # two param groups, A's and B's: ZeRO keeps a flat vector for each
        "strategy": "deepspeed",
        "deepspeed": {"stage": 2},
    }
    two_processes(write(tmp_path, "ref", **sections(tmp_path, method, **ref)))
    checkpoint = tmp_path / "ref" / "checkpoint-4"
    moments = load_file(checkpoint / "optimizer.safetensors")
    adapter = load_file(checkpoint / "adapter.safetensors")
    assert moments["state.0.exp_avg"].shape == adapter["shardtune_stores.pools.A_q_proj"].shape  # whole
    assert float(moments["state.0.step"]) == 4
    assert any(float(v.abs().sum()) > 0 for k, v in moments.items() if k.endswith("exp_avg_sq"))

    assert len(json.loads((checkpoint / "trainer_state.json").read_text())["param_groups"]) == 2
    stage3 = {**ref, "deepspeed": {"stage": 3, "offload_optimizer": True}}
    two_processes(
        write(tmp_path, "again", **sections(tmp_path, method, **stage3)), "--resume-from", checkpoint
    )
    same_adapter(tmp_path / "ref", tmp_path / "again", atol=1e-6)

    one = {"max_steps": 8, "batch_size": 8, "save_every": 4, "lr_ratio_b": 4.0}
    from shardtune.recipe.schema import load_recipe
    from shardtune.training.loop import train

    train(load_recipe(write(tmp_path, "one", **sections(tmp_path, method, **one))), resume=checkpoint)
    same_adapter(tmp_path / "ref", tmp_path / "one", atol=1e-4)

    # and the other way round: a one-process run's checkpoint, continued under ZeRO-3
    train(load_recipe(write(tmp_path, "plain", **sections(tmp_path, method, **one))))
    two_processes(
        write(tmp_path, "back", **sections(tmp_path, method, **stage3)),
        "--resume-from",
        tmp_path / "plain" / "checkpoint-4",
    )
    same_adapter(tmp_path / "plain", tmp_path / "back", atol=1e-4)


def test_one_process_runs_zero_in_a_world_of_one_and_leaves_the_process_as_it_was(tmp_path):
    """Unlaunched, strategy: deepspeed runs ZeRO in a process group of one (its offload is what one
    GPU gains): the same adapter as a plain run; afterwards the process group is closed and the
    environment is as before, so a plain run in the same process is plain again."""
    import torch.distributed as dist

    before = dict(os.environ)
    plain = write(tmp_path, "plain", **sections(tmp_path, "lora"))
    zero = write(
        tmp_path,
        "zero",
        **sections(tmp_path, "lora", strategy="deepspeed", deepspeed={"stage": 3, "offload_optimizer": True}),
    )
    train_here(zero)
    assert not dist.is_initialized() and dict(os.environ) == before
    assert "DeepSpeed ZeRO-3 over 1 processes" in (tmp_path / "zero" / "train.log").read_text()
    train_here(plain)
    assert "DeepSpeed" not in (tmp_path / "plain" / "train.log").read_text()
    same_adapter(tmp_path / "plain", tmp_path / "zero", atol=1e-5)


def test_zero3_composes_with_bf16_checkpointing_lors_init_and_scoring(tmp_path):
    """LoRS's gradient init (on the whole model, before the engine), bf16 autocast, gradient
    checkpointing and exact-match scoring (generation in lockstep, every layer gathered) under
    ZeRO-3 with offload; its adapter loads in one process."""
    recipe = write(
        tmp_path,
        "run",
        adapter={"method": "lors", "rank": 4, "alpha": 4, "init": "gradient", "init_samples": 8},
        train={
            "max_steps": 8,
            "batch_size": 4,
            "precision": "bf16",
            "gradient_checkpointing": True,
            "strategy": "deepspeed",
            "deepspeed": {"stage": 3, "offload_optimizer": True, "offload_params": True},
        },
        eval={"score": True, "score_base": True, "max_new_tokens": 8, "batch_size": 8},
    )
    two_processes(recipe)
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 8 and result["task_score"] is not None and result["task_score_base"] is not None
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    log = (run / "train.log").read_text()
    assert "initialised from the dense gradient" in log and "tuned model: exact match" in log
    from shardtune.artifacts.checkpoint import load_adapted_model

    model, _, meta = load_adapted_model(run)
    assert meta["trainable_parameters"] == result["trainable_parameters"]
    assert all(p.numel() > 0 for p in model.parameters())  # whole tensors, not partitions


def test_without_deepspeed_the_strategy_is_one_line(tmp_path, monkeypatch):
    """No deepspeed package: one line naming the recipe key and the install command, exit 2."""
    from typer.testing import CliRunner

    from shardtune.cli import app

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed → ImportError
    recipe = write(tmp_path, "run", **sections(tmp_path, "lora", strategy="deepspeed"))
    result = CliRunner().invoke(app, ["train", str(recipe), "-q"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [
        "error: train.strategy: deepspeed needs the deepspeed package: pip install 'shardtune[deepspeed]' "
        "(or strategy: fsdp, which needs nothing more; docs/distributed.md maps a ZeRO config onto it)"
    ]
    assert not (tmp_path / "run").exists()


def test_grad_norm_is_deepspeeds_and_clipping_follows_the_recipe(tmp_path):
    """The logged gradient norm is the one DeepSpeed clipped by (train.max_grad_norm): the same as
    a plain run's, step by step; with max_grad_norm 0 nothing is clipped and no norm is logged."""
    plain = write(tmp_path, "plain", **sections(tmp_path, "lora", max_grad_norm=0.05))
    zero = write(tmp_path, "zero", **sections(tmp_path, "lora", max_grad_norm=0.05, strategy="deepspeed"))
    train_here(plain)
    train_here(zero)

    def norms(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["grad_norm"] for line in lines]

    assert norms("plain") == pytest.approx(norms("zero"), rel=1e-4)
    same_adapter(tmp_path / "plain", tmp_path / "zero", atol=1e-5)  # clipped alike (0.05 clips)
    off = write(tmp_path, "off", **sections(tmp_path, "lora", max_grad_norm=0, strategy="deepspeed"))
    train_here(off)
    assert set(norms("off")) == {None}
    assert not torch.equal(
        load_file(tmp_path / "off" / "adapter.safetensors")["model.layers.0.self_attn.q_proj.adapter.lora_B"],
        load_file(tmp_path / "zero" / "adapter.safetensors")[
            "model.layers.0.self_attn.q_proj.adapter.lora_B"
        ],
    )
