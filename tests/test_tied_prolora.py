"""Tied-LoRA and PRoLoRA (the MoS paper's baselines) against dense formulas written here, and their
parameter counts against the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import paper_count, tiny_options
from transformers import LlamaConfig

from shardtune.adapters.model import (
    adapted_layers,
    adapter_named_parameters,
    count_parameters,
    inject_adapter,
)
from shardtune.core.errors import RecipeError
from shardtune.inspection.params import count_trainable, method_options
from shardtune.models.loading import build_tiny_model

IDS = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(4))
LLAMA2_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------------------------------
# Tied-LoRA


CONFIGS = ["vBuA", "vBUA", "VBuA", "VBUA", "VbUa", "vbuA", "vbUa", "Vbua"]


@pytest.mark.parametrize("trainable", CONFIGS)
def test_tiedlora_layers_compute_the_dense_formula(trainable):
    """ΔW_l = (α/r)·diag(v_l)·B_t·diag(u_l)·A_t with A_t, B_t one tensor per type, u, v per layer."""
    model = build_tiny_model("tiny-llama")
    opts = tiny_options("tiedlora", rank=4, alpha=8, trainable=trainable, targets=["q_proj", "v_proj"])
    targets = inject_adapter(model, opts)
    randomize(model)
    stores = model.shardtune_stores
    for name, layer in adapted_layers(model).items():
        kind = name.rsplit(".", 1)[-1]
        a, b = stores.get(f"A_{kind}").detach(), stores.get(f"B_{kind}").detach()
        ad = layer.adapter
        u = ad.lora_u.detach() if trainable[2] == "U" else torch.ones(4)
        v = ad.lora_v.detach() if trainable[0] == "V" else torch.ones(b.shape[0])
        dense = 2.0 * torch.diag(v) @ b @ torch.diag(u) @ a
        x = torch.randn(3, 64)
        torch.testing.assert_close(ad.delta_weight(), dense, atol=1e-6, rtol=1e-5)
        # x·Aᵀ·Bᵀ and x·(B·A)ᵀ round differently: a few 1e-6 apart (which depends on the thread count)
        torch.testing.assert_close(ad.delta(x), x @ dense.T, atol=1e-5, rtol=1e-5)
    # trained pieces are parameters, frozen A/B are buffers and u/v frozen at 1 have no tensor
    names = {n.rsplit(".", 1)[-1] for n, _ in adapter_named_parameters(model)}
    expected = set()
    for letter, pieces in zip(
        trainable, [{"lora_v"}, {"B_q_proj", "B_v_proj"}, {"lora_u"}, {"A_q_proj", "A_v_proj"}], strict=True
    ):
        expected |= pieces if letter.isupper() else set()
    assert names == expected
    assert count_parameters(model)[0] == paper_count(
        tiny_options("tiedlora", rank=4, trainable=trainable), targets
    )


@pytest.mark.parametrize("trainable", CONFIGS)
def test_tiedlora_starts_at_zero_and_every_trained_piece_moves(trainable):
    model = build_tiny_model("tiny-llama")
    model.eval()
    with torch.no_grad():
        base = model(IDS).logits
    inject_adapter(
        model, tiny_options("tiedlora", rank=4, trainable=trainable, targets=["q_proj", "down_proj"])
    )
    out = model(IDS).logits
    torch.testing.assert_close(out, base)
    params = [p for _, p in adapter_named_parameters(model)]
    opt = torch.optim.SGD(params, lr=0.1)
    out.pow(2).mean().backward()  # step 0: the zero piece gets a gradient (as LoRA's B)
    assert sum(p.grad.abs().sum() > 0 for p in params if p.grad is not None) >= 1
    opt.step()
    opt.zero_grad()
    model(IDS).logits.pow(2).mean().backward()  # step 1: every trained piece does (as LoRA's A)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_tiedlora_vbua_is_sharelora_ab():
    """u = v = 1 frozen: Tied-LoRA's default is ShareLoRA share: ab, the same update for the same A, B."""
    tied, share = build_tiny_model("tiny-llama"), build_tiny_model("tiny-llama")
    inject_adapter(tied, tiny_options("tiedlora", rank=4, alpha=8, targets="all-linear"))
    inject_adapter(share, tiny_options("sharelora", rank=4, alpha=8, share="ab", targets="all-linear"))
    randomize(tied)
    with torch.no_grad():
        for key, p in tied.shardtune_stores.matrices.items():
            share.shardtune_stores.matrices[key].copy_(p)
    torch.testing.assert_close(tied(IDS).logits, share(IDS).logits, atol=1e-5, rtol=0)
    assert count_parameters(tied)[0] == count_parameters(share)[0]


def test_tiedlora_refuses_bad_notation():
    for bad, why in [
        ("vbua", "nothing would be trained"),
        ("ABuv", "in this order"),
        ("vBu", "in this order"),
    ]:
        with pytest.raises(ValueError, match=why):
            tiny_options("tiedlora", trainable=bad)


