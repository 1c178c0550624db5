"""ShareLoRA (Song et al., arXiv 2406.10785): LoRA whose A, B or both are shared across layers.

Per projection type ``t`` with ``L_t`` adapted layers (scope ``type``, the paper's; ``attention``, the
paper's self-attention sharing: one matrix for q_proj, k_proj and v_proj of every layer together,
the other types per type; or all layers whose shared matrix has the same shape, scope ``shape``):

    ShareA :  ΔW_l = s · B_l · A_t         A_t ∈ R^{r×d_in} shared,   B_l ∈ R^{d_out×r} per layer
    ShareB :  ΔW_l = s · B_t · A_l         B_t shared,                A_l per layer
    ShareAB:  ΔW_l = s · B_t · A_t         both shared: every layer of type t gets the same ΔW

with ``s = α/r`` (rsLoRA: ``α/√r``). Initialisation as in the authors' scripts (which tie PEFT's
LoRA layers after injection): A Kaiming-uniform (a = √5) — ``init: normal`` gives their alternative
N(0, 1/r) for the shared A — and B zeros, so ΔW = 0 at step 0. The authors' LLaMA scripts use
ShareA on q_proj and v_proj, r = 64, α = 16, dropout 0.1 (``recipes/sharelora-llama3-8b.yaml``).

The shared matrices are one parameter each, registered once at the model root
(``shardtune_stores.A_<type>``), so the optimizer, clipping and DDP see them once; their gradient
is the sum of the gradients of every layer that uses them.

Trainable parameters per type: LoRA ``L·r·(d_in+d_out)``; ShareA ``r·d_in + L·r·d_out``;
ShareB ``L·r·d_in + r·d_out``; ShareAB ``r·(d_in+d_out)``. Scope ``attention`` counts q, k and v as one
group of ``3·L`` layers: ShareA ``r·d + L·r·(d_q + d_k + d_v)``. Sharing B across q, k and v needs
their output sizes equal (not with grouped-query attention, where k and v are narrower than q).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from shardtune.adapters.base import AdapterMethod, LayerAdapter, Target, add_low_rank
from shardtune.adapters.lora import LoraOptions, lora_scale

ATTENTION_KINDS = {"q_proj", "k_proj", "v_proj", "query", "key", "value"}  # what `scope: attention` groups


class ShareLoraOptions(LoraOptions):
    """LoRA's keys (rank, alpha, dropout, rslora) plus what is shared and how."""

    method: Literal["sharelora"] = "sharelora"
    share: Literal["a", "b", "ab"] = Field(
        "a", description="Which factor is shared across layers (the paper: a)."
    )
    scope: Literal["type", "attention", "shape"] = Field(
        "type",
        description="`type`: one shared matrix per projection type (q_proj, v_proj, …); `attention`: one for "
        "q_proj, k_proj and v_proj together (self-attention sharing), the other types per type; `shape`: one "
        "per shape of the shared matrix, across types.",
    )
    init: Literal["kaiming", "normal"] = Field(
        "kaiming",
        description="Init of A: Kaiming-uniform (a=√5, PEFT's) or N(0, 1/r) (the authors' alternative).",
    )


def _init_a(rank: int, in_features: int, how: str) -> torch.Tensor:
    a = torch.empty(rank, in_features)
    if how == "normal":
        return nn.init.normal_(a, std=1 / rank)
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class SharedFactors(nn.Module):
    """The shared matrices, keyed ``A_<group>`` / ``B_<group>``."""

    def __init__(self):
        super().__init__()
        self.matrices = nn.ParameterDict()


class ShareLoraAdapter(LayerAdapter):
    """A layer's own factor(s) plus an unregistered reference to the shared one(s) at the model root."""

    def __init__(
        self, target: Target, options: ShareLoraOptions, shared: SharedFactors, groups: dict[str, str]
    ):
        super().__init__(target.in_features, target.out_features, options.dropout)
        self.rank = options.rank
        self.scale = lora_scale(options.alpha, options.rank, options.rslora)
        self.groups = groups  # "A"/"B" → key in shared.matrices, for the shared factor(s)
        object.__setattr__(self, "_shared", shared)
        if "A" not in groups:
            self.lora_A = nn.Parameter(_init_a(options.rank, target.in_features, "kaiming"))
        if "B" not in groups:
            self.lora_B = nn.Parameter(torch.zeros(target.out_features, options.rank))

    def _factor(self, matrix: str) -> torch.Tensor:
        key = self.groups.get(matrix)
        return self._shared.matrices[key] if key is not None else getattr(self, f"lora_{matrix}")

    @property
    def dtype(self) -> torch.dtype:
        return self._factor("A").dtype

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._factor("A"), self._factor("B") * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self._factor("A")) * self.scale, self._factor("B"))

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self._factor("A")) * self.scale
        return add_low_rank(out, h, self._factor("B"))

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if not isinstance(self.dropout, nn.Identity):
            return None
        return self._factor("A"), self._factor("B"), self.scale

    def routing(self) -> dict:
        out = {}
        for matrix in ("A", "B"):
            key = self.groups.get(matrix)
            out[matrix] = {
                "pool": key or "own",
                "shards": list(range(self.rank)),
                "private": [key is None] * self.rank,
            }
        return out


class ShareLora(AdapterMethod):
    name = "sharelora"
    Options = ShareLoraOptions

    @staticmethod
    def groups(options: ShareLoraOptions, target: Target) -> dict[str, str]:
        """Which shared matrix this layer's A and/or B is (keys of SharedFactors.matrices)."""
        out = {}
        for matrix in ("A", "B"):
            if matrix.lower() in options.share:
                if options.scope == "attention" and target.name.rsplit(".", 1)[-1] in ATTENTION_KINDS:
                    out[matrix] = f"{matrix}_qkv"
                elif options.scope in ("type", "attention"):
                    out[matrix] = f"{matrix}_{target.kind}"
                else:
                    size = target.in_features if matrix == "A" else target.out_features
                    out[matrix] = f"{matrix}_{'in' if matrix == 'A' else 'out'}{size}"
        return out

    def check(self, options: ShareLoraOptions, targets: list[Target]) -> None:
        from shardtune.core.errors import RecipeError

        sizes: dict[str, set] = {}
        for t in targets:
            for matrix, key in self.groups(options, t).items():
                sizes.setdefault(key, set()).add(t.in_features if matrix == "A" else t.out_features)
        for key, found in sizes.items():
            if len(found) > 1:
                hint = "share: a (q, k and v read the same input)" if key == "B_qkv" else "scope: shape"
                raise RecipeError(
                    "adapter.scope",
                    f"layers sharing {key} have different sizes {sorted(found)}; use {hint}",
                )

    def build_stores(self, options: ShareLoraOptions, targets: list[Target]) -> SharedFactors:
        shared = SharedFactors()
        for t in targets:
            for matrix, key in self.groups(options, t).items():
                if key in shared.matrices:
                    continue
                if matrix == "A":
                    shared.matrices[key] = nn.Parameter(_init_a(options.rank, t.in_features, options.init))
                else:
                    shared.matrices[key] = nn.Parameter(torch.zeros(t.out_features, options.rank))
        return shared

    def build_layer(
        self, options: ShareLoraOptions, target: Target, stores: SharedFactors
    ) -> ShareLoraAdapter:
        return ShareLoraAdapter(target, options, stores, self.groups(options, target))

    def export_info(self, options: ShareLoraOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": lora_scale(options.alpha, options.rank, options.rslora)}
