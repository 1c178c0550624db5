"""Whole-model operations on the spine: inject, freeze, enable/disable, merge, save/load state.

None of this knows about a particular method: it only sees :class:`AdaptedLinear` layers, their
:class:`LayerAdapter` and the shared stores at ``model.shardtune_stores``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import torch
from torch import nn

from shardtune.adapters import get_method
from shardtune.adapters.base import (  # noqa: F401  (adapted_layers & co. are used from here too)
    DTYPES,
    STORES_ATTR,
    AdaptedLinear,
    AdapterOptions,
    Target,
    adapted_layers,
    adapter_disabled,
    set_adapter_enabled,
)
from shardtune.core.errors import BadInput, RecipeError
from shardtune.models.dtensor import full_tensor, like_parameter
from shardtune.models.quant import logical_numel


def _conv1d_if_loaded() -> type | None:
    """transformers' ``Conv1D`` once its module is imported, else None (then no module can be one):
    recognising GPT-2's layers never imports transformers (`shardtune params` counts without it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, fan_in_fan_out) for a supported linear layer, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    conv1d = _conv1d_if_loaded()
    if conv1d is not None and isinstance(module, conv1d):  # GPT-2 family: weight is (in, out)
        return module.weight.shape[0], module.weight.shape[1], True
    return None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All linear layers a method could adapt (the output head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear) or module is head:
            continue
        if _linear_shape(module) is not None and ".base_layer" not in name:
            found[name] = module
    return found


def find_targets(
    model: nn.Module, targets: list[str] | str, exclude: list[str] | None = None
) -> list[Target]:
    """Resolve the recipe's ``adapter.targets`` / ``adapter.exclude`` against the model's layers."""
    layers = linear_layers(model)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if targets == "all-linear":
        chosen = list(layers)
    elif isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise RecipeError("adapter.targets", f"invalid regular expression {targets!r}: {e}") from None
        chosen = [n for n in layers if rx.fullmatch(n)]
    else:
        for pattern in targets:
            if not any(_matches(n, pattern) for n in layers):
                raise RecipeError(
                    "adapter.targets",
                    f"{pattern!r} matches no linear layer of this model; its linear layers are: {', '.join(kinds)}",
                )
        chosen = [n for n in layers if any(_matches(n, p) for p in targets)]
    # (one list may name several architectures' layers, e.g. [o_proj, c_proj]: one of them must match)
    if exclude and not any(_matches(n, p) for n in chosen for p in exclude):
        raise RecipeError(
            "adapter.exclude",
            f"{exclude} matches none of the layers adapter.targets selects; their types are: "
            f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in chosen}))}",
        )
    chosen = [n for n in chosen if not any(_matches(n, p) for p in exclude or [])]
    if not chosen:
        raise RecipeError(
            "adapter.targets", f"selects no linear layer; this model's linear layers are: {', '.join(kinds)}"
        )
    kinds_of = projection_types(chosen)
    out = []
    for name in chosen:
        in_f, out_f, fifo = _linear_shape(layers[name])
        out.append(Target(name, layers[name], in_f, out_f, fifo, kinds_of[name]))
    return out


def projection_types(names: list[str]) -> dict[str, str]:
    """Name each layer's projection type: the shortest suffix of its path that, with layer numbers
    ignored, tells the types apart (``q_proj``; ``attn_c_proj`` vs ``mlp_c_proj`` in GPT-2)."""
    patterns = {n: [p for p in n.split(".") if not p.isdigit()] for n in names}
    for depth in range(1, max((len(p) for p in patterns.values()), default=1) + 1):
        suffix = {n: "_".join(p[-depth:]) for n, p in patterns.items()}
        full = {}
        for n, s in suffix.items():
            full.setdefault(s, set()).add(".".join(patterns[n]))
        if all(len(v) == 1 for v in full.values()):
            return suffix
    return {n: "_".join(p) for n, p in patterns.items()}


def inject_adapter(model: nn.Module, options: AdapterOptions) -> list[Target]:
    """Wrap every target layer in :class:`AdaptedLinear` and freeze everything but the adapter."""
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise BadInput("this model already carries a shardtune adapter")
    method = get_method(options.method)
    targets = find_targets(model, options.targets, options.exclude)
    method.resolve(options, targets)
    check_rank(method, options, targets)
    method.check(options, targets)
    base_dtype = next(model.parameters()).dtype
    dtype = base_dtype if options.dtype == "auto" else DTYPES[options.dtype]

    for p in model.parameters():
        p.requires_grad_(False)

    stores = method.build_stores(options, targets)
    if stores is not None:
        model.add_module(
            STORES_ATTR, stores.to(device=next(targets[0].module.parameters()).device, dtype=dtype)
        )
        if hasattr(stores, "assemble"):  # MoS: every layer's factors gathered once per step
            model.register_forward_pre_hook(_assemble_stores)
            model.register_forward_hook(_release_stores)
    for t in targets:
        device = next(t.module.parameters()).device
        adapter = method.build_layer(options, t, stores).to(device=device, dtype=dtype)
        parent_name, _, child = t.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdaptedLinear(t.module, adapter, t.fan_in_fan_out))
    model.shardtune_options = options
    model.shardtune_targets = [t.name for t in targets]
    model.shardtune_target_kinds = {t.name: t.kind for t in targets}
    return targets


