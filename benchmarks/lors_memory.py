"""LoRS vs a naive masked LoRA (dense delta through autograd, as SQFT does): peak memory and step time.

    python benchmarks/lors_memory.py --device cuda --shape 1b --dtype bf16 --batch 4 --seq 1024

The base is a random Llama of the given shape pruned 2:4 by magnitude; every linear layer of every
block is adapted at rank 16. Variants, measured in one run on the same model:

* naive masked LoRA — ``y = x·(W + (s·B·A) ⊙ M)ᵀ`` with plain autograd: it keeps the dense merged
  weight and the mask of every layer alive until backward, and forms the dense weight gradient;
* shardtune lors (grad_mode lors / exact) — the custom autograd function: saves x, W, A, B only;
* dense LoRA (unmasked, the result would not stay sparse) and the frozen base, for reference.

Peak memory is measured per variant alone on the GPU (``torch.cuda.max_memory_allocated``); step
time is the median over interleaved rounds. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_time import SHAPES, TARGETS, build_base, step_fn, sync  # noqa: E402
from shardtune.adapters import METHODS  # noqa: E402
from shardtune.adapters.lors import LorsAdapter  # noqa: E402
from shardtune.adapters.model import adapted_layers, inject_adapter  # noqa: E402
from shardtune.artifacts.prune import prune_model  # noqa: E402


def naive_forward(self, x, base):
    """SQFT-style masked LoRA through plain autograd (the baseline LoRS improves on)."""
    delta = (self.lora_B @ self.lora_A * self.scale) * (base.weight != 0)
    return F.linear(x, base.weight + delta.to(base.weight.dtype), base.bias)


def prepare(variant, shape, dtype, device, rank):
    model = build_base(shape, dtype, device)
    prune_model(model, "magnitude", pattern="2:4", targets=TARGETS)
    if variant == "frozen base":
        return model
    if variant == "dense lora":
        inject_adapter(model, METHODS["lora"].Options(method="lora", rank=rank, alpha=rank, targets=TARGETS))
        return model
    mode = "exact" if variant.endswith("exact") else "lors"
    opts = METHODS["lors"].Options(
        method="lors", rank=rank, alpha=rank, init="kaiming", grad_mode=mode, targets=TARGETS
    )
    inject_adapter(model, opts)
    if variant.startswith("naive"):
        for layer in adapted_layers(model).values():
            layer.adapter.forward_full = naive_forward.__get__(layer.adapter, LorsAdapter)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cuda = args.device.startswith("cuda")
    variants = ["frozen base", "dense lora", "naive masked lora", "shardtune lors", "shardtune lors exact"]
    ids = torch.randint(
        0, SHAPES[args.shape][5], (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(args.device)

    rows = {v: {"times": [], "peak_mem_gib": None} for v in variants}
    for v in variants:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = prepare(v, args.shape, dtype, args.device, args.rank)
        base_mem = torch.cuda.memory_allocated() if cuda else 0
        step = step_fn(model, ids, args.device, None)  # no autocast: LoRS computes in the base dtype
        step()
        step()
        sync(args.device)
        if cuda:
            rows[v]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows[v]["model_mem_gib"] = base_mem / 2**30
        for _ in range(args.rounds):
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(args.device)
            rows[v]["times"].append((time.perf_counter() - t0) / args.steps)
        del model, step

    naive = rows["naive masked lora"]
    print(
        f"\nLoRS vs naive masked LoRA — {args.shape} Llama shape pruned 2:4, {args.dtype}, batch {args.batch} × seq "
        f"{args.seq}, rank {args.rank}, {torch.cuda.get_device_name() if cuda else 'cpu'}"
    )
    print(f"{'variant':22} {'ms/step':>9} {'peak GiB':>9} {'mem ×naive':>10} {'time ×naive':>11}")
    out = []
    for v, r in rows.items():
        ms = 1000 * statistics.median(r["times"])
        naive_ms = 1000 * statistics.median(naive["times"])
        mem_ratio = r["peak_mem_gib"] / naive["peak_mem_gib"] if cuda else None
        print(
            f"{v:22} {ms:>9.1f} {r['peak_mem_gib'] or 0:>9.2f} {mem_ratio or 0:>10.2f} {ms / naive_ms:>11.2f}"
        )
        out.append(
            {
                "variant": v,
                "step_ms": ms,
                "peak_mem_gib": r["peak_mem_gib"],
                "mem_vs_naive": mem_ratio,
                "time_vs_naive": ms / naive_ms,
            }
        )
    path = Path(
        args.json
        or Path(__file__).parent / "results" / f"lors_memory-{args.device.split(':')[0]}-{args.shape}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "rows": out}, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
