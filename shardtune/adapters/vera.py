"""VeRA — Vector-based Random Matrix Adaptation (Kopiczko et al., arXiv 2310.11454).

One pair of *frozen random* matrices is shared by every adapted layer of the model, held once at
the model root; each layer trains only two scaling vectors:

    A ∈ R^{r×d_in_max},  B ∈ R^{d_out_max×r}      frozen, shared (d_*_max: the largest target sizes)
    A_l = A[:, :in],     B_l = B[:out, :]          (every layer slices the top-left block it needs)
    y = W·x + Λ_b·B_l·Λ_d·A_l·dropout(x)           Λ_d = diag(d_l), d_l ∈ R^r;  Λ_b = diag(b_l), b_l ∈ R^out

No other scaling. Init as the paper and PEFT's ``VeraConfig``: ``b = 0`` (so ΔW = 0 at step 0),
``d = d_initial`` (0.1), and A, B Kaiming-uniform with gain √2 (``U(−√(6/fan_in), √(6/fan_in))``,
fan_in = d_in_max for A and r for B), drawn — A first, then B — from a CPU ``torch.Generator``
seeded with ``projection_seed``. This is PEFT's init bit for bit (same seed → same A, B), so a VeRA
adapter here and a PEFT one with ``projection_prng_key`` equal to our seed start from the same
projections.

Persistence: with ``save_projection: true`` (default, as PEFT) A and B are persistent buffers of the
root store and go into ``adapter.safetensors`` — a reload is bit-identical on any machine. With
``false`` they are rebuilt from ``projection_seed`` when the adapter is loaded (smaller files; relies
on torch's CPU generator giving the same numbers, true for a given torch version).

In spine terms ``A_l ← Λ_d·A[:, :in]`` and ``B_l ← Λ_b·B[:out, :]``: a VeRA adapter is exactly a rank-r
LoRA (export writes those products). Trainable parameters per layer ``r + out``
(LoRA ``r·(in + out)``): LLaMA-2-7B, all seven projections, r = 256 → 1,417,216.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from shardtune.adapters.base import SEED_MAX, SEED_MIN, AdapterMethod, AdapterOptions, LayerAdapter, Target


class VeraOptions(AdapterOptions):
    method: Literal["vera"] = "vera"
    rank: PositiveInt = Field(256, description="r: rows of the shared frozen A (columns of B).")
    d_initial: float = Field(0.1, description="Initial value of every entry of the scaling vector d.")
    projection_seed: int = Field(
        0,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="Seed of the frozen random A and B (PEFT's projection_prng_key; same seed, same matrices).",
    )
    save_projection: bool = Field(
        True,
        description="Store A and B in the adapter file (false: rebuild them from projection_seed when loading).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")


def kaiming_gain2(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``U(−√3·√2/√fan_in, +…)`` with fan_in = shape[1], drawn from ``generator`` (VeRA's projection init)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    if torch.empty(0).is_meta:  # parameter counting builds on the meta device
        return torch.empty(shape)
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen shared ``vera_A`` (r × d_in_max) and ``vera_B`` (d_out_max × r), as buffers."""

    def __init__(self, rank: int, in_max: int, out_max: int, seed: int, persistent: bool):
        super().__init__()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        a = kaiming_gain2((rank, in_max), gen)  # A first, then B: PEFT's order
        b = kaiming_gain2((out_max, rank), gen)
        self.register_buffer("vera_A", a, persistent=persistent)
        self.register_buffer("vera_B", b, persistent=persistent)


class VeraAdapter(LayerAdapter):
    """A layer's trainable ``lambda_d`` (r) and ``lambda_b`` (out) over slices of the shared projections."""

    def __init__(self, target: Target, options: VeraOptions, projections: VeraProjections):
        super().__init__(target.in_features, target.out_features, options.dropout)
        self.rank = options.rank
        self.lambda_d = nn.Parameter(torch.full((options.rank,), float(options.d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(target.out_features))
        object.__setattr__(self, "_proj", projections)  # not a submodule: it lives at the model root

    @property
    def dtype(self) -> torch.dtype:
        return self.lambda_d.dtype

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A[:, :in], B[:out, :])`` — this layer's slices of the frozen shared matrices."""
        return self._proj.vera_A[:, : self.in_features], self._proj.vera_B[: self.out_features, :]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.projections()
        return self.lambda_d.unsqueeze(1) * a, self.lambda_b.unsqueeze(1) * b

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.projections()
        return self.lambda_b * F.linear(self.lambda_d * F.linear(self.dropout(x), a), b)

    def routing(self) -> dict:
        r = self.rank
        return {
            "A": {
                "pool": "vera_A",
                "shards": list(range(r)),
                "private": [False] * r,
                "note": f"frozen random rows (first {self.in_features} columns), scaled by this layer's d",
            },
            "B": {
                "pool": "vera_B",
                "shards": list(range(r)),
                "private": [False] * r,
                "note": f"frozen random columns (first {self.out_features} rows), scaled by this layer's b",
            },
        }


class Vera(AdapterMethod):
    name = "vera"
    Options = VeraOptions

    def build_stores(self, options: VeraOptions, targets: list[Target]) -> VeraProjections:
        in_max = max(t.in_features for t in targets)
        out_max = max(t.out_features for t in targets)
        return VeraProjections(
            options.rank, in_max, out_max, options.projection_seed, options.save_projection
        )

    def build_layer(self, options: VeraOptions, target: Target, stores: VeraProjections) -> VeraAdapter:
        return VeraAdapter(target, options, stores)

    def export_info(self, options: VeraOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": 1.0}
