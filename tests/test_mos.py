"""MoS against a direct re-implementation of the authors' indexing (Forence1999/MoS, modules/Tied_LoRA.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_options

from shardtune.adapters.model import (
    adapted_layers,
    adapter_named_parameters,
    count_parameters,
    inject_adapter,
)
from shardtune.core.errors import RecipeError
from shardtune.models.loading import build_tiny_model
from shardtune.training.loop import enable_gradient_checkpointing


def authors_delta(
    pool_a: torch.Tensor, pool_b_authors: torch.Tensor, idx_a, idx_b, r: int, per_vec: int, scale: float
):
    """ΔW the way the authors write it, with explicit loops and their layouts: A-pool N×(d_in/per_vec) whose
    rows are shards; B-pool (d_out/per_vec)×N whose columns are shards. Rank vector j of A is the left-to-right
    concatenation of shards I_A[j·per_vec … j·per_vec+per_vec−1]; rank column j of B stacks shards I_B[j·per_vec … j·per_vec+per_vec−1]."""
    d_in, d_out = pool_a.shape[1] * per_vec, pool_b_authors.shape[0] * per_vec
    a = torch.zeros(r, d_in)
    b = torch.zeros(d_out, r)
    for j in range(r):
        for i in range(per_vec):
            width, height = d_in // per_vec, d_out // per_vec
            a[j, i * width : (i + 1) * width] = pool_a[idx_a[j * per_vec + i]]
            b[i * height : (i + 1) * height, j] = pool_b_authors[:, idx_b[j * per_vec + i]]
    return scale * b @ a


def mos_model(**kw):
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, tiny_options("mos", targets="all-linear", **kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("shards_per_vector", [1, 2, 4])
def test_assembled_factors_equal_authors_formulation(shards_per_vector):
    model = mos_model(rank=4, equivalent_rank=4, private_rank=1, shards_per_vector=shards_per_vector, alpha=8)
    pools = model.shardtune_stores
    for _name, layer in adapted_layers(model).items():
        ad = layer.adapter
        pool_a, pool_b = pools.pool("A", ad.kind).detach(), pools.pool("B", ad.kind).detach()
        expected = authors_delta(pool_a, pool_b.T, ad.index_A, ad.index_B, 4, shards_per_vector, 8 / 4)
        torch.testing.assert_close(ad.delta_weight(), expected, atol=1e-5, rtol=1e-5)
        x = torch.randn(3, ad.in_features)
        torch.testing.assert_close(ad.delta(x), x @ expected.T, atol=1e-4, rtol=1e-4)


def test_routing_structure_pools_and_privatization():
    r, big_r, p, per_vec = 4, 4, 2, 2
    model = mos_model(rank=r, equivalent_rank=big_r, private_rank=p, shards_per_vector=per_vec)
    layers = adapted_layers(model)
    by_kind: dict[str, list] = {}
    for layer in layers.values():
        by_kind.setdefault(layer.adapter.kind, []).append(layer.adapter)
    assert set(by_kind) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for kind, group in by_kind.items():
        n_layers = len(group)
        n_shards, n_public = big_r * n_layers * per_vec, (big_r - p) * n_layers * per_vec
        assert model.shardtune_stores.pool("A", kind).shape == (n_shards, group[0].in_features // per_vec)
        assert model.shardtune_stores.pool("B", kind).shape == (n_shards, group[0].out_features // per_vec)
        for k, ad in enumerate(group):
            for index in (ad.index_A, ad.index_B):
                public, private = index[: (r - p) * per_vec].tolist(), index[(r - p) * per_vec :].tolist()
                assert len(set(public)) == len(public) and all(
                    i < n_public for i in public
                )  # subset, no repeats
                assert private == list(
                    range(n_public + k * p * per_vec, n_public + (k + 1) * p * per_vec)
                )  # own block, last
        assert not torch.equal(group[0].index_A, group[0].index_B)  # pair dissociation


def test_ablation_switches():
    model = mos_model(rank=3, equivalent_rank=2, private_rank=0, shards_per_vector=1, pair_dissociation=False)
    for layer in adapted_layers(model).values():
        assert torch.equal(layer.adapter.index_A, layer.adapter.index_B)
        assert layer.adapter.index_A.numel() == 3  # per_vec = 1: one shard per vector

    # Without subset selection every layer uses the whole public pool: rank (R−p)·L + p.
    model = mos_model(equivalent_rank=2, private_rank=1, shards_per_vector=2, subset_selection=False)
    for layer in adapted_layers(model).values():
        ad = layer.adapter
        assert ad.rank == (2 - 1) * 2 + 1
        assert sorted(ad.index_A[: 2 * 2].tolist()) == list(range(4))

    # private_rank = equivalent_rank = rank: every layer owns its vectors — plain LoRA of that rank.
    model = mos_model(rank=2, equivalent_rank=2, private_rank=2, shards_per_vector=2)
    used = [
        set(layer.adapter.index_A.tolist())
        for layer in adapted_layers(model).values()
        if layer.adapter.kind == "q_proj"
    ]
    assert not used[0] & used[1]


def test_routing_is_seeded_and_saved(tmp_path):
    a = mos_model(routing_seed=7)
    b = mos_model(routing_seed=7)
    c = mos_model(routing_seed=8)
    idx = lambda m: torch.cat([layer.adapter.index_A for layer in adapted_layers(m).values()])  # noqa: E731
    assert torch.equal(idx(a), idx(b)) and not torch.equal(idx(a), idx(c))
    from shardtune.adapters.model import adapter_state_dict

    state = adapter_state_dict(a)
    assert any(k.endswith("index_A") for k in state) and any(
        k.startswith("shardtune_stores.pools.A_") for k in state
    )


def test_parameter_count_is_lora_of_equivalent_rank():
    for r, p, per_vec in [(4, 1, 2), (2, 0, 1), (6, 2, 4)]:
        model = mos_model(rank=r, equivalent_rank=4, private_rank=p, shards_per_vector=per_vec)
        n, _ = count_parameters(model)
        layers = adapted_layers(model).values()
        assert n == sum(4 * (x.adapter.in_features + x.adapter.out_features) for x in layers)


def test_shared_pool_gradient_is_sum_over_layers():
    """The pool is one parameter: its gradient is the sum of what each routing layer contributes. In
    float64: with every adapter weight drawn from N(0, 1) the gradient is a sum of terms that nearly
    cancel, whose fp32 rounding depends on the path each layer takes (alone or in a group)."""
    model = mos_model(rank=4, equivalent_rank=4, private_rank=1, shards_per_vector=2).double()
    ids = torch.randint(4, 200, (2, 9))
    model(ids).logits.pow(2).mean().backward()
    pool = model.shardtune_stores.pool("A", "q_proj")
    total = pool.grad.clone()
    # Recompute with each layer's contribution separately via a fresh graph per layer.
    contributions = torch.zeros_like(total)
    layers = [x for x in adapted_layers(model).values() if x.adapter.kind == "q_proj"]
    for keep in layers:
        pool.grad = None
        saved = {}
        for other in layers:
            if other is not keep:
                a, b = other.adapter.gathered()
                saved[other] = (a.detach(), b.detach())
        originals = {}
        for other, (a, b) in saved.items():
            originals[other] = other.adapter.routed
            other.adapter.routed = lambda a=a, b=b: (a, b)  # freeze the other layers' view
        model.zero_grad()
        model(ids).logits.pow(2).mean().backward()
        contributions += pool.grad
        for other, fn in originals.items():
            other.adapter.routed = fn
    assert total.abs().max() > 0
    torch.testing.assert_close(total, contributions, atol=1e-9 * total.abs().max().item(), rtol=1e-6)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"rank": 8, "equivalent_rank": 2, "private_rank": 1}, "adapter.rank"),
        ({"private_rank": 5, "equivalent_rank": 4}, "adapter.private_rank"),
        ({"shards_per_vector": 3}, "adapter.shards_per_vector"),
    ],
)
def test_invalid_settings_name_the_key(kw, key):
    model = build_tiny_model("tiny-llama")
    with pytest.raises(RecipeError, match=f"^{key}: "):
        inject_adapter(model, tiny_options("mos", targets="all-linear", **kw))


def test_routing_command_on_recipe_and_run(tmp_path):
    import json

    import yaml
    from conftest import TINY_OPTIONS, tiny_recipe
    from typer.testing import CliRunner

    from shardtune.cli import app

    runner = CliRunner()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path, adapter={"method": "mos", **TINY_OPTIONS["mos"]})))
    result = runner.invoke(app, ["routing", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    q0 = report["layers"][0]
    assert q0["type"] == "q_proj" and q0["matrices"]["A"]["pool"] == "A_q_proj"
    assert sum(q0["matrices"]["A"]["private"]) == 2  # p = 1 vector of l = 2 shards
    pool = report["pools"]["A_q_proj"]
    assert (
        pool["shards"] == 4 * 2 * 2
        and pool["unused"] + sum(pool["used_by_layers"].values()) == pool["shards"]
    )
    grid = report["overlap"]["q_proj"]["A"]
    assert grid[0][0] == 8 and grid[0][1] == grid[1][0] and grid[0][1] < 8  # private shards never overlap

    result = runner.invoke(app, ["routing", str(recipe), "--plot", str(tmp_path / "h.png")])
    assert result.exit_code == 0, result.output
    assert "routing summary" in result.output and (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    n = len(report["layers"])  # the per-layer table says how many of the layers it lists
    assert f"first 8 of {n} layers; --layers for more" in result.output
    for option, title in (("2", f"first 2 of {n} layers"), (str(n + 50), f"all {n} layers")):
        result = runner.invoke(app, ["routing", str(recipe), "--layers", option])
        assert result.exit_code == 0 and title in result.output, result.output

    # A trained run, and the simpler sharing of other methods.
    result = runner.invoke(app, ["train", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(runner.invoke(app, ["routing", str(tmp_path / "run"), "--json"]).stdout) == report
    result = runner.invoke(
        app,
        [
            "routing",
            str(recipe),
            "--set",
            "adapter.method=fossil",
            "--set",
            "adapter.equivalent_rank=null",
            "--set",
            "adapter.private_rank=null",
            "--set",
            "adapter.shards_per_vector=null",
            "--json",
        ],
    )
    assert result.exit_code == 2  # null is not a valid rank: the keys must be removed, not nulled
    result = runner.invoke(
        app, ["routing", str(recipe), "--set", "adapter={method: fossil, rank: 4}", "--json"]
    )
    fossil = json.loads(result.stdout)
    assert fossil["layers"][0]["matrices"]["A"]["pool"] == "fixed"
    assert "reused" in fossil["layers"][0]["matrices"]["B"]["note"]
    assert fossil["overlap"]["q_proj"]["B"][0][1] == 0  # nothing shared across layers


def test_routing_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    from shardtune.core.errors import BadInput
    from shardtune.inspection.routing import plot, routing_report

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    model = mos_model()
    with pytest.raises(BadInput, match="--plot needs matplotlib: pip install matplotlib"):
        plot(routing_report(model), tmp_path / "x.png")


def count_index_selects(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.index_select.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_a_training_step_gathers_each_pool_once_and_trains_what_per_layer_gathers_train():
    """Per-step assembly (ShardPools.assemble, at the model root): one index_select per pool per
    forward instead of one per layer, and the same outputs and pool gradients as each layer gathering
    for itself (``assemble_per_step = False``), with and without gradient checkpointing."""
    ids = torch.randint(4, 200, (2, 9))
    results = {}
    for per_step in (True, False):
        for checkpointing in (False, True):
            model = mos_model(rank=4, equivalent_rank=4, private_rank=1, shards_per_vector=2)
            model.shardtune_stores.assemble_per_step = per_step
            if checkpointing:
                enable_gradient_checkpointing(model)
                model.train()
            pools = model.shardtune_stores.pools
            layers = adapted_layers(model)
            n = count_index_selects(lambda model=model: model(ids).logits.pow(2).mean().backward())
            recomputed = len(layers) * 2 if checkpointing and not per_step else 0
            assert n == (len(pools) if per_step else 2 * len(layers)) + recomputed, (
                per_step,
                checkpointing,
                n,
            )
            results[per_step, checkpointing] = (
                model(ids).logits.detach(),
                {k: p.grad for k, p in pools.items()},
            )
    want_logits, want_grads = results[False, False]
    for key, (logits, grads) in results.items():
        torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=1e-6, msg=str(key))
        for name, grad in grads.items():
            scale = max(1.0, want_grads[name].abs().max().item())
            assert (grad - want_grads[name]).abs().max().item() <= 1e-6 * scale, (key, name)


def test_assembled_factors_are_used_only_while_the_pools_are_unchanged():
    """After an optimizer step (the pools change in place) a layer called on its own gathers afresh;
    a forward without gradients (eval, generate) drops the assembly; merge reads the pools directly."""
    model = mos_model(rank=4, equivalent_rank=4, private_rank=1, shards_per_vector=2)
    ids = torch.randint(4, 200, (2, 9))
    layer = next(iter(adapted_layers(model).values()))
    model(ids).logits.pow(2).mean().backward()
    assert layer.adapter.step_factors is None  # released when the forward ended: backward needs none
    enable_gradient_checkpointing(model)
    model.train()
    model(ids).logits.pow(2).mean().backward()
    assert layer.adapter.step_factors is not None  # kept for the blocks recomputed in backward
    torch.testing.assert_close(layer.adapter.routed()[0], layer.adapter.gathered()[0])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    stale_a = layer.adapter.step_factors[0]
    fresh_a, fresh_b = layer.adapter.gathered()
    assert not torch.equal(stale_a, fresh_a)
    assert torch.equal(layer.adapter.routed()[0], fresh_a)
    x = torch.randn(2, 3, layer.adapter.in_features)
    want = layer.base_layer(x) + layer.adapter.scale * x @ fresh_a.T @ fresh_b.T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model(ids)
    assert all(x.adapter.step_factors is None for x in adapted_layers(model).values())


def test_under_autocast_the_assembled_fp32_factors_are_freed_when_the_forward_ends():
    """Peak memory: under bf16 autocast each layer saves bf16 copies of its factors for backward, so
    once the forward ends nothing holds the fp32 assembly (as nothing holds per-layer gathers)."""
    import gc
    import weakref

    model = mos_model(rank=4, equivalent_rank=4, private_rank=1, shards_per_vector=2)
    ids = torch.randint(4, 200, (2, 9))
    refs = []

    def grab(module, _args):
        refs.extend(weakref.ref(t) for t in module.adapter.step_factors)

    for layer in adapted_layers(model).values():
        layer.register_forward_pre_hook(grab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).logits.float().pow(2).mean()
    gc.collect()
    assert refs and all(r() is None for r in refs), sum(r() is not None for r in refs)
    loss.backward()
    assert model.shardtune_stores.pool("A", "q_proj").grad.abs().sum() > 0
