"""LoRS (Hu et al., arXiv 2501.08582): LoRA for a pruned model that keeps it exactly as sparse.

A pruned weight ``W ∈ R^{out×in}`` with mask ``M = (W ≠ 0)`` is tuned through

    W̃ = (W + s·B·A) ⊙ M,        y = x·W̃ᵀ + b,        s = α/√r  (LoRS; ``rslora: false`` gives α/r)

with ``α = r`` unless set (the authors' scripts; so ``s = √r``).

so the merged weight has exactly W's zeros (the mask is recomputed as ``W ≠ 0``, never stored). The
update is no longer low-rank (``(B·A) ⊙ M``), so this layer replaces the base layer's forward with a
custom autograd function that keeps memory lean:

* forward builds ``W̃`` as a temporary, computes ``y`` and saves only ``x, W, A, B`` (never W̃,
  ``B·A`` or a mask; "weight recompute");
* backward recomputes ``W̃`` once for ``dx = dy·W̃``, then the adapter gradients, by ``grad_mode``:

  - ``lors`` (the paper's released kernel; default) — "graph rearrangement": the out×in weight
    gradient is never formed and the mask is passed straight through:
    ``dB = s·dyᵀ·(x·Aᵀ)``, ``dA = s·(dy·B)ᵀ·x``  (LoRS omits s; we keep it so clipping and SGD see
    the true scale);
  - ``authors`` — the released code exactly (``hyx1999/LoRS`` ``pefts/lors/lors_autograd.py``): the
    same rearranged gradient *without* s, ``dB = dyᵀ·(x·Aᵀ)``, ``dA = (dy·B)ᵀ·x``, although the forward
    uses ``s·B·A`` (with Adam, which is scale-invariant, only ε and weight decay see the difference);
  - ``exact`` — the true gradient of the masked update, ``G = (dyᵀ·x) ⊙ M``,
    ``dB = s·G·Aᵀ``, ``dA = s·Bᵀ·G``, formed in chunks of ``exact_chunk`` output rows so only a
    chunk×in slice of G exists at a time.

Initialisation: ``init: gradient`` (the paper's): before training, average the dense gradient G of
each target weight over ``init_samples`` training examples, take its top-r right singular vectors
(randomized SVD) as A (divided by ``init_gamma``) and B = 0, so ΔW = 0 and the first update lies
in the best rank-r approximation of the full gradient. ``init: kaiming`` is LoRA's.

No adapter dropout (it does not commute with the merged-weight forward). Merge is
``W ← W + s·(B·A) ⊙ M`` in fp32, so the zero pattern is kept bit for bit.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from shardtune.adapters.base import (
    AdapterMethod,
    AdapterOptions,
    LayerAdapter,
    Target,
    adapted_layers,
    adapter_disabled,
)
from shardtune.models.quant import dense_weight, is_quantized_linear


class LorsOptions(AdapterOptions):
    method: Literal["lors"] = "lors"
    rank: PositiveInt = Field(16, description="r: rank of B·A before masking.")
    alpha: float | None = Field(
        None,
        gt=0,
        description="α: the update is scaled by α/√r (α/r with rslora: false); unset: α = r, the authors' default.",
    )
    rslora: bool = Field(True, description="LoRS scales by α/√r; false gives LoRA's α/r.")
    grad_mode: Literal["lors", "exact", "authors"] = Field(
        "lors",
        description="`lors`: the paper's cheap rearranged gradient, scaled by s; `authors`: the same without s, "
        "as the released code; `exact`: the masked gradient (chunked).",
    )
    exact_chunk: PositiveInt = Field(1024, description="Output rows per chunk of the exact masked gradient.")
    init: Literal["gradient", "kaiming"] = Field(
        "gradient",
        description="`gradient`: A from the top-r right singular vectors of the dense gradient (LoRS).",
    )
    init_samples: PositiveInt = Field(128, description="Training examples whose gradient initialises A.")
    init_gamma: float = Field(1.0, gt=0, description="A = Vᵀ_r / γ for the gradient init.")

    @model_validator(mode="after")
    def _alpha_is_rank(self) -> LorsOptions:
        if self.alpha is None:
            self.alpha = float(self.rank)
        return self


def lors_scale(options: LorsOptions) -> float:
    """``s = α/√r`` (LoRS), or LoRA's ``α/r`` with ``rslora: false``."""
    return options.alpha / (math.sqrt(options.rank) if options.rslora else options.rank)


