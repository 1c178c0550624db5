"""Adapters on disk: ``adapter.safetensors`` + ``adapter.json`` (+ the resolved ``recipe.yaml``).

Safetensors and JSON only (no pickle). Writes are atomic: files go to a temporary name in the same
directory and are renamed into place (``adapter.json`` last, so a directory with an ``adapter.json``
always has the matching tensors); checkpoint directories are written under a temporary name and
renamed as a whole.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
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
from shardtune.artifacts.peftio import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    is_peft_adapter,
    peft_meta,
    read_peft_weights,
)
from shardtune.core.errors import BadInput, first_line, named_as
from shardtune.core.fileio import (
    atomic_directory,
    atomic_write,
    atomic_write_text,
    foreign_entries,
    read_safetensors,
    read_weights,
)
from shardtune.models.dtensor import full_tensor, like_parameter
from shardtune.models.loading import load_model
from shardtune.models.quant import quantization_of
from shardtune.recipe.schema import ModelSection, Recipe, parse_yaml, recipe_to_yaml

log = logging.getLogger("shardtune")

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
RECIPE_FILE = "recipe.yaml"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
BEST_DIR = "best"  # output.keep_best: the adapter of the best evaluation so far
BEST_FILE = "best.json"  # in it: {"step", "metric", "value"}
BEST_FILES = [ADAPTER_WEIGHTS, ADAPTER_CONFIG, RECIPE_FILE, BEST_FILE]
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
        # data.chat_template's Jinja when the recipe named one: eval and generate render chats alike
        "chat_template": getattr(model, "shardtune_chat_template", None),
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
    optimizer_numbers: dict[str, int | float] | None = None  # plain-number state (bitsandbytes' step)


def take_snapshot(model: nn.Module, optimizer=None) -> TrainingSnapshot:
    snapshot = TrainingSnapshot(adapter_state_dict(model))
    if optimizer is not None:
        snapshot.optimizer, snapshot.param_groups, snapshot.optimizer_numbers = optimizer_state(optimizer)
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


def save_best(
    model: nn.Module, recipe: Recipe, run_dir: Path, step: int, tensors: dict, metric: str, value: float
) -> Path | None:
    """``run_dir/best``: the adapter files of step ``step`` (as a run directory holds them, so eval,
    generate, merge and export take it) and best.json, replacing the earlier best as a whole. A
    ``best`` that holds files shardtune did not write is kept as it is, with a warning (None)."""
    final = run_dir / BEST_DIR
    foreign = foreign_entries(final, BEST_FILES) if final.is_dir() and not final.is_symlink() else []
    if final.is_symlink() or final.exists() and not final.is_dir() or foreign:
        what = ", ".join(foreign) or "a link or file"
        log.warning("kept %s as it is: it holds %s, which shardtune did not write", final, what)
        return None
    with atomic_directory(final) as tmp:
        save_adapter(model, recipe, tmp, step, tensors)
        best = {"step": step, "metric": metric, "value": value}
        atomic_write_text(tmp / BEST_FILE, json.dumps(best) + "\n")
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
        if p.is_dir() and suffix.isascii() and suffix.isdigit() and (p / ADAPTER_CONFIG).is_file():
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
    if not isinstance(meta.get("chat_template"), str | None):
        raise BadInput(f"{path}: key 'chat_template' must be a string or null, got {meta['chat_template']!r}")
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
    """The adapter tensors of a run or checkpoint; missing, empty, cut short, corrupt, not floating
    point or not finite: one line (:func:`shardtune.core.fileio.read_weights`)."""
    return read_weights(path)


def adapter_source(directory: Path) -> tuple[dict, AdapterOptions]:
    """(metadata, options) of an adapter directory: a shardtune run or checkpoint (adapter.json), or a
    PEFT LoRA adapter (adapter_config.json, read by :mod:`shardtune.artifacts.peftio`)."""
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
    # A PEFT LoRA's update is s·B·A with its own scale s (an export of shardtune's folds the recipe's
    # scale into B and writes α = r): with the same rank, B is rescaled to this recipe's scale, so
    # the update, and the model, are the ones the file holds.
    rescale_b = None
    free = ("init_from", "dropout", "dtype", "targets", "exclude", "init")
    if meta["format"] == "peft" and source.rank == ours.rank:  # (both LoRA: the methods agree)
        from shardtune.adapters.lora import lora_scale

        rescale_b = lora_scale(source.alpha, source.rank, source.rslora) / lora_scale(
            ours.alpha, ours.rank, ours.rslora
        )
        free += ("alpha", "rslora")
    for name, value in source.model_dump().items():
        if name in free:
            continue  # free to differ: they do not change what the weights mean
        if getattr(ours, name, value) != value:
            raise BadInput(
                f"{key}: {directory} has {name} = {value!r} but adapter.{name} is {getattr(ours, name)!r}"
            )
    saved = meta.get("targets")
    if saved and sorted(saved) != sorted(model.shardtune_targets):
        raise BadInput(f"{key}: {directory} adapts other layers than adapter.targets selects")
    if meta["format"] == "peft":
        state = read_peft_weights(directory)
        if rescale_b is not None and rescale_b != 1.0:
            state = {k: v * rescale_b if k.endswith("lora_B") else v for k, v in state.items()}
        load_adapter_state_dict(model, state, str(directory / PEFT_WEIGHTS))
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
    if meta.get("chat_template"):  # the template the run was trained with (data.chat_template)
        tokenizer.chat_template = meta["chat_template"]
    return model, tokenizer, meta


# ---------------------------------------------------------------------------------------------------
# Training state (resume): optimizer moments in safetensors, counters and RNG states in JSON/safetensors.


def optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], list, dict[str, int | float]]:
    """The optimizer state as whole tensors keyed ``state.<param index>.<name>``, its param groups, and
    the state that is a plain number, not a tensor (bitsandbytes counts steps in an int), keyed
    ``<param index>.<name>`` (trainer_state.json keeps those).

    Under FSDP each moment is gathered from its shards (every process must call this).
    """
    state = optimizer.state_dict()
    tensors, numbers, seen = {}, {}, set()
    for idx, entry in state["state"].items():
        for key, value in _flat_state(entry).items():
            if isinstance(value, torch.Tensor):
                value = full_tensor(value.detach()).cpu().contiguous()
                if value.data_ptr() in seen:  # one table shared by every parameter (bitsandbytes' qmap)
                    value = value.clone()
                seen.add(value.data_ptr())
                tensors[f"state.{idx}.{key}"] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[f"{idx}.{key}"] = value
    return tensors, state["param_groups"], numbers


def _flat_state(entry: dict) -> dict:
    """A parameter's optimizer state with nested dicts opened (bitsandbytes' state_dict wraps its 8-bit
    states in one, for FSDP; its load_state_dict takes them flat as well)."""
    flat = {}
    for key, value in entry.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


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
        "optimizer_numbers": snapshot.optimizer_numbers or {},
        "python_rng": _py_rng_to_json(random.getstate()),
    }
    atomic_write_text(directory / TRAINER_STATE, json.dumps(meta) + "\n")


def load_training_state(directory: Path, optimizer) -> dict:
    """Restore optimizer and RNG states from a checkpoint; return its counters (step, epoch, batch, and
    the judged evaluations, :mod:`shardtune.training.selection`, None in a checkpoint without).

    The moments are laid out as the optimizer's parameters are (this process's shard under FSDP),
    whatever strategy wrote them.
    """
    import random

    meta = read_trainer_state(directory)
    tensors = read_safetensors(directory / OPTIMIZER_FILE)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        idx = int(idx)
        if idx < len(params) and value.shape == params[idx].shape and value.dim() > 0:
            value = like_parameter(value, params[idx])  # a moment of the parameter's shape
        state.setdefault(idx, {})[name] = value
    for key, number in meta.get("optimizer_numbers", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = number
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise BadInput(
            f"--resume: the optimizer state in {directory} does not fit this adapter ({e})"
        ) from None
    rng = read_safetensors(directory / RNG_FILE)
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_py_rng_from_json(meta["python_rng"]))
    return {k: meta.get(k) for k in ("step", "epoch", "batch_in_epoch", "selection", "stream")}


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data):
    version, internal, gauss = data
    return version, tuple(internal), gauss


def resolve_resume(run_dir: Path, resume: str | Path | None) -> Path | None:
    """The string ``latest`` (``--resume``) → the newest checkpoint of the run (None if there is none);
    a path (``--resume-from``; a directory may be named ``latest``) → that checkpoint. An empty value,
    or a run directory rather than one of its checkpoints, is refused."""
    if resume is None:
        return None
    if isinstance(resume, str) and resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    if not str(resume).strip():
        raise BadInput("--resume-from: the value is empty; give a checkpoint-N directory")
    path = Path(resume)
    if not path.is_dir():
        raise BadInput(f"--resume-from: {resume} is not a directory")
    found = list_checkpoints(path)
    if not (path / TRAINER_STATE).is_file() and found:
        raise BadInput(
            f"--resume-from: {resume} is a run directory, not a checkpoint; its latest checkpoint is "
            f"{found[-1]} (or continue the run with --resume)"
        )
    if not (path / ADAPTER_CONFIG).is_file():
        raise BadInput(f"--resume-from: {resume} is not a checkpoint directory (no {ADAPTER_CONFIG})")
    if not (path / TRAINER_STATE).is_file() and not path.name.startswith("checkpoint-"):
        raise BadInput(
            f"--resume-from: {resume} is a run or adapter directory, not a checkpoint, and holds no "
            "checkpoint-N to resume from"
        )
    return path


def check_checkpoint(directory: Path, options: AdapterOptions | None = None, option: str = "--resume") -> int:
    """Read every file of a checkpoint (before a resumed run touches anything); return its step.
    Anything missing or broken, or an adapter other than ``options`` (the recipe's): one line naming
    the file, and nothing is written. ``option``: the command-line option that named the checkpoint."""
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
    state = read_trainer_state(directory, option)
    _check_step_agrees(directory, state["step"], meta["step"])
    read_safetensors(directory / OPTIMIZER_FILE)
    _check_rng_file(directory / RNG_FILE)
    return state["step"]


def _check_step_agrees(directory: Path, step: int, adapter_step: int) -> None:
    """trainer_state.json's step is the one the directory is named after and adapter.json records."""
    path = directory / TRAINER_STATE
    suffix = directory.name.removeprefix("checkpoint-")
    if directory.name.startswith("checkpoint-") and suffix.isdigit() and int(suffix) != step:
        raise BadInput(
            f"{path}: key 'step' is {step} but the directory is {directory.name}; the file was edited"
        )
    if adapter_step != step:
        raise BadInput(
            f"{path}: key 'step' is {step} but {ADAPTER_CONFIG} records step {adapter_step}; "
            "the file was edited"
        )


def _check_rng_file(path: Path) -> None:
    """rng.safetensors: torch's CPU generator state (and any CUDA ones) as torch writes them."""
    rng = read_safetensors(path)
    if "torch_cpu" not in rng:
        raise BadInput(f"{path}: holds no CPU random state; the file was edited")
    want = torch.get_rng_state()
    if rng["torch_cpu"].dtype != want.dtype or rng["torch_cpu"].shape != want.shape:
        raise BadInput(
            f"{path}: tensor 'torch_cpu' is not a CPU random state ({rng['torch_cpu'].dtype}, "
            f"{tuple(rng['torch_cpu'].shape)}); the file was edited"
        )
    try:  # (a generator of its own: the process's state is restored later, by the run)
        torch.Generator().set_state(rng["torch_cpu"])
    except RuntimeError as e:
        raise BadInput(
            f"{path}: tensor 'torch_cpu' is not a valid CPU random state ({first_line(e)}); the file was "
            "edited or damaged"
        ) from None
    for name, value in rng.items():
        if name.startswith("torch_cuda_") and (value.dtype != torch.uint8 or value.dim() != 1):
            raise BadInput(f"{path}: tensor {name!r} is not a CUDA random state; the file was edited")


def read_trainer_state(directory: Path, option: str = "--resume") -> dict:
    """trainer_state.json of a checkpoint: counters, optimizer param groups, Python's RNG state, each
    key checked (a wrong one is one line naming the file and the key, before a resumed run writes)."""
    path = directory / TRAINER_STATE
    for needed in (path, directory / OPTIMIZER_FILE):
        if not needed.is_file():
            raise BadInput(
                f"{option}: {needed} not found: {directory} holds no complete training state (was it "
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
        if not _is_int(meta[key]) or meta[key] < 0:
            raise BadInput(f"{path}: key {key!r} must be a whole number, got {_shown(meta[key])}")
    if meta["epoch"] > meta["step"]:  # (every epoch takes at least one optimizer step)
        raise BadInput(f"{path}: key 'epoch' is {meta['epoch']} but the checkpoint is at step {meta['step']}")
    if "processes" in meta and (not _is_int(meta["processes"]) or meta["processes"] < 1):
        raise BadInput(
            f"{path}: key 'processes' must be a positive whole number, got {_shown(meta['processes'])}"
        )
    _check_param_groups(path, meta["param_groups"])
    _check_python_rng(path, meta["python_rng"])
    return meta


# What AdamW's param groups hold besides ``params`` (torch's state_dict): numbers, a pair, flags.
GROUP_NUMBERS = ("lr", "eps", "weight_decay")
GROUP_FLAGS = (
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
)


def _check_param_groups(path: Path, groups) -> None:
    """``param_groups``: a list of AdamW groups, each with its parameter numbers, finite non-negative
    numbers for lr/eps/weight_decay, two betas in [0, 1) and true/false/null flags."""
    if not isinstance(groups, list) or not groups:
        raise BadInput(
            f"{path}: key 'param_groups' must be a non-empty list of optimizer groups, got {_shown(groups)}"
        )
    for i, group in enumerate(groups):
        where = f"param_groups[{i}]"
        if not isinstance(group, dict):
            raise BadInput(f"{path}: key {where!r} must be an object, got {_shown(group)}")
        for key in ("params", *GROUP_NUMBERS):  # (and betas, for the optimizers that have them)
            if key not in group:
                raise BadInput(f"{path}: missing key '{where}.{key}'; the file was edited or cut short")
        params = group["params"]
        if not isinstance(params, list) or not all(_is_int(p) and p >= 0 for p in params):
            raise BadInput(
                f"{path}: key '{where}.params' must be a list of parameter numbers, got {_shown(params)}"
            )
        for key, value in group.items():
            _check_group_value(path, f"{where}.{key}", key, value)


def _check_group_value(path: Path, where: str, key: str, value) -> None:
    """One value of a param group, by what its key is (see :data:`GROUP_NUMBERS`, :data:`GROUP_FLAGS`)."""
    if key == "params":
        return
    if key == "eps" and isinstance(value, list):  # Adafactor: (eps1 or null, eps2)
        if not all(v is None or _is_number(v) and v >= 0 for v in value):
            raise BadInput(f"{path}: key {where!r} must hold finite numbers ≥ 0 or null, got {_shown(value)}")
    elif key in GROUP_NUMBERS:
        if not _is_number(value) or value < 0:
            raise BadInput(f"{path}: key {where!r} must be a finite number ≥ 0, got {_shown(value)}")
    elif key == "betas":
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in value)
        ):
            raise BadInput(f"{path}: key {where!r} must be two numbers in [0, 1), got {_shown(value)}")
    elif key in GROUP_FLAGS:
        if value is not None and not isinstance(value, bool):
            raise BadInput(f"{path}: key {where!r} must be true, false or null, got {_shown(value)}")
    elif not (value is None or isinstance(value, (bool, str)) or _is_number(value)):
        raise BadInput(f"{path}: key {where!r} must be a finite number, a string, true, false or null")


