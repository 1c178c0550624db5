"""The adapter leaves shardtune: merged HF model directories, PEFT LoRA adapters, parameter counts.

* :func:`merge_run` — base + adapter → a plain transformers model directory. ``W ← W + ΔW`` is done in
  fp32 (LoRS: ``W + s·(B·A) ⊙ M``, every zero kept), then cast to the requested dtype; the directory
  is written under a temporary name and renamed, so an interrupted merge leaves nothing behind.
* :func:`export_peft` — any method whose update is low-rank (LoRA, FOSSIL, MoS, ShareLoRA) written as
  a standard PEFT LoRA adapter: per layer ``lora_A = A_l`` and ``lora_B = B_l`` from the spine's
  factors (the scale folded into B, so ``lora_alpha = r``), shared stores copied per layer, ranks
  padded with zeros to one ``r``. FOSSIL is exact: ``A = P`` (the 0/1 block-sum matrix), ``B = Dᵀ``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from shardtune.adapters.base import STORES_ATTR
from shardtune.adapters.model import adapted_layers, merge_adapter
from shardtune.artifacts.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    RECIPE_FILE,
    attach_adapter,
    load_adapted_model,
)
from shardtune.artifacts.peftio import is_peft_adapter
from shardtune.core.catalog import canonical_dtype
from shardtune.core.errors import BadInput
from shardtune.core.fileio import check_output_dir, output_kinds, write_output_dir
from shardtune.models import quant
from shardtune.models.loading import load_model

MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOW_RANK_METHODS = ("lora", "fossil", "mos", "sharelora", "vera", "vblora", "tiedlora", "prolora")


# What each writer is, and which earlier outputs it may replace (--overwrite): its own kind only (an
# export either format), never a run, the model cache or another command's output.
MERGED = {"what": "a merged model", "kinds": output_kinds("merge")}
EXPORTED = {"what": "an exported adapter", "kinds": output_kinds("export-peft", "export-shardtune")}


def _inputs(run_dir: Path, base_model: str | None = None) -> list[Path | None]:
    """What merge/export read: the run (or checkpoint, or PEFT adapter) and, when it is a local
    directory, its base model."""
    from shardtune.artifacts.checkpoint import adapter_source

    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: no such run or adapter directory")
    name = base_model or adapter_source(run_dir)[0]["base_model"].get("name") or ""
    base = Path(name).expanduser()
    return [run_dir, base if name and base.is_dir() else None]


def unwrap_merged(model: nn.Module) -> nn.Module:
    """Replace every (merged) AdaptedLinear by its base layer and drop the shared stores."""
    for name, layer in adapted_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, STORES_ATTR):
        delattr(model, STORES_ATTR)
    for attr in ("shardtune_options", "shardtune_targets", "shardtune_target_kinds"):
        model.__dict__.pop(attr, None)
    return model


MERGE_BASES = ("auto", "original", "dequantized")


def merge_run(
    run_dir: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    overwrite: bool = False,
    base_model: str | None = None,
    base_weights: str = "auto",
) -> dict:
    """Merge the run's adapter into its base model (``base_model``: another copy of it) and write a
    plain HF model directory.

    A run on a quantized base (``model.quantize``) is merged into a plain model: ``base_weights``
    ``original`` loads the base's unquantized weights (``W + ΔW``: the usual QLoRA merge), ``dequantized``
    the quantized base dequantized (``Q(W) + ΔW``: exactly the function that was trained), ``auto`` the
    original weights when the base has them (a model directory saved quantized has not).
    """
    dtype = canonical_dtype(dtype, "--dtype")
    if base_weights not in MERGE_BASES:
        raise BadInput(f"--base-weights: expected one of {', '.join(MERGE_BASES)}, got {base_weights!r}")
    inputs = _inputs(Path(run_dir), base_model)
    check_output_dir(out, "--out", replace=overwrite, inputs=inputs, **MERGED)  # before loading anything
    model, tokenizer, meta, source = _base_for_merge(Path(run_dir), base_weights, base_model)
    merge_adapter(model)
    unwrap_merged(model)
    model.to(MERGE_DTYPES[dtype])
    model.config.dtype = MERGE_DTYPES[dtype]

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_output_dir(out, write, "merge", overwrite, inputs, what=MERGED["what"])
    return {
        "out": str(out),
        "method": meta["method"],
        "dtype": dtype,
        "base_model": base_model or meta["base_model"]["name"],
        "quantize": meta["base_model"].get("quantize"),
        "base_weights": source,
    }


def _base_for_merge(
    run_dir: Path, base_weights: str, base_model: str | None
) -> tuple[nn.Module, object, dict, str]:
    """The run's base (``base_model``: another copy of it) in fp32 with its adapter attached, and where
    the base's weights came from: ``original`` (as stored, unquantized) or ``dequantized`` (the
    quantized base, dequantized)."""
    from shardtune.artifacts.checkpoint import base_model_errors, recorded_base
    from shardtune.models.loading import load_config

    meta, section = recorded_base(run_dir, base_model)
    quantization = quant.quantization_of(section)
    try:
        stored_quantized = quant.is_prequantized(load_config(section.name, section.trust_remote_code))
    except BadInput:  # no config to read: loading the base says what is wrong, in its own words
        stored_quantized = False
    if stored_quantized and base_weights == "original":
        raise BadInput(
            f"--base-weights original: {section.name} holds quantized weights only; use dequantized (or auto)"
        )
    trained_quantized = quantization is not None or stored_quantized
    if not trained_quantized:
        model, tokenizer, meta = load_adapted_model(run_dir, base_model=base_model, dtype="fp32")
        return model, tokenizer, meta, "original"
    source = "dequantized" if base_weights == "dequantized" or stored_quantized else "original"
    with base_model_errors(run_dir, base_model):
        if source == "original":
            model, tokenizer = load_model(section.name, "fp32", section.trust_remote_code, section.revision)
        else:  # quantized as it was trained (same dtype, so the same codes), then Q(W) in fp32, on the CPU
            model, tokenizer = load_model(
                section.name, section.dtype, section.trust_remote_code, section.revision, quantization, "cpu"
            )
            model = quant.dequantize_model(model, torch.float32)
    attach_adapter(model, run_dir)
    model.eval()
    return model, tokenizer, meta, source


def peft_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], int, dict]:
    """PEFT LoRA tensors (scale folded into B), the common rank, and fan_in_fan_out per layer."""
    layers = adapted_layers(model)
    factors = {name: layer.adapter.factors() for name, layer in layers.items()}
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors, fifo = {}, {}
    for name, (a, b) in factors.items():
        a, b = a.detach().float(), b.detach().float()
        pad = rank - a.shape[0]
        if pad:  # zero rows/columns: the product is unchanged
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().clone()
        fifo[name] = layers[name].fan_in_fan_out
    return tensors, rank, fifo


def peft_base_model(record: dict) -> dict:
    """``base_model_name_or_path`` (and ``revision``) for PEFT: the hub id of an embedded or hub model,
    the absolute path of a local one, and for a tiny builtin the directory it is saved to once."""
    from shardtune.core.catalog import EMBEDDED

    name = record["name"]
    if record.get("source") == "builtin":
        if name in EMBEDDED:
            return {"base_model_name_or_path": EMBEDDED[name][2], "revision": None}
        from shardtune.models.loading import saved_builtin

        return {"base_model_name_or_path": str(saved_builtin(name)), "revision": None}
    return {"base_model_name_or_path": name, "revision": record.get("revision")}


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short names (``q_proj``) when PEFT's suffix matching selects exactly the adapted layers, else full paths."""
    from shardtune.adapters.model import linear_layers

    short = {n.rsplit(".", 1)[-1] for n in names}
    every = set(names) | set(linear_layers(model))
    selected = {n for n in every if n.rsplit(".", 1)[-1] in short}
    return sorted(short) if selected == set(names) else sorted(names)


