"""Initialisation as the papers give it: ΔW = 0 at step 0 for every method and option, A's distribution
(Kaiming-uniform with the full fan-in, or N(0, 1/r) for ShareLoRA's ``init: normal``), and LoRS's gradient
init (A = top-r right singular vectors of the dense gradient / γ) against an SVD computed here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shardtune.adapters import METHODS
from shardtune.adapters.lors import gradient_init
from shardtune.adapters.model import adapted_layers, adapter_named_parameters, inject_adapter
from shardtune.artifacts.prune import prune_model
from shardtune.models.loading import build_tiny_model

D_IN = 256  # wide enough that the sample statistics of A are tight


class Wide(nn.Module):
    """Two blocks with q_proj and v_proj reading 256 inputs."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(D_IN, 32), "v_proj": nn.Linear(D_IN, 16)}) for _ in range(2)
        )

    def forward(self, x):
        return torch.cat([m(x) for block in self.layers for m in block.values()], dim=-1)


def wide(method, **opts):
    torch.manual_seed(0)
    model = Wide()
    inject_adapter(model, METHODS[method].Options(method=method, targets=["q_proj", "v_proj"], **opts))
    return model


def assert_kaiming_uniform(a: torch.Tensor, fan_in: int) -> None:
    """kaiming_uniform_(a=√5) on fan_in: U(−1/√fan_in, 1/√fan_in) (std bound/√3)."""
    bound = 1 / math.sqrt(fan_in)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)


CASES = [
    ("lora", {"rank": 4}),
    ("lora", {"rank": 8, "rslora": True}),
    ("fossil", {"rank": 4}),
    ("fossil", {"rank": 4, "mode": "mini", "mini_r": 8}),
    ("mos", {"rank": 4, "equivalent_rank": 3, "private_rank": 1}),
    ("mos", {"rank": 4, "equivalent_rank": 2, "private_rank": 0, "subset_selection": False}),
    ("sharelora", {"rank": 4, "share": "a"}),
    ("sharelora", {"rank": 4, "share": "b"}),
    ("sharelora", {"rank": 4, "share": "ab", "init": "normal"}),
    ("lors", {"rank": 4, "init": "kaiming"}),
]


@pytest.mark.parametrize("method, opts", CASES)
def test_the_update_is_zero_at_step_zero(method, opts):
    model = wide(method, **opts)
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        out = model(x)
        base = torch.cat([m.base_layer(x) for block in model.layers for m in block.values()], dim=-1)
    assert torch.equal(out, base)
    zero = {"lora": "lora_B", "fossil": "shard", "mos": "B_", "sharelora": "B", "lors": "lora_B"}[method]
    named = dict(adapter_named_parameters(model))
    zeros = [n for n in named if zero in n.rsplit(".", 1)[-1]]
    assert zeros and all(not named[n].any() for n in zeros)  # B (the shard) starts at zero
    assert all(named[n].any() for n in named if n not in zeros)  # and nothing else does


@pytest.mark.parametrize("method", ["lora", "lors"])
def test_own_a_is_kaiming_uniform(method):
    model = wide(method, rank=8, **({"init": "kaiming"} if method == "lors" else {}))
    for layer in adapted_layers(model).values():
        assert_kaiming_uniform(layer.adapter.lora_A.detach(), D_IN)


def test_mos_a_pools_use_the_full_vector_fan_in():
    """MoS (authors' code): A-pool shards U(−1/√d_in, 1/√d_in) with d_in the whole vector, not the shard."""
    model = wide("mos", rank=4, equivalent_rank=4, private_rank=1, shards_per_vector=4)
    pools = model.shardtune_stores.pools
    for kind in ("q_proj", "v_proj"):
        assert pools[f"A_{kind}"].shape[1] == D_IN // 4
        assert_kaiming_uniform(pools[f"A_{kind}"].detach(), D_IN)


@pytest.mark.parametrize("share", ["a", "b", "ab"])
@pytest.mark.parametrize("init", ["kaiming", "normal"])
def test_sharelora_a_init(share, init):
    """The shared A follows ``init`` (Kaiming-uniform, or N(0, σ = 1/r)); a layer's own A is Kaiming."""
    r = 4
    model = wide("sharelora", rank=r, share=share, init=init)
    for name, layer in adapted_layers(model).items():
        if "a" in share:
            a = model.shardtune_stores.matrices[f"A_{name.rsplit('.', 1)[-1]}"].detach()
            if init == "normal":
                assert abs(a.mean().item()) < 0.1 / r
                assert abs(a.std().item() - 1 / r) < 0.05 / r
                assert a.abs().max() > 2.5 / r  # Gaussian tails, not a bounded uniform
            else:
                assert_kaiming_uniform(a, D_IN)
        else:
            assert_kaiming_uniform(layer.adapter.lora_A.detach(), D_IN)


def pruned_llama():
    model = build_tiny_model("tiny-llama")
    prune_model(model, "magnitude", pattern="2:4")
    return model


def test_lors_gradient_init_is_the_top_singular_subspace_of_the_dense_gradient():
    """A = V_rᵀ/γ of the gradient summed over the first ``init_samples`` examples (whole batches), B = 0."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 200, (4, 12), generator=g) for _ in range(3)]
    reference = pruned_llama()
    for p in reference.parameters():
        p.requires_grad_(True)
    for ids in batches[:2]:  # init_samples 8 → exactly two batches of 4
        reference(input_ids=ids, labels=ids).loss.backward()
    modules = dict(reference.named_modules())

    gamma, r = 2.0, 4
    model = pruned_llama()
    opts = METHODS["lors"].Options(
        method="lors", rank=r, targets=["q_proj", "down_proj"], init_gamma=gamma, init_samples=8
    )
    inject_adapter(model, opts)
    assert gradient_init(model, [{"input_ids": b, "labels": b} for b in batches], opts) == 8
    for name, layer in adapted_layers(model).items():
        a = layer.adapter.lora_A.detach()
        grad = modules[name].weight.grad
        s = torch.linalg.svdvals(grad)
        torch.testing.assert_close(a @ a.T, torch.eye(r) / gamma**2, atol=1e-5, rtol=0)  # orthonormal / γ
        captured = (grad @ (gamma * a).T).norm() ** 2  # energy of G on A's rows: Σ_{i≤r} σ_i² iff top-r
        assert captured > 0.9999 * (s[:r] ** 2).sum(), name
        assert not layer.adapter.lora_B.any()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)
    assert not any(m._forward_hooks for m in model.modules())  # the gradient's hooks are gone
