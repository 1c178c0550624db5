"""A quantized frozen base (``model.quantize``): bitsandbytes NF4 / FP4 / INT8 under every method, on the CPU.

Tolerances, measured on the tiny models with fp32 adapters (bitsandbytes 0.50, CPU):

* NF4 and FP4, adapted model vs "dequantized base + the same adapter" (a plain model whose linear
  weights are the layers' dequantized ``Q(W)``): logits, loss and adapter gradients agree exactly (max
  difference 0.0; bitsandbytes' CPU 4-bit matmul is ``dequantize`` then an fp32 ``linear``). The tests
  hold them to ``atol 1e-5`` (gradients: ``rtol 1e-4``; FOSSIL bat's and LoRS's own autograd functions
  sum in another order, measured ≤ 2e-7 relative).
* INT8 in training mode (bitsandbytes dequantizes, then multiplies): loss within 1e-6, gradients within
  1e-5 relative. INT8 in evaluation mode runs LLM.int8()'s int8×int8 product, which quantizes the
  activations too: logits within 0.35 (measured 0.27 on logits of magnitude ~6).
* ``Q(W)`` itself is checked against the formats' formulas written out here (codes unpacked by hand,
  NF4 levels from the QLoRA paper) on the layers whose ``in_features`` is a multiple of 64; see
  :mod:`shardtune.models.quant` for bitsandbytes' CPU kernel on the others.
"""

from __future__ import annotations

import json
import os
import sys

import bitsandbytes  # noqa: F401  (the dev extra installs it: these tests must not be skipped)
import pytest
import torch
import yaml
from conftest import TINY_OPTIONS, TINY_TRAIN, copy_task, tiny_recipe
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from shardtune.adapters import METHODS
from shardtune.adapters.model import (
    adapted_layers,
    adapter_named_parameters,
    adapter_state_dict,
    count_parameters,
    inject_adapter,
    load_adapter_state_dict,
)
from shardtune.artifacts.checkpoint import load_adapted_model, save_adapter
from shardtune.cli import app
from shardtune.core.errors import BadInput, RecipeError
from shardtune.inspection.layout import layout_of
from shardtune.models import quant
from shardtune.models.loading import TINY_CONFIGS, build_tiny_model, load_model
from shardtune.recipe.schema import recipe_from_dict
from shardtune.training.loop import train

runner = CliRunner()
IDS = torch.randint(4, 260, (2, 11), generator=torch.Generator().manual_seed(3))
NF4 = quant.Quantization("nf4")
# The 16 NormalFloat-4 levels (Dettmers et al., QLoRA, arXiv 2305.14314, appendix E).
NF4_LEVELS = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# Every method (and FOSSIL's W-dependent bat mode) with options that fit the tiny models.
ALL_METHODS = [(m, {}) for m in TINY_OPTIONS] + [("fossil", {"mode": "bat"})]
LOW_RANK = ["lora", "fossil", "mos", "sharelora", "vera", "vblora", "tiedlora", "prolora"]


def quantized(name="tiny-llama", quantization=NF4):
    return load_model(name, quantization=quantization, device="cpu")[0]


def by_hand(layer) -> torch.Tensor:
    """``Q(W)`` from the codes and scales, as the formats are defined (shardtune.models.quant's docstring)."""
    w, state = layer.weight, getattr(layer.weight, "quant_state", None)
    if state is None:  # int8: q·s_o/127
        scales = w.SCB if w.SCB is not None else layer.state.SCB
        return w.data.float() * scales.float()[:, None] / 127
    n = layer.out_features * layer.in_features
    packed = w.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()  # high nibble first
    if state.nested:  # 8-bit scales in blocks of 256, each with an fp32 scale, plus the mean
        scale = state.state2.absmax.repeat_interleave(256)[: state.absmax.numel()]
        absmax = state.state2.code[state.absmax.long()] * scale + state.offset
    else:
        absmax = state.absmax
    levels = torch.tensor(NF4_LEVELS) if state.quant_type == "nf4" else state.code
    return (levels[codes] * absmax.repeat_interleave(64)[:n]).reshape(layer.out_features, layer.in_features)


