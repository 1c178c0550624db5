"""Padding against packing on a skewed length mix: useful (non-pad) tokens per second and pad share.

    python benchmarks/packing.py --shape smollm2-135m --examples 96 --json benchmarks/results/packing-cpu-smollm2.json

The same examples (token lengths drawn log-normal: median ``--median``, capped at ``--max-length``)
are trained on twice, in one run, by the same adapted model (a random Llama of the given shape,
FOSSIL rank 16 on every linear layer of every block, shardtune's AdamW):

* padding — shuffled batches of ``--batch`` examples, each padded to its longest (``data.packing:
  false``, what shardtune's loader does);
* packing — whole examples packed into rows of ``--max-length`` tokens by :func:`shardtune.data.
  examples.pack` (best-fit decreasing), ``--rows`` rows per batch, each example attending only to
  itself (position ids that restart; transformers' packed-sequence mask).

Both go through :class:`shardtune.data.examples.Collator` and :func:`model_inputs`, as the training
loop does. The time is that of every optimizer step over all examples (one warm-up step first, not
counted), taken ``--rounds`` times alternately; the median is reported. Useful tokens are the same
for both, so their ratio is the speed-up. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_time import SHAPES, TARGETS, build_base  # noqa: E402
from shardtune.adapters import METHODS  # noqa: E402
from shardtune.adapters.model import inject_adapter  # noqa: E402
from shardtune.data.examples import IGNORE, Collator, model_inputs, pack  # noqa: E402
from shardtune.training.loop import adamw  # noqa: E402


def skewed_examples(n: int, median: int, sigma: float, max_length: int, vocab: int, seed: int) -> list[dict]:
    """``n`` examples with log-normal lengths (at least 8 tokens); the first quarter of each is its
    prompt (masked), the rest trained."""
    rng = random.Random(seed)
    features = []
    for _ in range(n):
        length = max(8, min(max_length, round(rng.lognormvariate(0.0, sigma) * median)))
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = length // 4
        features.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return features


def padded_batches(features: list[dict], batch: int, seed: int) -> list[list[dict]]:
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    return [[features[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]


def packed_batches(features: list[dict], max_length: int, rows: int, seed: int) -> list[list[dict]]:
    packed = pack(features, max_length)
    random.Random(seed).shuffle(packed)
    return [packed[k : k + rows] for k in range(0, len(packed), rows)]


def timed_epoch(model, optimizer, batches: list[list[dict]]) -> float:
    collate = Collator(pad_token_id=0)
    started = time.perf_counter()
    for rows in batches:
        loss = model(**model_inputs(collate(rows))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--median", type=int, default=60)
    ap.add_argument("--sigma", type=float, default=1.0, help="of the log-normal lengths")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="examples per padded batch")
    ap.add_argument("--rows", type=int, default=1, help="packed rows per batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = SHAPES[args.shape][5]
    features = skewed_examples(args.examples, args.median, args.sigma, args.max_length, vocab, seed=0)
    useful = sum(len(f["input_ids"]) for f in features)
    plans = {
        "padding": padded_batches(features, args.batch, seed=1),
        "packing": packed_batches(features, args.max_length, args.rows, seed=1),
    }
    model = build_base(args.shape, torch.float32, "cpu")
    inject_adapter(model, METHODS["fossil"].Options(method="fossil", rank=16, targets=TARGETS))
    model.train()
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], 1e-4, 0.0, (0.9, 0.999))
    timed_epoch(model, optimizer, plans["packing"][:1])  # warm-up (allocator, kernels)
    timed_epoch(model, optimizer, plans["padding"][:1])
    times = {name: [] for name in plans}
    for _ in range(args.rounds):
        for name, batches in plans.items():
            times[name].append(timed_epoch(model, optimizer, batches))
    rows = []
    for name, batches in plans.items():
        slots = sum(len(rows) * max(len(r["input_ids"]) for r in rows) for rows in batches)
        seconds = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "batches": len(batches),
                "token_slots": slots,
                "pad_share": 1 - useful / slots,
                "seconds": seconds,
                "useful_tokens_per_s": useful / seconds,
            }
        )
    speedup = rows[1]["useful_tokens_per_s"] / rows[0]["useful_tokens_per_s"]
    lengths = sorted(len(f["input_ids"]) for f in features)
    print(
        f"{args.examples} examples, {useful} tokens (median {lengths[len(lengths) // 2]}, max {lengths[-1]}), "
        f"{args.shape} on {platform.machine()} ({torch.get_num_threads()} threads), median of {args.rounds} rounds"
    )
    print(f"{'variant':<9} {'batches':>7} {'slots':>7} {'pad share':>9} {'seconds':>8} {'useful tok/s':>12}")
    for r in rows:
        print(
            f"{r['variant']:<9} {r['batches']:>7} {r['token_slots']:>7} {r['pad_share']:>9.1%} "
            f"{r['seconds']:>8.2f} {r['useful_tokens_per_s']:>12.1f}"
        )
    print(f"packing / padding, useful tokens per second: {speedup:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "useful_tokens": useful,
                    "lengths": {"median": lengths[len(lengths) // 2], "max": lengths[-1]},
                    "threads": torch.get_num_threads(),
                    "rows": rows,
                    "times": times,
                    "speedup": speedup,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
