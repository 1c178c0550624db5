"""Adapters on disk: ``adapter.safetensors`` + ``adapter.json`` (+ the resolved ``recipe.yaml``).

Safetensors and JSON only (no pickle). Writes are atomic: files go to a temporary name in the same
directory and are renamed into place (``adapter.json`` last, so a directory with an ``adapter.json``
always has the matching tensors); checkpoint directories are written under a temporary name and
renamed as a whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import shardtune
from shardtune.adapters import METHODS, AdapterOptions
from shardtune.adapters.model import (
    adapter_state_dict,
    count_parameters,
    inject_adapter,
    load_adapter_state_dict,
)
from shardtune.errors import BadInput, named_as
from shardtune.fileio import atomic_directory, atomic_write, atomic_write_text, read_safetensors
from shardtune.fsdp import full_tensor, like_parameter
from shardtune.models import load_model
from shardtune.peftio import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_adapter, peft_meta, read_peft_weights
from shardtune.quant import quantization_of
from shardtune.recipe import ModelSection, Recipe, recipe_to_yaml

log = logging.getLogger("shardtune")

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
RECIPE_FILE = "recipe.yaml"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
# What a checkpoint-N directory holds (all of it shardtune's).
CHECKPOINT_FILES = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, RECIPE_FILE, TRAINER_STATE, OPTIMIZER_FILE, RNG_FILE]
FORMAT = "shardtune-adapter"
FORMAT_VERSION = 1


def adapter_metadata(model: nn.Module, recipe: Recipe, step: int) -> dict:
    options: AdapterOptions = model.shardtune_options
    method = METHODS[options.method]
    trainable, total = count_parameters(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shardtune_version": shardtune.__version__,
        "method": options.method,
        "options": options.model_dump(mode="json"),
        "method_info": method.export_info(options, model),
        "targets": list(model.shardtune_targets),
        # where the base model really is (absolute path, hub commit): the run works from anywhere
        "base_model": {**recipe.model.model_dump(mode="json"), **getattr(model, "shardtune_base", {})},
        "step": step,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def save_adapter(
    model: nn.Module,
    recipe: Recipe,
    directory: Path,
    step: int,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapter of ``model`` into ``directory`` (created if needed), file by file atomically.

    ``tensors``: the adapter's whole tensors when already gathered (:func:`adapter_state_dict`; under
    FSDP every process gathers, then the main process alone writes).
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if tensors is None else tensors
    meta = adapter_metadata(model, recipe, step)
    atomic_write(
        directory / ADAPTER_WEIGHTS,
        lambda tmp: save_file({k: v.cpu() for k, v in state.items()}, tmp, metadata={"format": "pt"}),
    )
    atomic_write_text(directory / RECIPE_FILE, recipe_to_yaml(recipe))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")


@dataclass
class TrainingSnapshot:
    """Whole tensors of everything a checkpoint holds, gathered on every process (a collective
    under FSDP) before the main process writes them."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None = None
    param_groups: list | None = None


def take_snapshot(model: nn.Module, optimizer=None) -> TrainingSnapshot:
    snapshot = TrainingSnapshot(adapter_state_dict(model))
    if optimizer is not None:
        snapshot.optimizer, snapshot.param_groups = optimizer_tensors(optimizer)
    return snapshot


