"""`shardtune prune`: make a sparse model for LoRS — magnitude, Wanda or SparseGPT, unstructured or N:M.

* ``magnitude``: score ``|W[o, i]|``; an unstructured ratio is applied per layer (lowest scores of the
  layer).
* ``wanda`` (Sun et al., arXiv 2306.11695): score ``|W[o, i]| · ‖X_i‖₂``, with ``‖X_i‖₂`` the norm of input
  feature ``i`` over the calibration tokens; an unstructured ratio is applied per output row, as in
  the paper. The kept weights are not changed.
* ``sparsegpt`` (Frantar & Alistarh, arXiv 2301.00774): prune and *reconstruct*. With the layer's
  Hessian ``H = 2·X·Xᵀ`` (``X``: its calibration inputs, in × tokens), dampened by ``λ = 1 %`` of its
  mean diagonal, and ``U`` the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = Uᵀ·U``; row j of U is the
  inverse Hessian of the columns ≥ j, scaled), columns are processed left to right in blocks of
  ``B = 128``. At the start of a block the mask of its columns is chosen by the OBS saliency
  ``w²/U_jj²`` (unstructured: the lowest ``p`` share of the block's weights; N:M: at the first
  column of each group of M, the ``M − N`` lowest of the group in every row). Column j is then
  frozen: the pruned weights are zeroed and the error is spread over the columns not yet processed,

      e = (w_j − q_j) / U_jj,      W[:, j:] −= e · U[j, j:]           (OBS update, rows at once)

  applied at once inside the block and lazily (``E·U[block, rest]``) to the columns after it.

Wanda and SparseGPT calibrate *sequentially*, as both papers' code: one pass of the dense model
records the inputs of the first decoder block and the other arguments of every block (``--samples``
examples of the recipe's data; padding tokens excluded from the statistics), then each block in turn
collects its statistics, is pruned, and is run again so that the next block sees the outputs of the
already-pruned ones.

Patterns: ``--sparsity 0.5`` (unstructured ratio) or ``--pattern 2:4`` (keep the N highest scores in
every group of M consecutive inputs of a row). The output head and embeddings are never pruned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shardtune.adapters.model import find_targets
from shardtune.core.errors import BadInput, named_as

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise BadInput(f"--pattern: expected N:M such as 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise BadInput(f"--pattern: need 0 < N < M, got {pattern!r}")
    return n, m


def prune_mask(
    score: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None, per_row: bool
) -> torch.Tensor:
    """Boolean keep-mask from scores (out × in)."""
    out_f, in_f = score.shape
    if nm is not None:
        n, m = nm
        groups = score.reshape(out_f, in_f // m, m)
        keep_idx = groups.topk(n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep_idx, True)
        return keep.reshape(out_f, in_f)
    if per_row:
        n_prune = int(in_f * sparsity)
        if n_prune == 0:
            return torch.ones_like(score, dtype=torch.bool)
        drop = score.argsort(dim=1)[:, :n_prune]
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    n_prune = int(score.numel() * sparsity)
    if n_prune == 0:
        return torch.ones_like(score, dtype=torch.bool)
    drop = score.flatten().argsort()[:n_prune]
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    keep[drop] = False
    return keep.reshape(score.shape)


# ---------------------------------------------------------------------------------------------------
# SparseGPT


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT on one layer: the pruned and reconstructed weight (out × in, fp32); see the module
    docstring. ``hessian`` is ``Σ x·xᵀ`` over the calibration tokens (any positive scale)."""
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    n_cols = w.shape[1]
    dead = torch.diag(h) == 0  # an input that is always 0: its weights cannot matter, drop them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * torch.diag(h).mean())
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(h_inv, upper=True).float()  # H⁻¹ = Uᵀ·U
    if nm is not None and blocksize % nm[1]:
        blocksize -= blocksize % nm[1]  # N:M groups must not straddle blocks
    for start in range(0, n_cols, blocksize):
        stop = min(start + blocksize, n_cols)
        block, u_block = w[:, start:stop].clone(), u[start:stop, start:stop]
        diag = torch.diag(u_block)
        errors = torch.zeros_like(block)
        pruned = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:  # adaptive mask: the p share of the block with the lowest saliency w²/U_jj²
            saliency = (block / diag).pow(2).flatten()
            n_prune = int(saliency.numel() * sparsity)
            if n_prune:
                pruned.view(-1)[saliency.topk(n_prune, largest=False).indices] = True
        for j in range(stop - start):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                saliency = (block[:, j : j + m] / diag[j : j + m]).pow(2)
                drop = saliency.topk(m - n, dim=1, largest=False).indices
                pruned[:, j : j + m].scatter_(1, drop, True)
            col = block[:, j]
            q = torch.where(pruned[:, j], torch.zeros_like(col), col)
            err = (col - q) / diag[j]
            block[:, j:] -= err.unsqueeze(1) * u_block[j, j:].unsqueeze(0)
            block[:, j] = q  # exactly zero where pruned
            errors[:, j] = err
        w[:, start:stop] = block
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return w


