"""VeRA and VB-LoRA against PEFT (`VeraConfig`, `VBLoRAConfig`): same init, same logits, same counts."""

from __future__ import annotations

import pytest
import torch
from conftest import paper_count, tiny_options, tiny_recipe
from safetensors.torch import load_file
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

peft = pytest.importorskip("peft")
IDS = torch.randint(4, 200, (2, 11), generator=torch.Generator().manual_seed(3))
TARGETS = ["q_proj", "v_proj", "down_proj"]  # three shapes: 64×64, 32×64, 64×176


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def randomize(model, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------------
# VeRA


@pytest.mark.parametrize("seed", [0, 7])
def test_vera_projections_are_peft_init_bit_for_bit(seed):
    ours = build_tiny_model("tiny-llama")
    inject_adapter(ours, tiny_options("vera", rank=8, projection_seed=seed, targets=TARGETS))
    ref = peft.get_peft_model(
        build_tiny_model("tiny-llama"), peft.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=seed)
    )
    stores = ours.shardtune_stores
    assert stores.vera_A.shape == (8, 176) and stores.vera_B.shape == (64, 8)  # largest in / out
    assert torch.equal(stores.vera_A, ref.base_model.vera_A["default"])
    assert torch.equal(stores.vera_B, ref.base_model.vera_B["default"])
    for name, layer in adapted_layers(ours).items():  # d = 0.1, b = 0, as PEFT
        peft_layer = ref.get_submodule(f"base_model.model.{name}")
        assert torch.equal(layer.adapter.lambda_d, peft_layer.vera_lambda_d["default"])
        assert torch.equal(layer.adapter.lambda_b, peft_layer.vera_lambda_b["default"])


@pytest.mark.parametrize("alias, targets", [("tiny-llama", TARGETS), ("tiny-gpt2", ["c_attn", "c_fc"])])
def test_vera_logits_match_peft(alias, targets):
    ours = build_tiny_model(alias)
    inject_adapter(ours, tiny_options("vera", rank=8, targets=targets))
    randomize(ours)
    ref = peft.get_peft_model(
        build_tiny_model(alias),
        peft.VeraConfig(r=8, target_modules=targets, fan_in_fan_out=alias == "tiny-gpt2"),
    )
    state = {}
    for name, layer in adapted_layers(ours).items():
        state[f"base_model.model.{name}.vera_lambda_d.default"] = layer.adapter.lambda_d.detach()
        state[f"base_model.model.{name}.vera_lambda_b.default"] = layer.adapter.lambda_b.detach()
    assert not ref.load_state_dict(state, strict=False).unexpected_keys
    ours_out, ref_out = logits(ours), logits(ref)
    assert (ours_out - logits(build_tiny_model(alias))).abs().max() > 1e-2  # the adapter acts
    err = (ours_out - ref_out).abs().max().item()
    assert err <= 1e-5, err