def plain_twin(name: str, model) -> torch.nn.Module:
    """The unquantized tiny model with every quantized layer's weight replaced by its ``Q(W)``."""
    twin = build_tiny_model(name)
    modules = dict(twin.named_modules())
    with torch.no_grad():
        for layer_name, layer in quant.quantized_layers(model).items():
            target = modules[layer_name]
            w = quant.dense_weight(layer)
            target.weight.copy_(w.T if isinstance(target, Conv1D) else w)  # GPT-2's Conv1D stores Wᵀ
    return twin


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def options(method, **kw):
    return METHODS[method].Options(method=method, **{**TINY_OPTIONS[method], "targets": "all-linear", **kw})


# ---------------------------------------------------------------------------------------------------
# The quantized weights


@pytest.mark.parametrize(
    "name, quantization",
    [
        ("tiny-llama", quant.Quantization("nf4", double_quant=False)),
        ("tiny-llama", NF4),
        ("tiny-gpt2", NF4),
        ("tiny-llama", quant.Quantization("fp4")),
        ("tiny-llama", quant.Quantization("int8")),
    ],
)
def test_dequantized_weights_follow_the_formats(name, quantization):
    model = quantized(name, quantization)
    original = dict(build_tiny_model(name).named_modules())
    layers = quant.quantized_layers(model)
    assert len(layers) == {"tiny-llama": 14, "tiny-gpt2": 8}[name]  # every linear layer but the head
    assert type(model.lm_head) is torch.nn.Linear
    checked = 0
    for layer_name, layer in layers.items():
        dense = quant.dense_weight(layer)
        if layer.in_features % 64 and quantization.kind != "int8":
            continue  # bitsandbytes' CPU kernel: see shardtune.models.quant
        torch.testing.assert_close(dense, by_hand(layer), atol=1e-6, rtol=0)
        w = original[layer_name].weight
        w = w.T if isinstance(original[layer_name], Conv1D) else w  # the codes hold W as (out, in)
        error = (dense - w).norm() / w.norm()
        assert error < {"nf4": 0.15, "fp4": 0.25, "int8": 0.02}[quantization.kind], (layer_name, error)
        checked += 1
    assert checked >= len(layers) // 2


def test_compute_dtype_and_double_quant_reach_the_layers(tmp_path):
    section = recipe_from_dict(
        tiny_recipe(tmp_path, model={"quantize": "fp4", "double_quant": False, "compute_dtype": "bfloat16"})
    ).model
    model = quantized(quantization=quant.quantization_of(section))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16
    assert layer.weight.quant_state.quant_type == "fp4" and not layer.weight.quant_state.nested
    x = torch.randn(3, 64)
    with torch.no_grad():  # x and Q(W) multiplied in bf16, the output returned in x's dtype
        expected = torch.nn.functional.linear(x.bfloat16(), quant.dense_weight(layer).bfloat16()).float()
        torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)


def test_pruned_zeros_stay_zeros_and_the_codes_stay_frozen():
    """4-bit formats have an exact 0 (LoRS's mask survives), and training never touches the codes."""
    from shardtune.artifacts.prune import prune_model

    model = build_tiny_model("tiny-llama")
    prune_model(model, "magnitude", pattern="2:4")
    pruned = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    q = quant.quantize_built_model(model, NF4, "cpu")
    codes = {n: layer.weight.data.clone() for n, layer in quant.quantized_layers(q).items()}
    for name, w in pruned.items():
        assert not quant.dense_weight(q.get_submodule(name))[w == 0].any()
    inject_adapter(q, options("lora"))
    optimizer = torch.optim.AdamW([p for _, p in adapter_named_parameters(q)], lr=1e-2)
    for _ in range(2):
        q(IDS, labels=IDS).loss.backward()
        optimizer.step()
    assert not any(p.requires_grad for n, p in q.named_parameters() if "base_layer" in n)
    for name, layer in quant.quantized_layers(q).items():
        assert torch.equal(layer.weight.data, codes[name.removesuffix(".base_layer")]), name


