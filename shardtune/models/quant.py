"""A quantized frozen base (QLoRA-style): bitsandbytes NF4 / FP4 / INT8 linear layers under the adapters.

``model.quantize`` loads the base through transformers' ``BitsAndBytesConfig``: every linear layer but
the output head becomes a bitsandbytes ``Linear4bit`` (``nf4``, ``fp4``) or ``Linear8bitLt`` (``int8``)
holding codes and scales instead of ``W``; embeddings, norms and the head stay in ``model.dtype``. The
adapter wraps such a layer exactly as it wraps ``nn.Linear`` (both are ``nn.Linear`` subclasses with
``in_features``/``out_features``), computes in its own dtype and never touches the codes:

    y = Q(W)·x + Δ(x),       Q(W) = dequantize(quantize(W))  (frozen; no dense copy is kept)

The formats, for ``W ∈ R^{out×in}`` with ``n = out·in`` entries taken row-major:

* ``nf4`` — blocks of 64 consecutive entries; block ``k`` keeps ``m_k = max |W_i|`` and per entry the
  index of the nearest of 16 NormalFloat levels ``c_j`` (quantiles of N(0, 1) scaled to [−1, 1], with an
  exact 0): ``Q(W)_i = c_{q_i}·m_k``. Zeros stay zeros (a pruned base keeps its pattern; entries with
  ``|W_i| < ~0.04·m_k`` become zeros too).
* ``fp4`` — the same with the 16 values of a 4-bit float (sign, 2 exponent bits, 1 mantissa bit).
* ``double_quant`` (4-bit only) — the scales ``m_k`` themselves quantized to 8 bits in blocks of 256,
  minus their mean, with one fp32 scale per block (QLoRA's "double quantization").
* ``int8`` (LLM.int8()) — one scale per output row, ``s_o = max_i |W_oi|``: ``q = round(127·W/s_o)``,
  ``Q(W) = q·s_o/127``.

Bytes held per quantized layer (what :func:`base_memory` measures and :meth:`shardtune.inspection.layout.ModelLayout.base_memory`
computes from a config alone; ``b = ⌈n/64⌉`` blocks):

    4-bit:  ⌈n/2⌉ codes + 16·4 (levels) + 4·b (fp32 scales)                         ≈ 4.5 bits/weight
            double quant: ⌈n/2⌉ + 64 + b (8-bit scales) + 4·⌈b/256⌉ + 256·4 + 4      ≈ 4.13 bits/weight
    int8:   n codes + 4·out (fp32 row scales)                                         ≈ 8 bits/weight

Methods whose forward needs the dense weight (LoRS: ``(W + s·B·A) ⊙ M``; FOSSIL ``bat``:
``ΔW = (W + I)·D``) call :func:`dense_weight` inside their autograd function, once in forward and once
in backward, and keep only the codes: one layer's dense ``Q(W)`` exists at a time.

CPU notes. bitsandbytes 0.50's CPU dequantization kernel (what a 4-bit layer computes with on the CPU)
takes block ``k``'s scale for entry ``(o, i)`` as ``k = o·⌊in/64⌋ + ⌊i/64⌋`` instead of
``⌊(o·in + i)/64⌋``: when ``in`` is not a multiple of 64 the blocks that straddle two rows get a
neighbour's scale. ``Q(W)`` is then further from W than the format allows, but forward, backward,
:func:`dense_weight` and merge all use that same kernel, so the adapted model and "dequantized base +
adapter" still agree exactly; :func:`prepare_loaded` logs which layers are affected (real models'
sizes are multiples of 64; the tiny test models' 176-wide MLP is not). bitsandbytes' CPU fast path for inference (on processors with AVX512-BF16) repacks a 4-bit
weight in place, computes in bf16 whatever ``compute_dtype`` says, fails on layers whose ``out`` is not a
multiple of 32, and has no backward; :func:`prepare_loaded` turns it off, so a layer computes
``x·Q(W)ᵀ`` in ``compute_dtype`` in training and in evaluation alike.

Nothing here imports bitsandbytes until a quantized model is asked for: a missing package is one
line, ``pip install shardtune[quant]``.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from shardtune.core.errors import RecipeError, first_line

QUANT_TYPES = ("nf4", "fp4", "int8")
INSTALL_HINT = "pip install shardtune[quant]"
# recipe dtype names, long and short
DTYPE_NAMES = {
    **{"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16},
    **{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16},
}
BLOCK = 64  # entries per 4-bit block (bitsandbytes' default, what transformers uses)
DOUBLE_QUANT_BLOCK = 256  # 8-bit scales per block of the double quantization


@dataclass(frozen=True)
class Quantization:
    """How the frozen base is quantized: ``kind`` nf4 | fp4 | int8; ``double_quant`` and
    ``compute_dtype`` (the dtype a 4-bit layer dequantizes into and multiplies in) for 4-bit only."""

    kind: str
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32

    @property
    def format(self) -> str:
        """The storage format alone, as :class:`BaseMemory` names it: ``nf4 + double quant``, ``int8``."""
        return self.kind + (" + double quant" if self.double_quant and self.kind != "int8" else "")

    def describe(self) -> str:
        if self.kind == "int8":
            return "int8"
        dtype = str(self.compute_dtype).removeprefix("torch.")
        return f"{self.format} (compute in {dtype})"


def quantization_of(section) -> Quantization | None:
    """The :class:`Quantization` a recipe's ``model`` section asks for (None: an unquantized base).

    Reads ``quantize``, ``double_quant``, ``compute_dtype`` (``auto``: ``model.dtype``) and ``dtype``.
    """
    kind = getattr(section, "quantize", None)
    if kind is None:
        return None
    compute = section.compute_dtype if section.compute_dtype != "auto" else section.dtype
    return Quantization(kind, bool(section.double_quant), DTYPE_NAMES[compute])


def require_bitsandbytes(kind: str = "a quantized base"):
    """``import bitsandbytes``, or one line that names the extra to install. (Its CPU backend logs, on
    import, that an optional faster kernel package is missing: that line is held back.)"""
    optional_kernel_notice = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = optional_kernel_notice.level
    optional_kernel_notice.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise RecipeError(
            "model.quantize", f"{kind} needs the bitsandbytes package, which is not installed: {INSTALL_HINT}"
        ) from None
    except (OSError, RuntimeError) as e:  # installed, but its native library does not load here
        first = first_line(e)
        raise RecipeError("model.quantize", f"{kind}: bitsandbytes cannot be loaded ({first})") from None
    finally:
        optional_kernel_notice.setLevel(level)
    return bitsandbytes


def bnb_config(quantization: Quantization):
    """transformers' ``BitsAndBytesConfig`` for ``quantization``."""
    from transformers import BitsAndBytesConfig

    if quantization.kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.kind,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=quantization.compute_dtype,
    )


