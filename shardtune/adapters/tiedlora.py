"""Tied-LoRA (Renduchintala, Konuk & Kuchaiev, arXiv 2311.09578): LoRA with A and B tied across
layers, plus per-layer scaling vectors, each piece trained or frozen.

For a projection type ``t`` (q_proj, v_proj, …) with ``L_t`` adapted layers, one ``A_t ∈ R^{r×d_in}``
and one ``B_t ∈ R^{d_out×r}`` are shared (tied) by all its layers; layer ``l`` has its own vectors
``u_l ∈ R^r`` and ``v_l ∈ R^{d_out}``:

    y = W_l·x + s · Λ_{v_l}·B_t·Λ_{u_l}·A_t·dropout(x),      Λ = diag,   s = α/r

``trainable`` names the configuration in the paper's notation, the four letters in the order of the
product — ``v B u A`` — upper case for a trained piece, lower case for a frozen one: ``vBuA`` (the
default) trains the tied A and B only (u = v = 1, which is exactly ShareLoRA ``share: ab``);
``vBUA`` adds a trained rank scaling u per layer; ``VbUa`` (frozen random A, B, trained u, v) is
VeRA's form; ``VBUA`` trains everything.

Initialisation: a frozen u or v is 1 (it then has no tensor); a frozen A or B is a fixed random
matrix (Kaiming-uniform, a = √5, as LoRA's A), saved with the adapter. Among the trained pieces the
one nearest the output in ``v, B, u, A`` starts at zero — B for the B-trained configurations, as
LoRA; v for VeRA's — so ΔW = 0 at step 0, the zero piece gets a gradient at once and the others from
the first step on (as LoRA's A); the other trained A/B start Kaiming-uniform and a trained u/v at 1.

Tied matrices live once at the model root (``shardtune_stores``; frozen ones as buffers). In spine
terms ``A_l = Λ_{u_l}·A_t``, ``B_l = s·Λ_{v_l}·B_t``: a rank-r LoRA, exported as one. Trainable
parameters per type: ``[A]·r·d_in + [B]·r·d_out + L_t·([u]·r + [v]·d_out)``, where ``[X]`` is 1 if X is
trained (LoRA: ``L_t·r·(d_in + d_out)``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, field_validator
from torch import nn

from shardtune.adapters.base import AdapterMethod, AdapterOptions, LayerAdapter, Target

ORDER = "vBuA"  # the product's order, output side first


class TiedLoraOptions(AdapterOptions):
    method: Literal["tiedlora"] = "tiedlora"
    rank: PositiveInt = Field(8, description="r: rank of the tied A (r×in) and B (out×r).")
    alpha: float = Field(16.0, gt=0, description="α: the update is scaled by α/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    trainable: str = Field(
        "vBuA",
        description="Which of v (out), B, u (r), A are trained, in the paper's notation: the letters v, B, "
        "u, A in this order, upper case = trained, lower case = frozen (vBuA: the tied A and B only).",
    )

    @field_validator("trainable")
    @classmethod
    def _notation(cls, value: str) -> str:
        if len(value) != 4 or value.lower() != ORDER.lower():
            raise ValueError(
                f"expected the letters v, B, u, A in this order, each upper or lower case, got {value!r}"
            )
        if value.islower():
            raise ValueError(
                f"nothing would be trained: write at least one letter in upper case, got {value!r}"
            )
        return value


def trained(options: TiedLoraOptions) -> dict[str, bool]:
    """``{"v": …, "B": …, "u": …, "A": …}``: which pieces the configuration trains."""
    return {
        name: letter.isupper() for name, letter in zip(("v", "B", "u", "A"), options.trainable, strict=True)
    }


def zero_piece(options: TiedLoraOptions) -> str:
    """The trained piece nearest the output (in v, B, u, A order): it starts at zero."""
    flags = trained(options)
    return next(name for name in ("v", "B", "u", "A") if flags[name])


def _kaiming(rows: int, cols: int) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(rows, cols), a=math.sqrt(5))


class TiedFactors(nn.Module):
    """The tied ``A_<type>`` / ``B_<type>``: parameters when trained, persistent buffers when frozen."""

    def __init__(self):
        super().__init__()
        self.matrices = nn.ParameterDict()
        self.frozen = nn.Module()

    def get(self, key: str) -> torch.Tensor:
        return self.matrices[key] if key in self.matrices else getattr(self.frozen, key)

    def add(self, key: str, value: torch.Tensor, train: bool) -> None:
        if train:
            self.matrices[key] = nn.Parameter(value)
        else:
            self.frozen.register_buffer(key, value)


class TiedLoraAdapter(LayerAdapter):
    """A layer's vectors u (r) and v (out) — parameters when trained — over its type's tied A and B."""

    def __init__(self, target: Target, options: TiedLoraOptions, tied: TiedFactors):
        super().__init__(target.in_features, target.out_features, options.dropout)
        self.rank = options.rank
        self.scale = options.alpha / options.rank
        self.kind = target.kind
        flags, zero = trained(options), zero_piece(options)
        if flags["u"]:
            self.lora_u = nn.Parameter(torch.zeros(options.rank) if zero == "u" else torch.ones(options.rank))
        if flags["v"]:
            n = target.out_features
            self.lora_v = nn.Parameter(torch.zeros(n) if zero == "v" else torch.ones(n))
        object.__setattr__(self, "_tied", tied)  # not a submodule: the tied matrices live at the model root

    @property
    def dtype(self) -> torch.dtype:
        return self._tied.get(f"A_{self.kind}").dtype

    def tied(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tied.get(f"A_{self.kind}"), self._tied.get(f"B_{self.kind}")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.tied()
        if hasattr(self, "lora_u"):
            a = self.lora_u.unsqueeze(1) * a
        b = b * self.scale
        if hasattr(self, "lora_v"):
            b = self.lora_v.unsqueeze(1) * b
        return a, b

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.tied()
        h = F.linear(self.dropout(x), a)
        if hasattr(self, "lora_u"):
            h = h * self.lora_u
        y = F.linear(h, b) * self.scale
        return y * self.lora_v if hasattr(self, "lora_v") else y

    def routing(self) -> dict:
        r = self.rank
        notes = {
            "A": "own u (r) scales its rows" if hasattr(self, "lora_u") else "rows used as they are (u = 1)",
            "B": "own v (out) scales its rows" if hasattr(self, "lora_v") else "used as it is (v = 1)",
        }
        return {
            m: {
                "pool": f"{m}_{self.kind}",
                "shards": list(range(r)),
                "private": [False] * r,
                "note": notes[m],
            }
            for m in ("A", "B")
        }


class TiedLora(AdapterMethod):
    name = "tiedlora"
    Options = TiedLoraOptions

    def check(self, options: TiedLoraOptions, targets: list[Target]) -> None:
        from shardtune.core.errors import RecipeError

        shapes: dict[str, set] = {}
        for t in targets:
            shapes.setdefault(t.kind, set()).add((t.out_features, t.in_features))
        for kind, found in shapes.items():
            if len(found) > 1:
                raise RecipeError(
                    "adapter.targets",
                    f"layers of type {kind} have different shapes {sorted(found)}; they cannot tie",
                )

    def build_stores(self, options: TiedLoraOptions, targets: list[Target]) -> TiedFactors:
        flags, zero = trained(options), zero_piece(options)
        tied = TiedFactors()
        for t in targets:
            if f"A_{t.kind}" in tied.matrices or hasattr(tied.frozen, f"A_{t.kind}"):
                continue
            a = (
                torch.zeros(options.rank, t.in_features)
                if zero == "A"
                else _kaiming(options.rank, t.in_features)
            )
            b = (
                torch.zeros(t.out_features, options.rank)
                if zero == "B"
                else _kaiming(t.out_features, options.rank)
            )
            tied.add(f"A_{t.kind}", a, flags["A"])
            tied.add(f"B_{t.kind}", b, flags["B"])
        return tied

    def build_layer(self, options: TiedLoraOptions, target: Target, stores: TiedFactors) -> TiedLoraAdapter:
        return TiedLoraAdapter(target, options, stores)

    def export_info(self, options: TiedLoraOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": options.alpha / options.rank}