# ---------------------------------------------------------------------------------------------------
# The adapted model against "dequantized base + the same adapter"


@pytest.mark.parametrize(
    "method, extra", ALL_METHODS, ids=[m + ("-bat" if e else "") for m, e in ALL_METHODS]
)
def test_nf4_logits_and_gradients_equal_the_dequantized_base_plus_the_same_adapter(method, extra):
    model = quantized()
    reference = plain_twin("tiny-llama", model)
    inject_adapter(model, options(method, **extra))
    inject_adapter(reference, options(method, **extra))
    randomize(model)
    load_adapter_state_dict(reference, adapter_state_dict(model))
    ours, theirs = logits(model), logits(reference)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - logits(quant.dequantize_model(quantized()))).abs().max() > 1e-2  # the adapter shows

    model.train(), reference.train()
    loss, loss_ref = model(IDS, labels=IDS).loss, reference(IDS, labels=IDS).loss
    loss.backward(), loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    grads = dict(adapter_named_parameters(reference))
    for name, p in adapter_named_parameters(model):
        want = grads[name].grad
        if (
            want is not None
        ):  # fp32 sums in another order (the plain twin takes the fused layer): of the largest
            largest = want.abs().max().item()
            torch.testing.assert_close(p.grad, want, atol=max(1e-7, 1e-5 * largest), rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["fp4", "int8"])
def test_fp4_and_int8_against_the_dequantized_base(kind):
    model = quantized(quantization=quant.Quantization(kind))
    reference = plain_twin("tiny-llama", model)
    for m in (model, reference):
        inject_adapter(m, options("lora"))
    randomize(model)
    load_adapter_state_dict(reference, adapter_state_dict(model))
    # INT8 evaluation quantizes the activations too (LLM.int8()): the looser tolerance of the docstring
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5 if kind == "fp4" else 0.35, rtol=0)
    model.train(), reference.train()
    loss, loss_ref = model(IDS, labels=IDS).loss, reference(IDS, labels=IDS).loss
    loss.backward(), loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    grads = dict(adapter_named_parameters(reference))
    for name, p in adapter_named_parameters(model):  # within 1e-5 of the largest entry
        reference_grad = grads[name].grad
        assert (p.grad - reference_grad).abs().max() <= 1e-5 * reference_grad.abs().max(), name


def test_gpt2_conv1d_layers_become_quantized_linear_layers():
    """transformers quantizes GPT-2's Conv1D (weight stored (in, out)) into (out, in) Linear4bit layers."""
    model = quantized("tiny-gpt2")
    reference = plain_twin("tiny-gpt2", model)
    targets = inject_adapter(model, options("lora"))
    assert not any(t.fan_in_fan_out for t in targets)
    assert all(t.fan_in_fan_out for t in inject_adapter(reference, options("lora")))
    randomize(model)
    load_adapter_state_dict(reference, adapter_state_dict(model))
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, extra", [("lors", {}), ("fossil", {"mode": "bat"})])
def test_dense_weight_methods_keep_no_dense_copy_for_backward(method, extra):
    """LoRS and FOSSIL bat dequantize W inside their autograd functions: nothing out×in is saved."""
    model = quantized()
    inject_adapter(model, options(method, **extra, targets=["down_proj"]))
    randomize(model)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 176, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert not [t for t in saved if t.shape in ((64, 176), (176, 64))]
    assert x.grad is not None and all(p.grad is not None for p in layer.adapter.parameters())


def test_merging_into_a_quantized_layer_is_refused():
    model = quantized()
    inject_adapter(model, options("lora"))
    with pytest.raises(BadInput, match="quantized layer"):
        next(iter(adapted_layers(model).values())).merge()


