"""PRoLoRA — Partial Rotation LoRA (Wang et al., arXiv 2402.16902, ACL 2024): intra-layer sharing.

Notation: rank ``r``, unshared rank ``u`` (``unshared_rank``), sharing multiples ``m`` for A
(``share_a``) and ``n`` for B (``share_b``); shared rank ``r' = r − u``. Per adapted layer
``W ∈ R^{out×in}`` the trainable pieces are

    A0 ∈ R^{r'×⌈in/m⌉},  B0 ∈ R^{⌈out/n⌉×r'}      (shared chunks: broadcast m resp. n times)
    A_u ∈ R^{u×in},      B_u ∈ R^{out×u}          (unshared ranks: ordinary LoRA vectors)

Broadcast reduction with rotation (strides ``s_A = max(⌊r'/m⌋, 1)``, ``s_B = max(⌊r'/n⌋, 1)``): copy
``i`` of a chunk has its rank vectors cyclically shifted by ``i·s``, and the copies are laid side by
side, the last one cropped:

    A[j, i·c_A + k] = A0[(j + i·s_A) mod r', k]      j < r',  c_A = ⌈in/m⌉,  i·c_A + k < in
    B[i·c_B + k, j] = B0[k, (j + i·s_B) mod r']      j < r',  c_B = ⌈out/n⌉, i·c_B + k < out
    A[r' + j, :] = A_u[j],   B[:, r' + j] = B_u[:, j]                 (unshared ranks last)
    y = W·x + (α/r)·B·A·dropout(x)

``rotation: false`` drops the shift (plain broadcast, the paper's CLoRA ablation); ``u = r`` or
``m = n = 1, u = 0`` is plain LoRA. Init (the paper's "rectified" one): A0 and A_u Kaiming-uniform
(a = √5) with the fan of the *full* input, i.e. ``U(−1/√in, 1/√in)`` — the same scale as a LoRA A;
B0, B_u zero (ΔW = 0 at step 0). As the authors' code (Forence1999/PRoLoRA) A and B are rebuilt from
the chunks at every forward. Nothing is shared between layers.

A and B are exactly rank-r LoRA factors (export writes them). Trainable parameters per layer:
``r'·(⌈in/m⌉ + ⌈out/n⌉) + u·(in + out)`` (LoRA: ``r·(in + out)``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveInt
from torch import nn

from shardtune.adapters.base import AdapterMethod, AdapterOptions, LayerAdapter, Target
from shardtune.core.errors import RecipeError


class ProLoraOptions(AdapterOptions):
    method: Literal["prolora"] = "prolora"
    rank: PositiveInt = Field(8, description="r: rank of ΔW = B·A (shared plus unshared ranks).")
    unshared_rank: NonNegativeInt = Field(
        1, description="u: rank vectors that are ordinary, unshared LoRA vectors (partial sharing)."
    )
    share_a: PositiveInt = Field(
        2, description="m: A's shared part is m rotated copies of a chunk ⌈in/m⌉ wide (broadcast reduction)."
    )
    share_b: PositiveInt = Field(
        2, description="n: B's shared part is n rotated copies of a chunk ⌈out/n⌉ tall."
    )
    rotation: bool = Field(True, description="Shift copy i of a chunk by i·⌊(r−u)/m⌋ rank positions.")
    alpha: float = Field(16.0, gt=0, description="α: the update is scaled by α/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")


def broadcast(chunk: torch.Tensor, copies: int, stride: int, length: int, rotate: bool) -> torch.Tensor:
    """``copies`` copies of ``chunk`` (r' × c) side by side along its second axis, copy ``i`` with its
    rows rolled so that row j holds ``chunk[(j + i·stride) mod r']``, cropped to ``length`` columns."""
    shared = chunk.shape[0]
    if rotate and shared > 0:
        rows = torch.arange(shared, device=chunk.device)
        index = (rows.unsqueeze(0) + stride * torch.arange(copies, device=chunk.device).unsqueeze(1)) % shared
        tiles = chunk[index]  # (copies, r', c): tiles[i, j] = chunk[(j + i·stride) mod r']
    else:
        tiles = chunk.unsqueeze(0).expand(copies, *chunk.shape)
    return tiles.permute(1, 0, 2).reshape(shared, copies * chunk.shape[1])[:, :length]


class ProLoraAdapter(LayerAdapter):
    """A layer's chunks ``A0``, ``B0`` and unshared vectors ``A_u``, ``B_u``."""

    def __init__(self, target: Target, options: ProLoraOptions):
        super().__init__(target.in_features, target.out_features, options.dropout)
        r, u, m, n = options.rank, options.unshared_rank, options.share_a, options.share_b
        self.rank, self.unshared, self.copies_a, self.copies_b = r, u, m, n
        self.rotate = options.rotation
        self.stride_a, self.stride_b = max((r - u) // m, 1), max((r - u) // n, 1)
        self.scale = options.alpha / r
        in_f, out_f = target.in_features, target.out_features
        bound = 1 / math.sqrt(in_f)  # Kaiming-uniform(a=√5) with the full input as fan
        self.lora_A0 = nn.Parameter(torch.empty(r - u, math.ceil(in_f / m)).uniform_(-bound, bound))
        self.lora_Au = nn.Parameter(torch.empty(u, in_f).uniform_(-bound, bound))
        self.lora_B0 = nn.Parameter(torch.zeros(math.ceil(out_f / n), r - u))
        self.lora_Bu = nn.Parameter(torch.zeros(out_f, u))

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A0.dtype

    def assembled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` without the scale: rotated broadcasts of the chunks, then the unshared vectors."""
        a = broadcast(self.lora_A0, self.copies_a, self.stride_a, self.in_features, self.rotate)
        b = broadcast(self.lora_B0.T, self.copies_b, self.stride_b, self.out_features, self.rotate).T
        return torch.cat([a, self.lora_Au]), torch.cat([b, self.lora_Bu], dim=1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.assembled()
        return a, b * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.assembled()
        return F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def routing(self) -> dict:
        shared, r = self.rank - self.unshared, self.rank
        how = "rotated broadcast" if self.rotate else "broadcast"
        return {
            "A": {
                "pool": "own",
                "shards": list(range(r)),
                "private": [True] * r,
                "note": f"{shared} ranks: {how} of a chunk {self.lora_A0.shape[1]} wide ×{self.copies_a} "
                f"(stride {self.stride_a}); {self.unshared} unshared",
            },
            "B": {
                "pool": "own",
                "shards": list(range(r)),
                "private": [True] * r,
                "note": f"{shared} ranks: {how} of a chunk {self.lora_B0.shape[0]} tall ×{self.copies_b} "
                f"(stride {self.stride_b}); {self.unshared} unshared",
            },
        }


class ProLora(AdapterMethod):
    name = "prolora"
    Options = ProLoraOptions

    def check(self, options: ProLoraOptions, targets: list[Target]) -> None:
        if options.unshared_rank > options.rank:
            raise RecipeError(
                "adapter.unshared_rank",
                f"must be at most adapter.rank ({options.rank}), got {options.unshared_rank}",
            )
        for key, copies in (("share_a", options.share_a), ("share_b", options.share_b)):
            for t in targets:
                size = t.in_features if key == "share_a" else t.out_features
                if copies > size:
                    raise RecipeError(
                        f"adapter.{key}",
                        f"must be at most the size it divides ({t.name}: {size}), got {copies}",
                    )

    def build_layer(
        self, options: ProLoraOptions, target: Target, stores: nn.Module | None
    ) -> ProLoraAdapter:
        return ProLoraAdapter(target, options)

    def export_info(self, options: ProLoraOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": options.alpha / options.rank}
