"""ShareLoRA: tied factors, parameter counts (tiny and LLaMA-7B shapes), gradients, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_options
from transformers import AutoModelForCausalLM, LlamaConfig

from shardtune.adapters.model import (
    adapted_layers,
    adapter_named_parameters,
    count_parameters,
    inject_adapter,
)
from shardtune.core.errors import RecipeError
from shardtune.models.loading import build_tiny_model

LLAMA_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def count_on_meta(config, **options) -> int:
    """Trainable parameters of an adapter on a model built on the meta device (no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    with torch.device("meta"):
        inject_adapter(model, tiny_options("sharelora", **options))
    return count_parameters(model)[0]


@pytest.mark.parametrize(
    "targets, share, expected",
    [  # the spec's table (fossil_sharelora_lors.md §B.3), computed from r, d_in, d_out, L
        (["q_proj", "v_proj"], "a", 17_301_504),  # 17.30M
        (["q_proj", "v_proj"], "b", 17_301_504),
        (["q_proj", "v_proj"], "ab", 1_048_576),  # 1.05M
        (ALL7, "a", 89_309_184),  # 89.3M (−44.1 % vs LoRA 159.9M)
        (ALL7, "b", 75_595_776),  # 75.6M
        (ALL7, "ab", 4_997_120),  # 5.0M
    ],
)
def test_parameter_counts_llama_7b(targets, share, expected):
    assert count_on_meta(LLAMA_7B, rank=64, targets=targets, share=share) == expected


def test_lora_count_llama_7b_for_reference():
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(LLAMA_7B)
    with torch.device("meta"):
        inject_adapter(model, tiny_options("lora", rank=64, targets=ALL7))
    assert count_parameters(model)[0] == 159_907_840  # 159.9M


@pytest.mark.parametrize("share", ["a", "b", "ab"])
def test_tiny_counts_match_formula(share):
    model = build_tiny_model("tiny-llama")
    targets = inject_adapter(model, tiny_options("sharelora", rank=4, share=share, targets="all-linear"))
    n_layers = 2
    expected = 0
    for kind in {t.kind for t in targets}:
        t = next(x for x in targets if x.kind == kind)
        a = 4 * t.in_features * (1 if "a" in share else n_layers)
        b = 4 * t.out_features * (1 if "b" in share else n_layers)
        expected += a + b
    assert count_parameters(model)[0] == expected


def test_shared_matrix_is_one_parameter_and_layers_agree():
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, tiny_options("sharelora", share="ab", targets=["q_proj", "v_proj"]))
    names = [n for n, _ in adapter_named_parameters(model)]
    assert sorted(names) == sorted(
        f"shardtune_stores.matrices.{m}_{k}" for m in "AB" for k in ("q_proj", "v_proj")
    )
    q = [x.adapter for n, x in adapted_layers(model).items() if n.endswith("q_proj")]
    assert q[0].factors()[0] is q[1].factors()[0]
    opt = torch.optim.SGD([p for _, p in adapter_named_parameters(model)], lr=0.1)
    model(torch.randint(4, 200, (2, 7))).logits.sum().backward()
    opt.step()
    torch.testing.assert_close(q[0].factors()[1], q[1].factors()[1])  # still identical after a step


