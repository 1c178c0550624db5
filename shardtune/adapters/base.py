"""The spine every adapter method is built on.

Every method yields, for each adapted linear layer ``l`` (``W_l ∈ R^{out×in}``, PyTorch layout),
low-rank factors

    A_l ∈ R^{r×in},   B_l ∈ R^{out×r},   ΔW_l = B_l · A_l            (scale folded into B_l)

that are *views of a parameter store*: the layer's own matrices (LoRA), a replicated shard
(FOSSIL), a cross-layer matrix (ShareLoRA), shard pools (MoS). The adapted layer computes

    y = base(x) + Δ(x),    Δ(x) = x · ΔW_lᵀ = (x · A_lᵀ) · B_lᵀ

and everything that only needs ``(A_l, B_l)`` — merge, export as LoRA, parameter counting,
routing inspection — is written once here, on top of :meth:`LayerAdapter.factors`. A method may
override :meth:`LayerAdapter.delta` with a fast path that never materialises a factor (FOSSIL
never builds its 0/1 matrix ``A``).

Stores shared between layers live at the model root (``model.shardtune_stores``) so that DDP/FSDP
see each parameter exactly once; a layer keeps an *unregistered* reference to them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from torch import nn

from shardtune.adapters.fused import fused_forward
from shardtune.core.errors import BadInput
from shardtune.models.dtypes import DTYPES  # noqa: F401 - re-exported: adapters name dtypes by it
from shardtune.models.quant import is_quantized_linear

STORES_ATTR = "shardtune_stores"

DTypeName = Literal["fp32", "bf16", "fp16", "auto"]


# The seeds torch.Generator.manual_seed takes (a random routing, projection or task draw).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def dtype_synonyms(value):
    """Long torch names (``float32``, ``bfloat16``, ``float16``) as synonyms of fp32, bf16, fp16."""
    from shardtune.core.catalog import DTYPE_SYNONYMS

    return DTYPE_SYNONYMS.get(value.strip().lower(), value) if isinstance(value, str) else value


class AdapterOptions(BaseModel):
    """Options every method shares. Methods subclass this and add their own keys."""

    # strict: `rank: true` or `rank: "8"` are mistakes, not 1 and 8; numbers must be finite.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    method: str
    targets: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description=(
            "Which linear layers get an adapter. A list matches module names exactly or by their last "
            "components (`q_proj` matches `model.layers.0.self_attn.q_proj`); a string is a regular "
            "expression that must match the whole module name; `all-linear` selects every linear layer "
            "except the output head."
        ),
    )
    exclude: list[str] = Field(
        default_factory=list, description="Module names (same matching as a `targets` list) to leave out."
    )

    @field_validator("targets")
    @classmethod
    def _targets_regex_compiles(cls, targets):
        """A string of targets is a regular expression: one that does not compile is refused with the
        recipe (``--dry-run`` included), not when the model is built."""
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"invalid regular expression {targets!r}: {e}") from None
        return targets

    init_from: str | None = Field(
        None,
        description="Start from the adapter weights in this directory instead of the method's init: a "
        "shardtune run or checkpoint of the same method and options, or (method `lora`) a PEFT LoRA adapter "
        "(adapter_config.json + adapter_model.safetensors) of the same rank, alpha and layers.",
    )
    dtype: Annotated[DTypeName, BeforeValidator(dtype_synonyms)] = Field(
        "fp32",
        description="dtype of the adapter parameters; `auto` uses the base model's dtype. fp32 is the safe default.",
    )


@dataclass
class Target:
    """One linear layer chosen for adaptation."""

    name: str  # module path inside the model, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module  # nn.Linear or transformers' Conv1D
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # True for GPT-2's Conv1D, whose weight is stored (in, out)
    kind: str = ""  # projection type shared across layers, e.g. "q_proj" (or "attn_c_proj" when ambiguous)


class LayerAdapter(nn.Module):
    """Per-layer view of a method's parameter store.

    Subclasses implement :meth:`factors` (and may override :meth:`delta`). ``dropout`` is applied
    to the adapter's input, as in LoRA and MiSS. A method whose update is not additive on the
    output (LoRS masks the merged weight) sets ``replaces_base`` and implements :meth:`forward_full`.
    """

    replaces_base = False
    # Why this adapter's update is not a fixed low-rank ``B·A`` (so `shardtune export --format peft`
    # refuses it with this reason); ``None`` for every low-rank method.
    not_low_rank: str | None = None

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the adapter's parameters (what its input is cast to outside autocast)."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, B)`` with ``A`` of shape (r, in), ``B`` of shape (out, r), ``ΔW = B @ A``."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``Δ(x) = dropout(x) · Aᵀ · Bᵀ`` — methods with a cheaper form override this."""
        a, b = self.factors()
        return F.linear(F.linear(self.dropout(x), a), b)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, s)`` with ``Δ(x) = s·x·Aᵀ·Bᵀ`` when no dropout applies, for the fused layer
        (:mod:`shardtune.adapters.fused`); None (the default) for updates of another form, or with dropout."""
        return None

    def block_sum_shard(self) -> torch.Tensor | None:
        """FOSSIL's form for the fused layer: the shard ``D`` (r × out) with ``Δ(x) = (P·x)·D``, ``P·x``
        the block sum of length r (``A = P`` never built); None (the default) for every other update,
        or with dropout."""
        return None

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + Δ(x)``: the base layer's output plus the update. Methods whose update is
        ``h·Bᵀ`` with a small ``h = dropout(x)·Aᵀ`` (N×r) override this with :func:`add_low_rank`."""
        return out + self.delta(x).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Dense ``ΔW = B · A`` (out, in). Used by merge; never in the training forward."""
        a, b = self.factors()
        return b @ a

    def merged_weight(self, weight: torch.Tensor, unmerge: bool = False) -> torch.Tensor:
        """The fp32 base weight ``W`` (out, in) with the update folded in (``W + ΔW``), or taken out of a
        merged one (``unmerge``). Additive by default; a method whose ΔW depends on W overrides it."""
        delta = self.delta_weight().float()
        return weight - delta if unmerge else weight + delta

    def forward_full(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """The whole layer's output, for methods with ``replaces_base``."""
        raise NotImplementedError

    def routing(self) -> dict:
        """Where each factor's rank vectors come from, for `shardtune routing`.

        ``{"A": {"pool": name | "own" | "fixed", "shards": [...], "private": [...]}, "B": {...}}``;
        ``own`` means a store of this layer alone. The default: both factors are the layer's own.
        """
        a, b = self.factors()
        return {
            m: {"pool": "own", "shards": list(range(n)), "private": [True] * n}
            for m, n in (("A", a.shape[0]), ("B", b.shape[1]))
        }