def default_device() -> torch.device:
    """Where a quantized base is loaded when the caller names no device: the GPU if there is one."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def load_kwargs(quantization: Quantization, device: torch.device | str | None = None) -> dict:
    """Extra ``from_pretrained`` arguments that load the base quantized, whole on ``device`` (bitsandbytes
    quantizes while it places the weights, so a quantized model is loaded where it will run)."""
    require_bitsandbytes(quantization.kind)
    device = torch.device(device) if device is not None else default_device()
    return {"quantization_config": bnb_config(quantization), "device_map": {"": device}}


def quantize_built_model(
    model: nn.Module, quantization: Quantization, device: torch.device | str | None = None
) -> nn.Module:
    """A model built in memory (the tiny aliases), loaded again through the same quantized
    ``from_pretrained`` path as a model directory, from its own state dict."""
    kwargs = load_kwargs(quantization, device)
    quantized = type(model).from_pretrained(
        None, config=model.config, state_dict=model.state_dict(), dtype=model.dtype, **kwargs
    )
    return prepare_loaded(quantized)


def prepare_loaded(model: nn.Module) -> nn.Module:
    """Settle a freshly loaded model's quantized layers: bitsandbytes' CPU inference fast path off
    (module docstring). A model without quantized layers is returned as it is."""
    straddling = []
    for name, module in quantized_layers(model).items():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if (
            layer_format(module) != "int8"
            and module.weight.device.type == "cpu"
            and module.in_features % BLOCK
        ):
            straddling.append(name)
    if straddling:
        logging.getLogger("shardtune").warning(
            "%d quantized layers (e.g. %s) have in_features not a multiple of %d: bitsandbytes' CPU kernel "
            "dequantizes their blocks that straddle two rows with a neighbouring block's scale (training and "
            "merge agree with it; the GPU kernels do not do this)",
            len(straddling),
            straddling[0],
            BLOCK,
        )
    return model


# ---------------------------------------------------------------------------------------------------
# Quantized layers: detection and dequantization


def _bnb_layer_classes() -> tuple[type, ...]:
    bnb = sys.modules.get("bitsandbytes")  # never imported here: no bitsandbytes, no quantized layer
    if bnb is None:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    classes = _bnb_layer_classes()
    return bool(classes) and isinstance(module, classes)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear layer of ``model`` by its module path."""
    classes = _bnb_layer_classes()
    if not classes:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, classes)}


def layer_format(module: nn.Module) -> str | None:
    """``nf4``, ``fp4`` or ``int8`` for a quantized layer, None for any other."""
    if not is_quantized_linear(module):
        return None
    state = getattr(module.weight, "quant_state", None)
    return state.quant_type if state is not None else "int8"


