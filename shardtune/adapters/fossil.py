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
merge and export-as-LoRA use. The padding makes this exact when ``in mod r ≠ 0``. Training without
dropout, the default mode runs in the fused layer (:meth:`FossilAdapter.block_sum_shard`,
:mod:`shardtune.adapters.fused`): ``dD = sᵀ·dy``, ``dx = dy·W + (dy·Dᵀ)·P``, and none of ``x`` kept
for backward.

``mini`` mode trains ``D_mini ∈ R^{r×mini_r}`` and tiles it ``out/mini_r`` times along the output
axis (``D = [D_mini | D_mini | …]``, needs ``out mod mini_r = 0``); ``mini_r = out`` is the default
mode. Trainable parameters per layer: default ``r·out``, mini ``r·mini_r`` (LoRA: ``r·(in+out)``).

``bat`` mode (Block Affine Transformation; PEFT's ``init_weights="bat"``, the first "Bone") cuts W
into r×r blocks ``W_bc`` (b: output block, c: input block; needs ``r | in`` and ``r | out``) and
trains one r×r matrix ``D_b`` per output block (zeros at init), shared by every input block of that
row:

    ΔW_bc = W_bc·D_b + D_b = (W_bc + I_r)·D_b              ("weight-guided": ΔW depends on W)
    y = W·x + ΔW·dropout(x)

Trainable parameters ``(out/r)·r·r = r·out``, as the default mode. ΔW is generally of full rank
(up to min(out, in)), so a bat adapter is *not* a LoRA: it has no factors (A, B); merge is
``W ← W + (W + I)·D`` blockwise in fp32, unmerge ``W = (W' − D_b)·(I + D_b)⁻¹`` (exact up to the
rounding of the solve), and `export --format peft` refuses it. The forward materialises ΔW
(``out·in·r`` multiply-adds per step, as PEFT does) and, without dropout, multiplies by the merged
weight ``W + ΔW`` — PEFT's computation, so a merged model gives the same logits. PEFT's bat ignores
``miss_dropout``; ours, when set, applies it to the adapter's input (``W·x + ΔW·dropout(x)``). The
MiSS README's "Bat-Col" orientation is not in PEFT and not implemented here.

Numerically identical to PEFT's ``MissConfig`` (``init_weights=True`` / ``"mini"`` / ``"bat"``;
tensor ``miss_block``), which is the test reference.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, field_validator
from torch import nn

from shardtune.adapters.base import AdapterMethod, AdapterOptions, LayerAdapter, Target, add_low_rank
from shardtune.adapters.fused import block_sum
from shardtune.core.errors import RecipeError
from shardtune.models.quant import dense_weight, is_quantized_linear