# ---------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize(
    "method, extra", ALL_METHODS, ids=[m + ("-bat" if e else "") for m, e in ALL_METHODS]
)
def test_every_method_trains_on_an_nf4_base_and_its_loss_falls(tmp_path, method, extra):
    raw = tiny_recipe(
        tmp_path,
        model={"quantize": "nf4"},
        adapter={"method": method, **TINY_OPTIONS[method], **extra},
        train={"max_steps": 16, **TINY_TRAIN.get(method, {})},
    )
    result = train(recipe_from_dict(raw))
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < 0.75 * losses[0], losses
    assert 0 < result.base_bytes < 0.45 * result.base_bytes_unquantized  # linear layers at ~4.1 bits


def test_save_load_gives_the_same_logits(tmp_path):
    recipe = recipe_from_dict(
        tiny_recipe(tmp_path, model={"quantize": "nf4"}, adapter={"method": "mos", **TINY_OPTIONS["mos"]})
    )
    model = quantized()
    inject_adapter(model, recipe.adapter)
    randomize(model)
    save_adapter(model, recipe, tmp_path / "saved", step=0)
    meta = json.loads((tmp_path / "saved" / "adapter.json").read_text())
    assert meta["base_model"]["quantize"] == "nf4" and meta["base_model"]["double_quant"] is True
    loaded, _, _ = load_adapted_model(tmp_path / "saved")
    assert quant.quantized_layers(loaded)  # loaded quantized again, as it was trained
    assert torch.equal(logits(loaded), logits(model))


def write(tmp_path, name, **sections):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, output={"dir": str(tmp_path / name)}, **sections)))
    return path


def same_adapter(a, b, atol):
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=1e-5, msg=k)


def test_gradient_checkpointing_and_resume_on_an_nf4_base(tmp_path):
    sections = {"model": {"quantize": "nf4"}, "adapter": {"method": "sharelora", "rank": 4}}
    plain = recipe_from_dict(tiny_recipe(tmp_path / "a", **sections, train={"max_steps": 8, "save_every": 4}))
    train(plain)
    checkpointed = tiny_recipe(
        tmp_path / "b", **sections, train={"max_steps": 8, "gradient_checkpointing": True}
    )
    train(recipe_from_dict(checkpointed))
    same_adapter(tmp_path / "a" / "run", tmp_path / "b" / "run", atol=1e-6)
    first = load_file(tmp_path / "a" / "run" / "adapter.safetensors")
    train(plain, resume=str(tmp_path / "a" / "run" / "checkpoint-4"))  # steps 5-8 again, from the checkpoint
    again = load_file(tmp_path / "a" / "run" / "adapter.safetensors")
    for k in first:
        torch.testing.assert_close(first[k], again[k], atol=1e-6, rtol=1e-5, msg=k)