def logical_numel(parameter: torch.Tensor) -> int:
    """Entries of the weight a parameter stands for: ``out·in`` for a 4-bit one (which holds two codes a
    byte), the whole tensor's for one DeepSpeed ZeRO-3 partitioned (``ds_numel``), ``numel`` for any other."""
    state = getattr(parameter, "quant_state", None)
    if state is not None:
        return math.prod(state.shape)
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def dense_weight(module: nn.Module) -> torch.Tensor:
    """``W`` (out, in) of a linear layer: the weight itself for ``nn.Linear``; for a quantized layer its
    dequantized ``Q(W)``, a new tensor (4-bit: in the dtype it was quantized from; int8: fp32)."""
    if not is_quantized_linear(module):
        return module.weight
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "a 4-bit layer was repacked by bitsandbytes' CPU fast path (see prepare_loaded)"
            )
        return bnbf.dequantize_4bit(weight.data, state)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB  # int8
    return bnbf.int8_vectorwise_dequant(weight.data, scales)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized layer by an ``nn.Linear`` holding ``Q(W)`` in ``dtype`` and drop the
    quantization config: a plain model that computes what the quantized one did (for merge)."""
    if not quantized_layers(model):
        return model
    model = model.dequantize(dtype=dtype)  # transformers: the quantizer's own inverse, config removed
    model.to(dtype)
    return model


def is_prequantized(config) -> bool:
    """A model directory whose weights are stored quantized (its config has a quantization_config):
    the original unquantized weights are not there."""
    return getattr(config, "quantization_config", None) is not None


# ---------------------------------------------------------------------------------------------------
# Memory: bytes of the base, measured on a model or computed from a config


@dataclass
class BaseMemory:
    """Bytes of the frozen base's parameters: as held (quantized layers as codes + scales) and as they
    would be with every layer in ``dtype``; ``quantized_layers`` counts the layers held quantized."""

    stored_bytes: int
    unquantized_bytes: int
    dtype: str
    quantized_layers: int = 0
    format: str | None = None  # e.g. "nf4 + double quant"

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        plain = f"{human_bytes(self.unquantized_bytes)} in {self.dtype}"
        if not self.quantized_layers:
            return f"base weights: {plain}"
        ratio = self.unquantized_bytes / max(self.stored_bytes, 1)
        return (
            f"base weights: {human_bytes(self.stored_bytes)} with {self.quantized_layers} linear layers in "
            f"{self.format} ({plain} unquantized, {ratio:.2f}× more)"
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The scales and levels a quantized layer keeps beside its codes."""
    state = getattr(module.weight, "quant_state", None)
    if state is None:  # int8: one fp32 scale per output row
        scales = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        return [scales]
    found = [state.absmax, state.code]
    if state.nested:
        found += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in found if isinstance(t, torch.Tensor)]


def _format_of(module: nn.Module) -> str:
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return "int8"
    return state.quant_type + (" + double quant" if state.nested else "")


def base_memory(model: nn.Module, dtype: torch.dtype, leave_out=()) -> BaseMemory:
    """Bytes of ``model``'s base parameters, measured tensor by tensor (each storage once); ``leave_out``:
    parameters not to count (the adapter's). The unquantized figure counts each quantized layer's
    ``out·in`` weights, and every other floating-point parameter, in ``dtype``."""
    layers = quantized_layers(model)
    quantized_weights = {id(m.weight): m for m in layers.values()}
    skip = {id(p) for p in leave_out}
    stored = unquantized = 0
    for p in model.parameters():  # tied parameters once
        if id(p) in skip:
            continue
        layer = quantized_weights.get(id(p))
        if layer is None:
            size = p.numel() * p.element_size()
            stored += size
            unquantized += p.numel() * _dtype_bytes(dtype) if p.is_floating_point() else size
            continue
        stored += p.numel() * p.element_size()
        stored += sum(t.numel() * t.element_size() for t in _quant_state_tensors(layer))
        unquantized += layer.in_features * layer.out_features * _dtype_bytes(dtype)
    formats = sorted({_format_of(m) for m in layers.values()})
    return BaseMemory(
        stored,
        unquantized,
        str(dtype).removeprefix("torch."),
        len(layers),
        ", ".join(formats) if formats else None,
    )


def quantized_layer_bytes(out_features: int, in_features: int, kind: str, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one quantized ``out×in`` weight (module docstring)."""
    n = out_features * in_features
    if kind == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / BLOCK)
    codes = math.ceil(n / 2) + 16 * 4  # two 4-bit codes a byte + the 16 fp32 levels
    if not double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) + 256 * 4 + 4


def config_dtype(config) -> torch.dtype:
    """The dtype a model's weights are stored in (its config's ``dtype``), float32 when it says none."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPE_NAMES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def check_strategy(quantized: bool, sharded: bool) -> None:
    """FSDP cannot shard bitsandbytes' packed parameters (their codes are uint8 tensors with a quantization
    state beside them, which FSDP2's flat shards cannot carry)."""
    if quantized and sharded:
        raise RecipeError(
            "train.strategy",
            "fsdp cannot shard a quantized base (bitsandbytes keeps codes and scales beside each weight); "
            "use strategy: ddp, which keeps one quantized copy per process",
        )