class FossilOptions(AdapterOptions):
    method: Literal["fossil"] = "fossil"
    rank: PositiveInt = Field(64, description="r: the shard has r rows; the input is summed in blocks of r.")
    mode: Literal["default", "mini", "bat"] = Field(
        "default",
        description="`default`: shard r×out per layer; `mini`: shard r×mini_r tiled along out; `bat`: one "
        "r×r block D_b per output block, ΔW_bc = (W_bc + I)·D_b (needs r | in and r | out; not low-rank).",
    )
    mini_r: PositiveInt = Field(
        1, description="Width of the mini shard (mode: mini); must divide out_features."
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input, before the block sum."
    )

    @field_validator("mini_r")
    @classmethod
    def _mini_r_needs_mini_mode(cls, value: int, info):
        # (a saved or resolved recipe spells out the default: only another value counts)
        if value != cls.model_fields["mini_r"].default and info.data.get("mode", "mini") != "mini":
            raise ValueError(
                f"applies to mode: mini only (mode is {info.data['mode']}); set adapter.mode: mini"
            )
        return value


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
        """``s = P·x``: the blocks of length r summed, the last one zero-padded → (..., r)."""
        return block_sum(x.reshape(-1, x.shape[-1]), self.rank).view(*x.shape[:-1], self.rank)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        s = self.block_sum(self.dropout(x))
        if self.mini_r is None:
            return s @ self.shard
        # Tile the (…, mini_r) result instead of the shard: y[o] = (s·D_mini)[o mod mini_r].
        y = s @ self.shard
        return y.repeat(*([1] * (y.dim() - 1)), self.out_features // self.mini_r)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.mini_r is not None:
            return out + self.delta(x).to(out.dtype)
        return add_low_rank(out, self.block_sum(self.dropout(x)), self.shard.T)

    def block_sum_shard(self) -> torch.Tensor | None:
        if self.mini_r is not None or not isinstance(self.dropout, nn.Identity):
            return None
        return self.shard

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


class BatAdapter(LayerAdapter):
    """FOSSIL ``bat``: one r×r block ``D_b`` per output block; ``ΔW_bc = (W_bc + I)·D_b``."""

    not_low_rank = "its update (W + I)·D depends on the base weight and is not low-rank"
    replaces_base = True  # the forward uses the merged weight W + ΔW (see forward_full)

    def __init__(self, target: Target, rank: int, dropout: float = 0.0):
        super().__init__(target.in_features, target.out_features, dropout)
        self.rank = rank
        self.fan_in_fan_out = target.fan_in_fan_out
        self.shard = nn.Parameter(torch.zeros(target.out_features // rank, rank, rank))
        object.__setattr__(self, "_base", target.module)  # the frozen layer whose weight ΔW multiplies

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    def base_weight(self) -> torch.Tensor:
        """The frozen W in the (out, in) orientation and the adapter's dtype (a quantized base: ``Q(W)``,
        dequantized; always (out, in))."""
        w = dense_weight(self._base)
        return (w.T if self.fan_in_fan_out else w).to(self.shard.dtype)

    def blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (out, in) as a (out/r, r, in/r, r) grid: ``[b, i, c, j] = W[b·r + i, c·r + j]``."""
        r = self.rank
        return weight.reshape(self.out_features // r, r, self.in_features // r, r)

    def bat_delta(self, weight: torch.Tensor, shard: torch.Tensor | None = None) -> torch.Tensor:
        """``ΔW`` for base weight ``weight``: block (b, c) is ``W_bc·D_b + D_b`` (``shard``: D, default the
        parameter)."""
        d = (self.shard if shard is None else shard).to(weight.dtype)
        delta = torch.einsum("bicj,bjk->bick", self.blocks(weight), d) + d.unsqueeze(2)
        return delta.reshape(self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        return self.bat_delta(self.base_weight())

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dropout(x), self.delta_weight())

    def forward_full(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Without dropout: ``x·(W + ΔW)ᵀ + b`` with the merged weight, as PEFT (and as a merged model)
        computes it; with dropout: ``base(x) + dropout(x)·ΔWᵀ``. In the adapter's dtype (fp32 over a
        bf16 base) unless autocast is on; the output comes back in the base's dtype. Over a quantized
        base: :class:`BatQuantizedFunction`, in the adapter's dtype."""
        if is_quantized_linear(base):
            return self._forward_quantized(x, base)
        if not isinstance(self.dropout, nn.Identity):
            out = base(x)
            x = x if torch.is_autocast_enabled(x.device.type) else x.to(self.dtype)
            return out + self.delta(x).to(out.dtype)
        w = self.base_weight()
        merged = w + self.bat_delta(w)
        bias = base.bias.to(merged.dtype) if base.bias is not None else None
        y = F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(merged.dtype), merged, bias)
        return y.to(base.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else y

    def _forward_quantized(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if isinstance(self.dropout, nn.Identity):  # x·(Q(W) + ΔW)ᵀ + b
                y = BatQuantizedFunction.apply(x, self.shard, self, base, True)
                return (y if base.bias is None else y + base.bias.to(y.dtype)).to(x.dtype)
        out = base(x)  # Q(W)·x + b from the quantized layer, then dropout(x)·ΔWᵀ
        with torch.autocast(device_type=x.device.type, enabled=False):
            delta = BatQuantizedFunction.apply(self.dropout(x), self.shard, self, base, False)
        return out + delta.to(out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"a bat adapter has no low-rank factors: {self.not_low_rank}")

    def merged_weight(self, weight: torch.Tensor, unmerge: bool = False) -> torch.Tensor:
        """``W' = W + (W + I)·D`` blockwise; unmerge solves ``W·(I + D_b) = W' − D_b`` for W."""
        if not unmerge:
            return weight + self.bat_delta(weight)
        d = self.shard.detach().to(weight.dtype)  # (nb, r, r)
        eye = torch.eye(self.rank, dtype=weight.dtype, device=weight.device)
        rhs = (self.blocks(weight) - d.unsqueeze(2)).permute(0, 2, 1, 3)  # (nb, nc, r, r): W'_bc − D_b
        w = torch.linalg.solve((eye + d).unsqueeze(1), rhs, left=False)  # X·(I + D_b) = rhs
        return w.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def routing(self) -> dict:
        n_out, n_in = self.out_features // self.rank, self.in_features // self.rank
        return {
            "A": {
                "pool": "fixed",
                "shards": [],
                "private": [],
                "note": "none: the base weight's blocks W_bc + I",
            },
            "B": {
                "pool": "own",
                "shards": list(range(n_out)),
                "private": [True] * n_out,
                "note": f"{n_out} r×r blocks D_b, each shared by the {n_in} input blocks of its row",
            },
        }


class BatQuantizedFunction(torch.autograd.Function):
    """``y = x·(c·W + ΔW)ᵀ`` with ``ΔW_bc = (W_bc + I)·D_b`` over a quantized base, ``c ∈ {0, 1}``
    (``include_base``). W is the layer's dequantized ``Q(W)``, made in forward and again in backward and
    never saved: only x and D are kept, so one layer's dense W exists at a time (autograd through
    :meth:`BatAdapter.bat_delta` would keep every layer's W until backward). Backward, with
    ``G = dyᵀ·x`` (out×in) cut into the same r×r blocks ``G_bc``:

        dx   = dy·(c·W + ΔW)
        dD_b = Σ_c (W_bc + I)ᵀ·G_bc       i.e.  dD[b,j,k] = Σ_{i,c} W[b,i,c,j]·G[b,i,c,k] + Σ_c G[b,j,c,k]
    """

    @staticmethod
    def forward(ctx, x, shard, adapter: BatAdapter, layer: nn.Module, include_base: bool):
        w = adapter.base_weight()
        weight = adapter.bat_delta(w, shard)
        if include_base:
            weight = weight + w
        del w
        ctx.save_for_backward(x, shard)
        ctx.adapter, ctx.include_base = adapter, include_base
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, dy):
        x, shard = ctx.saved_tensors
        adapter = ctx.adapter
        w = adapter.base_weight()  # recomputed from the codes
        dx = d_shard = None
        if ctx.needs_input_grad[0]:
            weight = adapter.bat_delta(w, shard) + (w if ctx.include_base else 0)
            dx = (dy.to(weight.dtype) @ weight).to(x.dtype)
            del weight
        if ctx.needs_input_grad[1]:
            g = dy.reshape(-1, dy.shape[-1]).T.to(w.dtype) @ x.reshape(-1, x.shape[-1]).to(w.dtype)
            g_blocks = adapter.blocks(g)
            d_shard = torch.einsum("bicj,bick->bjk", adapter.blocks(w), g_blocks) + g_blocks.sum(2)
            d_shard = d_shard.to(shard.dtype)
        return dx, d_shard, None, None, None


class Fossil(AdapterMethod):
    name = "fossil"
    Options = FossilOptions

    def check(self, options: FossilOptions, targets: list[Target]) -> None:
        if options.mode == "bat":
            for t in targets:
                if t.in_features % options.rank or t.out_features % options.rank:
                    raise RecipeError(
                        "adapter.rank",
                        f"mode bat cuts every weight into r×r blocks, so r must divide its sizes; {t.name} "
                        f"is {t.out_features}×{t.in_features}, got {options.rank}",
                    )
        if options.mode == "mini":
            for t in targets:
                if t.out_features % options.mini_r:
                    raise RecipeError(
                        "adapter.mini_r",
                        f"must divide the output size of every target; {t.name} has out_features "
                        f"{t.out_features}, got {options.mini_r}",
                    )

    def largest_rank(self, options: FossilOptions, target: Target) -> int:
        if options.mode == "bat":
            return min(target.in_features, target.out_features)  # r×r blocks of W
        # r = in gives every input its own row of D (a full ΔW); beyond it the blocks are padding.
        return target.in_features

    def build_layer(self, options: FossilOptions, target: Target, stores: nn.Module | None) -> LayerAdapter:
        if options.mode == "bat":
            return BatAdapter(target, options.rank, options.dropout)
        mini_r = options.mini_r if options.mode == "mini" else None
        return FossilAdapter(target.in_features, target.out_features, options.rank, mini_r, options.dropout)

    def export_info(self, options: FossilOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": 1.0}
