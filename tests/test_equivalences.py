"""Equivalences users rely on: gradient accumulation, bf16 autocast, and PEFT export when short module
names would select more layers than were adapted (full paths) or when layer ranks differ (padding)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_task, tiny_options, tiny_recipe
from safetensors.torch import load_file

from shardtune.adapters.model import adapted_layers, adapter_named_parameters, inject_adapter
from shardtune.artifacts.prune import prune_model
from shardtune.models.loading import build_tiny_model
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import train

peft = pytest.importorskip("peft")
IDS = torch.randint(4, 260, (2, 11), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches of b == one batch of k·b


def adapter_after(tmp_path, name, batch_size, grad_accum, method="lora"):
    data = {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False}
    adapter = {"method": method, "rank": 4, "targets": "all-linear"}
    train_cfg = {"max_steps": 4, "batch_size": batch_size, "grad_accum": grad_accum, "lr": 1e-2}
    raw = tiny_recipe(
        tmp_path, data=data, adapter=adapter, train=train_cfg, output={"dir": str(tmp_path / name)}
    )
    result = train(recipe_from_dict(raw))
    assert result.steps == 4
    return load_file(tmp_path / name / "adapter.safetensors")


@pytest.mark.parametrize("method", ["lora", "sharelora"])
def test_grad_accumulation_equals_the_large_batch(tmp_path, method):
    big = adapter_after(tmp_path, "big", 8, 1, method)
    accumulated = adapter_after(tmp_path, "acc", 4, 2, method)
    half = adapter_after(tmp_path, "half", 4, 1, method)  # the same steps on half the data
    assert big.keys() == accumulated.keys()
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], atol=1e-4, rtol=1e-4, msg=k)
    assert max((half[k] - big[k]).abs().max() for k in big) > 1e-3  # the comparison can tell


def test_epochs_count_optimizer_steps_not_micro_batches(tmp_path):
    data = {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False}
    train_cfg = {"max_steps": None, "epochs": 2, "batch_size": 4, "grad_accum": 2}
    result = train(recipe_from_dict(tiny_recipe(tmp_path, data=data, train=train_cfg)))
    assert result.steps == 64 // (4 * 2) * 2  # 8 optimizer steps of 8 examples per epoch, 2 epochs


# ---------------------------------------------------------------------------------------------------
# bf16: autocast over an fp32 model, and a bf16 base under an fp32 adapter, against fp32


PATHS = [
    ("lora", {}),
    ("lora", {"rslora": True}),
    ("fossil", {"rank": 6}),  # padded block sum
    ("fossil", {"mode": "mini", "mini_r": 16}),
    ("mos", {}),
    ("sharelora", {"share": "ab"}),
    ("lors", {"grad_mode": "lors"}),
    ("lors", {"grad_mode": "exact"}),
]


def model_for(method, dtype=torch.float32, adapter: dict | None = None):
    """The tiny Llama (pruned 2:4 for LoRS) in ``dtype``; with ``adapter`` options, a random adapter on
    every linear layer."""
    model = build_tiny_model("tiny-llama")
    if method == "lors":
        prune_model(model, "magnitude", pattern="2:4")
    model.to(dtype).eval()
    if adapter is not None:
        inject_adapter(model, tiny_options(method, targets="all-linear", **adapter))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in adapter_named_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def forward_backward(model, autocast: bool):
    """Logits (fp32) and the adapter gradients of a fixed weighting of the logits."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(IDS).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out.float() * w).sum().backward()
    return out.float().detach(), {n: p.grad.clone() for n, p in adapter_named_parameters(model)}