class LorsLinearFunction(torch.autograd.Function):
    """``y = x·((W + s·B·A) ⊙ (W≠0))ᵀ + b`` saving only x, W, A, B. See the module docstring.

    ``quantized``: a bitsandbytes layer (``model.quantize``); ``weight`` is then None and W is its
    dequantized ``Q(W)``, made here and again in backward and never saved (only the codes stay).
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_a, lora_b, scale: float, grad_mode: str, chunk: int, quantized=None
    ):
        w = weight if quantized is None else dense_weight(quantized)
        merged = masked_merged_weight(w, lora_a, lora_b, scale)
        y = F.linear(x.to(w.dtype), merged, bias.to(w.dtype) if bias is not None else None)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scale, ctx.grad_mode, ctx.chunk, ctx.quantized = scale, grad_mode, chunk, quantized
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        if ctx.quantized is not None:
            weight = dense_weight(ctx.quantized)  # recomputed from the codes, as the merged weight is
        s = ctx.scale
        dx = None
        if ctx.needs_input_grad[0]:
            merged = masked_merged_weight(weight, lora_a, lora_b, s)  # weight recompute
            dx = (dy.to(weight.dtype) @ merged).to(x.dtype)
            del merged
        x2 = x.reshape(-1, x.shape[-1]).to(lora_a.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(lora_a.dtype)
        if ctx.grad_mode in ("lors", "authors"):
            g = s if ctx.grad_mode == "lors" else 1.0  # the released code does not scale by s
            d_b = g * (dy2.T @ (x2 @ lora_a.T))  # (out×N)(N×r): no out×in product
            d_a = g * ((dy2 @ lora_b).T @ x2)  # (r×N)(N×in)
        else:
            d_a = torch.zeros_like(lora_a)
            d_b = torch.empty_like(lora_b)
            for start in range(0, weight.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                g = dy2[:, rows].T @ x2  # (c×in) slice of the dense weight gradient
                g *= weight[rows] != 0
                d_b[rows] = s * (g @ lora_a.T)
                d_a += s * (lora_b[rows].T @ g)
        d_bias = dy2.sum(0).to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, d_bias, d_a, d_b, None, None, None, None


def masked_merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
    """``(W + s·B·A) ⊙ (W ≠ 0)`` in W's dtype (the low-rank product in the adapter's dtype)."""
    delta = (lora_b @ lora_a).mul_(scale).to(weight.dtype)
    return torch.where(weight != 0, weight + delta, torch.zeros((), dtype=weight.dtype, device=weight.device))


class LorsAdapter(LayerAdapter):
    """Own A (r×in) and B (out×r); replaces the base forward by :class:`LorsLinearFunction`."""

    replaces_base = True
    not_low_rank = "its update (B·A) ⊙ M is masked, not low-rank"

    def __init__(self, target: Target, options: LorsOptions):
        super().__init__(target.in_features, target.out_features)
        if target.fan_in_fan_out:
            from shardtune.core.errors import RecipeError

            raise RecipeError(
                "adapter.method", f"lors supports nn.Linear layers only; {target.name} is a Conv1D"
            )
        self.rank = options.rank
        self.scale = lors_scale(options)
        self.grad_mode = options.grad_mode
        self.chunk = options.exact_chunk
        self.lora_A = nn.Parameter(torch.empty(options.rank, target.in_features))
        self.lora_B = nn.Parameter(torch.zeros(target.out_features, options.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        object.__setattr__(self, "_base", target.module)  # the frozen sparse layer (for the mask)

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B * self.scale

    def mask(self) -> torch.Tensor:
        """``M = (W ≠ 0)``; over a quantized base ``Q(W) ≠ 0``, which keeps every zero of a pruned W (the
        4-bit and 8-bit formats have an exact 0) and adds the entries that quantize to 0."""
        return dense_weight(self._base) != 0

    def delta_weight(self) -> torch.Tensor:
        """The masked update ``s·(B·A) ⊙ M`` (not low-rank): merge keeps every zero of W."""
        return (self.lora_B @ self.lora_A * self.scale) * self.mask()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight())

    def forward_full(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        quantized = base if is_quantized_linear(base) else None
        weight = base.weight if quantized is None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = LorsLinearFunction.apply(
                x,
                weight,
                base.bias,
                self.lora_A,
                self.lora_B,
                self.scale,
                self.grad_mode,
                self.chunk,
                quantized,
            )
        return y if quantized is None else y.to(x.dtype)  # Q(W) may be fp32 (int8) over a bf16 model


class Lors(AdapterMethod):
    name = "lors"
    Options = LorsOptions

    def build_layer(self, options: LorsOptions, target: Target, stores: nn.Module | None) -> LorsAdapter:
        return LorsAdapter(target, options)

    def export_info(self, options: LorsOptions, model: nn.Module) -> dict:
        return {"rank": options.rank, "scale": lors_scale(options), "masked": True}


@torch.no_grad()
def gradient_init(model: nn.Module, batches, options: LorsOptions) -> int:
    """LoRS init: A := top-r right singular vectors of the mean dense gradient of each target weight.

    ``batches`` yields model inputs with labels; returns the number of examples used. The dense
    gradient ``G = Σ dyᵀ·x`` (summed over the batches: what autograd would accumulate in ``W.grad``) is
    gathered by hooks on each target layer's input ``x`` and output gradient ``dy``, so the frozen W never
    needs a gradient of its own (a quantized W, bitsandbytes' integer codes, cannot have one).
    """
    layers = {n: m for n, m in adapted_layers(model).items() if isinstance(m.adapter, LorsAdapter)}
    grads: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args, out):
            x = args[0].detach()

            def add_gradient(dy: torch.Tensor) -> None:
                g = dy.reshape(-1, dy.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()
                grads[name] = grads[name] + g if name in grads else g

            if not out.requires_grad:  # the first target: nothing before it needs a gradient
                out.requires_grad_(True)
            out.register_hook(add_gradient)
            return out

        return hook

    handles = [layer.base_layer.register_forward_hook(capture(n)) for n, layer in layers.items()]
    seen = 0
    try:
        with torch.enable_grad(), adapter_disabled(model):
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                seen += batch["input_ids"].shape[0]
                if seen >= options.init_samples:
                    break
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():
        grad = grads.get(name)
        if grad is None:
            continue
        q = min(4 * options.rank, *grad.shape)
        _, _, v = torch.svd_lowrank(grad, q=q, niter=4)
        a = layer.adapter.lora_A
        top = v[:, : options.rank].T / options.init_gamma
        a.zero_()
        a[: top.shape[0]].copy_(top.to(a.dtype))
        layer.adapter.lora_B.zero_()
    return seen