def test_bf16_autocast_over_an_nf4_base_keeps_fp32_adapters(tmp_path):
    raw = tiny_recipe(
        tmp_path,
        model={"quantize": "nf4", "compute_dtype": "bfloat16"},
        train={"max_steps": 16, "precision": "bf16"},
    )
    result = train(recipe_from_dict(raw))
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < 0.75 * losses[0]
    tensors = load_file(tmp_path / "run" / "adapter.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert result.eval_loss is not None and result.eval_loss < losses[0]


def test_two_processes_on_an_nf4_base_equal_one(tmp_path):
    """DDP over 2 gloo processes × batch 4 == 1 process × batch 8, each process with its NF4 copy."""
    import subprocess

    sections = {
        "model": {"quantize": "nf4"},
        "adapter": {"method": "mos", **TINY_OPTIONS["mos"]},
        "data": {"task": None, "path": str(copy_task(tmp_path)), "eval_samples": 0, "chat_template": False},
    }
    one = write(tmp_path, "one", **sections, train={"max_steps": 4, "batch_size": 8})
    two = write(tmp_path, "two", **sections, train={"max_steps": 4, "batch_size": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for recipe, extra in ((one, []), (two, ["--nproc", "2"])):
        done = subprocess.run(
            [sys.executable, "-m", "shardtune", "train", str(recipe), "-q", *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-4)


def test_fsdp_refuses_a_quantized_base_in_one_line():
    quant.check_strategy(quantized=True, sharded=False)  # one process: fsdp trains unsharded anyway
    quant.check_strategy(quantized=False, sharded=True)
    with pytest.raises(
        RecipeError, match=r"^train.strategy: fsdp cannot shard a quantized base.*use strategy: ddp"
    ):
        quant.check_strategy(quantized=True, sharded=True)


# ---------------------------------------------------------------------------------------------------
# Recipe keys and a missing bitsandbytes


@pytest.mark.parametrize(
    "model, message",
    [
        (
            {"double_quant": False},
            "model.double_quant: applies to model.quantize nf4 or fp4 only (quantize is unset)",
        ),
        (
            {"quantize": "int8", "compute_dtype": "bfloat16"},
            "model.compute_dtype: applies to model.quantize nf4 or fp4 only (quantize is int8)",
        ),
        ({"quantize": "nf3"}, "model.quantize: must be one of 'nf4', 'fp4' or 'int8', got 'nf3'"),
    ],
)
def test_quantization_keys_are_checked(tmp_path, model, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_recipe(tmp_path, model=model))
    assert str(err.value) == message


def test_defaults_of_a_resolved_recipe_are_accepted_without_quantize(tmp_path):
    section = recipe_from_dict(
        tiny_recipe(tmp_path, model={"double_quant": True, "compute_dtype": "auto"})
    ).model
    assert quant.quantization_of(section) is None
    section = recipe_from_dict(tiny_recipe(tmp_path, model={"quantize": "nf4", "dtype": "bfloat16"})).model
    assert quant.quantization_of(section) == quant.Quantization("nf4", True, torch.bfloat16)


def test_a_missing_bitsandbytes_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, model={"quantize": "nf4"})))
    result = runner.invoke(app, ["train", str(path), "-q"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: model.quantize: nf4 needs the bitsandbytes package, which is not installed: "
        "pip install shardtune[quant]"
    ]
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


# ---------------------------------------------------------------------------------------------------
# Memory


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("quantization", [NF4, quant.Quantization("fp4", False), quant.Quantization("int8")])
def test_measured_base_bytes_equal_the_formula(name, quantization):
    model = quantized(name, quantization)
    measured = quant.base_memory(model, torch.float32)
    computed = layout_of(TINY_CONFIGS[name]()).base_memory(quantization, torch.float32)
    assert measured == computed
    plain = build_tiny_model(name)
    assert measured.unquantized_bytes == sum(p.numel() * 4 for p in plain.parameters())
    assert count_parameters(model)[1] == sum(p.numel() for p in plain.parameters())  # out·in, not bytes


def test_params_and_the_train_summary_report_base_memory(tmp_path):
    result = runner.invoke(app, ["params", "--model", "tiny-llama", "--quantize", "nf4", "--json"])
    assert result.exit_code == 0, result.output
    memory = json.loads(result.output)["base_memory"]
    assert memory["format"] == "nf4 + double quant" and memory["quantized_layers"] == 14
    assert memory["stored_bytes"] == quant.base_memory(quantized(), torch.float32).stored_bytes
    result = runner.invoke(app, ["params", "--model", "tiny-llama"])
    assert "base weights: 491.25 KiB in float32" in result.output

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, model={"quantize": "nf4"}, train={"max_steps": 2})))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "14 linear layers in nf4 + double quant (491.25 KiB in float32 unquantized" in " ".join(
        result.output.split()
    )
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["base_bytes"] == memory["stored_bytes"] and saved["base_bytes_unquantized"] == 503040


# ---------------------------------------------------------------------------------------------------
# merge and export


def trained_nf4_run(tmp_path, method="lora", **adapter):
    raw = tiny_recipe(
        tmp_path,
        model={"quantize": "nf4"},
        adapter={"method": method, **TINY_OPTIONS[method], **adapter},
        train={"max_steps": 2},
    )
    train(recipe_from_dict(raw))
    model, _, _ = load_adapted_model(tmp_path / "run")
    randomize(model, seed=1)  # a visible update
    save_adapter(model, recipe_from_dict(raw), tmp_path / "run", step=2)
    return tmp_path / "run", logits(model)


