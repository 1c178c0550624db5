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


def test_add_low_rank_is_one_addmm_and_leaves_mixed_dtypes_to_a_plain_add():
    out = torch.randn(3, 4, 6)
    h, b = torch.randn(3, 4, 2), torch.randn(6, 2)
    torch.testing.assert_close(add_low_rank(out, h, b), out + h @ b.T, atol=1e-6, rtol=1e-6)
    mixed = add_low_rank(out.bfloat16(), h, b)  # a bf16 base, an fp32 adapter, no autocast
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), (out.bfloat16() + (h @ b.T).bfloat16()).float())