@pytest.mark.parametrize("share", ["a", "b"])
def test_shared_gradient_is_sum_over_layers(share):
    """Against an untied dense reference: plain LoRA whose layers hold copies of the shared matrix."""
    ids = torch.randint(4, 200, (2, 9))
    tied = build_tiny_model("tiny-llama")
    inject_adapter(tied, tiny_options("sharelora", share=share, targets=["q_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in adapter_named_parameters(tied):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    untied = build_tiny_model("tiny-llama")
    inject_adapter(untied, tiny_options("lora", rank=4, targets=["q_proj", "down_proj"]))
    with torch.no_grad():  # copy the raw tensors (shared or own), not the implementation's factors()
        matrices = tied.shardtune_stores.matrices
        for name, layer in adapted_layers(untied).items():
            kind = name.rsplit(".", 1)[-1]
            own = adapted_layers(tied)[name].adapter
            layer.adapter.lora_A.copy_(matrices[f"A_{kind}"] if share == "a" else own.lora_A)
            layer.adapter.lora_B.copy_(matrices[f"B_{kind}"] if share == "b" else own.lora_B)
    assert torch.allclose(tied(ids).logits, untied(ids).logits, atol=1e-5)
    tied(ids).logits.pow(2).mean().backward()
    untied(ids).logits.pow(2).mean().backward()
    matrix = share.upper()
    for kind in ("q_proj", "down_proj"):
        shared = tied.shardtune_stores.matrices[f"{matrix}_{kind}"].grad
        per_layer = [
            getattr(x.adapter, f"lora_{matrix}").grad
            for n, x in adapted_layers(untied).items()
            if n.endswith(kind)
        ]
        torch.testing.assert_close(shared, sum(per_layer), atol=1e-6, rtol=1e-4)


def test_scope_shape_shares_across_types():
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, tiny_options("sharelora", share="a", scope="shape", targets="all-linear"))
    keys = set(model.shardtune_stores.matrices.keys())
    assert keys == {"A_in64", "A_in176"}  # q,k,v,o,gate,up read 64 inputs; down reads 176
    # GPT-2's attn.c_proj (64 in) and mlp.c_proj (256 in) share a name; they are two projection types.
    gpt2 = build_tiny_model("tiny-gpt2")
    inject_adapter(gpt2, tiny_options("sharelora", share="a", scope="type", targets=["c_proj"]))
    assert set(gpt2.shardtune_stores.matrices.keys()) == {"A_attn_c_proj", "A_mlp_c_proj"}


def test_check_refuses_mixed_sizes_in_one_group():
    from shardtune.adapters.base import Target
    from shardtune.adapters.sharelora import ShareLora

    targets = [Target("a.0.x", None, 8, 8, False, "x"), Target("a.1.x", None, 16, 8, False, "x")]
    with pytest.raises(RecipeError, match="adapter.scope: layers sharing A_x have different sizes"):
        ShareLora().check(tiny_options("sharelora", share="a"), targets)


def test_routing_shows_shared_factor():
    from shardtune.inspection.routing import routing_report

    model = build_tiny_model("tiny-llama")
    inject_adapter(model, tiny_options("sharelora", share="a", targets=["q_proj"]))
    report = routing_report(model)
    first, second = report["layers"]
    assert first["matrices"]["A"]["pool"] == second["matrices"]["A"]["pool"] == "A_q_proj"
    assert first["matrices"]["B"]["pool"].endswith(":B")  # own B
    assert report["overlap"]["q_proj"]["A"][0][1] == 4 and report["overlap"]["q_proj"]["B"][0][1] == 0
    assert report["pools"]["A_q_proj"]["max_reuse"] == 2


def mha_llama():
    """A tiny LLaMA without grouped-query attention: q, k and v all 64 → 64."""
    from shardtune.models.loading import TINY_CONFIGS

    config = TINY_CONFIGS["tiny-llama"]()
    config.num_key_value_heads = 4
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_scope_attention_shares_one_factor_for_q_k_v():
    model = build_tiny_model("tiny-llama")
    targets = inject_adapter(
        model, tiny_options("sharelora", rank=4, share="a", scope="attention", targets="all-linear")
    )
    keys = set(model.shardtune_stores.matrices.keys())
    assert keys == {"A_qkv", "A_o_proj", "A_gate_proj", "A_up_proj", "A_down_proj"}
    qkv = [
        x.adapter
        for n, x in adapted_layers(model).items()
        if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
    ]
    assert len(qkv) == 6 and all(a.factors()[0] is qkv[0].factors()[0] for a in qkv)
    # count: one A for the 6 attention layers, one per other type; B per layer
    expected = 4 * 64 + sum(4 * t.out_features for t in targets)
    expected += sum(
        4 * t.in_features
        for t in targets
        if t.kind in ("o_proj", "gate_proj", "up_proj", "down_proj") and ".0." in t.name
    )
    assert count_parameters(model)[0] == expected


@pytest.mark.parametrize("share", ["a", "ab"])
def test_scope_attention_gradient_is_the_sum_over_q_k_v_and_layers(share):
    ids = torch.randint(4, 200, (2, 9))
    tied = mha_llama()
    inject_adapter(
        tied,
        tiny_options("sharelora", share=share, scope="attention", targets=["q_proj", "k_proj", "v_proj"]),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in adapter_named_parameters(tied):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    untied = mha_llama()
    inject_adapter(untied, tiny_options("lora", rank=4, targets=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for name, layer in adapted_layers(untied).items():
            a, b = adapted_layers(tied)[name].adapter.factors()
            layer.adapter.lora_A.copy_(a)
            layer.adapter.lora_B.copy_(b / layer.adapter.scale)
    torch.testing.assert_close(tied(ids).logits, untied(ids).logits, atol=1e-5, rtol=0)
    tied(ids).logits.pow(2).mean().backward()
    untied(ids).logits.pow(2).mean().backward()
    for matrix in share.upper():
        shared = tied.shardtune_stores.matrices[f"{matrix}_qkv"].grad
        per_layer = [getattr(x.adapter, f"lora_{matrix}").grad for x in adapted_layers(untied).values()]
        assert len(per_layer) == 6
        torch.testing.assert_close(shared, sum(per_layer), atol=1e-6, rtol=1e-4)


def test_scope_attention_refuses_shared_b_under_gqa():
    with pytest.raises(
        RecipeError,
        match=r"adapter.scope: layers sharing B_qkv have different sizes \[32, 64\]; use share: a",
    ):
        inject_adapter(
            build_tiny_model("tiny-llama"),
            tiny_options("sharelora", share="b", scope="attention", targets=["q_proj", "k_proj"]),
        )