@pytest.mark.parametrize(
    "trainable, expected",
    [  # LLaMA-2-7B, all seven projections, r = 64
        ("vBuA", 4_997_120),  # = LoRA r = 2 (the MoS paper's "Tied LoRA ≈ 5M" budget)
        (
            "vBUA",
            5_011_456,
        ),  # + a rank scaling u per layer: a line of the MoS authors' model_param_summary.txt
        ("VBUA", 4_997_120 + 32 * (64 * 7 + 4 * 4096 + 2 * 11008 + 4096)),
    ],
)
def test_tiedlora_counts_llama2_7b(trainable, expected):
    assert count_trainable(LLAMA2_7B, method_options("tiedlora", rank=64, trainable=trainable, targets=ALL7))[
        0
    ] == (expected)


# ---------------------------------------------------------------------------------------------------
# PRoLoRA


def dense_prolora(a0, au, b0, bu, in_f, out_f, m, n, rotate):
    """A and B by the paper's indexing, entry by entry (no reshapes): rotated broadcast, then unshared."""
    rs = a0.shape[0]
    u = au.shape[0]
    sa, sb = max(rs // m, 1), max(rs // n, 1)
    ca, cb = a0.shape[1], b0.shape[0]
    a = torch.zeros(rs + u, in_f)
    b = torch.zeros(out_f, rs + u)
    for j in range(rs):
        for col in range(in_f):
            i, k = divmod(col, ca)
            a[j, col] = a0[(j + i * sa * rotate) % rs, k]
        for row in range(out_f):
            i, k = divmod(row, cb)
            b[row, j] = b0[k, (j + i * sb * rotate) % rs]
    a[rs:] = au
    b[:, rs:] = bu
    return a, b


@pytest.mark.parametrize(
    "in_f, out_f, r, u, m, n, rotate",
    [
        (64, 48, 4, 1, 2, 3, True),  # the paper's Fig. 1 shape: r = 4, u = 1, m = 2, n = 3
        (70, 45, 6, 2, 4, 4, True),  # chunks cropped: 70 = 4·18 − 2, 45 = 4·12 − 3
        (64, 48, 5, 0, 8, 2, True),  # stride max(⌊5/8⌋, 1) = 1
        (64, 48, 4, 1, 2, 2, False),  # CLoRA: broadcast without rotation
        (32, 16, 3, 3, 2, 2, True),  # u = r: plain LoRA
    ],
)
def test_prolora_factors_match_the_paper_indexing(in_f, out_f, r, u, m, n, rotate):
    from shardtune.adapters.base import Target
    from shardtune.adapters.prolora import ProLoraAdapter

    opts = tiny_options(
        "prolora", rank=r, unshared_rank=u, share_a=m, share_b=n, rotation=rotate, alpha=2 * r
    )
    layer = ProLoraAdapter(Target("x", None, in_f, out_f, False), opts)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    assert layer.lora_A0.shape == (r - u, math.ceil(in_f / m)) and layer.lora_B0.shape == (
        math.ceil(out_f / n),
        r - u,
    )
    a_ref, b_ref = dense_prolora(
        layer.lora_A0.detach(),
        layer.lora_Au.detach(),
        layer.lora_B0.detach(),
        layer.lora_Bu.detach(),
        in_f,
        out_f,
        m,
        n,
        rotate,
    )
    a, b = layer.factors()
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, 2.0 * b_ref)
    x = torch.randn(4, in_f)
    torch.testing.assert_close(layer.delta(x), 2.0 * x @ (b_ref @ a_ref).T, atol=1e-4, rtol=1e-4)
    n_params = sum(p.numel() for p in layer.parameters())
    assert n_params == (r - u) * (math.ceil(in_f / m) + math.ceil(out_f / n)) + u * (in_f + out_f)


def test_prolora_init_is_rectified_and_update_starts_at_zero():
    model = build_tiny_model("tiny-llama")
    inject_adapter(
        model, tiny_options("prolora", rank=8, unshared_rank=2, share_a=4, share_b=4, targets=["down_proj"])
    )
    layer = next(iter(adapted_layers(model).values())).adapter
    bound = 1 / math.sqrt(176)  # fan = the full input (176), not the chunk (44)
    for a in (layer.lora_A0, layer.lora_Au):
        assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert not layer.lora_B0.any() and not layer.lora_Bu.any()


@pytest.mark.parametrize(
    "options, expected",
    [  # LLaMA-2-7B, all seven projections (the MoS paper's baselines and research/mos.md §3)
        ({"rank": 8, "unshared_rank": 0, "share_a": 4, "share_b": 4}, 4_997_120),  # "PRoLoRA (4/8)", 5.00M
        ({"rank": 16, "unshared_rank": 0, "share_a": 8, "share_b": 8}, 4_997_120),
        ({"rank": 64, "unshared_rank": 0, "share_a": 8, "share_b": 8}, 19_988_480),
        ({"rank": 8, "unshared_rank": 8, "share_a": 4, "share_b": 4}, 19_988_480),  # u = r: LoRA r = 8
    ],
)
def test_prolora_counts_llama2_7b(options, expected):
    assert count_trainable(LLAMA2_7B, method_options("prolora", targets=ALL7, **options))[0] == expected


def test_prolora_checks():
    with pytest.raises(RecipeError, match="adapter.unshared_rank: must be at most adapter.rank"):
        inject_adapter(build_tiny_model("tiny-llama"), tiny_options("prolora", rank=2, unshared_rank=3))
    with pytest.raises(RecipeError, match="adapter.share_b: must be at most"):
        inject_adapter(
            build_tiny_model("tiny-llama"), tiny_options("prolora", share_b=40, targets=["k_proj"])
        )