def add_low_rank(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out + h·bᵀ`` for ``h`` (…, r) and ``b`` (out, r): one ``addmm`` that accumulates into the base
    output, so the update never exists as an (N, out) tensor of its own and no separate add runs (in
    backward the base output's gradient passes through unchanged). Any scale belongs in ``h``, the
    small side. With mixed dtypes outside autocast (a bf16 base, an fp32 adapter) the update is
    computed in the adapter's dtype and added. (In place, ``addmm_`` on the 3-D output's 2-D view, was
    measured slower: autograd replays the view in backward.) Training without dropout takes the whole
    layer through :mod:`shardtune.adapters.fused` instead (under autocast too)."""
    if (out.dtype == h.dtype == b.dtype) or torch.is_autocast_enabled(out.device.type):
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
        return flat.view(out.shape)
    return out + F.linear(h, b).to(out.dtype)


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus its adapter: ``y = base(x) + Δ(x)``.

    Works for ``nn.Linear``, for GPT-2's ``Conv1D`` (weight stored transposed) and for bitsandbytes'
    quantized ``Linear4bit`` / ``Linear8bitLt`` (``model.quantize``; see :mod:`shardtune.models.quant`): the
    adapter is always expressed in the (out, in) orientation; only :meth:`merge` cares about the layout
    (and refuses a quantized layer: merge dequantizes the base first).

    States: ``merged`` (ΔW folded into the base weight; merging twice is a no-op, unmerge subtracts it
    again) and ``enabled``. A disabled layer always computes the base model's output, merged or not:
    a merged one subtracts ``x·ΔWᵀ`` from the merged weight's output (in fp32).
    """

    def __init__(self, base_layer: nn.Module, adapter: LayerAdapter, fan_in_fan_out: bool):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.fan_in_fan_out = fan_in_fan_out
        self.enabled = True
        self.merged = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            out = self.base_layer(x, *args, **kwargs)
            if not self.enabled:
                # ΔW is folded into the weight; disabled means the base model's output, so take it out
                # again (the weights are left as they are: disabling never changes the merge state).
                out = out - F.linear(x.float(), self.adapter.delta_weight().float()).to(out.dtype)
            return out
        if self.enabled and self.adapter.replaces_base:
            return self.adapter.forward_full(x, self.base_layer)
        if self.enabled and not args and not kwargs:
            fused = fused_forward(self, x)
            if fused is not None:
                return fused
        out = self.base_layer(x, *args, **kwargs)
        if self.enabled:
            # Under autocast the matmuls pick their dtype themselves; otherwise run the adapter in its
            # own dtype (fp32 by default, also over a bf16 base) and return to the base's dtype.
            if not torch.is_autocast_enabled(x.device.type):
                x = x.to(self.adapter.dtype)
            out = self.adapter.add_delta(out, x)
        return out

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        if is_quantized_linear(self.base_layer):
            raise BadInput(
                "merge: ΔW cannot be folded into a quantized layer (its codes would be quantized again); "
                "`shardtune merge` dequantizes the base first"
            )
        weight = self.base_layer.weight
        w = weight.float().T if self.fan_in_fan_out else weight.float()
        w = self.adapter.merged_weight(w, unmerge=sign < 0)
        weight.copy_((w.T if self.fan_in_fan_out else w).to(weight.dtype))

    def merge(self) -> None:
        """Fold ``ΔW`` into the base weight (computed in fp32, stored in the base dtype)."""
        if not self.merged:
            self._add_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_delta(-1.0)
            self.merged = False


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every adapted layer of ``model`` by its module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in adapted_layers(model).values():
        layer.enabled = enabled


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the frozen base model: ``with adapter_disabled(model): base_logits = model(x).logits``."""
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        set_adapter_enabled(model, True)


def parameter_role(name: str) -> str:
    """What an adapter parameter is, from the last part of its name: ``A`` (lora_A…, A_<kind> of a
    cross-layer store), ``B`` (likewise), ``bank`` (VB-LoRA's vectors), ``logits`` (VB-LoRA's mixtures),
    ``shard`` (FOSSIL) or ``scale`` (the vectors of VeRA and Tied-LoRA)."""
    last = name.rsplit(".", 1)[-1]
    if last.startswith(("lora_A", "A_")):
        return "A"
    if last.startswith(("lora_B", "B_")):
        return "B"
    if last.startswith("logits"):
        return "logits"
    if last in ("bank", "shard"):
        return last
    return "scale"


class AdapterMethod:
    """A registered method: its recipe options and how it builds stores and layer adapters.

    Subclasses set ``name``, ``Options`` and implement :meth:`build_layer`; methods with stores
    shared between layers also implement :meth:`build_stores`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[AdapterOptions]]
    summary: ClassVar[str] = ""
    # Options that are ranks of the layers' updates: each must fit every target (largest_rank).
    rank_options: ClassVar[tuple[str, ...]] = ("rank",)
    # The integer option that scales the trainable parameters (`shardtune compare --budgets` sets it).
    budget_option: ClassVar[str] = "rank"
    # Learning rates by parameter role (:func:`parameter_role`) as multiples of ``train.lr``, where the
    # method's paper prescribes them; ``train.param_groups`` overrides them.
    lr_scales: ClassVar[dict[str, float]] = {}

    def resolve(self, options: AdapterOptions, targets: list[Target]) -> None:
        """Fill options left unset to be chosen from the targets (in place: the run records them)."""

    def check(self, options: AdapterOptions, targets: list[Target]) -> None:
        """Raise :class:`shardtune.core.errors.RecipeError` if the options cannot work on these targets."""

    def largest_rank(self, options: AdapterOptions, target: Target) -> int:
        """The largest ``adapter.rank`` that fits ``target``: a rank-r update of an out×in weight
        needs r ≤ min(in, out); beyond it a method trains more than the weight has entries."""
        return min(target.in_features, target.out_features)

    def build_stores(self, options: AdapterOptions, targets: list[Target]) -> nn.Module | None:
        """Parameters shared between layers; registered once at the model root."""
        return None

    def build_layer(self, options: AdapterOptions, target: Target, stores: nn.Module | None) -> LayerAdapter:
        raise NotImplementedError

    def export_info(self, options: AdapterOptions, model: nn.Module) -> dict:
        """Extra method facts written into adapter.json: the rank and scale the layers of ``model`` use."""
        return {}
