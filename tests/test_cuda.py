"""CUDA checks, run on a GPU machine (`bash benchmarks/gpu_check.sh`); skipped where there is no GPU.

bf16 autocast over a bf16 base with fp32 adapters — what `train.precision: bf16` with
`model.dtype: bfloat16` trains — through the fused layer, against the general path on the same GPU;
MoS's per-step assembly against per-layer gathers; and short bf16 training runs of the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OPTIONS, randomize_adapter

from shardtune.adapters import METHODS
from shardtune.adapters.model import adapted_layers, inject_adapter
from shardtune.models.loading import build_tiny_model
from shardtune.training.loop import enable_gradient_checkpointing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]


def cuda_model(method: str, **kw):
    model = build_tiny_model("tiny-qwen2").to("cuda", torch.bfloat16)
    options = {**TINY_OPTIONS[method], **kw}
    inject_adapter(
        model, METHODS[method].Options(method=method, targets="all-linear", dtype="float32", **options)
    )
    randomize_adapter(model, std=0.05)
    return model


def step(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.float(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("method", ["lora", "mos", "sharelora", "fossil"])
def test_the_fused_layer_under_cuda_autocast_matches_the_general_path(method):
    ids = torch.randint(4, 200, (4, 32), device="cuda")
    model = cuda_model(method)
    layer = next(iter(adapted_layers(model).values()))
    x = torch.randn(2, 8, layer.adapter.in_features, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert type(layer(x).grad_fn).__name__ == "_LowRankLinearBackward"
    fused_loss, fused_grads = step(model, ids)
    for layer in adapted_layers(model).values():  # the general path
        layer.adapter.low_rank_factors = layer.adapter.block_sum_shard = lambda: None
    general_loss, general_grads = step(model, ids)
    assert math.isclose(fused_loss.item(), general_loss.item(), rel_tol=1e-2)
    for got, want in zip(fused_grads, general_grads, strict=True):
        assert got.dtype == torch.float32
        scale = max(1e-3, want.abs().max().item())
        assert (got - want).abs().max().item() <= 3e-2 * scale


def test_mos_per_step_assembly_on_cuda_equals_per_layer_gathers():
    ids = torch.randint(4, 200, (4, 32), device="cuda")
    results = []
    for per_step in (True, False):
        model = cuda_model("mos")
        model.shardtune_stores.assemble_per_step = per_step
        enable_gradient_checkpointing(model)
        model.train()
        results.append(step(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert math.isclose(loss_a.item(), loss_b.item(), rel_tol=1e-5)
    for got, want in zip(grads_a, grads_b, strict=True):
        scale = max(1e-3, want.abs().max().item())
        assert (got - want).abs().max().item() <= 1e-3 * scale


@pytest.mark.parametrize("method", ["lora", "fossil", "mos", "sharelora"])
def test_a_bf16_training_run_on_cuda(method, tmp_path):
    options = [f"--set=adapter.{k}={v}" for k, v in TINY_OPTIONS[method].items()]
    run = subprocess.run(
        [sys.executable, "-m", "shardtune", "train", str(ROOT / "recipes/tiny.yaml"),
         f"--set=adapter.method={method}", *options, "--set=train.precision=bf16",
         "--set=model.dtype=bfloat16", f"--set=output.dir={tmp_path / 'run'}", "--json", "-q"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert math.isfinite(result["final_loss"]) and math.isfinite(result["eval_loss"])
    assert result["eval_loss"] < 3.0, result  # the repeat task is learnt (untrained: about 5.3)


def test_the_factor_gradients_are_written_in_fp32_by_the_product():
    """On CUDA a bf16 product writes its fp32 result directly (``torch.mm(..., out_dtype=)``): A's and B's
    gradients are never rounded to bf16 on their way to the fp32 parameters."""
    from shardtune.adapters import fused

    assert fused._writes_wider(torch.device("cuda"), torch.bfloat16)
    m1 = torch.randn(16, 8192, device="cuda").bfloat16()
    m2 = torch.randn(8192, 2048, device="cuda").bfloat16()
    got = fused._gradient_product(m1, m2, torch.float32, alpha=2.0)
    assert got.dtype == torch.float32
    want = 2.0 * (m1.double() @ m2.double())
    rounded = (2.0 * (m1 @ m2).float()).double()
    assert (got.double() - want).abs().max() < (rounded - want).abs().max() / 8


@pytest.mark.parametrize("stage,offload", [(2, False), (3, True)])
def test_zero_on_one_gpu_trains_what_a_plain_bf16_run_trains(stage, offload, tmp_path):
    """strategy: deepspeed on the GPU (a world of one: NCCL, ZeRO-2, or ZeRO-3 with weights and
    optimizer state offloaded to CPU memory): the adapter of a plain bf16 run, within bf16's rounding."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    def run(name, *extra):
        done = subprocess.run(
            [sys.executable, "-m", "shardtune", "train", str(ROOT / "recipes/tiny.yaml"),
             "--set=adapter.method=mos", *[f"--set=adapter.{k}={v}" for k, v in TINY_OPTIONS["mos"].items()],
             "--set=train.precision=bf16", "--set=model.dtype=bfloat16", "--set=train.max_steps=20",
             f"--set=output.dir={tmp_path / name}", "-q", *extra],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr[-2000:]
        return load_file(tmp_path / name / "adapter.safetensors")

    plain = run("plain")
    zero = run(
        "zero", "--set=train.strategy=deepspeed", f"--set=train.deepspeed.stage={stage}",
        f"--set=train.deepspeed.offload_optimizer={offload}",
        f"--set=train.deepspeed.offload_params={offload and stage == 3}",
    )  # fmt: skip
    log = (tmp_path / "zero" / "train.log").read_text()
    assert f"DeepSpeed ZeRO-{stage} over 1 processes" in log
    for k in plain:
        scale = max(1e-3, plain[k].abs().max().item())
        assert (zero[k] - plain[k]).abs().max().item() <= 2e-2 * scale, k
