"""Every method across its option grid against an independent dense reference written here.

The model is a toy of three blocks with a ``q_proj`` (18→12) and a ``v_proj`` (18→20), all reading the
same input, so the reference for the whole model is one dense formula per layer. For each option set the
test compares, in float64, the output and the gradients with respect to every adapter parameter and to
the input. The reference builds ``ΔW`` from the raw parameters (``lora_A``, ``shard``, the MoS pools and
routing buffers, the shared matrices) with plain torch ops; it never calls ``factors``, ``delta``,
``delta_weight`` or ``gathered``. Dropout is checked with a fixed seed: the reference draws the same
masks as ``F.dropout`` of ones in the order the layers run, and applies them to the adapter's input only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardtune.adapters import METHODS
from shardtune.adapters.model import (
    adapted_layers,
    adapter_named_parameters,
    count_parameters,
    inject_adapter,
)

D_IN = 18  # 18 % 4 = 2 and 18 % 5 = 3: FOSSIL pads the input; 18 % 6 = 0: it does not
OUT = {"q_proj": 12, "v_proj": 20}
N_BLOCKS = 3
KINDS = ("q_proj", "v_proj")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D_IN, OUT["q_proj"])
        self.v_proj = nn.Linear(D_IN, OUT["v_proj"])


class Toy(nn.Module):
    """Three blocks of two linear layers that all read the input; the output is their concatenation."""

    def __init__(self, sparse: bool = False, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(N_BLOCKS))
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if sparse and p.dim() == 2:  # a pruned weight: about half of it exactly zero
                    p.mul_(torch.rand(p.shape, generator=g) > 0.5)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(block, kind)(x) for block in self.layers for kind in KINDS], dim=-1)


LAYER_NAMES = [f"layers.{i}.{kind}" for i in range(N_BLOCKS) for kind in KINDS]  # in forward order


def toy_model(method: str, sparse: bool = False, **opts):
    model = Toy(sparse=sparse)
    options = METHODS[method].Options(method=method, targets=list(KINDS), dtype="auto", **opts)
    inject_adapter(model, options)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model, options


# ---------------------------------------------------------------------------------------------------
# The references: ΔW of one layer from the raw parameters


def lora_like_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def reference_delta(model: nn.Module, name: str, options) -> torch.Tensor:
    """Dense ``ΔW`` (out, in) of layer ``name`` from the method's raw parameters."""
    layer = adapted_layers(model)[name]
    kind = name.rsplit(".", 1)[-1]
    out_f = OUT[kind]
    if options.method == "lora":
        ad = layer.adapter
        return lora_like_scale(options.alpha, options.rank, options.rslora) * ad.lora_B @ ad.lora_A
    if options.method == "fossil":
        shard = layer.adapter.shard  # (r, out) or (r, mini_r)
        width = options.mini_r if options.mode == "mini" else out_f
        assert shard.shape == (options.rank, width)
        rows = torch.arange(D_IN) % options.rank  # ΔW[o, i] = D[i mod r, o mod width]
        cols = torch.arange(out_f) % width
        return shard[rows][:, cols].T
    if options.method == "sharelora":
        stores = model.shardtune_stores.matrices
        if options.scope == "type":
            key_a, key_b = f"A_{kind}", f"B_{kind}"
        else:
            key_a, key_b = f"A_in{D_IN}", f"B_out{out_f}"
        a = stores[key_a] if "a" in options.share else layer.adapter.lora_A
        b = stores[key_b] if "b" in options.share else layer.adapter.lora_B
        assert a.shape == (options.rank, D_IN) and b.shape == (out_f, options.rank)
        return lora_like_scale(options.alpha, options.rank, options.rslora) * b @ a
    if options.method == "mos":
        return mos_reference_delta(model, name, options)
    raise AssertionError(options.method)


def mos_rank(options) -> int:
    """The per-layer rank: r, or all (R−p)·L public vectors plus p private ones without subset selection."""
    if options.subset_selection:
        return options.rank
    return (options.equivalent_rank - options.private_rank) * N_BLOCKS + options.private_rank