# Methods PEFT has a type of its own for: `--format peft` writes them as that type (their shared stores
# kept, as small as the method makes them); `--format peft-lora` writes them as a dense LoRA.
NATIVE_PEFT = ("vera", "vblora")


def peft_native(model: nn.Module, method: str) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's own VERA or VBLORA tensors and config keys for the adapter ``model`` carries: the shared
    store once (VeRA's projections vera_A, vera_B, when the run saves them; VB-LoRA's bank) and each
    layer's vectors (λ_d, λ_b) or logits, under PEFT's names — the same layouts shardtune computes
    with, so PEFT computes the same update."""
    options, stores = model.shardtune_options, model.shardtune_stores
    tensors: dict[str, torch.Tensor] = {}
    if method == "vera":
        if options.save_projection:
            tensors["base_model.vera_A"] = stores.vera_A
            tensors["base_model.vera_B"] = stores.vera_B
        for name, layer in adapted_layers(model).items():
            tensors[f"base_model.model.{name}.vera_lambda_d"] = layer.adapter.lambda_d
            tensors[f"base_model.model.{name}.vera_lambda_b"] = layer.adapter.lambda_b
        config = {
            "peft_type": "VERA",
            "r": options.rank,
            "projection_prng_key": options.projection_seed,
            "save_projection": options.save_projection,
            "vera_dropout": 0.0,
            "d_initial": options.d_initial,
            "init_weights": True,
        }
    else:
        # PEFT's save_only_topk_weights form, which is what the paper stores: per sub-vector the k bank
        # indices (in the smallest integer type that holds h) and the first k − 1 softmax weights
        # (the last is 1 minus their sum); PEFT rebuilds logits with exactly that top-k softmax
        tensors["base_model.vblora_vector_bank"] = stores.bank
        h = options.num_vectors
        index_dtype = next(t for bound, t in INDEX_TYPES if h < bound)
        for name, layer in adapted_layers(model).items():
            for side in ("A", "B"):
                logits, indices = getattr(layer.adapter, f"logits_{side}").detach().float().topk(options.topk)
                key = f"base_model.model.{name}.vblora_logits_{side}"
                tensors[f"{key}_topk_indices"] = indices.to(index_dtype)
                tensors[f"{key}_topk_weights"] = torch.softmax(logits, dim=-1)[:, :, :-1]
        config = {
            "peft_type": "VBLORA",
            "r": options.rank,
            "num_vectors": options.num_vectors,
            "vector_length": options.vector_length,
            "topk": options.topk,
            "save_only_topk_weights": True,
            "vblora_dropout": 0.0,
            "init_vector_bank_bound": options.init_vector_bank_bound,
            "init_logits_std": options.init_logits_std,
            "exclude_modules": None,
        }
    return {k: _stored(v) for k, v in tensors.items()}, config


# The integer type PEFT stores VB-LoRA's bank indices in: the smallest that holds every index below h.
INDEX_TYPES = ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32), (2**63, torch.int64))


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as the export file keeps it: floats in fp32, indices as they are; its own memory."""
    tensor = tensor.detach()
    return (tensor.float() if tensor.is_floating_point() else tensor).contiguous().clone()