@pytest.mark.parametrize("method, kw", PATHS, ids=[f"{m}-{kw}" for m, kw in PATHS])
def test_bf16_autocast_is_close_to_fp32(method, kw):
    model = model_for(method, adapter=kw)
    base = model_for(method)
    with torch.no_grad():
        base32 = base(IDS).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base_bf16 = base(IDS).logits.float()
    out32, grads32 = forward_backward(model, autocast=False)
    out_bf16, grads_bf16 = forward_backward(model, autocast=True)
    effect = (out32 - base32).abs().max()
    base_noise = (base_bf16 - base32).abs().max()
    err = (out_bf16 - out32).abs().max()
    assert effect > 2.0  # the adapter moves the logits far more than bf16 rounding does
    assert err < 0.1 * effect and err < 3 * base_noise, (float(err), float(effect), float(base_noise))
    # bf16 backward through attention: ~10 % on single q/k tensors, a few % over the whole gradient; a
    # wrong path (a missing scale, a dropped term) is off by 50 % or more
    for name, g32 in grads32.items():
        assert g32.norm() > 0, name
        rel = (grads_bf16[name] - g32).norm() / g32.norm()
        assert rel < 0.25, (name, float(rel))
    whole32 = torch.cat([g.flatten() for g in grads32.values()])
    whole_bf16 = torch.cat([grads_bf16[n].flatten() for n in grads32])
    assert (whole_bf16 - whole32).norm() < 0.06 * whole32.norm()


@pytest.mark.parametrize("method, kw", PATHS, ids=[f"{m}-{kw}" for m, kw in PATHS])
def test_bf16_base_with_fp32_adapter_is_close_to_fp32(method, kw):
    """A bf16 base model: the adapter keeps fp32 parameters; its input is cast up and its output down."""
    model16 = model_for(method, torch.bfloat16, adapter=kw)
    model32 = model_for(method, adapter=kw)
    assert {p.dtype for _, p in adapter_named_parameters(model16)} == {torch.float32}
    with torch.no_grad():
        out16, out32 = model16(IDS).logits, model32(IDS).logits
        base16 = model_for(method, torch.bfloat16)(IDS).logits.float()
        base32 = model_for(method)(IDS).logits
    assert out16.dtype == torch.bfloat16
    effect, noise = (out32 - base32).abs().max(), (base16 - base32).abs().max()
    err = (out16.float() - out32).abs().max()
    assert err < 0.1 * effect and err < 3 * noise, (float(err), float(effect), float(noise))


# ---------------------------------------------------------------------------------------------------
# PEFT export: target_modules as full paths, ranks padded to one r


def run_dir_with(tmp_path, model_name, **adapter):
    raw = tiny_recipe(tmp_path, model={"name": model_name}, adapter=adapter, train={"max_steps": 3})
    train(recipe_from_dict(raw))
    return tmp_path / "run"


