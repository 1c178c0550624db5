"""The fused update paths (``add_delta``: the update accumulated into the base output by one addmm,
the scale on the small N×r side; the fused layer ``_LowRankLinear``: base and update with one
written-out backward) compute what plain autograd computes from the spine's factors:
``y = base(x) + dropout(x)·Aᵀ·Bᵀ``, outputs and every gradient within 1e-6 in fp32 (of the largest value, for sums of many terms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardtune.adapters import METHODS
from shardtune.adapters.base import add_low_rank
from shardtune.adapters.model import adapted_layers, inject_adapter
from shardtune.models import build_tiny_model

OPTIONS = {
    "lora": {"rank": 4, "alpha": 12},
    "fossil": {"rank": 8},
    "mos": {"rank": 4, "equivalent_rank": 4, "private_rank": 1, "shards_per_vector": 2},
    "sharelora": {"rank": 4, "alpha": 8},
    "vera": {"rank": 8},
    "tiedlora": {"rank": 4},
    "prolora": {"rank": 4},
    "vblora": {"rank": 4, "vector_length": 16},
}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_add_delta_equals_the_plain_formula_with_gradients(method):
    model = build_tiny_model("tiny-llama")
    options = METHODS[method].Options(method=method, targets=["q_proj", "down_proj"], **OPTIONS[method])
    inject_adapter(model, options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    for name, layer in adapted_layers(model).items():
        x = torch.randn(2, 5, layer.adapter.in_features, generator=g, requires_grad=True)
        a, b = layer.adapter.factors()
        plain = layer.base_layer(x) + F.linear(F.linear(x, a), b)
        w = torch.randn(plain.shape, generator=g)
        want = torch.autograd.grad((plain * w).sum(), [x, *params], allow_unused=True)
        # the layer as training runs it (the fused layer where it applies) and the general add_delta
        for path, fused in [
            ("layer", layer(x)),
            ("add_delta", layer.adapter.add_delta(layer.base_layer(x), x)),
        ]:
            torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6, msg=f"{name} {path}")
            got = torch.autograd.grad((fused * w).sum(), [x, *params], allow_unused=True)
            for i, (gi, wi) in enumerate(zip(got, want, strict=True)):
                if wi is None:
                    assert gi is None or not gi.abs().max(), (name, path, i)
                    continue
                scale = max(1.0, wi.abs().max().item())
                err = (gi - wi).abs().max().item()
                assert err <= 1e-6 * scale, f"{name} {path} gradient {i}: {err} (largest {scale})"


def test_add_low_rank_is_one_addmm_and_leaves_mixed_dtypes_to_a_plain_add():
    out = torch.randn(3, 4, 6)
    h, b = torch.randn(3, 4, 2), torch.randn(6, 2)
    torch.testing.assert_close(add_low_rank(out, h, b), out + h @ b.T, atol=1e-6, rtol=1e-6)
    mixed = add_low_rank(out.bfloat16(), h, b)  # a bf16 base, an fp32 adapter, no autocast
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), (out.bfloat16() + (h @ b.T).bfloat16()).float())


@pytest.mark.parametrize("method", ["lora", "mos", "sharelora"])
def test_the_fused_layer_equals_plain_autograd_bias_and_base_gradients_included(method):
    """:class:`_LowRankLinear` takes the whole layer (base + update) while training without dropout or
    autocast: output and the gradients of x, the adapter's parameters and (when asked) W and the bias
    equal plain autograd's on ``x·Wᵀ + bias + x·Aᵀ·Bᵀ``; with dropout, autocast or no grad the general
    path runs."""
    model = build_tiny_model("tiny-qwen2")  # q_proj carries a bias
    inject_adapter(model, METHODS[method].Options(method=method, targets=["q_proj"], **OPTIONS[method]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    layer = next(iter(adapted_layers(model).values()))
    base = layer.base_layer
    assert base.bias is not None
    base.requires_grad_(True)
    stores = getattr(model, "shardtune_stores", None)
    params = [p for p in layer.parameters() if p.requires_grad] + list(stores.parameters() if stores else [])
    x = torch.randn(2, 5, base.in_features, generator=g, requires_grad=True)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "_LowRankLinearBackward"
    a, b = layer.adapter.factors()
    plain = F.linear(x, base.weight, base.bias) + F.linear(F.linear(x, a), b)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    w = torch.randn(plain.shape, generator=g)
    inputs = [x, *params]
    got = torch.autograd.grad((fused * w).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((plain * w).sum(), inputs, allow_unused=True)
    for i, (g_got, g_want) in enumerate(zip(got, want, strict=True)):
        assert (g_got is None) == (g_want is None)
        if g_got is not None:  # within 1e-6 of the largest value: sums of many terms, in another order
            scale = max(1.0, g_want.abs().max().item())
            assert (g_got - g_want).abs().max().item() <= 1e-6 * scale, (i, scale)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(layer(x).grad_fn).__name__ != "_LowRankLinearBackward"
    layer.adapter.dropout = torch.nn.Dropout(0.1)
    assert type(layer(x).grad_fn).__name__ != "_LowRankLinearBackward"
