"""FOSSIL — a.k.a. MiSS / Bone / DiSHA (Kang & Yin, arXiv 2409.15371): one shard shared across the weight.

Each adapted layer ``W ∈ R^{out×in}`` trains a single shard ``D ∈ R^{r×out}`` (zeros at init, so
ΔW = 0 at step 0; no scaling factor). The shard is replicated across the input dimension:

    ΔW[o, i] = D[i mod r, o]          i.e.   ΔW = [ Dᵀ | Dᵀ | … | Dᵀ | Dᵀ[:, :in mod r] ]

Forward (the paper's efficient form; ΔW is never materialised): pad ``x`` with zeros on the right
to a multiple of r, cut it into ``g = ⌈in/r⌉`` blocks of length r, sum the blocks, multiply by D:

    s_j = Σ_{i ≡ j (mod r)} dropout(x)_i          (s ∈ R^r, cost O(in) additions)
    y   = W·x + s·D                               (cost O(r·out) MACs; LoRA: O(r·(in+out)))

In the spine's terms FOSSIL is exactly LoRA with a frozen 0/1 factor:

    A = P ∈ {0,1}^{r×in},  P[j, i] = 1 iff i mod r = j,     B = Dᵀ,     ΔW = B·A

(proof: ``(Dᵀ·P)[o, i] = Σ_j D[j, o]·P[j, i] = D[i mod r, o]``, and ``P·x = s``), which is what
merge and export-as-LoRA use. The padding makes this exact when ``in mod r ≠ 0``.

``mini`` mode trains ``D_mini ∈ R^{r×mini_r}`` and tiles it ``out/mini_r`` times along the output
axis (``D = [D_mini | D_mini | …]``, needs ``out mod mini_r = 0``); ``mini_r = out`` is the default
mode. Trainable parameters per layer: default ``r·out``, mini ``r·mini_r`` (LoRA: ``r·(in+out)``).

Numerically identical to PEFT's ``MissConfig`` (``init_weights=True`` / ``"mini"``; tensor
``miss_block``), which is the test reference.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from shardtune.adapters.base import AdapterMethod, AdapterOptions, LayerAdapter, Target
from shardtune.errors import RecipeError


class FossilOptions(AdapterOptions):
    method: Literal["fossil"] = "fossil"
    rank: PositiveInt = Field(64, description="r: the shard has r rows; the input is summed in blocks of r.")
    mode: Literal["default", "mini"] = Field(
        "default", description="`default`: shard r×out per layer; `mini`: shard r×mini_r tiled along out."
    )
    mini_r: PositiveInt = Field(
        1, description="Width of the mini shard (mode: mini); must divide out_features."
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input, before the block sum."
    )


class FossilAdapter(LayerAdapter):
    """The shard ``D`` (r × out, or r × mini_r in mini mode) of one layer."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, mini_r: int | None, dropout: float = 0.0
    ):
        super().__init__(in_features, out_features, dropout)
        self.rank = rank
        self.mini_r = mini_r
        self.shard = nn.Parameter(torch.zeros(rank, mini_r if mini_r is not None else out_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.in_features / self.rank)

    def full_shard(self) -> torch.Tensor:
        """``D`` of shape (r, out): the mini shard tiled along the output axis, or the shard itself."""
        if self.mini_r is None:
            return self.shard
        return self.shard.repeat(1, self.out_features // self.mini_r)

    def block_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``s = P·x``: zero-pad to a multiple of r and sum the blocks of length r → (..., r)."""
        pad = self.n_blocks * self.rank - self.in_features
        if pad:
            x = F.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], self.n_blocks, self.rank).sum(dim=-2)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        s = self.block_sum(self.dropout(x))
        if self.mini_r is None:
            return s @ self.shard
        # Tile the (…, mini_r) result instead of the shard: y[o] = (s·D_mini)[o mod mini_r].
        y = s @ self.shard
        return y.repeat(*([1] * (y.dim() - 1)), self.out_features // self.mini_r)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.full_shard()
        eye = torch.eye(self.rank, dtype=shard.dtype, device=shard.device)
        p = eye.repeat(1, self.n_blocks)[:, : self.in_features]
        return p, shard.T

    def delta_weight(self) -> torch.Tensor:
        # ΔW[o, i] = D[i mod r, o], without the r·in·out product of B @ A.
        return self.full_shard().T.repeat(1, self.n_blocks)[:, : self.in_features]

    def routing(self) -> dict:
        r = self.rank
        return {
            "A": {
                "pool": "fixed",
                "shards": [],
                "private": [],
                "note": "0/1 block-sum matrix P (no parameters)",
            },
            "B": {
                "pool": "own",
                "shards": list(range(r)),
                "private": [True] * r,
                "note": f"shard D reused {self.n_blocks}× across the input"
                + (f", tiled {self.out_features // self.mini_r}× along the output" if self.mini_r else ""),
            },
        }


class Fossil(AdapterMethod):
    name = "fossil"
    Options = FossilOptions
    summary = "one shard D (r×out) per layer replicated across the input; ΔW[o,i] = D[i mod r, o]"

    def check(self, options: FossilOptions, targets: list[Target]) -> None:
        if options.mode == "mini":
            for t in targets:
                if t.out_features % options.mini_r:
                    raise RecipeError(
                        "adapter.mini_r",
                        f"must divide the output size of every target; {t.name} has out_features "
                        f"{t.out_features}, got {options.mini_r}",
                    )

    def largest_rank(self, options: FossilOptions, target: Target) -> int:
        # r = in gives every input its own row of D (a full ΔW); beyond it the blocks are padding.
        return target.in_features

    def build_layer(self, options: FossilOptions, target: Target, stores: nn.Module | None) -> FossilAdapter:
        mini_r = options.mini_r if options.mode == "mini" else None
        return FossilAdapter(target.in_features, target.out_features, options.rank, mini_r, options.dropout)

    def export_info(self, options: FossilOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": 1.0}
