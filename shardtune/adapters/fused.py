"""The fused training layer: a frozen linear layer and its low-rank update in one autograd function.

While training without dropout, an adapted ``nn.Linear`` computes

    y = x·Wᵀ + bias + h·Bᵀ,      h = s·x·Aᵀ   (N×r, the small side)

or, for FOSSIL's block sum (:meth:`LayerAdapter.block_sum_shard`: ``A = P``, the 0/1 matrix that is
never built, ``B = Dᵀ``), ``h = P·x``. The backward, written out with ``g = ∂L/∂h = dy·B``:

    dB = dyᵀ·h       dA = s·gᵀ·x       dx = dy·W + s·g·A
                                       (FOSSIL: dD = hᵀ·dy,  dx = dy·W + (dy·Dᵀ)·P, a broadcast add)

The scale rides on the products (their ``alpha``), never as a pass of its own over an N×r tensor, and
the two input-gradient terms accumulate in one (N, in) buffer instead of two tensors and an add. Saved
for backward: the small ``h`` and the parameters, and ``x`` only where a gradient needs it (LoRA's
``dA``; a base weight that trains): FOSSIL keeps none of its (N, in) input. ``W`` and ``bias`` get
gradients only if they ask (a frozen base never does).

Under autocast the adapter's factors come in their own dtype (fp32 parameters) and are cast to the
compute dtype inside the function; their gradients go back in their own dtype, written so by the
product itself where the device can (CUDA: a bf16 product with an fp32 result, cuBLAS accumulating in
fp32 anyway), so no cast runs between a product and its parameter's gradient.

Measured and not kept (docs/benchmarks.md): running the layers that read one input (q/k/v, gate/up)
as one group, their down products stacked into one and their input gradients summed in place:
0.3 % of a CPU step, not worth its bookkeeping. Writing the update first and letting the base product
accumulate onto it (``addmm_`` with beta 1, so no pass of its own over ``y`` and ``dx``): less GPU
time in kernels, yet an H200 step 8 % slower (``lora (update first)`` in benchmarks/step_time.py).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# The floating dtypes autocast casts for a matmul (others, e.g. float64, are left alone).
_AUTOCASTS = (torch.float32, torch.float16, torch.bfloat16)
# Casts of trainable leaf tensors, as autocast caches them: a matrix shared by every layer (ShareLoRA's
# A) is cast once per forward, not once per layer. Weakly held: an entry lives while some layer's
# backward has it saved. Keyed by the parameter's storage, shape and version (an optimizer step bumps it).
_CASTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _autocast_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, reusing the copy made earlier in this step for a trainable leaf (a parameter);
    ``t`` itself when it has that dtype already (no call at all: this runs per layer and step)."""
    if t.dtype == dtype:
        return t
    if not (t.is_leaf and t.requires_grad) or torch.compiler.is_compiling():
        return t.to(dtype)
    key = (t.data_ptr(), t.shape, t._version, dtype, t.device)
    copy = _CASTS.get(key)
    if copy is None:
        copy = _CASTS[key] = t.to(dtype)
    return copy


def block_sum(flat: torch.Tensor, rank: int) -> torch.Tensor:
    """``P·x`` for (N, in) ``flat``: the blocks of length r summed, the last one zero-padded → (N, r)."""
    n_in = flat.shape[1]
    full = n_in // rank * rank
    s = flat[:, :full].reshape(flat.shape[0], -1, rank).sum(dim=1)
    if full < n_in:
        s[:, : n_in - full] += flat[:, full:]
    return s


def _add_block_sum_transposed(dx: torch.Tensor, ds: torch.Tensor) -> None:
    """``dx += ds·P`` in place: ``ds`` (N, r) added to every block of length r of ``dx`` (N, in)."""
    rank, n_in = ds.shape[1], dx.shape[1]
    full = n_in // rank * rank
    dx[:, :full].view(dx.shape[0], -1, rank).add_(ds.unsqueeze(1))
    if full < n_in:
        dx[:, full:] += ds[:, : n_in - full]


# Devices (by type and input dtype) whose matrix product can write its result in a wider dtype
# (``torch.mm(..., out_dtype=)``: CUDA's bf16/fp16 products with an fp32 result); probed once each.
_WIDE_PRODUCTS: dict[tuple[str, torch.dtype], bool] = {}


def _writes_wider(device: torch.device, dtype: torch.dtype) -> bool:
    if torch.compiler.is_compiling():  # no probing inside a traced region: the plain product there
        return False
    key = (device.type, dtype)
    if key not in _WIDE_PRODUCTS:
        try:
            probe = torch.ones(2, 2, dtype=dtype, device=device)
            _WIDE_PRODUCTS[key] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):  # no such kernel here (the CPU's), or no such argument
            _WIDE_PRODUCTS[key] = False
    return _WIDE_PRODUCTS[key]


