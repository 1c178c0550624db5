"""MoS — Mixture of Shards (Wang et al., arXiv 2410.00938, ICLR 2025): LoRA factors routed out of global shard pools.

Notation: per-layer rank ``r`` (``rank``), equivalent rank ``R`` (``equivalent_rank``: the trainable
budget equals LoRA of rank R), private rank ``p`` (``private_rank``), shards per vector ``l``
(``shards_per_vector``), ``L_t`` = number of adapted layers of projection type ``t``.

Pools (inter-layer sharing). For every projection type ``t`` (q_proj, k_proj, …) there is one
A-pool and one B-pool, shared by all layers of that type and held once at the model root:

    P^A_t ∈ R^{N_t × d_in/l},   P^B_t ∈ R^{N_t × d_out/l},   N_t = R·L_t·l shards each

The first ``N_pub = (R−p)·L_t·l`` shards are public; the rest are split into ``L_t`` private blocks of
``p·l`` shards, block ``k`` owned by layer ``k`` alone (shard privatization).

Routing (fixed, drawn once from ``routing_seed``, saved with the adapter — there is no learned
router). For layer ``k`` of type ``t``:

    I^A_k = perm_A(N_pub)[: (r−p)·l] ++ [N_pub + k·p·l, …, N_pub + (k+1)·p·l − 1]     (subset selection)
    I^B_k = perm_B(N_pub)[: (r−p)·l] ++ (same private range)    perm_B independent of perm_A (pair dissociation)

Assembly (intra-layer sharing; vector sharding): rank vector ``j`` is the concatenation of the
``l`` shards ``I[j·l], …, I[j·l+l−1]``:

    A_k[j, :] = [P^A_t[I^A_k[j·l]] | … | P^A_t[I^A_k[j·l+l−1]]]  ∈ R^{d_in}      → A_k ∈ R^{r×d_in}
    B_k[:, j] = [P^B_t[I^B_k[j·l]] ; … ; P^B_t[I^B_k[j·l+l−1]]]  ∈ R^{d_out}     → B_k ∈ R^{d_out×r}
    y = W·x + (α/r) · B_k · A_k · dropout(x)

so the private shards form the last ``p`` rank vectors. In code both gathers are one
``index_select`` + ``reshape`` (no Python loop over shards). Init as the authors': A-pools
Kaiming-uniform with fan = d_in, i.e. ``U(−1/√d_in, 1/√d_in)``; B-pools zero (ΔW = 0 at step 0).

Trainable parameters: ``Σ_t R·L_t·(d_in^t + d_out^t)`` — exactly LoRA of rank R, whatever r, p, l.

Ablations (each strategy can be switched off, for the paper's studies):
``subset_selection: false`` — every layer uses all public shards in pool order (per-layer rank
becomes ``(R−p)·L_t + p``); ``pair_dissociation: false`` — B uses A's public indices;
``shards_per_vector: 1`` — no vector sharding; ``private_rank: 0`` — no privatization.
``private_rank = R = rank`` is plain LoRA of rank R.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from shardtune.adapters.base import (
    SEED_MAX,
    SEED_MIN,
    AdapterMethod,
    AdapterOptions,
    LayerAdapter,
    Target,
    adapted_layers,
    add_low_rank,
)
from shardtune.core.errors import RecipeError


class MosOptions(AdapterOptions):
    method: Literal["mos"] = "mos"
    rank: PositiveInt = Field(8, description="r: rank of each layer's assembled ΔW = B·A.")
    equivalent_rank: PositiveInt | None = Field(
        None,
        description="R: trainable parameters equal those of LoRA with this rank (pool size R·L·l shards). "
        "Unset: 2 (the paper's budget), or the least R whose pools hold rank r on a shallow model "
        "(R = p + ⌈(r−p)/L⌉); the run records the value used.",
    )
    private_rank: int = Field(
        1, ge=0, description="p: rank vectors per layer built from its own private shards."
    )
    shards_per_vector: PositiveInt = Field(
        2, description="l: each rank vector is l shards (vector sharding; 1 switches it off)."
    )
    subset_selection: bool = Field(
        True, description="Each layer routes r−p public vectors (false: all of them)."
    )
    pair_dissociation: bool = Field(True, description="A and B draw their public shards independently.")
    alpha: float = Field(16.0, gt=0, description="α: the update is scaled by α/r.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the adapter's input (the paper uses 0.1)."
    )
    routing_seed: int = Field(
        0, ge=SEED_MIN, le=SEED_MAX, description="Seed of the fixed random routing (saved with the adapter)."
    )


class ShardPools(nn.Module):
    """The global pools of every projection type: ``A_<type>`` (N × d_in/l) and ``B_<type>`` (N × d_out/l).

    Per-step assembly (``assemble_per_step``, on by default): while training, every layer's factors of
    a type are gathered by one ``index_select`` per pool at the start of the model's forward
    (:meth:`assemble`, a forward pre-hook at the model root) rather than one per layer, so that a step
    launches 2 gathers per type instead of 2·L_t, and backward scatters each pool's gradient once
    (one ``stack`` of the layers' gradients, one ``index_add``). The values are the same gathers: the
    assembled ``(A_k, B_k)`` of layer ``k`` is exactly what :meth:`MosAdapter.gathered` computes. They
    are dropped when the forward ends (:meth:`release`; kept for the recomputation under gradient
    checkpointing), and a layer uses them only while the pools are unchanged since (their version
    counters), so a forward after an optimizer step without the hook, or any merge or export, gathers
    afresh.
    """

    def __init__(self):
        super().__init__()
        self.pools = nn.ParameterDict()
        self.routes: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # target → (I^A, I^B, rank)
        self.assemble_per_step = True
        self.members: dict[str, list[MosAdapter]] = {}  # type → its layers, in pool-block order
        self._versions: dict[str, tuple[int, int]] | None = None  # type → its pools' versions at assembly

    def pool(self, matrix: str, kind: str) -> nn.Parameter:
        return self.pools[f"{matrix}_{kind}"]

    def assemble(self) -> None:
        """Gather every layer's ``(A_k, B_k)`` of each type at once, for this step's forward (and the
        recomputation that gradient checkpointing runs in backward). Only while gradients are recorded,
        into trainable pools that are whole tensors; otherwise each layer gathers for itself. (Under
        FSDP the root unit's pre-forward hook, registered after this one but run first, has already
        all-gathered the pools; a pool still sharded, a DTensor, would be left to the layers.)"""
        pools = list(self.pools.values())
        training = (
            self.assemble_per_step
            and torch.is_grad_enabled()
            # a sharded pool (an FSDP2 DTensor) is no plain nn.Parameter
            and all(p.requires_grad and type(p) is nn.Parameter for p in pools)
        )
        for kind, layers in self.members.items():
            if not training:
                for layer in layers:
                    layer.step_factors = None
                continue
            a_all = _assembled(
                self.pool("A", kind), [layer.index_A for layer in layers], layers[0].in_features
            )
            b_all = _assembled(
                self.pool("B", kind), [layer.index_B for layer in layers], layers[0].out_features
            )
            for layer, a, b_t in zip(layers, a_all, b_all, strict=True):
                layer.step_factors = (a, b_t.T)
        self._versions = {kind: self._pool_versions(kind) for kind in self.members} if training else None

    def release(self, keep: bool = False) -> None:
        """After the model's forward: drop the assembled factors (their fp32 values are not needed by
        backward), or ``keep`` them for the blocks that gradient checkpointing recomputes in backward."""
        if not keep:
            for layers in self.members.values():
                for layer in layers:
                    layer.step_factors = None
            self._versions = None

    def holds_assembly(self) -> bool:
        return self._versions is not None

    def _pool_versions(self, kind: str) -> tuple[int, int]:
        return self.pool("A", kind)._version, self.pool("B", kind)._version

    def assembled_is_current(self, kind: str) -> bool:
        """The pools of ``kind`` have not changed since :meth:`assemble` (an optimizer step bumps their
        versions)."""
        return self._versions is not None and self._versions[kind] == self._pool_versions(kind)


def _assembled(pool: torch.Tensor, indices: list[torch.Tensor], width: int) -> tuple[torch.Tensor, ...]:
    """One ``index_select`` for all the layers' routing indices (every layer of a type has the same
    rank), then each layer's (rank × width) view."""
    rows = pool.index_select(0, torch.cat(indices))
    return rows.reshape(len(indices), -1, width).unbind(0)