# ---------------------------------------------------------------------------------------------------
# Sequential calibration: block by block, each block fed by the already-pruned ones


class _Stop(Exception):
    """Raised after the last block: the calibration pass needs no output head."""


def decoder_blocks(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The ``ModuleList`` of repeated blocks that holds the most target layers (``model.layers``)."""
    best, count = None, 0
    for name, candidate in model.named_modules():
        if isinstance(candidate, nn.ModuleList) and len(candidate):
            inside = sum(any(m is t for m in candidate.modules()) for t in modules.values())
            if inside > count:
                best, count = (name, candidate), inside
    return best


@torch.no_grad()
def _block_inputs(model: nn.Module, blocks: list[nn.Module], batches) -> list[dict]:
    """Run the dense model once over the calibration batches, stopping after the last block; per batch
    keep the first block's hidden-state input, the other arguments of every block (attention masks,
    position embeddings — per block, since some models give layers different masks) and the mask of
    real (not padding) tokens."""
    items: list[dict] = []

    def capture(index: int):
        def hook(_mod, args, kwargs):
            item = items[-1]
            if index == 0:
                item["hidden"] = args[0] if args else kwargs["hidden_states"]
            item["calls"].append((tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        return hook

    def stop(_mod, _args, _out):
        raise _Stop

    handles = [b.register_forward_pre_hook(capture(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            items.append({"tokens": mask.reshape(-1).bool(), "calls": []})
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return items


def _run_block(block: nn.Module, index: int, item: dict) -> torch.Tensor:
    """Block ``index`` on the batch's current hidden states (the previous block's pruned output)."""
    args, kwargs = item["calls"][index]
    out = block(item["hidden"], *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def calibration_statistics(
    model: nn.Module, modules: dict[str, nn.Module], batches, method: str, prune_fn
) -> None:
    """For each decoder block in order: collect the statistics of its target layers over the
    calibration tokens (``Σ x²`` per input for Wanda, ``Σ x·xᵀ`` for SparseGPT), call
    ``prune_fn(name, statistic)`` for each, then rerun the block to feed the next one. Targets outside
    the blocks get statistics from one pass of the (partly pruned) whole model at the end."""
    found = decoder_blocks(model, modules)
    blocks = list(found[1]) if found is not None else []
    state: dict = {"tokens": None}
    stats: dict[str, torch.Tensor] = {}

    def collect(names: list[str], run) -> None:
        hooks = []
        for name in names:
            stats[name] = torch.zeros((), dtype=torch.float64)

            def hook(_mod, args, _out, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                if state["tokens"] is not None and state["tokens"].numel() == x.shape[0]:
                    x = x[state["tokens"]]
                if method == "sparsegpt":  # fp32 products, as SparseGPT's code; the solve is in fp64
                    x = x.float()
                    stats[name] = stats[name] + (x.T @ x).double()
                else:
                    x = x.double()
                    stats[name] = stats[name] + (x * x).sum(0)

            hooks.append(modules[name].register_forward_hook(hook))
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        for name in names:
            prune_fn(name, stats.pop(name))

    in_blocks = set()
    if blocks:
        items = _block_inputs(model, blocks, batches)
        for index, block in enumerate(blocks):
            names = [n for n, m in modules.items() if any(m is x for x in block.modules())]
            in_blocks.update(names)

            def run(block=block, index=index):
                for item in items:
                    state["tokens"] = item["tokens"]
                    _run_block(block, index, item)

            if names:
                collect(names, run)
            for item in items:  # the next block sees this (pruned) block's outputs
                item["hidden"] = _run_block(block, index, item)
    rest = [n for n in modules if n not in in_blocks]
    if rest:

        def run_model():
            device = next(model.parameters()).device
            for batch in batches:
                mask = batch.get("attention_mask")
                state["tokens"] = None if mask is None else mask.reshape(-1).bool().to(device)
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=None if mask is None else mask.to(device),
                )

        collect(rest, run_model)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float | None = 0.5,
    pattern: str | None = None,
    calibration=None,
    targets: list[str] | str = "all-linear",
) -> dict:
    """Prune the target layers in place; return per-layer and overall sparsity."""
    if method not in PRUNE_METHODS:
        raise BadInput(f"--method: expected one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    nm = parse_pattern(pattern) if pattern else None
    if nm is None and (sparsity is None or not 0 < sparsity < 1):
        raise BadInput(f"--sparsity: expected a ratio between 0 and 1, got {sparsity}")
    chosen = find_targets(model, targets)
    if any(t.fan_in_fan_out for t in chosen):
        raise BadInput("prune: Conv1D layers (GPT-2 family) are not supported; LoRS needs nn.Linear layers")
    modules = {t.name: t.module for t in chosen}
    if nm is not None:
        for name, m in modules.items():
            if m.weight.shape[1] % nm[1]:
                raise BadInput(f"--pattern: {name} has {m.weight.shape[1]} inputs, not a multiple of {nm[1]}")
    if method != "magnitude" and calibration is None:
        raise BadInput(
            f"--method {method} needs calibration samples: pass --recipe RECIPE (its data section)"
        )

    def prune_one(name: str, statistic: torch.Tensor | None) -> None:
        w = modules[name].weight
        if method == "sparsegpt":
            w.copy_(sparsegpt_prune(w, statistic.to(w.device), sparsity, nm).to(w.dtype))
            return
        score = w.detach().abs().float()
        if method == "wanda":
            score = score * statistic.sqrt().to(score.device, torch.float32).unsqueeze(0)
        w.mul_(prune_mask(score, sparsity, nm, per_row=method == "wanda").to(w.dtype))

    if method == "magnitude":
        for name in modules:
            prune_one(name, None)
    else:
        calibration_statistics(model, modules, calibration, method, prune_one)
    layers, zeros, total = [], 0, 0
    for name, module in modules.items():
        w = module.weight
        n_zero = int((w == 0).sum())
        layers.append({"layer": name, "zeros": n_zero, "total": w.numel(), "sparsity": n_zero / w.numel()})
        zeros += n_zero
        total += w.numel()
    return {
        "method": method,
        "pattern": pattern or f"unstructured {sparsity}",
        "layers": layers,
        "overall_sparsity": zeros / total,
    }


def prune_to_directory(
    model: str,
    out: Path,
    method: str = "magnitude",
    sparsity: float | None = 0.5,
    pattern: str | None = None,
    recipe: Path | None = None,
    samples: int = 128,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> dict:
    """Load ``model``, prune it (Wanda and SparseGPT calibrate on the first ``samples`` examples of
    ``recipe``'s data) and write it to ``out``; return :func:`prune_model`'s report with ``out``."""
    from shardtune.core.catalog import canonical_dtype
    from shardtune.core.fileio import check_output_dir, output_kinds
    from shardtune.models.loading import load_model

    dtype = canonical_dtype(dtype, "--dtype")
    local = Path(model).expanduser()
    inputs = [local if local.exists() else None, recipe]
    check_output_dir(  # before loading anything
        out, "--out", replace=overwrite, inputs=inputs, what="a pruned model", kinds=output_kinds("prune")
    )
    with named_as({"model.name": "MODEL"}):
        lm, tokenizer = load_model(model, dtype)
    calibration = calibration_batches(recipe, tokenizer, samples) if recipe is not None else None
    report = prune_model(lm, method, sparsity, pattern, calibration)
    save_model_dir(lm, tokenizer, out, overwrite, inputs)
    return {**report, "out": str(out)}


def calibration_batches(recipe: Path, tokenizer, samples: int):
    """Batches of 8 of the first ``samples`` training examples of the recipe's data, tokenized as for
    training (prompt and completion alike; padding is masked)."""
    from torch.utils.data import DataLoader

    from shardtune.data.examples import Collator, encode_all, load_examples, uses_chat
    from shardtune.recipe.schema import load_recipe

    data = load_recipe(recipe).data
    examples, _ = load_examples(data)
    features, _ = encode_all(
        examples[:samples], tokenizer, data.max_length, uses_chat(tokenizer, data.chat_template)
    )
    return DataLoader(features, batch_size=8, collate_fn=Collator(tokenizer.pad_token_id))


def save_model_dir(model: nn.Module, tokenizer, out: Path, overwrite: bool = False, inputs=()) -> None:
    """Write a HF model directory atomically (temp dir, then rename), marked as shardtune's."""
    from shardtune.core.fileio import write_output_dir

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_output_dir(out, write, "prune", overwrite, inputs, what="a pruned model")


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zeros over every nn.Linear weight except the output head (adapted layers included)."""
    head = model.get_output_embeddings()
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)
