"""LoRA (Hu et al., 2021, arXiv 2106.09685) — the baseline every other method is compared with.

For a frozen linear layer ``W ∈ R^{out×in}`` LoRA trains two own matrices per layer

    A ∈ R^{r×in}  (Kaiming-uniform, a = √5),     B ∈ R^{out×r}  (zeros, so ΔW = 0 at step 0)

and computes

    y = W·x + s · B·A·dropout(x),      s = α / r          (rsLoRA: s = α / √r)

Trainable parameters per layer: ``r·(in + out)``. In the spine's terms the factors are
``(A, s·B)``. This matches PEFT's ``LoraConfig`` (``lora_A``/``lora_B``, ``lora_alpha``,
``lora_dropout``, ``use_rslora``) number for number.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from shardtune.adapters.base import AdapterMethod, AdapterOptions, LayerAdapter, Target, add_low_rank


class LoraOptions(AdapterOptions):
    method: Literal["lora"] = "lora"
    rank: PositiveInt = Field(8, description="r: the rank of ΔW = B·A.")
    alpha: float = Field(16.0, gt=0, description="α: the update is scaled by α/r (α/√r with rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    rslora: bool = Field(False, description="Rank-stabilised scaling α/√r instead of α/r.")


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoraAdapter(LayerAdapter):
    """Own ``lora_A`` (r, in) and ``lora_B`` (out, r) per layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(in_features, out_features, dropout)
        self.rank = rank
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scale

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``h = s·dropout(x)·Aᵀ`` (N×r): the scale on the small side, not on B or the (N, out) result."""
        return F.linear(self.dropout(x), self.lora_A) * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.lora_B)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return add_low_rank(out, self.down(x), self.lora_B)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return (self.lora_A, self.lora_B, self.scale) if isinstance(self.dropout, nn.Identity) else None


class Lora(AdapterMethod):
    name = "lora"
    Options = LoraOptions

    def build_layer(self, options: LoraOptions, target: Target, stores: nn.Module | None) -> LoraAdapter:
        scale = lora_scale(options.alpha, options.rank, options.rslora)
        return LoraAdapter(target.in_features, target.out_features, options.rank, scale, options.dropout)

    def export_info(self, options: LoraOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": lora_scale(options.alpha, options.rank, options.rslora)}