class MosAdapter(LayerAdapter):
    """One layer's view of the pools: its routing indices (buffers, saved) and the gather."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kind: str,
        pools: ShardPools,
        index_a: torch.Tensor,
        index_b: torch.Tensor,
        rank: int,
        private_rank: int,
        scale: float,
        dropout: float = 0.0,
    ):
        super().__init__(in_features, out_features, dropout)
        self.kind = kind
        self.rank = rank
        self.private_rank = private_rank
        self.scale = scale
        self.register_buffer("index_A", index_a.clone())
        self.register_buffer("index_B", index_b.clone())
        object.__setattr__(self, "_pools", pools)  # not a submodule: the pools live at the model root
        self.step_factors: tuple[torch.Tensor, torch.Tensor] | None = None  # set by ShardPools.assemble
        pools.members.setdefault(kind, []).append(self)

    @property
    def dtype(self) -> torch.dtype:
        return self._pools.pool("A", self.kind).dtype

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B_unscaled)``: one index_select per pool, then a reshape that concatenates the shards."""
        a = (
            self._pools.pool("A", self.kind)
            .index_select(0, self.index_A)
            .reshape(self.rank, self.in_features)
        )
        b_t = (
            self._pools.pool("B", self.kind)
            .index_select(0, self.index_B)
            .reshape(self.rank, self.out_features)
        )
        return a, b_t.T

    def routed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward's ``(A, B_unscaled)``: this step's assembled factors when the pools
        assembled them (:meth:`ShardPools.assemble`) and have not changed since, else :meth:`gathered`.
        (A compiled block trusts the assembly: it only runs inside the model's forward.)"""
        step = self.step_factors
        if step is not None and (
            torch.compiler.is_compiling() or self._pools.assembled_is_current(self.kind)
        ):
            return step
        return self.gathered()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.gathered()
        return a, b * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.routed()
        return F.linear(F.linear(self.dropout(x), a) * self.scale, b)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, b = self.routed()
        return add_low_rank(out, F.linear(self.dropout(x), a) * self.scale, b)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if not isinstance(self.dropout, nn.Identity):
            return None
        a, b = self.routed()
        return a, b, self.scale

    def routing(self) -> dict:
        shards_per_vector = self.index_A.numel() // self.rank
        n_private = self.private_rank * shards_per_vector
        return {
            matrix: {
                "pool": f"{matrix}_{self.kind}",
                "shards": index.tolist(),
                "private": [i >= index.numel() - n_private for i in range(index.numel())],
            }
            for matrix, index in (("A", self.index_A), ("B", self.index_B))
        }


def _groups(targets: list[Target]) -> dict[str, list[Target]]:
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.kind, []).append(t)
    return groups


