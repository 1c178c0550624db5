"""End-to-end training on tiny random models: learning, frozen base, adapter files, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CONV1D_UNSUPPORTED, TINY_OPTIONS, TINY_TRAIN, tiny_recipe

from shardtune.adapters import METHODS
from shardtune.adapters.model import adapter_named_parameters, inject_adapter
from shardtune.artifacts.checkpoint import attach_adapter, list_checkpoints, load_adapted_model
from shardtune.core.errors import BadInput, RecipeError
from shardtune.models.loading import build_tiny_model
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import train


def run(tmp_path, **sections):
    return train(recipe_from_dict(tiny_recipe(tmp_path, **sections)))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_loss_falls_and_only_adapter_changes(tmp_path, method, alias):
    if alias == "tiny-gpt2" and method in CONV1D_UNSUPPORTED:
        pytest.skip(f"{method} needs nn.Linear layers (tested in test_adapters)")
    result = run(
        tmp_path,
        model={"name": alias},
        adapter={"method": method, **TINY_OPTIONS[method]},
        train={"max_steps": 40, **TINY_TRAIN.get(method, {})},
        logging={"every": 1},
    )
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert result.eval_loss is not None and result.eval_loss < losses[0]

    # Only adapter parameters changed: the trained model's base weights equal a fresh model's.
    trained, _, meta = load_adapted_model(tmp_path / "run")
    fresh = build_tiny_model(alias)
    fresh_params = dict(fresh.named_parameters())
    adapter_names = {n for n, _ in adapter_named_parameters(trained)}
    changed_adapter = 0
    for name, p in trained.named_parameters():
        if name in adapter_names:
            changed_adapter += int(p.abs().sum() > 0)
            continue
        base_name = name.replace(".base_layer", "")
        assert torch.equal(p, fresh_params[base_name]), name
    assert changed_adapter == len(adapter_names)
    assert meta["method"] == method and meta["step"] == 40


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_identical_logits(tmp_path, method, input_ids):
    dropout = {} if method == "lors" else {"dropout": 0.1}  # LoRS has no adapter dropout
    run(tmp_path, adapter={"method": method, **TINY_OPTIONS[method], **dropout})
    run_dir = tmp_path / "run"
    assert {"adapter.safetensors", "adapter.json", "recipe.yaml", "metrics.jsonl", "train.log"} <= {
        p.name for p in run_dir.iterdir()
    }
    meta = json.loads((run_dir / "adapter.json").read_text())
    assert meta["base_model"]["name"] == "tiny-llama"
    assert meta["shardtune_version"] and meta["targets"] and meta["options"]["rank"] == 4

    model_a, _, _ = load_adapted_model(run_dir)
    model_b = build_tiny_model("tiny-llama")
    attach_adapter(model_b, run_dir)
    model_b.eval()
    with torch.no_grad():
        a, b = model_a(input_ids).logits, model_b(input_ids).logits
        base = build_tiny_model("tiny-llama")(input_ids).logits
    assert torch.equal(a, b)
    assert (a - base).abs().max() > 1e-3  # the trained adapter is really there


def test_checkpoints_every_n_steps_and_keep_last(tmp_path):
    run(tmp_path, train={"max_steps": 12, "save_every": 3, "keep_checkpoints": 2})
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["checkpoint-6", "checkpoint-9"]
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == 9 and state["epoch"] == 0 and state["batch_in_epoch"] == 9
    assert (ckpts[-1] / "optimizer.safetensors").is_file() and (ckpts[-1] / "rng.safetensors").is_file()
    assert json.loads((ckpts[-1] / "adapter.json").read_text())["step"] == 9
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # no temporary directory left behind
    from safetensors.torch import load_file

    from shardtune.adapters.model import adapter_state_dict

    model, _, meta = load_adapted_model(ckpts[0])  # loads what the checkpoint holds, at its step
    saved = load_file(ckpts[0] / "adapter.safetensors")
    loaded = adapter_state_dict(model)
    assert meta["step"] == 6 and saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    final = load_file(tmp_path / "run" / "adapter.safetensors")
    assert all(not torch.equal(saved[k], final[k]) for k in final if k.endswith("lora_B"))
    # and it is the state at step 6: resumed from it, another run ends exactly where this one ended
    train(
        recipe_from_dict(tiny_recipe(tmp_path / "again", train={"max_steps": 12, "save_every": 3})),
        resume=str(ckpts[0]),
    )
    again = load_file(tmp_path / "again" / "run" / "adapter.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_bf16_and_grad_accum_and_schedules(tmp_path):
    result = run(
        tmp_path,
        adapter={"method": "fossil", "rank": 4},
        train={"precision": "bf16", "grad_accum": 2, "schedule": "linear", "warmup_steps": 2, "max_steps": 6},
        logging={"every": 1},
    )
    assert result.steps == 6
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The rate each step used: warm-up reaches the peak at step 2 (step 1 already learns), then falls
    # linearly towards 0 after the last step.
    assert lrs == pytest.approx([0.5e-2, 1e-2, 1e-2, 0.75e-2, 0.5e-2, 0.25e-2])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_ratio_and_min_lr_shape_the_whole_schedule(tmp_path, schedule):
    """lr 1e-2, min_lr 1e-3, warm-up 25% of 8 steps (2): every step's rate, written out by hand."""
    run(
        tmp_path,
        train={"schedule": schedule, "warmup_ratio": 0.25, "min_lr": 1e-3, "max_steps": 8},
        logging={"every": 1},
    )
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    decay = [(done - 2) / 6 for done in range(2, 8)]  # steps 3..8: progress after the warm-up
    shape = (
        [0.5 * (1 + math.cos(math.pi * p)) for p in decay] if schedule == "cosine" else [1 - p for p in decay]
    )
    assert lrs == pytest.approx([0.5e-2, 1e-2, *(1e-3 + 9e-3 * f for f in shape)])
    assert lrs[-1] > 1e-3  # the floor comes after the last step


