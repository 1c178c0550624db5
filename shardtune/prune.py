"""`shardtune prune`: make a sparse model for LoRS — magnitude or Wanda scores, unstructured or N:M.

Scores per weight ``W[o, i]``:

* ``magnitude``: ``|W[o, i]|``; an unstructured ratio is applied per layer (lowest scores of the layer).
* ``wanda`` (Sun et al., 2023): ``|W[o, i]| · ‖X_i‖₂``, with ``‖X_i‖₂`` the norm of input feature ``i``
  over the calibration tokens; an unstructured ratio is applied per output row, as in the paper.

Patterns: ``--sparsity 0.5`` (unstructured ratio) or ``--pattern 2:4`` (keep the N highest scores in
every group of M consecutive inputs of a row). The output head and embeddings are never pruned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shardtune.adapters.model import find_targets
from shardtune.errors import BadInput


def parse_pattern(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise BadInput(f"--pattern: expected N:M such as 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise BadInput(f"--pattern: need 0 < N < M, got {pattern!r}")
    return n, m


@torch.no_grad()
def input_norms(model: nn.Module, modules: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """‖X_i‖₂ of every input feature of every module over the calibration batches."""
    sums = {name: torch.zeros(m.weight.shape[1], dtype=torch.float64) for name, m in modules.items()}
    hooks = []
    for name, module in modules.items():

        def hook(_mod, args, _out, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += (x * x).sum(0).cpu()

        hooks.append(module.register_forward_hook(hook))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


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
    if method not in ("magnitude", "wanda"):
        raise BadInput(f"--method: expected magnitude or wanda, got {method!r}")
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
    norms = None
    if method == "wanda":
        if calibration is None:
            raise BadInput(
                "--method wanda needs calibration samples: pass --recipe RECIPE (its data section)"
            )
        norms = input_norms(model, modules, calibration)
    layers, zeros, total = [], 0, 0
    for name, module in modules.items():
        w = module.weight
        score = w.detach().abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device, torch.float32).unsqueeze(0)
        keep = prune_mask(score, sparsity, nm, per_row=method == "wanda")
        w.mul_(keep.to(w.dtype))
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
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict:
    """Load ``model``, prune it (Wanda calibrates on the first ``samples`` examples of ``recipe``'s
    data) and write it to ``out``; return :func:`prune_model`'s report with ``out``."""
    from torch.utils.data import DataLoader

    from shardtune.data import Collator, encode_all, load_examples, uses_chat
    from shardtune.fileio import check_output_dir
    from shardtune.models import load_model
    from shardtune.recipe import load_recipe

    if dtype not in ("float32", "bfloat16", "float16"):
        raise BadInput(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    local = Path(model).expanduser()
    inputs = [local if local.exists() else None, recipe]
    check_output_dir(out, "--out", replace=overwrite, inputs=inputs)  # before loading anything
    lm, tokenizer = load_model(model, dtype)
    calibration = None
    if recipe is not None:
        data = load_recipe(recipe).data
        examples, _ = load_examples(data)
        features, _ = encode_all(
            examples[:samples], tokenizer, data.max_length, uses_chat(tokenizer, data.chat_template)
        )
        calibration = DataLoader(features, batch_size=8, collate_fn=Collator(tokenizer.pad_token_id))
    report = prune_model(lm, method, sparsity, pattern, calibration)
    save_model_dir(lm, tokenizer, out, overwrite, inputs)
    return {**report, "out": str(out)}


def save_model_dir(model: nn.Module, tokenizer, out: Path, overwrite: bool = False, inputs=()) -> None:
    """Write a HF model directory atomically (temp dir, then rename), marked as shardtune's."""
    from shardtune.fileio import write_output_dir

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_output_dir(out, write, "prune", overwrite, inputs)


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zeros over every nn.Linear weight except the output head (adapted layers included)."""
    head = model.get_output_embeddings()
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)