def merged_logits(out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert not quant.quantized_layers(model)
    return logits(model)


@pytest.mark.parametrize("method, extra", [("lora", {}), ("lors", {}), ("fossil", {"mode": "bat"})])
def test_merge_of_an_nf4_run_says_which_base_weights(tmp_path, method, extra):
    run, nf4_logits = trained_nf4_run(tmp_path, method, **extra)
    result = runner.invoke(
        app,
        [
            "merge",
            str(run),
            "--out",
            str(tmp_path / "deq"),
            "--dtype",
            "fp32",
            "--base-weights",
            "dequantized",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "(dequantized weights; trained on nf4)" in result.output
    torch.testing.assert_close(
        merged_logits(tmp_path / "deq"), nf4_logits, atol=1e-4, rtol=0
    )  # what was trained

    result = runner.invoke(
        app, ["merge", str(run), "--out", str(tmp_path / "orig"), "--dtype", "fp32", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["base_weights"] == "original" and report["quantize"] == "nf4"  # auto: the original weights
    plain = build_tiny_model("tiny-llama")  # the unquantized base + the same adapter
    inject_adapter(plain, load_adapted_model(run)[0].shardtune_options)
    load_adapter_state_dict(plain, load_file(run / "adapter.safetensors"))
    torch.testing.assert_close(merged_logits(tmp_path / "orig"), logits(plain), atol=1e-4, rtol=0)
    if method == "lors":  # the mask of the trained function: every zero of Q(W)
        deq = dict(quant.dequantize_model(quantized()).named_modules())
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "deq")
        for name, module in merged.named_modules():
            if name.endswith("proj"):
                assert not module.weight[deq[name].weight == 0].any(), name


def test_merge_of_a_base_saved_quantized_dequantizes_it(tmp_path):
    """A model directory saved in NF4 has no original weights: auto dequantizes, original is refused."""
    base = quantized()
    base.save_pretrained(tmp_path / "nf4-base")
    from shardtune.models.loading import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "nf4-base")
    raw = tiny_recipe(tmp_path, model={"name": str(tmp_path / "nf4-base")}, train={"max_steps": 3})
    train(recipe_from_dict(raw))
    model, _, _ = load_adapted_model(tmp_path / "run")
    assert quant.quantized_layers(model)
    result = runner.invoke(
        app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--dtype", "fp32", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["base_weights"] == "dequantized"
    torch.testing.assert_close(merged_logits(tmp_path / "m"), logits(model), atol=1e-4, rtol=0)
    result = runner.invoke(
        app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--base-weights", "original"]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --base-weights original: {tmp_path / 'nf4-base'} holds quantized weights only; use dequantized (or auto)"
    ]


def test_export_of_an_nf4_run_is_a_plain_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    run, nf4_logits = trained_nf4_run(tmp_path, "prolora")
    result = runner.invoke(app, ["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    dequantized_base = quant.dequantize_model(quantized())
    loaded = peft.PeftModel.from_pretrained(dequantized_base, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(loaded), nf4_logits, atol=1e-5, rtol=0)


def test_a_librarys_logged_warnings_go_to_the_log_not_stderr(tmp_path):
    """bitsandbytes logs a cast warning per int8 layer and step through `logging`; with no handler of
    its own Python prints it on stderr, which carries shardtune's words only: it goes to train.log."""
    import subprocess

    recipe = tmp_path / "r.yaml"
    raw = tiny_recipe(tmp_path, model={"name": "tiny-llama", "quantize": "int8"}, train={"max_steps": 2})
    recipe.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "shardtune", "train", str(recipe), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SHARDTUNE_DEBUG": ""},
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert "MatMul8bitLt" in (tmp_path / "run" / "train.log").read_text()
