"""Learning rates and weight decay by parameter role (issue 36): LoRA+ (train.lr_ratio_b), VB-LoRA's
rates from its paper, train.param_groups. The reference: torch's AdamW stepping the same tensors at
the role's rate — after one step from the same initial adapter (same seed, same gradients), each role
of a grouped run equals the role of a run whose single rate is that role's."""

from __future__ import annotations

import pytest
import torch
from conftest import resumed_and_uninterrupted, tiny_recipe
from safetensors.torch import load_file

from shardtune.adapters.base import parameter_role
from shardtune.core.errors import RecipeError
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import train

VBLORA = {"method": "vblora", "rank": 4, "num_vectors": 8, "vector_length": 16, "topk": 2}


def one_step(tmp_path, name: str, adapter: dict, **train_keys) -> dict[str, torch.Tensor]:
    raw = tiny_recipe(
        tmp_path / name,
        adapter=adapter,
        train={"max_steps": 1, "schedule": "constant", "max_grad_norm": 0.0, **train_keys},
    )
    train(recipe_from_dict(raw))
    return load_file(tmp_path / name / "run" / "adapter.safetensors")


def by_role(tensors: dict[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if parameter_role(k) == role}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vblora_trains_its_logits_at_ten_times_the_banks_rate(tmp_path):
    grouped = one_step(tmp_path, "paper", VBLORA, lr=1e-3)  # the paper's rates: bank 1e-3, logits 1e-2
    flat = {"logits": {"lr_scale": 1.0}}
    at_1e3 = one_step(tmp_path, "1e-3", VBLORA, lr=1e-3, param_groups=flat)
    at_1e2 = one_step(tmp_path, "1e-2", VBLORA, lr=1e-2, param_groups=flat)
    assert same(by_role(grouped, "bank"), by_role(at_1e3, "bank"))
    assert same(by_role(grouped, "logits"), by_role(at_1e2, "logits"))
    assert not same(by_role(grouped, "logits"), by_role(at_1e3, "logits"))


def test_lora_plus_trains_b_at_its_ratio_and_a_role_takes_its_own_weight_decay(tmp_path):
    lora = {"method": "lora", "rank": 4}
    plus = one_step(
        tmp_path, "plus", lora, lr=1e-3, lr_ratio_b=16.0, param_groups={"A": {"weight_decay": 0.5}}
    )
    b_at_16x = one_step(tmp_path, "16x", lora, lr=16e-3)
    plain = one_step(tmp_path, "plain", lora, lr=1e-3)
    assert same(by_role(plus, "B"), by_role(b_at_16x, "B"))
    # A has no gradient at the first step (B starts at zero): only its decay moves it, A ← A·(1 − lr·wd)
    for key, a in by_role(plain, "A").items():
        torch.testing.assert_close(plus[key], a * (1 - 1e-3 * 0.5), rtol=0, atol=1e-7)
    assert not same(by_role(plus, "A"), by_role(plain, "A"))


def test_a_grouped_run_resumes_exactly(tmp_path):
    def recipe(where):
        return recipe_from_dict(
            tiny_recipe(
                where,
                adapter=VBLORA,
                train={
                    "max_steps": 4,
                    "save_every": 2,
                    "lr_ratio_b": None,
                    "param_groups": {"bank": {"weight_decay": 0.1}},
                },
            )
        )

    again, final = resumed_and_uninterrupted(recipe, tmp_path, checkpoint=2)
    assert same(again, final)


@pytest.mark.parametrize(
    "adapter, train_keys, message",
    [
        (
            {"method": "fossil", "rank": 4},
            {"lr_ratio_b": 16},
            "train.lr_ratio_b: fossil has no B parameters (its roles: shard)",
        ),
        (
            {"method": "lora", "rank": 4},
            {"param_groups": {"bank": {"lr_scale": 2}}},
            "train.param_groups.bank: lora has no bank",
        ),
        ({"method": "lora", "rank": 4}, {"param_groups": {"C": {"lr_scale": 2}}}, "train.param_groups"),
        (
            {"method": "lora", "rank": 4},
            {"lr_ratio_b": 4, "param_groups": {"B": {"lr_scale": 2}}},
            "lr_ratio_b and param_groups.B.lr_scale both set",
        ),
        ({"method": "lora", "rank": 4}, {"lr_ratio_b": 0}, "train.lr_ratio_b"),
    ],
)
def test_a_role_the_method_lacks_is_one_line(tmp_path, adapter, train_keys, message):
    with pytest.raises(RecipeError) as found:
        train(recipe_from_dict(tiny_recipe(tmp_path, adapter=adapter, train={"max_steps": 1, **train_keys})))
    assert message in str(found.value) and "\n" not in str(found.value)


def test_roles_by_name():
    names = {
        "model.layers.0.self_attn.q_proj.adapter.lora_A": "A",
        "model.layers.0.self_attn.q_proj.adapter.lora_B": "B",
        "adapter_stores.A_q_proj": "A",
        "adapter_stores.B_q_proj": "B",
        "adapter_stores.bank": "bank",
        "model.layers.0.mlp.up_proj.adapter.logits_A": "logits",
        "model.layers.0.mlp.up_proj.adapter.shard": "shard",
        "model.layers.0.mlp.up_proj.adapter.lambda_d": "scale",
        "model.layers.0.mlp.up_proj.adapter.lora_Au": "A",
        "model.layers.0.mlp.up_proj.adapter.lora_B0": "B",
    }
    assert {name: parameter_role(name) for name in names} == names
