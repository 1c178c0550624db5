"""VB-LoRA — LoRA factors composed from a shared vector bank (Li, Han & Ji, arXiv 2405.15179).

"Divide and share": every rank vector of every adapted layer's A and B is cut into sub-vectors of
length ``b`` (``vector_length``), and each sub-vector is a top-k mixture of the vectors of one global
bank ``V ∈ R^{h×b}`` (h = ``num_vectors``), held once at the model root and shared by all layers,
all projection types and both factors. A layer owns only the mixture logits:

    logits_A ∈ R^{r × in/b × h},   logits_B ∈ R^{out/b × r × h}
    mix(ℓ) = Σ_{j ∈ topk(ℓ)} softmax(ℓ_topk)_j · V_j          (top-k admixture; the rest get weight 0)
    A[i, c·b:(c+1)·b] = mix(logits_A[i, c])                   → A ∈ R^{r×in}
    B[c·b:(c+1)·b, i] = mix(logits_B[c, i])                   → B ∈ R^{out×r}
    y = W·x + B·A·dropout(x)                                  (no scaling factor)

Init as PEFT's ``VBLoRAConfig`` and the authors: bank ``U(−0.02, 0.02)`` (``init_vector_bank_bound``),
logits ``N(0, 0.1²)`` (``init_logits_std``). Unlike LoRA, ΔW is (slightly) non-zero at step 0: B is
not zero. ``b`` must divide the input and output size of every target.

The spine's factors are exactly (A, B): a VB-LoRA adapter exports as a rank-r LoRA. Trainable
parameters: ``h·b + Σ_layers r·h·(in + out)/b`` (bank + logits). The paper's headline counts *stored*
parameters after training, when each sub-vector keeps only its k indices and k−1 mixture weights:
``h·b + Σ_layers r·(in + out)/b·(2k − 1)`` numbers (indices counted as one each).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from shardtune.adapters.base import AdapterMethod, AdapterOptions, LayerAdapter, Target
from shardtune.core.errors import RecipeError


class VbloraOptions(AdapterOptions):
    method: Literal["vblora"] = "vblora"
    rank: PositiveInt = Field(4, description="r: the rank of ΔW = B·A.")
    num_vectors: PositiveInt = Field(256, description="h: vectors in the shared bank.")
    vector_length: PositiveInt = Field(
        256, description="b: length of a bank vector; must divide every target's input and output size."
    )
    topk: PositiveInt = Field(2, description="k: bank vectors mixed into each sub-vector.")
    init_vector_bank_bound: float = Field(0.02, gt=0, description="The bank starts U(−bound, bound).")
    init_logits_std: float = Field(0.1, gt=0, description="The mixture logits start N(0, std²).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")


class VectorBank(nn.Module):
    """The one bank ``V`` (h × b) every layer mixes its sub-vectors from."""

    def __init__(self, num_vectors: int, vector_length: int, bound: float):
        super().__init__()
        self.bank = nn.Parameter(torch.empty(num_vectors, vector_length))
        nn.init.uniform_(self.bank, -bound, bound)


def topk_mixture(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """``Σ_topk softmax(logits_topk)·V`` over the last axis of ``logits`` → (..., b)."""
    top, index = logits.topk(k, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[index]).sum(-2)


class VbloraAdapter(LayerAdapter):
    """A layer's mixture logits (``logits_A``, ``logits_B``) over the shared bank."""

    def __init__(self, target: Target, options: VbloraOptions, bank: VectorBank):
        super().__init__(target.in_features, target.out_features, options.dropout)
        self.rank, self.topk, self.length = options.rank, options.topk, options.vector_length
        h = options.num_vectors
        self.logits_A = nn.Parameter(torch.empty(options.rank, target.in_features // self.length, h))
        self.logits_B = nn.Parameter(torch.empty(target.out_features // self.length, options.rank, h))
        nn.init.normal_(self.logits_A, 0.0, options.init_logits_std)
        nn.init.normal_(self.logits_B, 0.0, options.init_logits_std)
        object.__setattr__(self, "_bank", bank)  # not a submodule: the bank lives at the model root

    @property
    def dtype(self) -> torch.dtype:
        return self.logits_A.dtype

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self._bank.bank
        a = topk_mixture(self.logits_A, bank, self.topk).reshape(self.rank, self.in_features)
        b = topk_mixture(self.logits_B, bank, self.topk)  # (out/b, r, b)
        return a, b.transpose(1, 2).reshape(self.out_features, self.rank)

    def routing(self) -> dict:
        out = {}
        for matrix, logits in (("A", self.logits_A), ("B", self.logits_B)):
            used = sorted(set(logits.detach().topk(self.topk, dim=-1).indices.flatten().tolist()))
            out[matrix] = {
                "pool": "vector_bank",
                "shards": used,
                "private": [False] * len(used),
                "note": f"{logits.shape[0] * logits.shape[1]} sub-vectors, each a top-{self.topk} mix of these",
            }
        return out


class Vblora(AdapterMethod):
    name = "vblora"
    Options = VbloraOptions
    # The paper trains the bank at 1e-3 and the logits at 1e-2 in every experiment (its Tables 7-9):
    # the logits at ten times train.lr.
    lr_scales = {"logits": 10.0}

    def check(self, options: VbloraOptions, targets: list[Target]) -> None:
        if options.topk > options.num_vectors:
            raise RecipeError(
                "adapter.topk",
                f"must be at most adapter.num_vectors ({options.num_vectors}), got {options.topk}",
            )
        for t in targets:
            if t.in_features % options.vector_length or t.out_features % options.vector_length:
                raise RecipeError(
                    "adapter.vector_length",
                    f"must divide the input and output size of every target; {t.name} is "
                    f"{t.out_features}×{t.in_features}, got {options.vector_length}",
                )

    def build_stores(self, options: VbloraOptions, targets: list[Target]) -> VectorBank:
        return VectorBank(options.num_vectors, options.vector_length, options.init_vector_bank_bound)

    def build_layer(self, options: VbloraOptions, target: Target, stores: VectorBank) -> VbloraAdapter:
        return VbloraAdapter(target, options, stores)

    def export_info(self, options: VbloraOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": 1.0}
