"""train.optimizer (issue 36): each is the library's own optimizer with the recipe's settings — checked
by replaying every step of a run on a fresh reference optimizer (torch's or bitsandbytes') that gets
the same parameters, gradients and learning rate, and must land on the same values — and each
resumes exactly from a checkpoint (its state, 8-bit codes and plain-number steps included)."""

from __future__ import annotations

import pytest
import torch
from conftest import resumed_and_uninterrupted, tiny_recipe

from shardtune.core.errors import RecipeError
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training import loop
from shardtune.training.loop import train

bnb = pytest.importorskip("bitsandbytes", reason="the 8-bit optimizers need bitsandbytes (the quant extra)")

# VB-LoRA: a bank large enough (256 × 16 = 4,096 numbers) for bitsandbytes' 8-bit states (smaller
# tensors keep float32 ones), and two roles at two rates (bank and logits: param groups)
VBLORA = {"method": "vblora", "rank": 4, "num_vectors": 256, "vector_length": 16, "topk": 2}
TRAIN = {"max_steps": 5, "lr": 5e-3, "weight_decay": 0.01, "betas": [0.8, 0.95], "warmup_steps": 2}


def reference(name: str, groups: list[dict]):
    settings = {"lr": TRAIN["lr"], "weight_decay": TRAIN["weight_decay"]}
    if name == "adafactor":
        return torch.optim.Adafactor(groups, **settings)
    if name == "adamw":  # torch's fused kernel, as shardtune takes it on the CPU
        return torch.optim.AdamW(groups, betas=tuple(TRAIN["betas"]), fused=True, **settings)
    kind = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    return kind[name](groups, betas=tuple(TRAIN["betas"]), **settings)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"])
def test_every_step_is_the_reference_optimizers_step(tmp_path, monkeypatch, name):
    steps = []  # per optimizer step: [(group, param before, grad, lr)], params after
    made = []
    real = loop.make_optimizer

    def recording(params, cfg, sharded=False):
        optimizer = real(params, cfg, sharded)
        made.append(optimizer)
        inner = optimizer.step

        def step(closure=None):
            seen = [
                (i, p.detach().clone(), p.grad.detach().clone(), group["lr"])
                for i, group in enumerate(optimizer.param_groups)
                for p in group["params"]
            ]
            out = inner(closure)
            steps.append((seen, [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]))
            return out

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", recording)
    train(recipe_from_dict(tiny_recipe(tmp_path, adapter=VBLORA, train={**TRAIN, "optimizer": name})))
    assert len(steps) == TRAIN["max_steps"] and len(made[0].param_groups) == 2  # bank, logits

    first, _ = steps[0]
    mirror = [torch.nn.Parameter(before.clone()) for _, before, _, _ in first]
    groups: dict[int, list] = {}
    for (i, *_), p in zip(first, mirror, strict=True):
        groups.setdefault(i, []).append(p)
    ref = reference(name, [{"params": ps} for _, ps in sorted(groups.items())])
    for seen, after in steps:
        for (i, before, grad, lr), p in zip(seen, mirror, strict=True):
            assert torch.equal(p.data, before)  # the run's parameters are the reference's so far
            p.grad = grad
            ref.param_groups[i]["lr"] = lr
        ref.step()
        for p, expected in zip(mirror, after, strict=True):
            assert torch.equal(p.data, expected)
    if name.endswith("8bit"):
        assert any(
            v.dtype == torch.uint8
            for state in made[0].state.values()
            for v in state.values()
            if torch.is_tensor(v)
        )


@pytest.mark.parametrize("name", ["adamw_8bit", "adafactor"])
def test_each_optimizer_resumes_exactly(tmp_path, name):
    def recipe(where):
        raw = tiny_recipe(where, adapter=VBLORA, train={**TRAIN, "optimizer": name, "save_every": 2})
        return recipe_from_dict(raw)

    again, final = resumed_and_uninterrupted(recipe, tmp_path, checkpoint=2)
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_another_optimizer_does_not_resume_a_checkpoint(tmp_path):
    raw = tiny_recipe(tmp_path, train={"max_steps": 3, "save_every": 2})
    train(recipe_from_dict(raw))
    raw["train"]["optimizer"] = "adafactor"
    with pytest.raises(Exception, match="train.optimizer"):
        train(recipe_from_dict(raw), resume=tmp_path / "run" / "checkpoint-2")


def test_eight_bit_with_fsdp_is_one_line(tmp_path):
    with pytest.raises(RecipeError) as found:
        recipe_from_dict(tiny_recipe(tmp_path, train={"optimizer": "adamw_8bit", "strategy": "fsdp"}))
    assert "adamw_8bit does not work with strategy: fsdp" in str(found.value) and "\n" not in str(found.value)