@pytest.mark.parametrize(
    "train_keys, message",
    [
        (
            {"warmup_steps": 2, "warmup_ratio": 0.1},
            "train: warmup_steps and warmup_ratio are both set; keep one",
        ),
        ({"min_lr": 0.1, "lr": 0.01}, "train: min_lr 0.1 is above lr 0.01"),
        ({"warmup_ratio": 1.0}, "train.warmup_ratio"),
    ],
)
def test_warmup_and_floor_mistakes_are_one_line(tmp_path, train_keys, message):
    with pytest.raises(RecipeError) as found:
        recipe_from_dict(tiny_recipe(tmp_path, train=train_keys))
    assert message in str(found.value) and "\n" not in str(found.value)


def test_epochs_determine_steps(tmp_path):
    result = run(tmp_path, data={"num_samples": 64}, train={"max_steps": None, "epochs": 2, "batch_size": 16})
    assert result.steps == 8  # 64 / 16 per epoch, two epochs


def test_same_seed_same_adapter(tmp_path, input_ids):
    from safetensors.torch import load_file

    run(tmp_path / "a", adapter={"method": "lora", "dropout": 0.1})
    run(tmp_path / "b", adapter={"method": "lora", "dropout": 0.1})
    a = load_file(tmp_path / "a" / "run" / "adapter.safetensors")
    b = load_file(tmp_path / "b" / "run" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_clobber_a_run(tmp_path):
    run(tmp_path)
    with pytest.raises(BadInput, match=r"output.dir: .* already holds a run"):
        run(tmp_path)
    run(tmp_path, output={"overwrite": True})


def test_data_file_with_prompt_masking(tmp_path):
    from shardtune.data.examples import IGNORE, Example, encode
    from shardtune.models.loading import byte_tokenizer

    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"say {i} =", "completion": f" {i}"} for i in range(50)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = run(tmp_path, data={"task": None, "path": str(path), "eval_samples": 5})
    assert result.steps == 12 and result.eval_loss is not None

    feat, truncated = encode(Example("ab", "cd"), byte_tokenizer(), 64)
    assert feat["labels"][:2] == [IGNORE, IGNORE] and feat["labels"][2:] == feat["input_ids"][2:]
    assert feat["input_ids"][-1] == 2 and not truncated  # ends with EOS
    feat, truncated = encode(Example("ab", "cdefgh"), byte_tokenizer(), 4)
    assert truncated and len(feat["input_ids"]) == 4


def test_attach_rejects_mismatched_adapter(tmp_path):
    run(tmp_path)
    model = build_tiny_model("tiny-gpt2")
    with pytest.raises(BadInput, match="adapter.targets|other layers"):
        attach_adapter(model, tmp_path / "run")
    (tmp_path / "run" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    model = build_tiny_model("tiny-llama")
    with pytest.raises(BadInput, match="corrupt or truncated safetensors"):
        attach_adapter(model, tmp_path / "run")


def test_inject_twice_is_refused():
    model = build_tiny_model("tiny-llama")
    opts = METHODS["lora"].Options(method="lora")
    inject_adapter(model, opts)
    with pytest.raises(BadInput, match="already carries"):
        inject_adapter(model, opts)


def test_eval_every_logs_heldout_loss(tmp_path):
    run(tmp_path, eval={"every": 4}, logging={"every": 2})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    with_eval = [r["step"] for r in rows if "eval_loss" in r]
    assert with_eval == [4, 8, 12]
    assert rows[-1]["eval_loss"] < rows[0]["loss"]


def test_packing_and_truncation_reported(tmp_path):
    result = run(tmp_path, data={"max_length": 42, "packing": True})
    assert result.truncated_examples > 0  # the longer chat-rendered examples exceed 42 tokens
    assert result.steps == 12


def test_adamw_is_fused_unless_sharded():
    """The adapter's AdamW runs torch's fused kernel on unsharded CPU/CUDA parameters (one pass per
    step, not a dozen small ops per tensor), with the same update as the default implementation."""
    from shardtune.training.loop import adamw

    def run(sharded: bool) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8, 4))
        opt = adamw([p], 1e-2, 0.01, (0.9, 0.999), sharded=sharded)
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach(), opt

    fused, opt = run(False)
    assert opt.defaults["fused"] is True
    plain, opt = run(True)
    assert not opt.defaults["fused"]
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
