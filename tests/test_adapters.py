"""Adapter math: LoRA and FOSSIL against PEFT (the reference) and against direct dense formulas."""

from __future__ import annotations

import pytest
import torch
from conftest import CONV1D_UNSUPPORTED, NONZERO_INIT, TINY, paper_count, tiny_options

from shardtune.adapters import METHODS
from shardtune.adapters.model import (
    adapted_layers,
    adapter_disabled,
    adapter_named_parameters,
    count_parameters,
    find_targets,
    inject_adapter,
    merge_adapter,
    unmerge_adapter,
)
from shardtune.core.errors import RecipeError
from shardtune.models.loading import build_tiny_model

peft = pytest.importorskip("peft")


def options(method: str, **kw):
    return METHODS[method].Options(method=method, **kw)


def randomize_adapter(model, seed=0):
    """Give every adapter parameter non-zero values so the update is visible in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------------
# PEFT parity


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(alias, rslora, input_ids):
    ours = build_tiny_model(alias)
    inject_adapter(
        ours, options("lora", rank=4, alpha=8, rslora=rslora, targets=["q_proj", "v_proj", "down_proj"])
    )
    randomize_adapter(ours)

    ref = peft.get_peft_model(
        build_tiny_model(alias),
        peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    )
    state = {}
    for name, layer in adapted_layers(ours).items():
        state[f"base_model.model.{name}.lora_A.default.weight"] = layer.adapter.lora_A.detach()
        state[f"base_model.model.{name}.lora_B.default.weight"] = layer.adapter.lora_B.detach()
    result = ref.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert len(state) == 2 * 3 * 2  # every adapter tensor went somewhere

    ours_out, ref_out = logits(ours, input_ids), logits(ref, input_ids)
    assert (ours_out - logits(build_tiny_model(alias), input_ids)).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(ours_out, ref_out, atol=1e-5, rtol=0)


def test_lora_matches_peft_on_gpt2_conv1d(input_ids):
    ours = build_tiny_model("tiny-gpt2")
    inject_adapter(ours, options("lora", rank=4, alpha=4, targets=["c_attn", "c_fc"]))
    randomize_adapter(ours)
    ref = peft.get_peft_model(
        build_tiny_model("tiny-gpt2"),
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    state = {}
    for name, layer in adapted_layers(ours).items():
        assert layer.fan_in_fan_out
        state[f"base_model.model.{name}.lora_A.default.weight"] = layer.adapter.lora_A.detach()
        state[f"base_model.model.{name}.lora_B.default.weight"] = layer.adapter.lora_B.detach()
    assert not ref.load_state_dict(state, strict=False).unexpected_keys
    torch.testing.assert_close(logits(ours, input_ids), logits(ref, input_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "rank, mode, mini_r",
    [
        (8, "default", 1),  # 64 % 8 == 0 and 176 % 8 == 0: no padding
        (6, "default", 1),  # 64 % 6 == 4, 176 % 6 == 2: zero padding of the input
        (8, "mini", 16),  # q 64, v 32, up 176: all divisible by 16
    ],
)
def test_fossil_matches_peft_miss(rank, mode, mini_r, input_ids):
    targets = ["q_proj", "v_proj", "down_proj"] if mode == "default" else ["q_proj", "v_proj", "up_proj"]
    ours = build_tiny_model("tiny-llama")
    inject_adapter(ours, options("fossil", rank=rank, mode=mode, mini_r=mini_r, targets=targets))
    randomize_adapter(ours)
    ref = peft.get_peft_model(
        build_tiny_model("tiny-llama"),
        peft.MissConfig(
            r=rank, target_modules=targets, init_weights="mini" if mode == "mini" else True, mini_r=mini_r
        ),
    )
    state = {
        f"base_model.model.{name}.miss_block.default": layer.adapter.shard.detach()
        for name, layer in adapted_layers(ours).items()
    }
    assert not ref.load_state_dict(state, strict=False).unexpected_keys
    ours_out = logits(ours, input_ids)
    assert (ours_out - logits(build_tiny_model("tiny-llama"), input_ids)).abs().max() > 1e-3
    torch.testing.assert_close(ours_out, logits(ref, input_ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Direct dense formulas (independent of PEFT)


@pytest.mark.parametrize(
    "in_features, out_features, rank", [(64, 48, 8), (70, 48, 8), (5, 12, 8), (33, 20, 4)]
)
def test_fossil_delta_is_replicated_shard(in_features, out_features, rank):
    """ΔW[o, i] = D[i mod r, o]; forward == x·ΔWᵀ; factors (P, Dᵀ) give the same ΔW."""
    from shardtune.adapters.fossil import FossilAdapter

    layer = FossilAdapter(in_features, out_features, rank, mini_r=None)
    torch.nn.init.normal_(layer.shard)
    d = layer.shard.detach()
    dense = torch.empty(out_features, in_features)
    for o in range(out_features):
        for i in range(in_features):
            dense[o, i] = d[i % rank, o]
    x = torch.randn(3, 5, in_features)
    torch.testing.assert_close(layer.delta_weight(), dense)
    torch.testing.assert_close(layer.delta(x), x @ dense.T, atol=1e-5, rtol=1e-5)
    a, b = layer.factors()
    assert a.shape == (rank, in_features) and b.shape == (out_features, rank)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(b @ a, dense)


def test_fossil_mini_tiles_the_shard():
    from shardtune.adapters.fossil import FossilAdapter

    layer = FossilAdapter(20, 12, 4, mini_r=3)
    torch.nn.init.normal_(layer.shard)
    d = layer.shard.detach()
    dense = torch.tensor([[d[i % 4, o % 3].item() for i in range(20)] for o in range(12)])
    x = torch.randn(7, 20)
    torch.testing.assert_close(layer.delta_weight(), dense)
    torch.testing.assert_close(layer.delta(x), x @ dense.T, atol=1e-5, rtol=1e-5)
    assert layer.shard.numel() == 4 * 3


def test_lora_delta_is_scaled_product():
    from shardtune.adapters.lora import LoraAdapter

    layer = LoraAdapter(16, 10, rank=4, scale=2.5)
    torch.nn.init.normal_(layer.lora_B)
    dense = 2.5 * layer.lora_B.detach() @ layer.lora_A.detach()
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer.delta_weight(), dense)
    torch.testing.assert_close(layer.delta(x), x @ dense.T, atol=1e-5, rtol=1e-5)


def test_initial_update_is_zero_and_init_follows_paper(input_ids):
    """LoRA: Kaiming-uniform A, zero B; FOSSIL: zero shard → the model is unchanged at step 0
    (VB-LoRA's B is a mixture of a random bank: small but not zero, as in PEFT)."""
    base = logits(build_tiny_model("tiny-llama"), input_ids)
    for method in METHODS:
        model = build_tiny_model("tiny-llama")
        inject_adapter(model, tiny_options(method, targets="all-linear"))
        if method in NONZERO_INIT:
            assert 0 < (logits(model, input_ids) - base).abs().max() < 0.5
            continue
        torch.testing.assert_close(logits(model, input_ids), base)
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, options("lora", rank=8, targets=["q_proj"]))
    a = adapted_layers(model)["model.layers.0.self_attn.q_proj"].adapter.lora_A
    bound = 1 / 64**0.5  # kaiming_uniform(a=√5) on fan_in 64 → U(-1/√fan_in, 1/√fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound


