"""The merge / enable state machine of adapted layers, for every method.

merge twice == merge once; unmerge after merge gives the base weights back; a disabled layer gives the
base model's output whether merged or not (and disabling never changes the weights or the merge state);
merge → save → merge: the saved adapter is the unmerged one and merging it again gives the same model.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_options, tiny_recipe
from safetensors.torch import load_file

from shardtune.adapters import METHODS
from shardtune.adapters.model import (
    adapted_layers,
    adapter_disabled,
    adapter_named_parameters,
    adapter_state_dict,
    inject_adapter,
    merge_adapter,
    unmerge_adapter,
)
from shardtune.artifacts.prune import prune_model
from shardtune.models.loading import build_tiny_model, byte_tokenizer

IDS = torch.randint(4, 260, (2, 11), generator=torch.Generator().manual_seed(7))
TOL = dict(atol=5e-5, rtol=1e-5)  # W·x + ΔW·x vs (W + ΔW)·x in fp32
CASES = [(m, "tiny-llama") for m in METHODS] + [("lora", "tiny-gpt2"), ("sharelora", "tiny-gpt2")]


def base_model(method, alias):
    model = build_tiny_model(alias)
    if method == "lors":
        prune_model(model, "magnitude", pattern="2:4")
    return model


def adapted(method, alias):
    model = base_model(method, alias)
    inject_adapter(model, tiny_options(method, targets="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    return model


def logits(model):
    model.eval()  # GPT-2 has dropout
    with torch.no_grad():
        return model(IDS).logits


def weights(model):
    return {n: layer.base_layer.weight.detach().clone() for n, layer in adapted_layers(model).items()}


@pytest.mark.parametrize("method, alias", CASES)
def test_merge_twice_equals_merge_once_and_unmerge_restores_the_base(method, alias):
    model = adapted(method, alias)
    before, adapted_out = weights(model), logits(model)
    base_out = logits(base_model(method, alias))
    assert (adapted_out - base_out).abs().max() > 1e-2
    merge_adapter(model)
    once = weights(model)
    assert all(not torch.equal(once[n], before[n]) for n in before)  # every layer took its ΔW
    merge_adapter(model)
    twice = weights(model)
    assert all(torch.equal(once[n], twice[n]) for n in once)  # a second merge adds nothing
    torch.testing.assert_close(logits(model), adapted_out, **TOL)
    unmerge_adapter(model)
    restored = weights(model)
    for n in before:
        torch.testing.assert_close(restored[n], before[n], atol=1e-6, rtol=0, msg=n)
        assert torch.equal(restored[n] == 0, before[n] == 0) or method != "lors", n
    unmerge_adapter(model)  # unmerging an unmerged layer changes nothing
    assert all(torch.equal(weights(model)[n], restored[n]) for n in restored)
    torch.testing.assert_close(logits(model), adapted_out, **TOL)
    with adapter_disabled(model):
        torch.testing.assert_close(logits(model), base_out, **TOL)


@pytest.mark.parametrize("method, alias", CASES)
def test_disabled_while_merged_gives_the_base_model(method, alias):
    model = adapted(method, alias)
    adapted_out, base_out = logits(model), logits(base_model(method, alias))
    merge_adapter(model)
    merged_weights = weights(model)
    with adapter_disabled(model):
        torch.testing.assert_close(logits(model), base_out, **TOL)
    assert all(layer.merged and layer.enabled for layer in adapted_layers(model).values())
    assert all(torch.equal(weights(model)[n], w) for n, w in merged_weights.items())  # weights untouched
    torch.testing.assert_close(logits(model), adapted_out, **TOL)
    unmerge_adapter(model)
    with adapter_disabled(model):
        torch.testing.assert_close(logits(model), base_out, **TOL)


def test_merged_layer_disabled_in_bf16_is_close_to_the_bf16_base():
    """A bf16 base: the merged weight is rounded once; taking ΔW out again stays within bf16 noise."""
    model = build_tiny_model("tiny-llama", torch.bfloat16)
    inject_adapter(model, tiny_options("lora", targets="all-linear"))
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.normal_(0, 0.1)
    base_out = logits(build_tiny_model("tiny-llama", torch.bfloat16)).float()
    adapted_out = logits(model).float()
    merge_adapter(model)
    with adapter_disabled(model):
        off = logits(model).float()
    effect = (adapted_out - base_out).abs().max()
    assert (off - base_out).abs().max() < 0.1 * effect


def test_merge_into_a_bf16_base_is_computed_in_fp32_and_rounded_once():
    """``W ← bf16(fp32(W) + s·B·A)``: ΔW is not rounded to bf16 before the add (a second rounding)."""
    model = build_tiny_model("tiny-llama", torch.bfloat16)
    inject_adapter(model, tiny_options("lora", rank=4, alpha=8, targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.normal_(0, 0.05)
    before = weights(model)
    merge_adapter(model)
    for name, layer in adapted_layers(model).items():
        # fp32; s = 2 is a power of two, so s·(B·A) and (s·B)·A are the same bits
        delta = 8 / 4 * layer.adapter.lora_B.detach() @ layer.adapter.lora_A.detach()
        expected = (before[name].float() + delta).to(torch.bfloat16)
        assert torch.equal(layer.base_layer.weight, expected), name


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_save_merge(tmp_path, method):
    """Saving a merged model writes the adapter itself (not merged weights); loading it on a fresh base
    and merging gives the same weights and logits as the first merge."""
    from shardtune.artifacts.checkpoint import load_adapted_model, save_adapter
    from shardtune.recipe.schema import recipe_from_dict

    model = adapted(method, "tiny-llama")
    unmerged_state = adapter_state_dict(model)
    merge_adapter(model)
    merged_out, merged_weights = logits(model), weights(model)
    if method == "lors":  # a pruned base is not the builtin alias: save it as a model directory
        base_dir = tmp_path / "sparse"
        base_model(method, "tiny-llama").save_pretrained(base_dir)
        byte_tokenizer().save_pretrained(base_dir)
        name = str(base_dir)
    else:
        name = "tiny-llama"
    raw = tiny_recipe(tmp_path, model={"name": name}, adapter={"method": method, **TINY_OPTIONS[method]})
    recipe = recipe_from_dict(raw)
    save_adapter(model, recipe, tmp_path / "saved", step=3)
    saved = load_file(tmp_path / "saved" / "adapter.safetensors")
    assert saved.keys() == unmerged_state.keys()
    assert all(torch.equal(saved[k], unmerged_state[k]) for k in saved)
    merge_adapter(model)  # merge again after saving: still a no-op
    assert all(torch.equal(weights(model)[n], w) for n, w in merged_weights.items())

    loaded, _, meta = load_adapted_model(tmp_path / "saved")
    assert meta["step"] == 3
    torch.testing.assert_close(logits(loaded), merged_out, **TOL)
    merge_adapter(loaded)
    for n, w in weights(loaded).items():
        torch.testing.assert_close(w, merged_weights[n], atol=1e-6, rtol=0, msg=n)
    torch.testing.assert_close(logits(loaded), merged_out, **TOL)


def test_merge_run_twice_writes_the_same_model(tmp_path):
    """`shardtune merge` leaves the run as it was: a second merge of the same run gives the same weights."""
    from transformers import AutoModelForCausalLM

    from shardtune.artifacts.export import merge_run
    from shardtune.recipe.schema import recipe_from_dict
    from shardtune.training.loop import train

    train(recipe_from_dict(tiny_recipe(tmp_path, adapter={"method": "mos", **TINY_OPTIONS["mos"]})))
    run = tmp_path / "run"
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix != ".log"}
    merge_run(run, tmp_path / "m1", dtype="fp32")
    merge_run(run, tmp_path / "m2", dtype="fp32")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in files} == files
    stored = load_file(tmp_path / "m1" / "model.safetensors")
    assert not [k for k in stored if "shardtune" in k or "adapter" in k or "base_layer" in k]
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "m1").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "m2").state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    base = build_tiny_model("tiny-llama").state_dict()
    changed = [k for k in one if not torch.equal(one[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only adapted weights moved
    assert json.loads((run / "adapter.json").read_text())["method"] == "mos"
