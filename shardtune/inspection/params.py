"""Parameter counts and base memory from a model's config alone: `shardtune params`, `compare --budgets`.

* :func:`count_trainable` — trainable parameters of a method on a model: the adapter is injected into
  the meta skeleton of the config's :class:`~shardtune.inspection.layout.ModelLayout` (no weights, no modeling code
  once the layout is cached; well under a second even for a 70B config).
* :func:`parameter_report` — the rows `params` prints: count, share of the base, ratio to LoRA, and the
  base's weight memory (:meth:`shardtune.inspection.layout.ModelLayout.base_memory`), quantized or not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shardtune.adapters import METHODS, AdapterOptions
from shardtune.adapters.model import inject_adapter, trainable_share
from shardtune.core.errors import BadInput, named_as
from shardtune.inspection.layout import ModelLayout, keep_layout, layout_of, model_layout, skeleton
from shardtune.models import quant


def count_trainable(config, options: AdapterOptions) -> tuple[int, int]:
    """(trainable adapter parameters, base parameters) from a model config alone."""
    return count_on_layout(layout_of(config), options)


def count_on_layout(layout: ModelLayout, options: AdapterOptions) -> tuple[int, int]:
    """(trainable adapter parameters, base parameters): the adapter is injected, as training injects
    it, into the meta skeleton of the model's layout."""
    model = skeleton(layout)
    with torch.device("meta"):
        inject_adapter(model, options)
    trainable, base, _ = trainable_share(model)
    return trainable, base


def parameter_options(
    model: str | None,
    method: str | None,
    rank: int | None,
    targets: str | None,
    overrides: list[str] | None,
    recipe: Path | None,
    quantize: str | None = None,
) -> tuple[str | None, str, dict, str | None]:
    """(model, method, adapter options, quantize) for `params`: the recipe's model, adapter and
    ``model.quantize`` (when given) with the command line's options on top; ``--set KEY=VALUE`` values
    are read as YAML, as recipes are."""
    from shardtune.recipe.schema import load_recipe, parse_yaml

    options: dict = {}
    if recipe is not None:
        loaded = load_recipe(recipe)
        model = model or loaded.model.name
        options = {k: v for k, v in loaded.adapter.model_dump(mode="json").items() if k != "method"}
        method = method or loaded.adapter.method
        quantize = quantize or loaded.model.quantize
    if rank is not None:
        options["rank"] = rank
    if targets is not None:
        options["targets"] = targets if targets == "all-linear" else targets.split(",")
    given_as_options = {"rank": rank, "targets": targets}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInput(f"--set {item}: expected KEY=VALUE")
        key = key.strip().removeprefix("adapter.")
        if key == "method":
            raise BadInput(f"--set {item}: give the method with --method")
        if given_as_options.get(key) is not None:
            raise BadInput(f"--set {item}: --{key} gives adapter.{key} already; give it once")
        options[key] = parse_yaml(value)
    return model, method or "lora", options, quantize


def parameter_report(
    model: str | None,
    method: str = "lora",
    options: dict | None = None,
    compare: bool = False,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    double_quant: bool = True,
    model_key: str = "--model",
) -> dict:
    """Trainable parameters of ``method`` (or, ``compare``, of every method with the options it
    understands) on ``model``'s config: rows with the count, the share of the base and the ratio to LoRA;
    and the base's weight memory (:meth:`shardtune.inspection.layout.ModelLayout.base_memory`) in the config's dtype,
    quantized as ``quantize`` (nf4 | fp4 | int8) when given. ``model_key``: where ``model`` came from, as
    a bad one is named (``--model``, or ``model.name`` of a recipe)."""
    from shardtune.core.catalog import DEFAULT_MODEL
    from shardtune.core.errors import ShardtuneError

    if quantize is not None and quantize not in quant.QUANT_TYPES:
        raise BadInput(f"--quantize: expected one of {', '.join(quant.QUANT_TYPES)}, got {quantize!r}")
    if not double_quant and quantize not in ("nf4", "fp4"):
        raise BadInput(
            f"--no-double-quant: applies to --quantize nf4 or fp4 only (quantize is {quantize or 'unset'})"
        )
    if compare:
        known = {k for m in METHODS.values() for k in m.Options.model_fields}
        unknown = sorted(k for k in (options or {}) if k not in known)
        if unknown:
            raise BadInput(f"--set adapter.{unknown[0]}: no method has this option")
    note = None
    if model is None:
        model = DEFAULT_MODEL
        note = f"counting on the embedded default model {model} (give --model or --recipe for another)"
    with named_as({"model.name": model_key}):
        layout = model_layout(model, trust_remote_code, keep=False)  # kept below, once counted
    options = options or {}
    rows = []
    for name in METHODS if compare else [method]:
        fields = METHODS[name].Options.model_fields if name in METHODS else {}
        method_opts = {k: v for k, v in options.items() if k in fields} if compare else options
        try:
            trainable, base = count_on_layout(layout, method_options(name, **method_opts))
            rows.append({"method": name, "trainable": trainable, "base": base})
        except ShardtuneError as e:
            if not compare:
                raise
            rows.append({"method": name, "trainable": None, "base": None, "error": str(e)})
    if all(r["trainable"] is None for r in rows):  # (--compare) no method takes these options
        raise BadInput(rows[0]["error"])
    lora = next((r["trainable"] for r in rows if r["method"] == "lora"), None)
    for r in rows:
        r["vs_lora"] = r["trainable"] / lora if lora and r["trainable"] is not None else None
        r["percent_of_base"] = 100 * r["trainable"] / r["base"] if r["trainable"] is not None else None
    quantization = quant.Quantization(quantize, double_quant and quantize != "int8") if quantize else None
    memory = layout.base_memory(quantization, getattr(torch, layout.config_dtype))
    keep_layout(model, layout, trust_remote_code)
    base_memory = {**memory.as_dict(), "summary": memory.describe()}
    report = {"model": model, "options": options, "methods": rows, "base_memory": base_memory}
    return {**report, **({"note": note} if note else {})}


def method_options(method: str, **kw) -> AdapterOptions:
    if method not in METHODS:
        raise BadInput(f"--method: unknown method {method!r}; available: {', '.join(METHODS)}")
    from shardtune.recipe.schema import adapter_section

    return adapter_section({**kw, "method": method})