def save_checkpoint(
    model: nn.Module,
    recipe: Recipe,
    run_dir: Path,
    step: int,
    keep: int,
    optimizer=None,
    counters: dict | None = None,
    snapshot: TrainingSnapshot | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-{step}`` as a whole (temp dir + rename); keep the newest ``keep``.

    With ``optimizer`` (or a ``snapshot`` that holds its state) the checkpoint also holds the
    training state, so a killed run can resume.
    """
    snapshot = snapshot or take_snapshot(model, optimizer)
    final = run_dir / f"checkpoint-{step}"
    with atomic_directory(final) as tmp:
        save_adapter(model, recipe, tmp, step, snapshot.adapter)
        if snapshot.optimizer is not None:
            save_training_state(tmp, snapshot, {"step": step, **(counters or {})})
        else:
            atomic_write_text(tmp / TRAINER_STATE, json.dumps({"step": step}) + "\n")
    rotate_checkpoints(run_dir, keep)
    return final


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints of a run; remove the older ones (:func:`remove_checkpoint`)."""
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_checkpoint(old)


def remove_checkpoint(directory: Path) -> None:
    """Delete a checkpoint shardtune wrote (the oldest, beyond ``train.keep_checkpoints``): its own files,
    then the directory if that leaves it empty. A file someone put there keeps it, with a warning; a
    symbolic link named like a checkpoint is someone's too (its target is never touched) and is kept."""
    if directory.is_symlink() or not directory.is_dir():
        log.warning(
            "kept %s: a link or file named like a checkpoint, which shardtune did not write", directory
        )
        return
    for name in CHECKPOINT_FILES:
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        if directory.is_dir():
            left = sorted(p.name for p in directory.iterdir())
            log.warning("kept %s: it holds %s, which shardtune did not write", directory, ", ".join(left))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-N`` directories of a run, oldest first."""
    found = []
    for p in run_dir.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and (p / ADAPTER_CONFIG).is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def read_adapter_config(directory: Path) -> dict:
    """adapter.json of a run or checkpoint, checked key by key (one line naming the file and the key)."""
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise BadInput(f"{directory}: no such run or adapter directory")
    if not path.is_file():
        raise BadInput(f"{directory}: not a shardtune adapter directory (no {ADAPTER_CONFIG})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: corrupt adapter config ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadInput(f"{path}: not a shardtune adapter config (format is not {FORMAT!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BadInput(f"{path}: written by a newer shardtune (format {version}); please upgrade")
    expected = {
        "method": str,
        "options": dict,
        "targets": list,
        "base_model": dict,
        "step": int,
    }
    for key, kind in expected.items():
        if key not in meta:
            raise BadInput(f"{path}: missing key {key!r}; the file was edited or cut short")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise BadInput(f"{path}: key {key!r} must be a {kind.__name__}, got {meta[key]!r}")
    if not isinstance(meta["base_model"].get("name"), str):
        raise BadInput(f"{path}: key 'base_model.name' is missing or not a string")
    if meta["options"].get("method", meta["method"]) != meta["method"]:
        raise BadInput(
            f"{path}: key 'method' says {meta['method']!r} but 'options.method' says {meta['options']['method']!r}"
        )
    return meta


def adapter_options_from_config(meta: dict, source: str) -> AdapterOptions:
    method = meta.get("method")
    if method not in METHODS:
        raise BadInput(
            f"{source}: unknown adapter method {method!r}; this shardtune knows {', '.join(METHODS)}"
        )
    try:
        return METHODS[method].Options.model_validate({**meta.get("options", {}), "method": method})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BadInput(f"{source}: invalid adapter option {where!r} ({err['msg']})") from None


def read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a run or checkpoint; missing, empty, cut short or corrupt: one line."""
    return read_safetensors(path)


def adapter_source(directory: Path) -> tuple[dict, AdapterOptions]:
    """(metadata, options) of an adapter directory: a shardtune run or checkpoint (adapter.json), or a
    PEFT LoRA adapter (adapter_config.json, read by :mod:`shardtune.peftio`)."""
    if is_peft_adapter(directory):
        meta = peft_meta(directory)
        return meta, METHODS["lora"].Options.model_validate(meta["options"])
    meta = read_adapter_config(directory)
    return meta, adapter_options_from_config(meta, str(directory / ADAPTER_CONFIG))


def attach_adapter(model: nn.Module, directory: Path) -> dict:
    """Inject the adapter described in ``directory`` (shardtune's or PEFT's) into ``model`` and load its weights."""
    meta, options = adapter_source(directory)
    targets = inject_adapter(model, options)
    saved = meta.get("targets")
    if saved and sorted(saved) != sorted(model.shardtune_targets):
        raise BadInput(
            f"{directory}: the adapter was trained on other layers than this model has "
            f"({len(saved)} saved, {len(targets)} found); is it the right base model?"
        )
    if meta["format"] == "peft":
        load_adapter_state_dict(model, read_peft_weights(directory), str(directory / PEFT_WEIGHTS))
    else:
        state = read_adapter_weights(directory / ADAPTER_WEIGHTS)
        load_adapter_state_dict(model, state, str(directory / ADAPTER_WEIGHTS))
    return meta


def init_adapter_from(model: nn.Module, directory: Path) -> None:
    """``adapter.init_from``: the weights of another adapter directory (shardtune's or PEFT's) into the
    adapter ``model`` carries; its method and the options that shape the update must be the same."""
    key = "adapter.init_from"
    if not directory.is_dir():
        raise BadInput(f"{key}: {directory} is not a directory")
    meta, source = adapter_source(directory)
    ours: AdapterOptions = model.shardtune_options
    if source.method != ours.method:
        raise BadInput(f"{key}: {directory} holds a {source.method} adapter; adapter.method is {ours.method}")
    for name, value in source.model_dump().items():
        if name in ("init_from", "dropout", "dtype", "targets", "exclude", "init"):
            continue  # free to differ: they do not change what the weights mean
        if getattr(ours, name, value) != value:
            raise BadInput(
                f"{key}: {directory} has {name} = {value!r} but adapter.{name} is {getattr(ours, name)!r}"
            )
    saved = meta.get("targets")
    if saved and sorted(saved) != sorted(model.shardtune_targets):
        raise BadInput(f"{key}: {directory} adapts other layers than adapter.targets selects")
    if meta["format"] == "peft":
        load_adapter_state_dict(model, read_peft_weights(directory), str(directory / PEFT_WEIGHTS))
    else:
        load_adapter_state_dict(
            model, read_adapter_weights(directory / ADAPTER_WEIGHTS), str(directory / ADAPTER_WEIGHTS)
        )


def attach_weights(model: nn.Module, directory: Path) -> None:
    """Load a checkpoint's adapter tensors into a model that already carries the same adapter."""
    state = read_adapter_weights(directory / ADAPTER_WEIGHTS)
    load_adapter_state_dict(model, state, str(directory / ADAPTER_WEIGHTS))


def recorded_base(directory: Path, base_model: str | None = None) -> tuple[dict, ModelSection]:
    """(metadata, base model section) of an adapter directory: the base it records (``base_model``:
    another copy of it, at no particular revision). ``trust_remote_code`` is never taken from it."""
    if not directory.is_dir():
        raise BadInput(f"{directory}: no such run or adapter directory")
    meta, _ = adapter_source(directory)
    recorded = {k: v for k, v in meta["base_model"].items() if k in ModelSection.model_fields}
    recorded["trust_remote_code"] = False
    if base_model is not None:
        recorded = {**recorded, "name": base_model, "revision": None}
    if not recorded.get("name"):
        raise BadInput(f"{directory}: the adapter names no base model; give it with --base-model")
    try:
        return meta, ModelSection.model_validate(recorded)
    except ValidationError as e:
        raise BadInput(f"{directory / ADAPTER_CONFIG}: invalid base_model ({e.errors()[0]['msg']})") from None


@contextmanager
def base_model_errors(
    directory: Path, base_model: str | None, option: str = "--base-model"
) -> Iterator[None]:
    """Bad input met loading an adapter's base model names where the name came from: ``option`` (the
    command line's ``base_model``), else the field of the adapter's config that records it, with the
    option that gives another copy (a moved or deleted base)."""
    if base_model is not None:
        with named_as({"model.name": option}):
            yield
        return
    peft = is_peft_adapter(directory)
    config = directory / (PEFT_CONFIG if peft else ADAPTER_CONFIG)
    field = f"{config}: {'base_model_name_or_path' if peft else 'base_model.name'}"
    try:
        with named_as({"model.name": field, "model.revision": f"{config}: base_model.revision"}):
            yield
    except BadInput as e:
        if not str(e).startswith(field):
            raise
        raise BadInput(f"{e} (give the base model with {option})") from None


def load_adapted_model(
    directory: str | Path,
    base_model: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    base_option: str = "--base-model",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Base model (as recorded in adapter.json or PEFT's adapter_config.json, or ``base_model``) with
    the adapter attached, in eval mode. ``base_option``: the command-line option that gave
    ``base_model`` (or would give it), as errors name it.

    ``trust_remote_code`` is never taken from the adapter directory: the caller must ask for it.
    """
    directory = Path(directory)
    meta, section = recorded_base(directory, base_model)
    with base_model_errors(directory, base_model, base_option):
        model, tokenizer = load_model(
            section.name,
            dtype or section.dtype,
            trust_remote_code=trust_remote_code,
            revision=section.revision,
            quantization=quantization_of(section),  # the base as it was trained: quantized the same way
        )
    attach_adapter(model, directory)
    model.eval()
    return model, tokenizer, meta


# ---------------------------------------------------------------------------------------------------
# Training state (resume): optimizer moments in safetensors, counters and RNG states in JSON/safetensors.


def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """The optimizer state as whole tensors keyed ``state.<param index>.<name>``, and its param groups.

    Under FSDP each moment is gathered from its shards (every process must call this).
    """
    state = optimizer.state_dict()
    tensors = {
        f"state.{idx}.{key}": full_tensor(value.detach()).cpu().contiguous()
        for idx, entry in state["state"].items()
        for key, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, state["param_groups"]


def save_training_state(directory: Path, snapshot: TrainingSnapshot, counters: dict) -> None:
    """Everything a killed run needs to continue exactly: optimizer, step/epoch/batch, RNG states."""
    import random

    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    atomic_write(directory / OPTIMIZER_FILE, lambda tmp: save_file(snapshot.optimizer, tmp))
    atomic_write(directory / RNG_FILE, lambda tmp: save_file(rng, tmp))
    meta = {
        **counters,
        "param_groups": snapshot.param_groups,
        "python_rng": _py_rng_to_json(random.getstate()),
    }
    atomic_write_text(directory / TRAINER_STATE, json.dumps(meta) + "\n")


def load_training_state(directory: Path, optimizer) -> dict:
    """Restore optimizer and RNG states from a checkpoint; return its counters (step, epoch, batch).

    The moments are laid out as the optimizer's parameters are (this process's shard under FSDP),
    whatever strategy wrote them.
    """
    import random

    meta = read_trainer_state(directory)
    tensors = read_adapter_weights(directory / OPTIMIZER_FILE)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        idx = int(idx)
        if idx < len(params) and value.shape == params[idx].shape and value.dim() > 0:
            value = like_parameter(value, params[idx])  # a moment of the parameter's shape
        state.setdefault(idx, {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise BadInput(
            f"--resume: the optimizer state in {directory} does not fit this adapter ({e})"
        ) from None
    rng = read_adapter_weights(directory / RNG_FILE)
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_py_rng_from_json(meta["python_rng"]))
    return {k: meta[k] for k in ("step", "epoch", "batch_in_epoch")}


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data):
    version, internal, gauss = data
    return version, tuple(internal), gauss


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``latest`` → the newest checkpoint of the run (None if there is none); a path → that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(resume)
        if not path.is_dir():
            raise BadInput(f"--resume-from: {resume} is not a directory")
        if not (path / ADAPTER_CONFIG).is_file():
            raise BadInput(f"--resume-from: {resume} is not a checkpoint directory (no {ADAPTER_CONFIG})")
    return path


def check_checkpoint(directory: Path, options: AdapterOptions | None = None) -> int:
    """Read every file of a checkpoint (before a resumed run touches anything); return its step.
    Anything missing or broken, or an adapter other than ``options`` (the recipe's): one line naming
    the file, and nothing is written."""
    meta = read_adapter_config(directory)
    saved = adapter_options_from_config(meta, str(directory / ADAPTER_CONFIG))
    ours = options.model_dump() if options is not None else {}
    theirs = saved.model_dump()
    differing = [  # the method first: another method's options all differ after it
        k
        for k in sorted(ours.keys() | theirs.keys(), key=lambda k: (k != "method", k))
        if ours.get(k) is not None and ours.get(k) != theirs.get(k)
    ]
    if options is not None and differing:  # (an unset option is chosen at run time: the checkpoint's stands)
        key = differing[0]
        raise BadInput(
            f"{directory / ADAPTER_CONFIG}: the checkpoint's adapter has {key} = {theirs.get(key)!r} but the "
            f"recipe says adapter.{key} = {ours.get(key)!r}; resume with the recipe it was trained with"
        )
    read_adapter_weights(directory / ADAPTER_WEIGHTS)
    state = read_trainer_state(directory)
    read_adapter_weights(directory / OPTIMIZER_FILE)
    rng = read_adapter_weights(directory / RNG_FILE)
    if "torch_cpu" not in rng:
        raise BadInput(f"{directory / RNG_FILE}: holds no CPU random state; the file was edited")
    return state["step"]


def read_trainer_state(directory: Path) -> dict:
    """trainer_state.json of a checkpoint: counters, optimizer param groups, Python's RNG state."""
    path = directory / TRAINER_STATE
    for needed in (path, directory / OPTIMIZER_FILE):
        if not needed.is_file():
            raise BadInput(
                f"--resume: {needed} not found: {directory} holds no complete training state (was it "
                "written by shardtune train with train.save_every?)"
            )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: corrupt trainer state ({e})") from None
    if not isinstance(meta, dict):
        raise BadInput(f"{path}: corrupt trainer state (not a JSON object)")
    for key in ("step", "epoch", "batch_in_epoch", "param_groups", "python_rng"):
        if key not in meta:
            raise BadInput(f"{path}: missing key {key!r}; the file was edited or cut short")
    for key in ("step", "epoch", "batch_in_epoch"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise BadInput(f"{path}: key {key!r} must be a whole number, got {meta[key]!r}")
    return meta