def test_vera_trains_only_the_vectors():
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, tiny_options("vera", rank=8, targets=TARGETS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.adapter.{v}" for n in adapted_layers(model) for v in ("lambda_d", "lambda_b")}
    assert count_parameters(model)[0] == sum(
        8 + layer.adapter.out_features for layer in adapted_layers(model).values()
    )
    a0, b0 = model.shardtune_stores.vera_A.clone(), model.shardtune_stores.vera_B.clone()
    randomize(model, 0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS).logits.pow(2).mean().backward()
    opt.step()
    assert torch.equal(model.shardtune_stores.vera_A, a0) and torch.equal(model.shardtune_stores.vera_B, b0)
    # the layers read views of the one shared pair: one A for everything, not a copy per layer
    a_views = {layer.adapter.projections()[0].data_ptr() for layer in adapted_layers(model).values()}
    assert a_views == {model.shardtune_stores.vera_A.data_ptr()}


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_projection_persistence(tmp_path, save_projection):
    from shardtune.artifacts.checkpoint import load_adapted_model
    from shardtune.recipe.schema import recipe_from_dict
    from shardtune.training.loop import train

    raw = tiny_recipe(
        tmp_path,
        adapter={"method": "vera", "rank": 4, "projection_seed": 5, "save_projection": save_projection},
        train={"max_steps": 3, "lr": 5e-2},
    )
    train(recipe_from_dict(raw))
    stored = load_file(tmp_path / "run" / "adapter.safetensors")
    assert ("shardtune_stores.vera_A" in stored) == save_projection
    model, _, _ = load_adapted_model(tmp_path / "run")
    again, _, _ = load_adapted_model(tmp_path / "run")
    assert torch.equal(logits(model), logits(again))
    ref = peft.get_peft_model(
        build_tiny_model("tiny-llama"),
        peft.VeraConfig(r=4, target_modules="all-linear", projection_prng_key=5),
    )
    assert torch.equal(model.shardtune_stores.vera_A, ref.base_model.vera_A["default"])


def test_vera_count_llama2_7b_matches_mos_paper():
    """The MoS paper's VeRA baseline on LLaMA-2-7B: 1.42M trainable (r = 256, all seven projections)."""
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert count_trainable(config, method_options("vera", rank=256, targets=all7))[0] == 1_417_216


# ---------------------------------------------------------------------------------------------------
# VB-LoRA


@pytest.mark.parametrize("alias, targets, topk", [("tiny-llama", TARGETS, 2), ("tiny-gpt2", ["c_attn"], 3)])
def test_vblora_logits_match_peft(alias, targets, topk):
    opts = dict(rank=4, num_vectors=32, vector_length=16, topk=topk, targets=targets)
    ours = build_tiny_model(alias)
    inject_adapter(ours, tiny_options("vblora", **opts))
    randomize(ours, 1.0)
    config = peft.VBLoRAConfig(
        r=4,
        num_vectors=32,
        vector_length=16,
        topk=topk,
        target_modules=targets,
        fan_in_fan_out=alias == "tiny-gpt2",
    )
    ref = peft.get_peft_model(build_tiny_model(alias), config)
    with torch.no_grad():
        ref.base_model.vblora_vector_bank["default"].copy_(ours.shardtune_stores.bank)
    state = {}
    for name, layer in adapted_layers(ours).items():
        state[f"base_model.model.{name}.vblora_logits_A.default"] = layer.adapter.logits_A.detach()
        state[f"base_model.model.{name}.vblora_logits_B.default"] = layer.adapter.logits_B.detach()
    assert not ref.load_state_dict(state, strict=False).unexpected_keys
    ours_out, ref_out = logits(ours), logits(ref)
    assert (ours_out - logits(build_tiny_model(alias))).abs().max() > 1e-2
    err = (ours_out - ref_out).abs().max().item()
    assert err <= 1e-5, err
    # trainable parameters: the bank once plus every layer's logits, as PEFT counts them
    assert count_parameters(ours)[0] == ref.get_nb_savable_parameters()[0]


def test_vblora_factors_are_topk_mixtures_of_the_bank():
    """Direct formula: each sub-vector of A and B is Σ_topk softmax(logits)·bank, placed block by block."""
    model = build_tiny_model("tiny-llama")
    targets = inject_adapter(
        model, tiny_options("vblora", rank=3, num_vectors=8, vector_length=16, targets=["q_proj"])
    )
    randomize(model, 1.0)
    bank = model.shardtune_stores.bank.detach()
    adapter = adapted_layers(model)[targets[0].name].adapter
    la, lb = adapter.logits_A.detach(), adapter.logits_B.detach()

    def mix(logit):
        top = logit.topk(2)
        w = torch.softmax(top.values, 0)
        return sum(w[i] * bank[top.indices[i]] for i in range(2))

    a_ref = torch.stack([torch.cat([mix(la[i, c]) for c in range(64 // 16)]) for i in range(3)])
    b_ref = torch.stack([torch.cat([mix(lb[c, i]) for c in range(64 // 16)]) for i in range(3)], dim=1)
    a, b = adapter.factors()
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, b_ref)
    x = torch.randn(5, 64)
    # x·Aᵀ·Bᵀ and x·(B·A)ᵀ round differently: a few 1e-6 apart (which depends on the thread count)
    torch.testing.assert_close(adapter.delta(x), x @ (b_ref @ a_ref).T, atol=1e-5, rtol=1e-5)
    # the bank gets the gradient of every layer (it is one parameter at the model root)
    assert [n for n, _ in adapter_named_parameters(model)][0] == "shardtune_stores.bank"
    assert (
        paper_count(tiny_options("vblora", rank=3, num_vectors=8, vector_length=16), targets)
        == count_parameters(model)[0]
    )


def test_vblora_checks_sizes():
    with pytest.raises(RecipeError, match=r"adapter.vector_length: must divide .* 64×176, got 32"):
        inject_adapter(
            build_tiny_model("tiny-llama"), tiny_options("vblora", vector_length=32, targets=["down_proj"])
        )
    with pytest.raises(RecipeError, match="adapter.topk: must be at most adapter.num_vectors"):
        inject_adapter(build_tiny_model("tiny-llama"), tiny_options("vblora", topk=40, targets=["q_proj"]))


def test_routing_views():
    from shardtune.inspection.routing import routing_report

    model = build_tiny_model("tiny-llama")
    inject_adapter(model, tiny_options("vera", targets=["q_proj", "v_proj"]))
    report = routing_report(model)
    assert {e["matrices"]["A"]["pool"] for e in report["layers"]} == {"vera_A"}
    assert report["pools"]["vera_A"]["max_reuse"] == 4  # every layer uses every row of the one A
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, tiny_options("vblora", targets=["q_proj", "v_proj"]))
    report = routing_report(model)
    assert {e["matrices"]["B"]["pool"] for e in report["layers"]} == {"vector_bank"}
    assert report["pools"]["vector_bank"]["shards"] <= 32
