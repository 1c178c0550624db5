"""One adapted linear layer, forward + backward, under bf16 autocast: where the fused layer's time goes.

    python benchmarks/layer_time.py --device cuda            # the 1B and SmolLM2 projection shapes
    python benchmarks/layer_time.py --tokens 512 --reps 20   # a quick CPU run

A bf16 frozen weight, fp32 LoRA factors of rank 16, ``x`` that needs its gradient (as inside a network),
a random output gradient; gradients of x, A and B. Variants, interleaved, medians:

- ``frozen``: the base product alone (no adapter: the floor);
- ``general``: the base product, then ``addmm`` of the update (what runs with dropout);
- ``fused``: :class:`shardtune.adapters.fused._LowRankLinear` (what training runs);
- ``fused, dB as (hᵀ·dy)ᵀ``: the same with B's gradient computed in the other orientation;
- ``fused, dx added``: the same with the two input-gradient terms added instead of ``addmm_``.

Prints a table (× frozen) and writes JSON (benchmarks/results/layer_time-<device>.json unless --json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardtune.adapters.base import AdaptedLinear  # noqa: E402
from shardtune.adapters.fused import _LowRankLinear  # noqa: E402
from shardtune.adapters.lora import LoraAdapter  # noqa: E402

SHAPES = {  # (in, out) of the projections: the 1B (TinyLlama) shape and SmolLM2-135M's
    "1b q/o": (2048, 2048),
    "1b k/v": (2048, 256),
    "1b gate/up": (2048, 5632),
    "1b down": (5632, 2048),
    "smollm2 q/o": (576, 576),
    "smollm2 gate/up": (576, 1536),
    "smollm2 down": (1536, 576),
}


def _backward(ctx, dy, db_flipped: bool = False, dx_added: bool = False):
    """:class:`_LowRankLinear`'s backward (x, A and B only), with one of two changes."""
    x, weight, a, b, h = ctx.saved_tensors
    dy = dy.reshape(-1, dy.shape[-1])
    flat = x.reshape(-1, x.shape[-1])
    dh = torch.mm(dy, b).mul_(ctx.scale)
    db = torch.mm(h.t(), dy).t() if db_flipped else torch.mm(dy.t(), h)
    da = torch.mm(dh.t(), flat)
    dx = torch.mm(dy, weight) + torch.mm(dh, a) if dx_added else torch.mm(dy, weight).addmm_(dh, a)
    return dx.view(x.shape), None, None, da, db, None, None


class _DbFlipped(_LowRankLinear):
    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, db_flipped=True)


class _DxAdded(_LowRankLinear):
    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, dx_added=True)


def variants(layer: AdaptedLinear):
    base, adapter = layer.base_layer, layer.adapter

    def alternative(fn):
        def run(x):
            a, b = adapter.lora_A.to(torch.bfloat16), adapter.lora_B.to(torch.bfloat16)
            with torch.autocast(x.device.type, enabled=False):
                return fn.apply(x, base.weight, base.bias, a, b, adapter.scale, 0)

        return run

    def general(x):
        return adapter.add_delta(base(x), x)

    return {
        "frozen": base,
        "general": general,
        "fused": layer,
        "fused, dB as (hᵀ·dy)ᵀ": alternative(_DbFlipped),
        "fused, dx added": alternative(_DxAdded),
    }


def time_variants(runs, x, dy, wants, args, shape_name, sync) -> dict[str, list[float]]:
    """Check that every variant computes the general path's gradients, then time them interleaved."""

    def step(fn):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = fn(x)
        return torch.autograd.grad(y, wants if fn is not runs["frozen"] else [x], dy)

    reference = step(runs["general"])
    for name, fn in runs.items():  # every variant computes the same gradients (bf16 rounding)
        if name != "frozen":
            for got, want in zip(step(fn), reference, strict=True):
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                assert err < 2e-2, (shape_name, name, err)
    for fn in runs.values():
        for _ in range(3):
            step(fn)
    return interleaved_times(runs, step, args.rounds, args.reps, sync)


def interleaved_times(runs: dict, one_pass, rounds: int, reps: int, sync) -> dict[str, list[float]]:
    """Seconds per ``one_pass(fn)`` of every variant, one list entry per round: each round times ``reps``
    passes of each variant in turn (so a change in the machine's pace reaches every variant alike)."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                one_pass(fn)
            sync()
            times[name].append((time.perf_counter() - t0) / reps)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=8192, help="rows of x (batch × sequence)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50, help="timed forward + backward passes per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    for shape_name, (d_in, d_out) in SHAPES.items():
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False, device=args.device, dtype=torch.bfloat16).requires_grad_(
            False
        )
        adapter = LoraAdapter(d_in, d_out, args.rank, scale=2.0).to(args.device)
        with torch.no_grad():
            adapter.lora_B.normal_(std=0.02)
        layer = AdaptedLinear(base, adapter, fan_in_fan_out=False)
        x = torch.randn(args.tokens, d_in, device=args.device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(args.tokens, d_out, device=args.device, dtype=torch.bfloat16)
        runs = variants(layer)
        times = time_variants(runs, x, dy, [x, adapter.lora_A, adapter.lora_B], args, shape_name, sync)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in runs:
            rows.append(
                {
                    "shape": shape_name,
                    "in": d_in,
                    "out": d_out,
                    "variant": name,
                    "us": 1e6 * med[name],
                    "vs_frozen": med[name] / med["frozen"],
                    "vs_general": med[name] / med["general"],
                    "spread": (max(times[name]) - min(times[name])) / med[name],
                }
            )
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\none layer fwd+bwd, bf16 autocast, {args.tokens} tokens, rank {args.rank}, {device_name}")
    print(f"{'shape':16} {'variant':24} {'µs':>9} {'×frozen':>8} {'×general':>9} {'spread':>7}")
    for r in rows:
        print(
            f"{r['shape']:16} {r['variant']:24} {r['us']:>9.1f} {r['vs_frozen']:>8.3f} {r['vs_general']:>9.3f} {r['spread']:>7.3f}"
        )
    path = Path(
        args.json or Path(__file__).parent / "results" / f"layer_time-{args.device.split(':')[0]}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "device": device_name, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