def load_in_peft(tmp_path, run_dir, model_name):
    from shardtune.artifacts.checkpoint import load_adapted_model
    from shardtune.artifacts.export import export_peft

    export_peft(run_dir, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    loaded = peft.PeftModel.from_pretrained(build_tiny_model(model_name), str(tmp_path / "peft"))
    loaded.eval()
    ours, _, _ = load_adapted_model(run_dir)
    peft_layers = {
        n.removeprefix("base_model.model.") for n, m in loaded.named_modules() if hasattr(m, "lora_A")
    }
    with torch.no_grad():
        ours_logits, peft_logits = ours(IDS).logits, loaded(IDS).logits
        base = build_tiny_model(model_name).eval()(IDS).logits
    assert (ours_logits - base).abs().max() > 1e-4
    torch.testing.assert_close(peft_logits, ours_logits, atol=1e-5, rtol=1e-5)
    return config, peft_layers, set(adapted_layers(ours))


@pytest.mark.parametrize(
    "model_name, targets",
    [
        ("tiny-llama", r"model\.layers\.0\.self_attn\.(q|v)_proj"),  # q_proj would also select layer 1
        ("tiny-gpt2", ["attn.c_proj"]),  # c_proj would also select mlp.c_proj
    ],
)
def test_export_names_full_paths_when_short_names_select_more(tmp_path, model_name, targets):
    run_dir = run_dir_with(tmp_path, model_name, method="lora", rank=4, targets=targets)
    config, peft_layers, ours = load_in_peft(tmp_path, run_dir, model_name)
    assert config["target_modules"] == sorted(ours)  # full module paths
    assert peft_layers == ours  # PEFT adapted exactly our layers, no more
    # GPT-2's Conv1D stores (in, out): the config must say so (PEFT fixes a wrong flag with a warning;
    # other LoRA loaders do not)
    assert config["fan_in_fan_out"] == (model_name == "tiny-gpt2")


def test_export_uses_short_names_when_they_select_exactly(tmp_path):
    run_dir = run_dir_with(tmp_path, "tiny-llama", method="lora", rank=4, targets=["q_proj", "down_proj"])
    config, peft_layers, ours = load_in_peft(tmp_path, run_dir, "tiny-llama")
    assert config["target_modules"] == ["down_proj", "q_proj"] and peft_layers == ours


def test_export_pads_mos_ranks_that_differ_between_types(tmp_path):
    """MoS without subset selection: rank (R−p)·L_t + p, so q_proj (2 layers) and v_proj (1 layer) differ;
    the export pads to one r with zeros, and adapter.json records each type's rank and scale."""
    targets = r"model\.layers\.[01]\.self_attn\.q_proj|model\.layers\.1\.self_attn\.v_proj"
    adapter = dict(
        method="mos", rank=2, equivalent_rank=2, private_rank=1, shards_per_vector=2, subset_selection=False
    )
    run_dir = run_dir_with(tmp_path, "tiny-llama", targets=targets, alpha=6, **adapter)
    config, peft_layers, ours = load_in_peft(tmp_path, run_dir, "tiny-llama")
    assert config["r"] == (2 - 1) * 2 + 1 and peft_layers == ours
    info = json.loads((run_dir / "adapter.json").read_text())["method_info"]
    assert info == {"rank": {"q_proj": 3, "v_proj": 2}, "scale": {"q_proj": 6 / 3, "v_proj": 6 / 2}}


# ---------------------------------------------------------------------------------------------------
# Evaluation: batched and padded gives what one example at a time gives


def test_heldout_loss_is_the_token_weighted_mean_over_every_batch():
    """Batches with different numbers of target tokens: the mean over all tokens, not of batch means."""
    from torch.nn.functional import cross_entropy
    from torch.utils.data import DataLoader

    from shardtune.data.examples import Collator, Example, encode_all
    from shardtune.inspection.evaluate import heldout_loss
    from shardtune.models.loading import byte_tokenizer

    tok = byte_tokenizer()
    examples = [Example("p" * n, "c" * (9 - n)) for n in range(1, 8)]
    features, _ = encode_all(examples, tok, 64)
    model = build_tiny_model("tiny-llama").eval()
    loss = heldout_loss(model, DataLoader(features, batch_size=3, collate_fn=Collator(tok.pad_token_id)))
    total, count = 0.0, 0
    with torch.no_grad():
        for f in features:  # one example at a time, the next-token loss on every trained position
            logits = model(torch.tensor([f["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(f["labels"][1:])
            keep = targets != -100
            total += cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    from shardtune.inspection.evaluate import generate
    from shardtune.models.loading import byte_tokenizer

    tok = byte_tokenizer()
    model = model_for("lora", adapter={})
    prompts = [tok(p).input_ids for p in ("a", "twice xyz =", "hello there, model")]
    batched = generate(model, tok, prompts, max_new_tokens=6)
    alone = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    with torch.no_grad():  # and greedy: argmax one token at a time until EOS
        for p, answer in zip(prompts, alone, strict=True):
            new = []
            for _ in range(6):
                token = int(model(torch.tensor([p + new])).logits[0, -1].argmax())
                if token == tok.eos_token_id:
                    break
                new.append(token)
            assert answer == tok.decode(new, skip_special_tokens=True)