# ---------------------------------------------------------------------------------------------------
# Injection, freezing, enable/disable, merge


@pytest.mark.parametrize("alias", TINY)
@pytest.mark.parametrize("method", list(METHODS))
def test_inject_freezes_base_and_counts(alias, method, input_ids):
    if alias == "tiny-gpt2" and method in CONV1D_UNSUPPORTED:
        with pytest.raises(RecipeError, match="nn.Linear layers only"):
            inject_adapter(build_tiny_model(alias), tiny_options(method, targets="all-linear"))
        return
    model = build_tiny_model(alias)
    targets = inject_adapter(model, tiny_options(method, targets="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in adapter_named_parameters(model)}
    assert trainable == adapter and adapter
    n_adapter, _ = count_parameters(model)
    assert n_adapter == paper_count(tiny_options(method), targets)
    randomize_adapter(model)
    out = model(input_ids).logits
    out.sum().backward()
    assert all(p.grad is not None for _, p in adapter_named_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in adapter)


@pytest.mark.parametrize("method", list(METHODS))
def test_disable_and_merge(method, input_ids):
    model = build_tiny_model("tiny-gpt2" if method == "lora" else "tiny-llama")
    base = logits(model, input_ids)
    inject_adapter(model, tiny_options(method, targets="all-linear"))
    randomize_adapter(model)
    adapted = logits(model, input_ids)
    assert (adapted - base).abs().max() > 1e-3
    with adapter_disabled(model):
        torch.testing.assert_close(logits(model, input_ids), base)
    torch.testing.assert_close(logits(model, input_ids), adapted)
    # fp32 rounding differs between W·x + B·A·x and (W + B·A)·x: relative 1e-5 of the logit scale
    tol = dict(atol=5e-5, rtol=1e-5)
    merge_adapter(model)
    torch.testing.assert_close(logits(model, input_ids), adapted, **tol)
    unmerge_adapter(model)
    torch.testing.assert_close(logits(model, input_ids), adapted, **tol)
    with adapter_disabled(model):
        torch.testing.assert_close(logits(model, input_ids), base, **tol)


def test_adapter_dtype_and_bf16_base(input_ids):
    model = build_tiny_model("tiny-llama", dtype=torch.bfloat16)
    inject_adapter(model, options("fossil", rank=4, targets=["q_proj"]))
    assert {p.dtype for _, p in adapter_named_parameters(model)} == {torch.float32}
    randomize_adapter(model)
    assert model(input_ids).logits.dtype == torch.bfloat16
    model = build_tiny_model("tiny-llama", dtype=torch.bfloat16)
    inject_adapter(model, options("lora", rank=4, targets=["q_proj"], dtype="auto"))
    assert {p.dtype for _, p in adapter_named_parameters(model)} == {torch.bfloat16}


def test_target_resolution():
    model = build_tiny_model("tiny-llama")
    names = [t.name for t in find_targets(model, ["q_proj", "v_proj"])]
    assert names == [f"model.layers.{i}.self_attn.{k}" for i in range(2) for k in ("q_proj", "v_proj")]
    assert len(find_targets(model, "all-linear")) == 14  # 7 per layer, lm_head excluded
    assert [t.name for t in find_targets(model, r"model\.layers\.1\..*_proj", exclude=["mlp.up_proj"])] == [
        f"model.layers.1.{k}"
        for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.down_proj")
    ]
    with pytest.raises(RecipeError, match=r"adapter.targets: 'qproj' matches no linear layer.*q_proj"):
        find_targets(model, ["qproj"])
    with pytest.raises(RecipeError, match="adapter.targets: selects no linear layer"):
        find_targets(model, "nothing.*")


def test_fossil_mini_checks_divisibility():
    model = build_tiny_model("tiny-llama")
    with pytest.raises(
        RecipeError, match=r"adapter.mini_r: must divide .*k_proj has out_features 32, got 64"
    ):
        inject_adapter(model, options("fossil", rank=4, mode="mini", mini_r=64, targets=["q_proj", "k_proj"]))


# ---------------------------------------------------------------------------------------------------
# FOSSIL bat: ΔW_bc = (W_bc + I)·D_b, which depends on W


def bat_model(rank=8, targets=("q_proj", "v_proj", "down_proj"), scale=0.02, seed=0):
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, options("fossil", rank=rank, mode="bat", targets=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.adapter.shard.copy_(torch.randn(layer.adapter.shard.shape, generator=g) * scale)
    return model


@pytest.mark.parametrize("rank", [8, 16])
def test_fossil_bat_matches_peft(rank, input_ids):
    targets = ["q_proj", "v_proj", "down_proj"]  # 64×64, 32×64, 64×176: 176 = 11·16
    ours = bat_model(rank, targets)
    ref = peft.get_peft_model(
        build_tiny_model("tiny-llama"), peft.MissConfig(r=rank, target_modules=targets, init_weights="bat")
    )
    state = {
        f"base_model.model.{name}.miss_block.default": layer.adapter.shard.detach()
        for name, layer in adapted_layers(ours).items()
    }
    assert all(
        s.shape == (layer.adapter.out_features // rank, rank, rank)
        for s, layer in zip(state.values(), adapted_layers(ours).values(), strict=True)
    )
    assert not ref.load_state_dict(state, strict=False).unexpected_keys
    ours_out = logits(ours, input_ids)
    assert (ours_out - logits(build_tiny_model("tiny-llama"), input_ids)).abs().max() > 1e-2
    err = (ours_out - logits(ref, input_ids)).abs().max().item()
    assert err <= 1e-5, err


def test_fossil_bat_delta_is_the_block_formula():
    """Direct formula, block by block; depends on W; not low-rank."""
    model = bat_model(rank=4, targets=["k_proj"], scale=0.3)
    layer = adapted_layers(model)["model.layers.0.self_attn.k_proj"]
    w, d = layer.base_layer.weight.detach(), layer.adapter.shard.detach()
    dense = torch.empty_like(w)
    for b in range(w.shape[0] // 4):
        for c in range(w.shape[1] // 4):
            block = w[4 * b : 4 * b + 4, 4 * c : 4 * c + 4]
            dense[4 * b : 4 * b + 4, 4 * c : 4 * c + 4] = (block + torch.eye(4)) @ d[b]
    torch.testing.assert_close(layer.adapter.delta_weight(), dense)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer.adapter.delta(x), x @ dense.T, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(dense) > 4  # rank well above r: not a LoRA
    assert count_parameters(model)[0] == 2 * 32 * 4  # (out/r)·r·r = out·r per layer
    with pytest.raises(NotImplementedError, match="not low-rank"):
        layer.adapter.factors()


def test_fossil_bat_merge_is_exact_and_unmerge_restores_w(input_ids):
    model = bat_model(scale=0.05)
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in adapted_layers(model).items()}
    adapted = logits(model, input_ids)
    merge_adapter(model)
    for name, layer in adapted_layers(model).items():  # W' = W + (W + I)·D: the formula on the unmerged W
        torch.testing.assert_close(
            layer.base_layer.weight, before[name] + layer.adapter.bat_delta(before[name])
        )
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=5e-5, rtol=1e-5)
    unmerge_adapter(model)
    for name, layer in adapted_layers(model).items():  # W = (W' − D)·(I + D)⁻¹, not W' − ΔW(W')
        torch.testing.assert_close(layer.base_layer.weight, before[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), adapted, atol=5e-5, rtol=1e-5)


def test_fossil_bat_checks_block_sizes_and_routing():
    with pytest.raises(RecipeError, match=r"adapter.rank: mode bat .* 64×176, got 32"):
        inject_adapter(
            build_tiny_model("tiny-llama"), options("fossil", rank=32, mode="bat", targets=["down_proj"])
        )
    from shardtune.inspection.routing import routing_report

    report = routing_report(bat_model(rank=8, targets=["v_proj"]))
    b = report["layers"][0]["matrices"]["B"]
    assert len(b["shards"]) == 4 and "shared by the 8 input blocks" in b["note"]


def test_fossil_bat_with_dropout_takes_the_additive_path(input_ids):
    """dropout > 0: W·x + ΔW·dropout(x) — in eval mode the same logits as the merged-weight forward."""
    merged_path = bat_model(scale=0.05)
    additive = build_tiny_model("tiny-llama")
    inject_adapter(
        additive,
        options("fossil", rank=8, mode="bat", dropout=0.3, targets=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, layer in adapted_layers(additive).items():
            layer.adapter.shard.copy_(adapted_layers(merged_path)[name].adapter.shard)
    torch.testing.assert_close(logits(additive, input_ids), logits(merged_path, input_ids), atol=2e-5, rtol=0)
    additive.train()
    a, b = additive(input_ids).logits, additive(input_ids).logits
    assert not torch.equal(a, b)  # dropout acts in training