def _check_python_rng(path: Path, data) -> None:
    """``python_rng``: Python's ``random`` state as [version, [625 numbers], gauss], one that
    ``random.setstate`` takes (tried on a throwaway generator)."""
    import random

    if not isinstance(data, list) or len(data) != 3 or not isinstance(data[1], list):
        raise BadInput(
            f"{path}: key 'python_rng' must be Python's random state [version, [numbers], gauss], "
            f"got {_shown(data)}"
        )
    try:
        random.Random().setstate(_py_rng_from_json(data))
    except (TypeError, ValueError, OverflowError) as e:
        raise BadInput(f"{path}: key 'python_rng' is not a random state Python takes ({e})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite JSON number (JSON as Python reads it also takes NaN and Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value) -> str:
    """A value as an error shows it: its repr, cut short (an RNG state is hundreds of numbers)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What each optimizer keeps per parameter (``state.<param number>.<name>`` in optimizer.safetensors):
# the tensors it always has, those of its parameter's shape, and the others it may have.
OPTIMIZER_STATES = {
    "adamw": {
        "needed": {"step", "exp_avg", "exp_avg_sq"},
        "param_shaped": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
        "other": set(),
    },
    "adafactor": {"needed": {"step"}, "param_shaped": {"variance"}, "other": {"row_var", "col_var"}},
    "adamw_8bit": {  # bitsandbytes: the moments (8-bit codes, or float32 for small tensors), their scales
        "needed": {"state1", "state2"},
        "param_shaped": {"state1", "state2"},
        "other": {
            "qmap1",
            "qmap2",
            "absmax1",
            "absmax2",
            "max1",
            "max2",
            "new_max1",
            "new_max2",
            "unorm_vec",
        },
    },
}
OPTIMIZER_STATES["paged_adamw_8bit"] = OPTIMIZER_STATES["adamw_8bit"]
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_optimizer_fits(
    directory: Path, expected: list[list[torch.Tensor]], optimizer: str = "adamw"
) -> None:
    """The checkpoint's optimizer state fits the adapter's trainable parameters, grouped as AdamW gets
    them (``expected``: the groups, each its parameters in order; one group unless ``train.param_groups``
    and the like split them): the same groups, numbering each parameter once in that order, and for each
    parameter with a state, a step and moments of its shape. Checked before a resumed run writes anything."""
    state_path, tensors_path = directory / TRAINER_STATE, directory / OPTIMIZER_FILE
    groups = read_trainer_state(directory)["param_groups"]
    params = [p for group in expected for p in group]
    numbers = [n for group in groups for n in group["params"]]
    sizes = [len(group["params"]) for group in groups]
    if sizes != [len(group) for group in expected] or numbers != list(range(len(params))):
        raise BadInput(
            f"{state_path}: key 'param_groups' holds {len(groups)} group(s) of {_shown(sizes)} parameters "
            f"numbered {_shown(numbers)}; this adapter has {len(expected)} group(s) of "
            f"{_shown([len(group) for group in expected])} (0 to {len(params) - 1}): "
            "the optimizer state does not fit this adapter (or train.param_groups, train.lr_ratio_b or "
            "the method's rates group it otherwise)"
        )
    amsgrad = bool(groups[0].get("amsgrad"))
    kinds = OPTIMIZER_STATES[optimizer]
    names: dict[int, set[str]] = {}
    for key, value in read_safetensors(tensors_path).items():
        idx, name = _optimizer_key(tensors_path, key, len(params), optimizer)
        _check_optimizer_tensor(tensors_path, key, name, value, params[idx], name in kinds["param_shaped"])
        names.setdefault(idx, set()).add(name)
    needed = set(kinds["needed"]) | ({"max_exp_avg_sq"} if amsgrad else set())
    for idx, found in sorted(names.items()):
        if needed - found:
            raise BadInput(
                f"{tensors_path}: parameter {idx} has no {', '.join(sorted(needed - found))}; "
                "the file was edited"
            )


def _optimizer_key(path: Path, key: str, count: int, optimizer: str = "adamw") -> tuple[int, str]:
    """(parameter number, name) of an optimizer.safetensors key ``state.<number>.<name>``."""
    kinds = OPTIMIZER_STATES[optimizer]
    known = {"step"} | kinds["needed"] | kinds["param_shaped"] | kinds["other"]
    parts = key.split(".", 2)
    if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or parts[2] not in known:
        raise BadInput(
            f"{path}: tensor {key!r} is not a state of {optimizer} (state.<parameter>.<name>, name one of "
            f"{', '.join(sorted(known))}); the file was edited or train.optimizer changed"
        )
    if int(parts[1]) >= count:
        raise BadInput(f"{path}: tensor {key!r} is for parameter {parts[1]} but this adapter has {count}")
    return int(parts[1]), parts[2]


def _check_optimizer_tensor(
    path: Path, key: str, name: str, value: torch.Tensor, param: torch.Tensor, param_shaped: bool = True
) -> None:
    """A step is one floating-point number; a moment has its parameter's (whole) shape; 8-bit codes
    are bytes, everything else floating point."""
    if not (
        value.is_floating_point() or value.dtype == torch.uint8 and param_shaped and name.startswith("state")
    ):
        raise BadInput(f"{path}: tensor {key!r} must be floating point, got {value.dtype}")
    if name == "step" and value.numel() != 1:
        raise BadInput(f"{path}: tensor {key!r} must be one number, got shape {tuple(value.shape)}")
    if name != "step" and param_shaped and tuple(value.shape) != tuple(param.shape):
        raise BadInput(
            f"{path}: tensor {key!r} has shape {tuple(value.shape)} but the adapter's parameter has "
            f"{tuple(param.shape)}: the optimizer state does not fit this adapter"
        )
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise BadInput(
            f"{path}: tensor {key!r} holds NaN or infinity; the optimizer state is broken (resume from "
            "an earlier checkpoint)"
        )
    if value.is_floating_point() and name in NON_NEGATIVE_STATES and bool((value < 0).any()):
        raise BadInput(
            f"{path}: tensor {key!r} holds negative numbers, which a {name} never is; the file was edited"
        )


# Optimizer states that are never negative: step counts, second moments and their scales.
NON_NEGATIVE_STATES = {
    "step",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "variance",
    "row_var",
    "col_var",
    "state2",
    "absmax1",
    "absmax2",
}


# ---------------------------------------------------------------------------------------------------
# The same run: what a resumed run may not change (it would continue another run than the checkpoint's)

# The base model as loaded: another one (or the same one loaded otherwise) is another run.
SAME_MODEL_KEYS = ("name", "dtype", "quantize", "double_quant", "compute_dtype")
# The optimizer steps' examples and their order (seed, and the micro-batches a step sums), and the
# optimizer whose state the checkpoint holds.
SAME_TRAIN_KEYS = ("seed", "grad_accum", "optimizer")


def check_same_run(directory: Path, recipe: Recipe, processes: int) -> None:
    """The recipe describes the run the checkpoint is part of: the same base model (``model.name``,
    ``dtype``, ``quantize`` and its options), the same ``data`` section, ``train.seed``,
    ``train.grad_accum`` and global micro-batch (``train.batch_size`` × ``processes``, as the
    checkpoint records them). Anything else (steps, epochs, schedule, saving, logging, evaluation)
    may change. A difference: one line naming the key, the checkpoint's value and the recipe's."""
    path = directory / RECIPE_FILE
    saved = _saved_recipe(path)
    meta = read_adapter_config(directory)
    theirs_model = _section_values(saved, "model", ModelSection)
    for key in SAME_MODEL_KEYS:
        ours, theirs = getattr(recipe.model, key), theirs_model[key]
        if key == "name" and _same_model(ours, [theirs, meta["base_model"]["name"]]):
            continue
        if ours != theirs:
            _refuse_change(path, f"model.{key}", theirs, ours)
    theirs_data = _section_values(saved, "data", type(recipe.data))
    for key, ours in recipe.data.model_dump(mode="json").items():
        theirs = theirs_data[key]
        if key == "path" and ours is not None and theirs is not None and _same_path(ours, theirs):
            continue
        if ours != theirs:
            _refuse_change(path, f"data.{key}", theirs, ours)
    theirs_train = _section_values(saved, "train", type(recipe.train))
    for key in SAME_TRAIN_KEYS:
        if getattr(recipe.train, key) != theirs_train[key]:
            _refuse_change(path, f"train.{key}", theirs_train[key], getattr(recipe.train, key))
    _check_same_batch(directory, recipe.train.batch_size, theirs_train["batch_size"], processes)


def _check_same_batch(directory: Path, ours: int, theirs, processes: int) -> None:
    """The examples of a micro-batch over every process: ``batch_size`` × processes, as the checkpoint
    recorded them (a checkpoint that does not record its processes: this run's number)."""
    recorded = read_trainer_state(directory).get("processes", processes)
    if theirs * recorded == ours * processes:
        return
    if recorded == processes:
        _refuse_change(directory / RECIPE_FILE, "train.batch_size", theirs, ours)
    raise BadInput(
        f"train.batch_size: {ours} × {processes} processes is {ours * processes} examples a micro-batch, "
        "but "
        f"{directory} was trained with {theirs} × {recorded} = {theirs * recorded}; a resumed run must keep "
        "the examples a step sees (batch_size × processes)"
    )


def _saved_recipe(path: Path) -> dict:
    """The checkpoint's recipe.yaml as a mapping of sections (read, not validated: defaults may move)."""
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: not found; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadInput(f"{path}: cannot be read as a recipe ({e})") from None
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(s, {}), dict) for s in ("model", "data", "train")
    ):
        raise BadInput(f"{path}: not a recipe (a mapping of sections); the file was edited")
    return raw


def _section_values(saved: dict, section: str, model: type) -> dict:
    """Every key of a saved recipe's section: its value, or the key's default where it is not written."""
    values = saved.get(section, {})
    return {
        name: values.get(name, None if field.is_required() else field.get_default(call_default_factory=True))
        for name, field in model.model_fields.items()
    }


def _same_model(name: str, recorded: list) -> bool:
    """``model.name`` names the base the checkpoint records (its recipe's name, or the absolute path or
    hub id adapter.json keeps): the same string, or the same local directory."""
    return any(name == other or (isinstance(other, str) and _same_path(name, other)) for other in recorded)


def _same_path(a: str, b: str) -> bool:
    """Two paths of one existing file or directory."""
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def _refuse_change(path: Path, key: str, theirs, ours) -> None:
    raise BadInput(
        f"{key}: the checkpoint was trained with {_shown(theirs)} ({path}) but the recipe says "
        f"{_shown(ours)}; a resumed run must keep it (train a new run to change it)"
    )
