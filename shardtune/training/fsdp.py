"""Fully sharded data parallel training (``train.strategy: fsdp``) on PyTorch FSDP2.

Each of the model's blocks (``LlamaDecoderLayer``, ``GPT2Block``, … or the classes in
``train.fsdp.wrap``) becomes one FSDP unit; the root model is the last unit and holds everything
else: embeddings, final norm, output head and the adapter's shared stores
(``model.shardtune_stores``: MoS pools, ShareLoRA matrices). Every parameter — frozen base weight or
adapter — is split along its first dimension across the processes; a unit's weights are all-gathered
just before its forward (and again before its backward when ``reshard_after_forward``), and the
adapter gradients are reduce-scattered so that each process updates only its shard. The shared
stores are gathered once per step by the root unit, before any block runs, and their gradient (the
sum over every layer that uses them) is reduce-scattered once, after the last block's backward.

``train.precision: bf16`` becomes FSDP2's mixed-precision policy: weights are gathered and computed
in bf16, gradients reduced in fp32, the sharded master copy (and AdamW's state) stays in its dtype.

This is torch's ``fully_shard`` applied directly (not Accelerate's FSDP plugin), so the same code
runs on GPUs (NCCL) and on CPUs (gloo), where the tests run it. Tensors leave the sharded world only
through :func:`full_tensor` (a collective: every process must call it, in the same order), and
come back through :func:`like_parameter`; checkpoints hold full tensors, so a run checkpointed
under FSDP resumes under DDP or on one process, and the other way round.
"""

from __future__ import annotations

import torch
from torch import nn

from shardtune.adapters.base import STORES_ATTR
from shardtune.core.errors import RecipeError
from shardtune.models.dtensor import is_sharded


def block_classes(
    model: nn.Module, names: list[str] | None, key: str = "train.fsdp.wrap"
) -> list[type[nn.Module]]:
    """The module classes that become FSDP units (or are compiled, ``train.compile``): ``names`` or
    the model's ``_no_split_modules``; ``key`` is the recipe key an error names."""
    wanted = names if names is not None else list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in wanted if n not in present]
    if names is not None and missing:
        raise RecipeError(
            "train.fsdp.wrap",
            f"{missing[0]!r} is not a module class of this model; its blocks are: {', '.join(_blocks(model))}",
        )
    found = [present[n] for n in wanted if n in present]
    if not found:
        raise RecipeError(
            key,
            "this model names no blocks to shard (no _no_split_modules); list its block classes here"
            if key == "train.fsdp.wrap"
            else "this model names no decoder blocks to compile (no _no_split_modules)",
        )
    return found


def _blocks(model: nn.Module) -> list[str]:
    """Class names of the modules held in a ``ModuleList`` (a transformer's repeated blocks)."""
    return sorted(
        {type(m).__name__ for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst}
    )


def shard_model(
    model: nn.Module,
    wrap: list[str] | None,
    reshard_after_forward: bool,
    device: torch.device,
    bf16: bool,
) -> dict:
    """Apply ``fully_shard`` to every block (the classes named in ``wrap``, else the model's own
    blocks), then to the root; return a summary for the log. ``reshard_after_forward``: see
    ``train.fsdp`` in the recipe reference.

    The model may sit on the CPU: its shards move to ``device`` (each process then holds 1/N of
    every weight on the accelerator).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = tuple(block_classes(model, wrap))
    # The world group itself (no new process group): one dimension, every process.
    mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    units = [m for m in model.modules() if isinstance(m, classes)]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root: the rest of the model, the shared stores with it. It gathers them before the first
    # block and keeps them gathered until the backward is done.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    stores = getattr(model, STORES_ATTR, None)
    local = sum(p.to_local().nbytes if is_sharded(p) else p.nbytes for p in model.parameters())
    whole = sum(p.nbytes for p in model.parameters())  # a DTensor's nbytes are the whole tensor's
    return {
        "local_bytes": local,
        "whole_bytes": whole,
        "units": len(units),
        "classes": sorted(c.__name__ for c in classes),
        "processes": dist.get_world_size(),
        # sharded by the root unit (no block owns them): each is a DTensor now
        "root_store_tensors": sum(is_sharded(p) for p in stores.parameters()) if stores is not None else 0,
    }