def export_peft(
    run_dir: str | Path,
    out: str | Path,
    overwrite: bool = False,
    base_model: str | None = None,
    dense: bool = False,
) -> dict:
    """The run's adapter as a PEFT adapter directory (see the module docstring): VeRA and VB-LoRA as
    PEFT's own VERA and VBLORA types unless ``dense``, every other low-rank method (and those, with
    ``dense``) as a standard LoRA."""
    inputs = _inputs(Path(run_dir), base_model)
    check_output_dir(out, "--out", replace=overwrite, inputs=inputs, **EXPORTED)
    model, _, meta = load_adapted_model(run_dir, base_model=base_model)
    method = meta["method"]
    if method not in LOW_RANK_METHODS:
        raise BadInput(
            f"export: a {method} adapter cannot be written as a PEFT LoRA: its update (B·A) ⊙ M is masked, not "
            "low-rank, and a LoRA runtime would make the model dense; use `shardtune merge` instead"
        )
    reason = next(
        (lay.adapter.not_low_rank for lay in adapted_layers(model).values() if lay.adapter.not_low_rank), None
    )
    if reason:  # e.g. FOSSIL mode bat
        raise BadInput(
            f"export: this {method} adapter cannot be written as a PEFT LoRA: {reason}; use `shardtune merge` instead"
        )
    tensors, rank, fifo = peft_tensors(model)
    if len(set(fifo.values())) > 1:
        raise BadInput("export: the adapter mixes Conv1D and Linear layers; PEFT needs one fan_in_fan_out")
    names = list(adapted_layers(model))
    common = {
        "task_type": "CAUSAL_LM",
        # what PEFT/transformers load the base from: a hub id or an absolute path, never an alias
        **peft_base_model(model.shardtune_base),
        "target_modules": _target_modules(model, names),
        "bias": "none",
        "fan_in_fan_out": next(iter(fifo.values())),
        "modules_to_save": None,
        "inference_mode": True,
    }
    native = method in NATIVE_PEFT and not dense
    if native:
        tensors, extra = peft_native(model, method)
        config = {**common, **extra}
    else:
        config = {
            **common,
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": rank,  # the scale is folded into lora_B: α/r = 1
            "lora_dropout": 0.0,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
        }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    write_output_dir(
        out, write, "export-peft", overwrite, inputs, what=EXPORTED["what"], replaces=EXPORTED["kinds"]
    )
    stored = sum(p.numel() for p in tensors.values())
    base, revision = config["base_model_name_or_path"], config.get("revision")
    if native:
        serve, why = (
            None,
            f"vLLM serves LoRA adapters only: write this {method} adapter with --format peft-lora",
        )
    elif vllm_max_lora_rank(rank) is None:
        serve, why = None, f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; this adapter has rank {rank}"
    else:
        serve, why = vllm_command(base, Path(out), rank, revision), None
    return {
        "out": str(out),
        "format": "peft-lora" if dense else "peft",
        "peft_type": config["peft_type"],
        "method": method,
        "r": config["r"],
        "layers": len(names),
        "stored_parameters": stored,
        "base_model_name_or_path": base,
        "serve": serve,
        "serve_note": why,
    }


