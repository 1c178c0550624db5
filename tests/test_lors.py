"""LoRS and `shardtune prune`: masked merged forward, both gradient modes, saved tensors, sparsity kept."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from shardtune.adapters import METHODS
from shardtune.adapters.lors import LorsLinearFunction
from shardtune.adapters.model import adapted_layers, inject_adapter, merge_adapter
from shardtune.cli import app
from shardtune.models import build_tiny_model
from shardtune.prune import prune_model, sparsity_of

runner = CliRunner()


def sparse_weight(out_f=24, in_f=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    keep = torch.rand(out_f, in_f, generator=g) > 0.5
    return w * keep, keep


def factors(out_f=24, in_f=16, r=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, in_f, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(out_f, r, generator=g, dtype=dtype, requires_grad=True)
    return a, b


@pytest.mark.parametrize("mode", ["lors", "exact"])
def test_forward_and_gradients_against_dense_reference(mode):
    w, keep = sparse_weight()
    bias = torch.randn(24, dtype=torch.float64)
    a, b = factors()
    s = 0.7
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    y = LorsLinearFunction.apply(x, w, bias, a, b, s, mode, 7)  # chunk 7: rows split unevenly
    dy = torch.randn_like(y)
    y.backward(dy)
    got = (x.grad.clone(), a.grad.clone(), b.grad.clone())

    x_ref = x.detach().clone().requires_grad_(True)
    a_ref, b_ref = factors()
    y_ref = torch.nn.functional.linear(x_ref, (w + s * b_ref @ a_ref) * keep, bias)  # naive masked LoRA
    torch.testing.assert_close(y, y_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(got[0], x_ref.grad)  # dx is exact in both modes
    if mode == "exact":
        torch.testing.assert_close(got[1], a_ref.grad)
        torch.testing.assert_close(got[2], b_ref.grad)
    else:  # the paper's rearranged gradient: the mask passes straight through
        x2, dy2 = x.detach().reshape(-1, 16), dy.reshape(-1, 24)
        torch.testing.assert_close(got[2], s * dy2.T @ (x2 @ a_ref.detach().T))
        torch.testing.assert_close(got[1], s * (dy2 @ b_ref.detach()).T @ x2)
        assert not torch.allclose(got[1], a_ref.grad)  # and it is not the exact one


def test_saves_no_dense_delta():
    """Only x, W, A, B are saved: the one out×in tensor kept for backward is W itself."""
    w, _ = sparse_weight(64, 48, torch.float32)
    a, b = factors(64, 48, 4, torch.float32)
    x = torch.randn(10, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LorsLinearFunction.apply(x, w, None, a, b, 1.0, "lors", 16).sum().backward()
    dense = [t for t in saved if t.shape == (64, 48)]
    assert len(dense) == 1 and dense[0].data_ptr() == w.data_ptr()
    assert len(saved) == 4


def pruned_tiny(pattern="2:4"):
    model = build_tiny_model("tiny-llama")
    prune_model(model, "magnitude", pattern=pattern)
    return model


def test_prune_patterns_and_wanda():
    model = pruned_tiny("2:4")
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and "lm_head" not in name:
            groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
            assert (groups <= 2).all(), name
    assert sparsity_of(model) == pytest.approx(0.5)
    model = build_tiny_model("tiny-llama")
    report = prune_model(model, "magnitude", sparsity=0.3)
    assert all(abs(r["sparsity"] - 0.3) < 0.01 for r in report["layers"])
    model = build_tiny_model("tiny-llama")
    batches = [{"input_ids": torch.randint(4, 200, (2, 16))}]
    report = prune_model(model, "wanda", sparsity=0.5, calibration=batches)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()  # Wanda: the ratio holds in every row


def test_merge_keeps_zero_pattern_bit_for_bit():
    model = pruned_tiny()
    zeros_before = {
        n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    inject_adapter(
        model, METHODS["lors"].Options(method="lors", rank=4, init="kaiming", targets="all-linear")
    )
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.adapter.lora_B.normal_()
    ids = torch.randint(4, 200, (2, 9))
    before = model(ids).logits
    merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)
    for name, layer in adapted_layers(model).items():
        w = layer.base_layer.weight
        assert torch.equal(w == 0, zeros_before[name]), name  # same zeros, no new ones
        assert int((w == 0).sum()) == int(zeros_before[name].sum())


def test_prune_then_train_lors_with_gradient_init(tmp_path):
    result = runner.invoke(
        app, ["prune", "tiny-llama", "--out", str(tmp_path / "sparse"), "--pattern", "2:4", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["overall_sparsity"] == pytest.approx(0.5)
    raw = tiny_recipe(
        tmp_path,
        model={"name": str(tmp_path / "sparse")},
        adapter={"method": "lors", "rank": 4, "alpha": 4, "init": "gradient", "init_samples": 16},
        train={"max_steps": 30},
        logging={"every": 1},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "LoRS init" in result.output
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < 0.7 * losses[0]

    from shardtune.checkpoint import load_adapted_model

    model, _, _ = load_adapted_model(tmp_path / "run")
    merge_adapter(model)
    assert sparsity_of(model) == pytest.approx(0.5)


def test_gradient_init_gives_orthonormal_a_and_zero_b():
    from shardtune.adapters.lors import gradient_init

    model = pruned_tiny()
    opts = METHODS["lors"].Options(method="lors", rank=4, targets=["q_proj", "down_proj"])
    inject_adapter(model, opts)
    ids = torch.randint(4, 200, (4, 12))
    seen = gradient_init(model, [{"input_ids": ids, "labels": ids}], opts)
    assert seen == 4
    for layer in adapted_layers(model).values():
        a = layer.adapter.lora_A.detach()
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-4, rtol=0)
        assert not layer.adapter.lora_B.any()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_prune_errors():
    result = runner.invoke(app, ["prune", "tiny-llama", "--out", "/tmp/x", "--method", "wanda"])
    assert result.exit_code == 2 and "needs calibration samples" in result.stderr
    result = runner.invoke(app, ["prune", "tiny-llama", "--out", "/tmp/x", "--pattern", "4:2"])
    assert result.exit_code == 2 and "--pattern: need 0 < N < M" in result.stderr
    result = runner.invoke(app, ["prune", "tiny-gpt2", "--out", "/tmp/x"])
    assert result.exit_code == 2 and "Conv1D" in result.stderr
