"""Adapter files and checkpoints: ``adapter.json``'s method_info is what the layers use; save → load gives
the same model bit for bit; resuming from a checkpoint (in epoch 0 or 1) ends bit for bit where the
uninterrupted run ends — which needs the adapter, the AdamW moments, the RNG (dropout), the data position
and the learning-rate schedule all restored."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_recipe
from safetensors.torch import load_file

from shardtune.adapters import METHODS
from shardtune.adapters.model import (
    adapted_layers,
    adapter_named_parameters,
    adapter_state_dict,
    inject_adapter,
)
from shardtune.artifacts.checkpoint import load_adapted_model, save_adapter
from shardtune.models.loading import build_tiny_model
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import train

IDS = torch.randint(4, 260, (2, 11), generator=torch.Generator().manual_seed(7))
MOS = {"equivalent_rank": 3, "private_rank": 1, "shards_per_vector": 2}

INFO_CASES = [  # options, the rank and scale the paper's formulas give (2 layers of each type)
    ("lora", {"rank": 4, "alpha": 8}, {"rank": 4, "scale": 2.0}),
    ("lora", {"rank": 4, "alpha": 8, "rslora": True}, {"rank": 4, "scale": 4.0}),
    ("fossil", {"rank": 4}, {"rank": 4, "scale": 1.0}),
    ("mos", {"rank": 4, "alpha": 8, **MOS}, {"rank": 4, "scale": 2.0}),
    (
        "mos",
        {"rank": 4, "alpha": 10, **MOS, "subset_selection": False},
        {"rank": 5, "scale": 2.0},
    ),  # (3−1)·2+1
    ("sharelora", {"rank": 4, "alpha": 8, "share": "ab"}, {"rank": 4, "scale": 2.0}),
    ("sharelora", {"rank": 4, "alpha": 8, "rslora": True}, {"rank": 4, "scale": 4.0}),
    ("lors", {"rank": 4, "alpha": 8, "init": "kaiming"}, {"rank": 4, "scale": 4.0, "masked": True}),
    (
        "lors",
        {"rank": 4, "alpha": 8, "rslora": False, "init": "kaiming"},
        {"rank": 4, "scale": 2.0, "masked": True},
    ),
]


@pytest.mark.parametrize("method, opts, expected", INFO_CASES)
def test_method_info_records_the_rank_and_scale_the_layers_use(tmp_path, method, opts, expected):
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, METHODS[method].Options(method=method, targets=["q_proj", "v_proj"], **opts))
    recipe = recipe_from_dict(tiny_recipe(tmp_path, adapter={"method": method, **opts}))
    save_adapter(model, recipe, tmp_path / "a", step=1)
    info = json.loads((tmp_path / "a" / "adapter.json").read_text())["method_info"]
    assert info == pytest.approx(expected)
    for layer in adapted_layers(model).values():
        if method != "fossil":  # FOSSIL has no scale: ΔW is the shard itself
            assert layer.adapter.scale == pytest.approx(info["scale"])
            assert layer.adapter.rank == info["rank"]


@pytest.mark.parametrize("method", list(METHODS))
def test_save_then_load_gives_the_same_model_bit_for_bit(tmp_path, method):
    extra = {"routing_seed": 5} if method == "mos" else {}
    options = METHODS[method].Options(method=method, targets="all-linear", **TINY_OPTIONS[method], **extra)
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        expected = model.eval()(IDS).logits
    recipe = recipe_from_dict(
        tiny_recipe(tmp_path, adapter={"method": method, **TINY_OPTIONS[method], **extra})
    )
    save_adapter(model, recipe, tmp_path / "a", step=7)
    loaded, _, meta = load_adapted_model(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)
    state, again = adapter_state_dict(model), adapter_state_dict(loaded)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert meta["step"] == 7 and meta["trainable_parameters"] == sum(
        p.numel() for _, p in adapter_named_parameters(model)
    )


# ---------------------------------------------------------------------------------------------------
# Exact resume, in one process


def resume_recipe(tmp_path, name: str, method: str = "lora") -> dict:
    """48 training rows in batches of 8: 6 steps an epoch, so 10 steps cross into epoch 1."""
    return tiny_recipe(
        tmp_path,
        adapter={
            "method": method,
            **TINY_OPTIONS[method],
            "dropout": 0.1,
        },  # dropout: the RNG must be restored
        data={"num_samples": 48, "eval_samples": 8},
        train={"max_steps": 10, "save_every": 4, "batch_size": 8, "schedule": "cosine", "warmup_steps": 2},
        output={"dir": str(tmp_path / name)},
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    train(recipe_from_dict(resume_recipe(tmp, "ref")))
    return tmp


@pytest.mark.parametrize("checkpoint", [4, 8])  # epoch 0, batch 4 / epoch 1, batch 2
def test_resume_ends_bit_for_bit_where_the_uninterrupted_run_ends(reference_run, tmp_path, checkpoint):
    ref = reference_run / "ref"
    state = json.loads((ref / f"checkpoint-{checkpoint}" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (
        checkpoint,
        checkpoint // 6,
        checkpoint % 6,
    )
    train(recipe_from_dict(resume_recipe(tmp_path, "resumed")), resume=str(ref / f"checkpoint-{checkpoint}"))
    want = load_file(ref / "adapter.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the checkpoint is really mid-run: its adapter is neither the start nor the end
    mid = load_file(ref / f"checkpoint-{checkpoint}" / "adapter.safetensors")
    assert all(not torch.equal(mid[k], want[k]) for k in want if k.endswith("lora_B"))
    metrics = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    ref_lr = {m["step"]: m["lr"] for m in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())}
    assert [m["step"] for m in metrics] == [s for s in ref_lr if s > checkpoint]
    for m in metrics:  # the schedule continues where it was: the same learning rate at the same step
        assert m["lr"] == pytest.approx(ref_lr[m["step"]], abs=1e-12)
    # the rate step 10 used: cosine over steps 3..10 after 2 warm-up steps, falling to 0 after the last
    assert metrics[-1]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 7 / 8)), abs=1e-12)


def test_checkpoints_are_ordered_by_step_and_latest_is_the_highest(tmp_path):
    from shardtune.artifacts.checkpoint import list_checkpoints, resolve_resume

    for step in (2, 10, 9, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter.json").write_text("{}")
    (tmp_path / "checkpoint-11").mkdir()  # incomplete: no adapter.json
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (2, 9, 10, 100)]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-100"
    assert resolve_resume(tmp_path, None) is None