def _scaled_product(m1: torch.Tensor, m2: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``alpha·m1·m2`` in one product (``alpha`` rides on the GEMM; no pass of its own)."""
    if alpha == 1.0:
        return torch.mm(m1, m2)
    out = torch.empty(m1.shape[0], m2.shape[1], dtype=m1.dtype, device=m1.device)
    return out.addmm_(m1, m2, beta=0, alpha=alpha)  # beta 0: what ``out`` held is never read


def _gradient_product(
    m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0
) -> torch.Tensor:
    """``alpha·m1·m2`` as a ``dtype`` tensor: a parameter's gradient in the parameter's own dtype."""
    if m1.dtype == dtype:
        return _scaled_product(m1, m2, alpha)
    if dtype == torch.float32 and _writes_wider(m1.device, m1.dtype):
        out = torch.mm(m1, m2, out_dtype=dtype)
    else:
        out = torch.mm(m1, m2).to(dtype)
    return out if alpha == 1.0 else out.mul_(alpha)  # the small (r, in) result


class _LowRankLinear(torch.autograd.Function):
    """The layer of the module docstring: ``apply(x, weight, bias, a, b, scale, block_rank)``, with ``x``,
    ``weight`` and ``bias`` in the compute dtype and ``a``, ``b`` in the adapter's own.
    ``block_rank`` 0: ``h = s·x·Aᵀ`` and ``b`` is B (out×r); r > 0: FOSSIL's block sum, ``a`` is None
    and ``b`` is the shard D (r×out)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, block_rank):
        flat = x.reshape(-1, x.shape[-1])
        ctx.a_dtype, ctx.b_dtype = None if a is None else a.dtype, b.dtype
        b = _autocast_copy(b, x.dtype)
        if block_rank:
            h = block_sum(flat, block_rank)
        else:
            a = _autocast_copy(a, x.dtype)
            h = _scaled_product(flat, a.t(), scale)
        y = torch.addmm(bias, flat, weight.t()) if bias is not None else torch.mm(flat, weight.t())
        y.addmm_(h, b if block_rank else b.t())
        keep_x = a is not None or weight.requires_grad
        ctx.save_for_backward(x if keep_x else None, weight, a, b, h)
        ctx.scale, ctx.block_rank, ctx.in_shape = scale, block_rank, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _, _ = ctx.needs_input_grad
        dy = dy.reshape(-1, dy.shape[-1])
        flat = x.reshape(-1, x.shape[-1]) if x is not None else None
        dx = dw = dbias = da = db = None
        if ctx.block_rank:  # dD = hᵀ·dy;  dx = dy·W + (dy·Dᵀ)·P
            if need_b:
                db = _gradient_product(h.t(), dy, ctx.b_dtype)
            if need_x:
                dx = torch.mm(dy, weight)
                _add_block_sum_transposed(dx, torch.mm(dy, b.t()))
        else:  # g = dy·B;  dB = dyᵀ·h;  dA = s·gᵀ·x;  dx = dy·W + s·g·A
            g = torch.mm(dy, b) if need_x or need_a else None
            if need_b:
                db = _gradient_product(dy.t(), h, ctx.b_dtype)
            if need_a:
                da = _gradient_product(g.t(), flat, ctx.a_dtype, ctx.scale)
            if need_x:
                dx = torch.mm(dy, weight).addmm_(g, a, alpha=ctx.scale)
        if need_w:
            dw = torch.mm(dy.t(), flat)
        if need_bias:
            dbias = dy.sum(0)
        return None if dx is None else dx.view(ctx.in_shape), dw, dbias, da, db, None, None


def fused_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` (an :class:`AdaptedLinear`) by :class:`_LowRankLinear` where it applies: a plain
    ``nn.Linear`` base, gradients being recorded and an adapter that offers one of its two forms
    (:meth:`LayerAdapter.low_rank_factors`, :meth:`LayerAdapter.block_sum_shard`); outside autocast every
    operand of one dtype. Under autocast every operand is cast to the autocast dtype first, as autocast
    casts ``F.linear``'s (a bf16 base with fp32 adapters trains in bf16, the fp32 parameters receiving
    their gradients through the cast). None elsewhere (the caller takes the general path)."""
    base = layer.base_layer
    if type(base) is not nn.Linear or not torch.is_grad_enabled():
        return None
    parts = layer.adapter.low_rank_factors()
    if parts is not None:
        a, b, scale = parts
        block_rank = 0
    else:
        b = layer.adapter.block_sum_shard()
        if b is None:
            return None
        a, scale, block_rank = None, 1.0, b.shape[0]
    operands = (x, base.weight, base.bias, a, b)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if not all(t is None or t.dtype in _AUTOCASTS for t in operands):
            return None
        # the factors are cast inside (their gradients come back in their own dtype, with no cast between)
        x, weight, bias = (None if t is None else _autocast_copy(t, dtype) for t in operands[:3])
        if torch.compiler.is_compiling():
            with torch.autocast(device_type, enabled=False):
                return _LowRankLinear.apply(x, weight, bias, a, b, scale, block_rank)
        # eagerly, autocast switched off and on again directly: a third of the context manager's overhead,
        # which a step pays once per adapted layer (steps of narrow models wait on the CPU)
        torch.set_autocast_enabled(device_type, False)
        try:
            return _LowRankLinear.apply(x, weight, bias, a, b, scale, block_rank)
        finally:
            torch.set_autocast_enabled(device_type, True)
    if any(t is not None and t.dtype != x.dtype for t in operands):
        return None
    return _LowRankLinear.apply(x, base.weight, base.bias, a, b, scale, block_rank)