# The --max-lora-rank values vLLM accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (None above its largest)."""
    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), None)


def vllm_command(base: str, adapter: Path, rank: int, revision: str | None = None) -> str:
    """A ``vllm serve`` command line that serves the base (at its pinned revision) with this PEFT LoRA
    adapter (named after its directory), with the rank it needs."""
    import shlex

    name = adapter.resolve().name or "adapter"
    pinned = f" --revision {shlex.quote(revision)}" if revision else ""
    return (
        f"vllm serve {shlex.quote(base)}{pinned} --enable-lora --lora-modules "
        f"{shlex.quote(f'{name}={adapter.resolve()}')} --max-lora-rank {vllm_max_lora_rank(rank)}"
    )


def export_native(
    run_dir: str | Path, out: str | Path, overwrite: bool = False, base_model: str | None = None
) -> dict:
    """A copy of the run's adapter files (adapter.safetensors, adapter.json, recipe.yaml)."""
    run_dir = Path(run_dir)
    inputs = _inputs(run_dir, base_model)
    check_output_dir(out, "--out", replace=overwrite, inputs=inputs, **EXPORTED)
    if not (run_dir / ADAPTER_CONFIG).is_file():
        if is_peft_adapter(run_dir):
            raise BadInput(
                f"--format shardtune: {run_dir} is a PEFT LoRA adapter, not a shardtune run; it is in PEFT's "
                "format already (--format peft writes it again)"
            )
        raise BadInput(f"{run_dir}: not a shardtune adapter directory (no {ADAPTER_CONFIG})")
    load_adapted_model(run_dir, base_model=base_model)  # validate before copying

    def write(tmp: Path) -> None:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RECIPE_FILE):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)

    write_output_dir(
        out, write, "export-shardtune", overwrite, inputs, what=EXPORTED["what"], replaces=EXPORTED["kinds"]
    )
    return {"out": str(out), "format": "shardtune"}
