"""Tensors that FSDP2 may have sharded (DTensor): read whole through :func:`full_tensor` (a collective:
every process must call it, in the same order) and laid out again like their parameter through
:func:`like_parameter`. Plain tensors pass through unchanged.
"""

from __future__ import annotations

import torch


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective under FSDP), or ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def like_parameter(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param`` is: this process's shard when ``param`` is sharded."""
    if not is_sharded(param):
        return full.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    # Every process holds the same ``full`` (read from the same file): no broadcast needed.
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
