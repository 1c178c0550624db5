"""Where a training step's time goes: the kernels (GPU) or operators (CPU) of one step of each variant,
and what an adapter adds to the frozen base's.

    python benchmarks/profile_step.py --shape 1b --device cuda --dtype bf16 --batch 8 --seq 1024
    python benchmarks/profile_step.py --variants "frozen base,shardtune lora,shardtune mos"

Each variant of ``benchmarks/step_time.py`` (the same models, steps and optimizer) is warmed up and
then profiled over ``--steps`` steps with ``torch.profiler``. Per step: the wall time, the time the
device spent in kernels (on a GPU: ``busy``; well below the wall time means the step waits on the CPU
launching them) and how many it ran; then, per kernel name, its time and count per step, and the rows
where an adapter variant spends more than the first variant (the frozen base by default). On the CPU
the rows are operators and their own CPU time. Prints tables; writes JSON
(benchmarks/results/profile_step-<device>-<shape>.json unless --json is given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time  # noqa: E402


def profile_variant(step, device: str, steps: int) -> dict:
    """Per-step wall time, device-busy time, kernel (operator) count, and each name's time and count."""
    on_gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    step_time.sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        step_time.sync(device)
        wall = (time.perf_counter() - t0) / steps
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if on_gpu:  # kernels and memory operations; not the ranges user annotations draw over them
            if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        else:  # the operators' own CPU time (children excluded): a flat split of the step
            if event.device_type != DeviceType.CPU or not event.name.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        by_name[event.name][0] += us
        by_name[event.name][1] += 1
    rows = {name: {"ms": us / 1000 / steps, "count": n / steps} for name, (us, n) in by_name.items()}
    return {
        "wall_ms": 1000 * wall,
        "busy_ms": sum(r["ms"] for r in rows.values()),
        "count": sum(r["count"] for r in rows.values()),
        "names": rows,
    }


def short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=step_time.SHAPES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per variant (after 3 warm-up steps)")
    ap.add_argument(
        "--variants", default="frozen base,shardtune lora", help="comma-separated; the first is the reference"
    )
    ap.add_argument("--top", type=int, default=15, help="rows per table")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    specs = step_time.variants(args.rank, step_time.SHAPES[args.shape][2])
    specs.update({name: (*specs[of], how) for name, (of, how) in step_time.ABLATIONS.items()})
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"profile_step.py: unknown variant {unknown[0]!r}; known: {', '.join(specs)}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, step_time.SHAPES[args.shape][5], (args.batch, args.seq), generator=gen).to(
        args.device
    )

    results = {}
    for name in names:
        model = step_time.prepare(specs[name], args.shape, dtype, args.device, "float32")
        step = step_time.step_fn(model, ids, args.device, autocast_dtype)
        for _ in range(3):
            step()
        results[name] = profile_variant(step, args.device, args.steps)
        del model, step
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    what = "kernels" if args.device.startswith("cuda") else "aten operators (own CPU time)"
    print(f"\nprofile — {args.shape} shape, {args.dtype}, batch {args.batch} × seq {args.seq}, rank {args.rank}, "
          f"{args.device}, torch {torch.__version__}; per step, {what}")  # fmt: skip
    print(f"{'variant':26} {'wall ms':>9} {'busy ms':>9} {'count':>8}")
    for name, r in results.items():
        print(f"{name:26} {r['wall_ms']:>9.2f} {r['busy_ms']:>9.2f} {r['count']:>8.0f}")
    reference = results[names[0]]["names"]
    for name, r in results.items():
        print(f"\n{name}: the {args.top} largest")
        for key, row in sorted(r["names"].items(), key=lambda kv: -kv[1]["ms"])[: args.top]:
            print(f"  {row['ms']:>8.2f} ms {row['count']:>7.0f}×  {short(key)}")
        if name == names[0]:
            continue
        extra = {
            key: (row["ms"] - reference.get(key, {"ms": 0.0})["ms"], row["count"] - reference.get(key, {"count": 0})["count"])
            for key, row in r["names"].items()
        }  # fmt: skip
        print(f"{name}: where it spends more than {names[0]} (ms, count per step)")
        for key, (ms, count) in sorted(extra.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {ms:>+8.2f} ms {count:>+7.0f}×  {short(key)}")
    device_slug = args.device.split(":")[0]
    if device_slug == "cuda":
        device_slug += (
            "-" + (torch.cuda.get_device_name().replace("NVIDIA", "").split() or ["gpu"])[0].lower()
        )
    path = Path(
        args.json or Path(__file__).parent / "results" / f"profile_step-{device_slug}-{args.shape}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"args": vars(args), "torch": torch.__version__, "variants": results}, indent=2) + "\n"
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