def _draw(n_public: int, n_routed: int, subset_selection: bool, gen: torch.Generator) -> torch.Tensor:
    """Public shard indices of one factor of one layer: a random subset without repeats, or all of them."""
    if not subset_selection:
        return torch.arange(n_public, device="cpu")
    return torch.randperm(n_public, generator=gen, device="cpu")[:n_routed]


def layer_rank(options: MosOptions, n_layers: int) -> int:
    """Per-layer rank: ``r``, or all public vectors plus the private ones without subset selection."""
    if options.subset_selection:
        return options.rank
    return (options.equivalent_rank - options.private_rank) * n_layers + options.private_rank


class Mos(AdapterMethod):
    name = "mos"
    Options = MosOptions

    rank_options = ("rank", "equivalent_rank")
    budget_option = "equivalent_rank"  # the pools; the per-layer rank r stays the recipe's

    def resolve(self, options: MosOptions, targets: list[Target]) -> None:
        """An unset ``equivalent_rank``: 2, or the least budget whose pools hold rank r (shallow models)."""
        if options.equivalent_rank is None:
            fewest = min(len(group) for group in _groups(targets).values())
            p, r = options.private_rank, options.rank
            needed = p + math.ceil(max(r - p, 0) / fewest) if options.subset_selection else 2
            options.equivalent_rank = max(2, p, needed)

    def check(self, options: MosOptions, targets: list[Target]) -> None:
        r, big_r, p, per_vec = (
            options.rank,
            options.equivalent_rank,
            options.private_rank,
            options.shards_per_vector,
        )
        if p > big_r:
            raise RecipeError(
                "adapter.private_rank", f"must be at most adapter.equivalent_rank ({big_r}), got {p}"
            )
        if options.subset_selection and p > r:
            raise RecipeError("adapter.private_rank", f"must be at most adapter.rank ({r}), got {p}")
        if options.subset_selection and p == big_r and r != big_r:
            raise RecipeError(
                "adapter.rank", f"must equal adapter.equivalent_rank when all of it is private, got {r}"
            )
        for kind, group in _groups(targets).items():
            shapes = {(t.in_features, t.out_features) for t in group}
            if len(shapes) > 1:
                raise RecipeError(
                    "adapter.targets", f"layers of type {kind} have different shapes {sorted(shapes)}"
                )
            in_f, out_f = shapes.pop()
            if in_f % per_vec or out_f % per_vec:
                raise RecipeError(
                    "adapter.shards_per_vector",
                    f"must divide the input and output sizes of every target; {kind} is {out_f}×{in_f}, got {per_vec}",
                )
            if options.subset_selection and (r - p) > (big_r - p) * len(group):
                raise RecipeError(
                    "adapter.rank",
                    f"too large for the pool: {kind} has {len(group)} layers, so at most "
                    f"(R−p)·L + p = {(big_r - p) * len(group) + p}; got {r}",
                )

    def build_stores(self, options: MosOptions, targets: list[Target]) -> ShardPools:
        big_r, p, per_vec = options.equivalent_rank, options.private_rank, options.shards_per_vector
        gen = torch.Generator().manual_seed(options.routing_seed)
        stores = ShardPools()
        for kind, group in _groups(targets).items():
            n_layers, in_f, out_f = len(group), group[0].in_features, group[0].out_features
            n_shards, n_public = big_r * n_layers * per_vec, (big_r - p) * n_layers * per_vec
            bound = 1 / math.sqrt(in_f)  # Kaiming-uniform(a=√5) with fan = the full vector length d_in
            pool_a = torch.empty(n_shards, in_f // per_vec)
            if not pool_a.is_meta:  # (parameter counting builds on the meta device)
                pool_a.uniform_(-bound, bound, generator=gen)
            stores.pools[f"A_{kind}"] = nn.Parameter(pool_a)
            stores.pools[f"B_{kind}"] = nn.Parameter(torch.zeros(n_shards, out_f // per_vec))
            rank = layer_rank(options, n_layers)
            n_routed = (rank - p) * per_vec
            for k, t in enumerate(group):
                private = torch.arange(
                    n_public + k * p * per_vec, n_public + (k + 1) * p * per_vec, device="cpu"
                )
                public_a = _draw(n_public, n_routed, options.subset_selection, gen)
                public_b = (
                    _draw(n_public, n_routed, options.subset_selection, gen)
                    if options.pair_dissociation
                    else public_a
                )
                if not options.subset_selection and options.pair_dissociation:
                    public_b = public_b[torch.randperm(n_public, generator=gen, device="cpu")]
                stores.routes[t.name] = (torch.cat([public_a, private]), torch.cat([public_b, private]), rank)
        return stores

    def build_layer(self, options: MosOptions, target: Target, stores: ShardPools) -> MosAdapter:
        index_a, index_b, rank = stores.routes[target.name]
        return MosAdapter(
            target.in_features,
            target.out_features,
            target.kind,
            stores,
            index_a,
            index_b,
            rank,
            options.private_rank,
            options.alpha / rank,
            options.dropout,
        )

    def export_info(self, options: MosOptions, model: nn.Module) -> dict:
        """The per-layer rank and scale the layers use: ``r`` and ``α/r``, or without subset selection
        ``(R−p)·L_t + p`` and ``α`` over that, which depends on the type's layer count ``L_t`` (one value
        when every type agrees, else a mapping type → value)."""
        used = {
            layer.adapter.kind: (layer.adapter.rank, layer.adapter.scale)
            for layer in adapted_layers(model).values()
            if isinstance(layer.adapter, MosAdapter)
        }
        if len(set(used.values())) == 1:
            rank, scale = next(iter(used.values()))
            return {"rank": rank, "scale": scale}
        return {
            "rank": {kind: rank for kind, (rank, _) in sorted(used.items())},
            "scale": {kind: scale for kind, (_, scale) in sorted(used.items())},
        }