def _assemble_stores(model: nn.Module, _args: tuple) -> None:
    """Forward pre-hook at the model root: the shared stores assemble this step's factors of every
    layer at once, before any block runs (see :meth:`shardtune.adapters.mos.ShardPools.assemble`)."""
    getattr(model, STORES_ATTR).assemble()


def _release_stores(model: nn.Module, _args: tuple, _output) -> None:
    """Forward hook at the model root: the assembled factors are dropped once the forward is done
    (backward needs only the compute-dtype copies each layer saved), unless gradient checkpointing will
    run the blocks again in backward (HF's ``gradient_checkpointing`` flag on any module)."""
    stores = getattr(model, STORES_ATTR)
    if stores.holds_assembly():  # (a forward without gradients assembled nothing: no scan per token)
        recomputes = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        stores.release(keep=recomputes)


def check_rank(method, options: AdapterOptions, targets: list[Target]) -> None:
    """Every rank option of the method (``adapter.rank``, MoS's ``equivalent_rank``, …) must fit every
    layer it adapts (:meth:`AdapterMethod.largest_rank`)."""
    tightest = min(targets, key=lambda t: method.largest_rank(options, t))
    fits = method.largest_rank(options, tightest)
    for key in method.rank_options:
        rank = getattr(options, key, None)
        if isinstance(rank, int) and rank > fits:
            raise RecipeError(
                f"adapter.{key}",
                f"{rank} is larger than the layers it adapts allow: {tightest.name} is "
                f"{tightest.out_features}×{tightest.in_features}; the largest rank that fits every target is {fits}",
            )


def adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every adapter parameter once: shared stores first, then each layer's own."""
    stores = getattr(model, STORES_ATTR, None)
    if stores is not None:
        yield from stores.named_parameters(prefix=STORES_ATTR)
    for name, layer in adapted_layers(model).items():
        yield from layer.adapter.named_parameters(prefix=f"{name}.adapter")


def adapter_named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (e.g. MoS routing indices): everything an adapter file holds."""
    yield from adapter_named_parameters(model)
    stores = getattr(model, STORES_ATTR, None)
    modules = [(STORES_ATTR, stores)] if stores is not None else []
    modules += [(f"{name}.adapter", layer.adapter) for name, layer in adapted_layers(model).items()]
    for prefix, module in modules:
        # Only persistent buffers: a non-persistent one (VeRA's projections with save_projection:
        # false) is rebuilt from the options, not stored.
        persistent = set(module.state_dict(keep_vars=True))
        for bname, buf in module.named_buffers():
            if bname in persistent:
                yield f"{prefix}.{bname}", buf


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(adapter parameters, all parameters), each shared tensor counted once."""
    adapter = sum(logical_numel(p) for _, p in adapter_named_parameters(model))
    total = sum(logical_numel(p) for p in model.parameters())  # a 4-bit weight: out·in, not its bytes
    return adapter, total


def trainable_share(model: nn.Module) -> tuple[int, int, float]:
    """(trainable adapter parameters, base model parameters, trainable as % of the base): the one
    definition `train` and `params` print (each tensor once: a tied output head is the embedding)."""
    adapter, total = count_parameters(model)
    base = total - adapter
    return adapter, base, 100 * adapter / base


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies of the whole adapter tensors (safetensors refuses aliased tensors).

    Under FSDP the shards are gathered: every process must call this, in step.
    """
    return {n: full_tensor(t.detach()).contiguous().clone() for n, t in adapter_named_tensors(model)}


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter"
) -> None:
    """Copy ``state`` into the model's adapter; every key must be present with the right shape."""
    params = dict(adapter_named_tensors(model))
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise BadInput(
            f"{source}: tensors do not match the adapter built from its adapter.json "
            f"({len(missing)} missing, {len(unexpected)} unexpected; {detail})"
        )
    for name, p in params.items():
        t = state[name]
        if t.shape != p.shape:
            raise BadInput(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if t.is_floating_point() != p.is_floating_point():  # a weight as integers, or an index as floats
            kind = "floating point" if p.is_floating_point() else "whole numbers (an index)"
            raise BadInput(f"{source}: tensor {name!r} is {t.dtype}, expected {kind}")
        p.copy_(like_parameter(t.to(p.dtype), p))


def merge_adapter(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.unmerge()
