"""A model's shape without its modeling code: what parameter counting and memory estimates need.

`shardtune params`, `compare --budgets` and the memory estimate count on a model built from its
config on the meta device. Building it imports transformers' modeling code (about 2 s before the
first count). All a count needs of that model is its :class:`ModelLayout`:

* every linear layer (``nn.Linear`` / GPT-2's ``Conv1D``): name, ``in``/``out`` features, bias,
  whether a method may adapt it (not the output head) and whether a quantizer converts it;
* ``parameters``: the base's parameter count, each tensor once (a tied head is the embedding), the
  ``base`` of :func:`shardtune.adapters.model.trainable_share`;
* ``named_numel``: the entries of the parameters outside the tied keys, what the memory estimate sums.

:func:`model_layout` builds the meta model once per config and keeps the layout as JSON in
``cache_dir()/layouts/<sha256 of the config text, transformers version, LAYOUT_VERSION>.json``, so a
later count imports neither transformers' modeling code nor its config classes (never for
``trust_remote_code`` models, whose code may change under one config, nor for hub ids, whose config
only transformers resolves). :func:`layout_of` is the same for a config object in hand, per process.
:func:`skeleton` turns a layout back into a module tree of meta linear layers plus one frozen
parameter holding the rest of the base, so a count runs the very ``inject_adapter`` / ``trainable_share`` of training on it: the same targets,
resolution, rank checks and errors as on the real model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from shardtune.models.quant import BaseMemory, Quantization, quantized_layer_bytes

LAYOUT_VERSION = 1  # bump when what a layout holds, or how linear_layers chooses, changes

_MEMO: dict[str, ModelLayout] = {}


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    bias: bool
    fan_in_fan_out: bool  # GPT-2's Conv1D: weight stored (in, out)
    adaptable: bool  # one of linear_layers(model): not the output head
    quantizable: bool  # converted by a quantizer (base_memory)


@dataclass(frozen=True)
class ModelLayout:
    parameters: int
    named_numel: int
    dtype: str  # of the meta model's parameters
    config_dtype: str  # what the weights are stored in (quant.config_dtype)
    linears: tuple[LinearShape, ...]

    def base_memory(self, quantization: Quantization | None, dtype: torch.dtype) -> BaseMemory:
        """The base's weight memory: the linear layers a quantizer converts (every ``nn.Linear`` /
        ``Conv1D`` but the output head and tied weights) at :func:`shardtune.models.quant.quantized_layer_bytes`
        when ``quantization`` is given, every other parameter in ``dtype``."""
        size = dtype.itemsize
        converted = [s for s in self.linears if s.quantizable] if quantization is not None else []
        rest = (self.named_numel - sum(s.out_features * s.in_features for s in converted)) * size
        stored = rest + sum(
            quantized_layer_bytes(s.out_features, s.in_features, quantization.kind, quantization.double_quant)
            for s in converted
        )
        fmt = quantization.format if quantization is not None else None
        dtype_name = str(dtype).removeprefix("torch.")
        return BaseMemory(stored, self.named_numel * size, dtype_name, len(converted), fmt)

    def to_json(self) -> str:
        return json.dumps({"version": LAYOUT_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> ModelLayout:
        raw = json.loads(text)
        if raw.pop("version", None) != LAYOUT_VERSION:
            raise ValueError("another layout version")
        raw["linears"] = tuple(LinearShape(**s) for s in raw["linears"])
        return cls(**raw)


def layout_of(config) -> ModelLayout:
    """The layout of ``config``'s model, built once per process for each distinct config."""
    key = config.to_json_string(use_diff=False)
    if key not in _MEMO:
        _MEMO[key] = build_layout(config)
    return _MEMO[key]


def model_layout(name: str, trust_remote_code: bool = False, keep: bool = True) -> ModelLayout:
    """The layout of the model ``model.name`` names: from the cache when its config is known without
    transformers (:func:`shardtune.models.loading.config_fingerprint`), else from its config — then cached
    (``keep``; a caller that may still refuse the command keeps it itself, with :func:`keep_layout`,
    once it succeeds: a refused command writes nothing)."""
    from shardtune.models.loading import load_config

    path = _cache_path(name, trust_remote_code)
    if path is not None:
        try:
            return ModelLayout.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            pass  # not cached yet (or unreadable: rebuilt, and a file that is not ours is left alone)
    layout = layout_of(load_config(name, trust_remote_code))
    if keep:
        keep_layout(name, layout, trust_remote_code)
    return layout


def keep_layout(name: str, layout: ModelLayout, trust_remote_code: bool = False) -> None:
    """Cache ``layout`` as ``name``'s, unless it is cached already or cannot be (see :func:`model_layout`)."""
    path = _cache_path(name, trust_remote_code)
    if path is None or path.exists():
        return
    from shardtune.core.fileio import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, layout.to_json())
    except OSError:
        pass  # a read-only cache only costs the next count its seconds


def _cache_path(name: str, trust_remote_code: bool) -> Path | None:
    """Where ``name``'s layout is cached; None for what is never cached (remote code, hub ids, …)."""
    from importlib.metadata import version

    from shardtune.models.loading import cache_dir, config_fingerprint

    fingerprint = None if trust_remote_code else config_fingerprint(name)
    if fingerprint is None:
        return None
    text = f"{LAYOUT_VERSION}\n{version('transformers')}\n{fingerprint}"
    return cache_dir() / "layouts" / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def build_layout(config) -> ModelLayout:
    """Build ``config``'s model on the meta device and read its layout."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    from shardtune.adapters.model import _linear_shape, linear_layers
    from shardtune.models.quant import config_dtype, logical_numel

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied output head is the embedding: counted once, as a loaded model counts it
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    keep = get_keys_to_not_convert(model)
    adaptable = linear_layers(model)
    linears = []
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None:
            continue
        in_f, out_f, fifo = shape
        quantizable = (type(module) is nn.Linear or fifo) and not any(
            name == k or name.endswith("." + k) or k.startswith(name + ".") for k in keep
        )
        bias = getattr(module, "bias", None) is not None
        linears.append(LinearShape(name, in_f, out_f, bias, fifo, name in adaptable, quantizable))
    return ModelLayout(
        parameters=sum(logical_numel(p) for p in model.parameters()),
        named_numel=sum(p.numel() for n, p in model.named_parameters() if n not in tied),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        config_dtype=str(config_dtype(config)).removeprefix("torch."),
        linears=tuple(linears),
    )


def skeleton(layout: ModelLayout) -> nn.Module:
    """A meta module tree with the layout's adaptable linear layers at their names and one frozen
    ``base_rest`` parameter holding the rest of the base's entries: counts on it equal the model's."""
    root = nn.Module()
    dtype = getattr(torch, layout.dtype)
    rest = layout.parameters
    linears = [s for s in layout.linears if s.adaptable]
    conv1d = _conv1d_class() if any(s.fan_in_fan_out for s in linears) else None
    with torch.device("meta"):
        # registered first: inject_adapter reads the base dtype from the first parameter
        root.register_parameter("base_rest", nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False))
        for spec in linears:
            if spec.fan_in_fan_out:
                layer = conv1d(spec.out_features, spec.in_features).to(dtype)
                if not spec.bias:
                    layer.bias = None
            else:
                layer = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias, dtype=dtype)
            rest -= sum(p.numel() for p in layer.parameters())
            _place(root, spec.name, layer)
        root.base_rest = nn.Parameter(torch.empty(rest, dtype=dtype), requires_grad=False)
    return root


def _place(root: nn.Module, name: str, layer: nn.Module) -> None:
    *parents, child = name.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(child, layer)


def _conv1d_class() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D
