"""The fused update paths (``add_delta``: the update accumulated into the base output by one addmm,
the scale on the small N×r side) compute what plain autograd computes from the spine's factors:
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
        fused = layer(x)
        a, b = layer.adapter.factors()
        plain = layer.base_layer(x) + F.linear(F.linear(x, a), b)
        torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6, msg=name)
        w = torch.randn(fused.shape, generator=g)
        got = torch.autograd.grad((fused * w).sum(), [x, *params], allow_unused=True)
        want = torch.autograd.grad((plain * w).sum(), [x, *params], allow_unused=True)
        for i, (gi, wi) in enumerate(zip(got, want, strict=True)):
            if wi is None:
                assert gi is None or not gi.abs().max(), (name, i)
                continue
            scale = max(1.0, wi.abs().max().item())
            err = (gi - wi).abs().max().item()
            assert err <= 1e-6 * scale, f"{name} gradient {i}: {err} (largest {scale})"


def test_add_low_rank_accumulates_in_place_and_leaves_mixed_dtypes_to_a_plain_add():
    """In place into the base output (no N×out copy or temporary), with the gradients of the plain
    formula; out of place where in place cannot be (a leaf that requires grad, a non-contiguous
    output); mixed dtypes outside autocast add the update in the output's dtype."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 4, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g)
    a, b = (
        torch.randn(2, 5, generator=g, requires_grad=True),
        torch.randn(6, 2, generator=g, requires_grad=True),
    )
    out = F.linear(x, w)
    fused = add_low_rank(out, F.linear(x, a) * 0.5, b)
    assert fused is out  # accumulated into the base output itself
    plain = F.linear(x, w) + F.linear(F.linear(x, a) * 0.5, b)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    dy = torch.randn(plain.shape, generator=g)
    grads = torch.autograd.grad(fused, (x, a, b), dy)
    for got, want in zip(grads, torch.autograd.grad(plain, (x, a, b), dy), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)

    h = torch.randn(3, 4, 2, generator=g)
    leaf = torch.randn(3, 4, 6, generator=g, requires_grad=True)  # e.g. a hook made it one
    kept = leaf.detach().clone()
    torch.testing.assert_close(add_low_rank(leaf, h, b), kept + h @ b.T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(leaf.detach(), kept)
    strided = torch.randn(3, 6, 4, generator=g).transpose(1, 2)
    before = strided.clone()
    torch.testing.assert_close(add_low_rank(strided, h, b), before + h @ b.T, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(strided, before)

    base = torch.randn(3, 4, 6, generator=g)
    mixed = add_low_rank(base.bfloat16(), h, b)  # a bf16 base, an fp32 adapter, no autocast
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), (base.bfloat16() + (h @ b.T).bfloat16()).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = add_low_rank(base.bfloat16(), h, b)  # autocast: the factors take the output's dtype
    assert auto.dtype == torch.bfloat16
    want = torch.addmm(base.bfloat16().reshape(-1, 6), h.bfloat16().reshape(-1, 2), b.bfloat16().t())
    torch.testing.assert_close(auto, want.view(3, 4, 6))
