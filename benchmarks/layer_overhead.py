"""Host time of one adapted layer: what a forward + backward costs when its products cost nothing.

    python benchmarks/layer_overhead.py                  # CPU
    python benchmarks/layer_overhead.py --device cuda    # the launch side of a GPU step

Tiny shapes (2 × 8 input, 8 × 8 weight, rank 4), so that what is timed is the work around the products:
Python, autograd's nodes, the operators' dispatch (on a GPU their launches). Variants, interleaved, medians:

- ``nn.Linear (frozen)``: the frozen layer alone (what a frozen model pays per projection);
- ``bare autograd.Function``: a Python autograd function that returns its input (the least any layer
  written as one costs);
- ``plain Function, LoRA's products``: the fused layer's products (base, ``x·Aᵀ``, ``y += h·Bᵀ``; ``g``,
  ``dB``, ``dA``, ``dx``) in a function with no checks at all;
- ``fused layer (_LowRankLinear)``: :class:`shardtune.adapters.fused._LowRankLinear` called directly;
- ``AdaptedLinear (LoRA)``: the module as a model calls it (its checks, then the fused layer).

Each pass runs ``backward`` once, as a model's step does for all its layers together, so every row carries
the same engine start-up; the differences between rows are per layer. ``ms per step`` multiplies the
difference to the frozen layer by ``--layers`` adapted layers (28: benchmarks/step_time.py's small shape;
210: SmolLM2-135M's). Prints a table; writes JSON (benchmarks/results/layer_overhead-<device>.json unless
--json is given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.layer_time import interleaved_times  # noqa: E402
from shardtune.adapters.base import AdaptedLinear  # noqa: E402
from shardtune.adapters.fused import _LowRankLinear  # noqa: E402
from shardtune.adapters.lora import LoraAdapter  # noqa: E402


class _Bare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return dy


class _PlainProducts(torch.autograd.Function):
    """LoRA's forward and backward products, nothing else (no dtype checks, no reshapes, no casts)."""

    @staticmethod
    def forward(ctx, x, w, a, b, scale):
        h = torch.mm(x, a.t())
        y = torch.mm(x, w.t()).addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x, w, a, b, h)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b, h = ctx.saved_tensors
        g = torch.mm(dy, b)
        db = torch.mm(dy.t(), h).mul_(ctx.scale)
        da = torch.mm(g.t(), x).mul_(ctx.scale)
        dx = torch.mm(dy, w).addmm_(g, a, alpha=ctx.scale)
        return dx, None, da, db, None


def variants(layer: AdaptedLinear) -> dict:
    base, adapter = layer.base_layer, layer.adapter
    a, b, scale = adapter.lora_A, adapter.lora_B, adapter.scale
    return {
        "nn.Linear (frozen)": base,
        "bare autograd.Function": _Bare.apply,
        "plain Function, LoRA's products": lambda x: _PlainProducts.apply(x, base.weight, a, b, scale),
        "fused layer (_LowRankLinear)": lambda x: _LowRankLinear.apply(x, base.weight, None, a, b, scale, 0),
        "AdaptedLinear (LoRA)": layer,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2000, help="timed passes per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--layers", type=int, nargs="+", default=[28, 210], help="adapted layers per step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    base = nn.Linear(8, 8, bias=False, device=args.device).requires_grad_(False)
    layer = AdaptedLinear(base, LoraAdapter(8, 8, 4, scale=2.0).to(args.device), fan_in_fan_out=False)
    x = torch.randn(2, 8, device=args.device, requires_grad=True)
    dy = torch.ones(2, 8, device=args.device)
    runs = variants(layer)
    trainable = [x, layer.adapter.lora_A, layer.adapter.lora_B]

    def one_pass(fn):
        fn(x).backward(dy)
        for t in trainable:  # as an optimizer's zero_grad(set_to_none=True) leaves them
            t.grad = None

    for fn in runs.values():
        for _ in range(args.reps // 10):
            one_pass(fn)
    times = interleaved_times(runs, one_pass, args.rounds, args.reps, sync)
    frozen = statistics.median(times["nn.Linear (frozen)"])
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rows.append(
            {
                "variant": name,
                "us": 1e6 * med,
                "above_frozen_us": 1e6 * (med - frozen),
                "ms_per_step": {str(n): 1e3 * n * (med - frozen) for n in args.layers},
                "spread": (max(t) - min(t)) / med,
            }
        )
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\none tiny layer, forward + backward, host time, {device_name}, torch {torch.__version__}")
    per_step = "".join(f" {f'ms/step ({n})':>15}" for n in args.layers)
    print(f"{'variant':34} {'µs':>8} {'µs above frozen':>16}{per_step} {'spread':>7}")
    for r in rows:
        steps = "".join(f" {r['ms_per_step'][str(n)]:>15.2f}" for n in args.layers)
        print(f"{r['variant']:34} {r['us']:>8.1f} {r['above_frozen_us']:>16.1f}{steps} {r['spread']:>7.3f}")
    path = Path(
        args.json or Path(__file__).parent / "results" / f"layer_overhead-{args.device.split(':')[0]}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"args": vars(args), "device": device_name, "torch": torch.__version__, "rows": rows}, indent=2
        )
        + "\n"
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