def mos_reference_delta(model: nn.Module, name: str, options) -> torch.Tensor:
    """ΔW = α/r · B·A with rank vector j the concatenation of shards I[j·l … j·l+l−1] of the type's pools,
    after checking the routing indices have the structure the paper prescribes."""
    layer = adapted_layers(model)[name]
    kind = name.rsplit(".", 1)[-1]
    block = int(name.split(".")[1])
    big_r, p, per_vec = options.equivalent_rank, options.private_rank, options.shards_per_vector
    rank = mos_rank(options)
    n_public = (big_r - p) * N_BLOCKS * per_vec
    pool_a, pool_b = model.shardtune_stores.pools[f"A_{kind}"], model.shardtune_stores.pools[f"B_{kind}"]
    assert pool_a.shape == (big_r * N_BLOCKS * per_vec, D_IN // per_vec)
    assert pool_b.shape == (big_r * N_BLOCKS * per_vec, OUT[kind] // per_vec)
    idx_a, idx_b = layer.adapter.index_A.tolist(), layer.adapter.index_B.tolist()
    n_routed = (rank - p) * per_vec
    assert len(idx_a) == len(idx_b) == rank * per_vec
    private = list(range(n_public + block * p * per_vec, n_public + (block + 1) * p * per_vec))
    for idx in (idx_a, idx_b):
        public = idx[:n_routed]
        assert idx[n_routed:] == private  # the layer's own block, last
        assert len(set(public)) == len(public) and all(0 <= i < n_public for i in public)
        if not options.subset_selection:
            assert sorted(public) == list(range(n_public))  # every public shard
    if not options.subset_selection:
        assert idx_a[:n_routed] == list(range(n_public))  # in pool order
    if not options.pair_dissociation:
        assert idx_a == idx_b
    elif n_routed:
        assert idx_a[:n_routed] != idx_b[:n_routed]  # dissociated: B's public shards are drawn apart from A's
    a = torch.stack(
        [torch.cat([pool_a[idx_a[j * per_vec + t]] for t in range(per_vec)]) for j in range(rank)]
    )
    b = torch.stack(
        [torch.cat([pool_b[idx_b[j * per_vec + t]] for t in range(per_vec)]) for j in range(rank)], dim=1
    )
    return options.alpha / rank * b @ a


def reference_forward(model: nn.Module, options, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """``W·x + b + ΔW·(mask ⊙ x)`` per layer (the mask is the dropout of the adapter's input only)."""
    outs = []
    for name, mask in zip(LAYER_NAMES, masks, strict=True):
        base = adapted_layers(model)[name].base_layer
        outs.append(
            F.linear(x, base.weight, base.bias) + F.linear(x * mask, reference_delta(model, name, options))
        )
    return torch.cat(outs, dim=-1)


def dropout_masks(x: torch.Tensor, p: float) -> list[torch.Tensor]:
    """The masks (already divided by 1−p) that nn.Dropout draws for each layer, in the order they run."""
    if p == 0:
        return [torch.ones_like(x) for _ in LAYER_NAMES]
    return [F.dropout(torch.ones_like(x), p, training=True) for _ in LAYER_NAMES]


def output_and_grads(model: nn.Module, forward, x: torch.Tensor, weights: torch.Tensor):
    """``forward(x)`` and the gradients of ``Σ weights·forward(x)`` for every adapter parameter and x."""
    x = x.detach().clone().requires_grad_(True)
    params = dict(adapter_named_parameters(model))
    for p in params.values():
        p.grad = None
    out = forward(x)
    (out * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in params.items()}
    grads["input"] = x.grad.detach().clone()
    for p in params.values():
        p.grad = None
    return out.detach(), grads


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, D_IN, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 5, sum(OUT.values()) * N_BLOCKS, generator=g, dtype=torch.float64)
    return x, weights


def assert_matches_reference(model, options, dropout: float = 0.0):
    x, weights = inputs()
    model.train()
    torch.manual_seed(1234)
    got, got_grads = output_and_grads(model, model, x, weights)
    torch.manual_seed(1234)
    masks = dropout_masks(x, dropout)
    ref, ref_grads = output_and_grads(
        model, lambda x: reference_forward(model, options, x, masks), x, weights
    )
    layers = adapted_layers(model)
    base = torch.cat([layers[n].base_layer(x) for n in LAYER_NAMES], -1).detach()
    assert (ref - base).abs().max() > 0.1  # the adapter's part is large: a wrong one cannot hide
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name  # every parameter is reached
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-10, rtol=1e-10, msg=name)
    if dropout:
        model.eval()  # no dropout in eval mode: the plain reference
        with torch.no_grad():
            no_masks = dropout_masks(x, 0.0)
            torch.testing.assert_close(model(x), reference_forward(model, options, x, no_masks))
            assert not torch.allclose(model(x), got)  # and in train mode it really dropped inputs


GRID = {
    "lora": [
        {"rank": 4},
        {"rank": 4, "alpha": 6, "rslora": True},
        {"rank": 3, "alpha": 5, "rslora": True},
        {"rank": 4, "dropout": 0.3},
        {"rank": 4, "rslora": True, "dropout": 0.5},
    ],
    "fossil": [
        {"rank": 6},  # 18 % 6 = 0
        {"rank": 4},  # 18 % 4 = 2: zero padding
        {"rank": 5, "dropout": 0.3},  # padding and dropout
        {"rank": 6, "dropout": 0.3},
        {"rank": 4, "mode": "mini", "mini_r": 4},  # 12 and 20 are multiples of 4
        {"rank": 5, "mode": "mini", "mini_r": 2, "dropout": 0.3},
    ],
    "mos": [
        {"rank": 4, "equivalent_rank": 3, "private_rank": 1, "shards_per_vector": 2},
        {
            "rank": 4,
            "equivalent_rank": 3,
            "private_rank": 1,
            "shards_per_vector": 2,
            "subset_selection": False,
        },
        {
            "rank": 4,
            "equivalent_rank": 3,
            "private_rank": 1,
            "shards_per_vector": 2,
            "pair_dissociation": False,
        },
        {
            "rank": 4,
            "equivalent_rank": 3,
            "private_rank": 1,
            "shards_per_vector": 2,
            "subset_selection": False,
            "pair_dissociation": False,
        },
        {"rank": 4, "equivalent_rank": 3, "private_rank": 1, "shards_per_vector": 1},
        {"rank": 4, "equivalent_rank": 2, "private_rank": 0, "shards_per_vector": 2},
        {
            "rank": 5,
            "equivalent_rank": 2,
            "private_rank": 0,
            "shards_per_vector": 1,
            "subset_selection": False,
        },
        {"rank": 3, "equivalent_rank": 3, "private_rank": 3, "shards_per_vector": 2},  # plain LoRA of rank 3
        {"rank": 4, "equivalent_rank": 3, "private_rank": 1, "alpha": 7, "dropout": 0.3},
    ],
    "sharelora": [
        {"rank": 4, "share": "a"},
        {"rank": 4, "share": "b"},
        {"rank": 4, "share": "ab"},
        {"rank": 4, "share": "a", "rslora": True, "alpha": 6},
        {"rank": 4, "share": "b", "rslora": True},
        {"rank": 4, "share": "ab", "rslora": True, "init": "normal"},
        {"rank": 4, "share": "a", "scope": "shape"},  # q and v read 18 inputs: one A for both types
        {"rank": 4, "share": "ab", "scope": "shape"},
        {"rank": 4, "share": "a", "dropout": 0.3, "init": "normal"},
        {"rank": 4, "share": "ab", "dropout": 0.3},
    ],
}
CASES = [(method, opts) for method, grid in GRID.items() for opts in grid]


def case_id(case) -> str:
    method, opts = case
    return method + "-" + "-".join(f"{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("method, opts", CASES, ids=[case_id(c) for c in CASES])
def test_output_and_gradients_match_dense_reference(method, opts):
    model, options = toy_model(method, **opts)
    assert_matches_reference(model, options, dropout=opts.get("dropout", 0.0))


# ---------------------------------------------------------------------------------------------------
# LoRS: (W + s·B·A) ⊙ M with its two gradient modes, s = α/√r or α/r


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
@pytest.mark.parametrize("rslora", [True, False])
def test_lors_output_and_gradients_match_dense_reference(grad_mode, rslora):
    model, options = toy_model(
        "lors",
        sparse=True,
        rank=4,
        alpha=6,
        rslora=rslora,
        grad_mode=grad_mode,
        exact_chunk=5,
        init="kaiming",
    )
    s = 6 / math.sqrt(4) if rslora else 6 / 4
    x, weights = inputs(1)
    layers = adapted_layers(model)
    got, got_grads = output_and_grads(model, model, x, weights)

    def dense(x):
        outs = []
        for name in LAYER_NAMES:
            base, ad = layers[name].base_layer, layers[name].adapter
            merged = (base.weight + s * ad.lora_B @ ad.lora_A) * (base.weight != 0)
            outs.append(F.linear(x, merged, base.bias))
        return torch.cat(outs, dim=-1)

    ref, ref_grads = output_and_grads(model, dense, x, weights)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_grads["input"], ref_grads["input"], atol=1e-10, rtol=1e-10)
    offset, x2 = 0, x.reshape(-1, D_IN)
    for name in LAYER_NAMES:
        ad = layers[name].adapter
        out_f = OUT[name.rsplit(".", 1)[-1]]
        dy = weights[..., offset : offset + out_f].reshape(-1, out_f)  # ∂loss/∂y of this layer
        offset += out_f
        if grad_mode == "exact":
            want_a, want_b = ref_grads[f"{name}.adapter.lora_A"], ref_grads[f"{name}.adapter.lora_B"]
        else:  # the paper's rearranged gradient: the mask passes straight through
            want_b = s * dy.T @ (x2 @ ad.lora_A.detach().T)
            want_a = s * (dy @ ad.lora_B.detach()).T @ x2
        torch.testing.assert_close(got_grads[f"{name}.adapter.lora_A"], want_a, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got_grads[f"{name}.adapter.lora_B"], want_b, atol=1e-10, rtol=1e-10)
        if grad_mode == "lors":
            assert not torch.allclose(want_a, ref_grads[f"{name}.adapter.lora_A"])  # not the exact one


# ---------------------------------------------------------------------------------------------------
# Parameter counts: the papers' formulas, per projection type t with L_t layers (here L = 3, d_in = 18)


def paper_count(method: str, opts: dict) -> int:
    r = opts.get("rank")
    if method in ("lora", "lors"):  # r·(d_in + d_out) per layer
        return sum(N_BLOCKS * r * (D_IN + out) for out in OUT.values())
    if method == "fossil":  # MiSS: r·d_out per layer, mini r·mini_r
        width = {kind: opts["mini_r"] if opts.get("mode") == "mini" else out for kind, out in OUT.items()}
        return sum(N_BLOCKS * r * width[kind] for kind in OUT)
    if method == "mos":  # Σ_t R·L_t·(d_in + d_out): LoRA of rank R, whatever r, p, l
        return sum(opts["equivalent_rank"] * N_BLOCKS * (D_IN + out) for out in OUT.values())
    if method == "sharelora":
        share, scope = opts["share"], opts.get("scope", "type")
        a = (1 if scope == "type" else 1 / len(OUT)) * r * D_IN * len(OUT)  # shape: q and v share one A
        a = a if "a" in share else N_BLOCKS * r * D_IN * len(OUT)
        b = sum(r * out if "b" in share else N_BLOCKS * r * out for out in OUT.values())
        return int(a + b)
    raise AssertionError(method)


COUNT_CASES = CASES + [("lors", {"rank": 4, "init": "kaiming"}), ("lors", {"rank": 3, "init": "kaiming"})]


@pytest.mark.parametrize("method, opts", COUNT_CASES, ids=[case_id(c) for c in COUNT_CASES])
def test_parameter_count_is_the_papers_formula(method, opts):
    model, _ = toy_model(method, sparse=method == "lors", **opts)
    assert count_parameters(model)[0] == paper_count(method, opts)
