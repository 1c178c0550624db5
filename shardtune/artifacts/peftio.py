"""PEFT LoRA adapters come in: a directory PEFT wrote (``adapter_config.json`` +
``adapter_model.safetensors``) is read as a shardtune LoRA adapter, number for number.

PEFT's LoRA computes ``y = W·x + s·B·A·dropout(x)`` with ``s = lora_alpha / r`` (``use_rslora``:
``lora_alpha / √r``) — shardtune's :mod:`shardtune.adapters.lora` exactly. The config maps key by key:
``r → rank``, ``lora_alpha → alpha``, ``use_rslora → rslora``, ``lora_dropout → dropout``,
``target_modules`` (a list matched by name suffix, a regular expression matched in full, or
``all-linear``) → ``targets``, ``exclude_modules`` → ``exclude``; tensors
``base_model.model.<layer>.lora_A.weight`` → ``<layer>.adapter.lora_A`` (and ``lora_B``). What
shardtune's LoRA cannot represent — DoRA, bias training, ``modules_to_save``, per-layer ranks or
alphas, layer subsets — is refused with one line naming the key. Pickled ``adapter_model.bin`` files
are never read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from shardtune.adapters.lora import LoraOptions
from shardtune.core.errors import BadInput
from shardtune.core.fileio import read_weights

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
TENSOR = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def is_peft_adapter(directory: Path) -> bool:
    """A directory with PEFT's adapter_config.json and no shardtune adapter.json."""
    return (directory / PEFT_CONFIG).is_file() and not (directory / "adapter.json").is_file()


def read_peft_config(directory: Path) -> dict:
    """adapter_config.json of a PEFT adapter, checked: a LoRA that shardtune's LoRA represents exactly."""
    path = directory / PEFT_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: unreadable PEFT adapter config ({e})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: not a PEFT adapter config (not a JSON object)")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise BadInput(f"{path}: a PEFT {kind} adapter; shardtune reads PEFT LoRA adapters (peft_type LORA)")
    refused = {
        "use_dora": "DoRA",
        "bias": "trained biases",
        "modules_to_save": "whole modules trained beside the adapter",
        "rank_pattern": "per-layer ranks",
        "alpha_pattern": "per-layer alphas",
        "layers_to_transform": "a subset of layers",
        "layer_replication": "replicated layers",
        "target_parameters": "adapted parameters (not linear layers)",
        "trainable_token_indices": "trainable token embeddings",
    }
    for key, what in refused.items():
        value = config.get(key)
        if value not in (None, False, "none", {}, []):
            raise BadInput(f"{path}: key {key!r} = {value!r} ({what}) has no equivalent in shardtune's LoRA")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise BadInput(f"{path}: key 'r' must be a positive integer, got {config.get('r')!r}")
    return config


def lora_options(config: dict, directory: Path) -> LoraOptions:
    """The shardtune LoRA options that compute what this PEFT LoRA computes."""
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple | set):
        targets = sorted(targets)
    exclude = config.get("exclude_modules") or []
    if isinstance(exclude, str):
        raise BadInput(
            f"{directory / PEFT_CONFIG}: key 'exclude_modules' as a regular expression is not supported"
        )
    try:
        return LoraOptions(
            method="lora",
            rank=config["r"],
            alpha=float(config.get("lora_alpha", 8)),
            rslora=bool(config.get("use_rslora", False)),
            dropout=float(config.get("lora_dropout", 0.0)),
            targets=targets if targets is not None else "all-linear",
            exclude=sorted(exclude),
        )
    except ValueError as e:
        raise BadInput(f"{directory / PEFT_CONFIG}: {str(e).splitlines()[0]}") from None


def peft_meta(directory: Path) -> dict:
    """What shardtune's adapter.json would say of this PEFT adapter (method, options, base model)."""
    config = read_peft_config(directory)
    options = lora_options(config, directory)
    return {
        "format": "peft",
        "method": "lora",
        "options": options.model_dump(mode="json"),
        "targets": None,
        "base_model": {"name": config.get("base_model_name_or_path"), "revision": config.get("revision")},
        "step": None,
        "peft_config": config,
    }


def read_peft_weights(directory: Path) -> dict[str, torch.Tensor]:
    """PEFT's tensors under shardtune's names (``<layer>.adapter.lora_A`` / ``lora_B``)."""
    path = directory / PEFT_WEIGHTS
    if not path.is_file() and (directory / PEFT_PICKLE).is_file():
        raise BadInput(
            f"{directory / PEFT_PICKLE}: a pickle file, which shardtune never loads; save the adapter with "
            "safetensors (PEFT's save_pretrained(safe_serialization=True))"
        )
    state = {}
    for key, tensor in read_weights(path).items():
        match = TENSOR.match(key)
        if match is None:
            raise BadInput(
                f"{path}: tensor {key!r} is not a LoRA factor (base_model.model.<layer>.lora_A/B.weight)"
            )
        if not tensor.is_floating_point():
            raise BadInput(
                f"{path}: tensor {key!r} is {tensor.dtype}, expected floating point (a LoRA factor)"
            )
        state[f"{match.group(1)}.adapter.{match.group(2)}"] = tensor
    return state
