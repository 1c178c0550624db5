"""Peak memory of training on a large JSONL file: streamed (``data.streaming: true``) against the
whole-file read.

    python benchmarks/streaming.py --gb 2 --json benchmarks/results/streaming-cpu-smollm2.json

A JSONL file of ``--gb`` GB is generated once (prompt/completion records of ``--record-kb`` KB of
random words; kept at ``--file`` for the next run, recognised by its size and seed). Then, each in a
fresh process whose peak resident memory (``ru_maxrss``) is reported:

* streamed — ``shardtune train`` on the file, ``data.streaming: true``, ``--steps`` optimizer steps
  (the file is checked whole first, a record at a time, then read window by window);
* small file — the same training, not streamed, on the file's first ``--small-records`` records: the
  memory training takes whatever the data (what a streamed run should not exceed);
* whole read — what a run without streaming does before its first step: the file read into examples
  (:func:`shardtune.data.examples.load_examples`). It stops there: tokenizing every record of a
  file this size would take hours on a CPU and more memory still. A watchdog stops it above
  ``--cap-gb`` of resident memory (then the table says "> cap").

Same model (``--model``, default the embedded SmolLM2-135M-Instruct) and recipe otherwise. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = [f"w{i}" for i in range(2000)]


def generate(path: Path, gigabytes: float, record_kb: float, seed: int = 0) -> int:
    """Write records until the file holds ``gigabytes``; return the number of records. A finished file
    is renamed into place, so a killed generation is never taken for a whole one."""
    target = int(gigabytes * 2**30)
    rng = random.Random(seed)
    words = max(4, int(record_kb * 1024 / 6))
    count, written = 0, 0
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as f:
        while written < target:
            prompt = " ".join(rng.choices(WORDS, k=words // 5))
            completion = " " + " ".join(rng.choices(WORDS, k=words - words // 5))
            line = json.dumps({"prompt": prompt, "completion": completion}) + "\n"
            f.write(line)
            written += len(line)
            count += 1
    partial.rename(path)
    path.with_suffix(".json").write_text(
        json.dumps(
            {"records": count, "bytes": written, "gb": gigabytes, "record_kb": record_kb, "seed": seed}
        )
    )
    return count


def child(args) -> None:
    """In a fresh process: one variant; prints its seconds and peak resident memory as JSON."""
    import resource

    started = time.perf_counter()
    raw = recipe(args)
    if args.child in ("streamed", "small"):
        from shardtune.recipe.schema import recipe_from_dict
        from shardtune.training.loop import train

        if args.child == "small":
            raw["data"].update(path=str(small_file(args)), streaming=False)
        result = train(recipe_from_dict(raw))
        done = {"steps": result.steps, "final_loss": result.final_loss}
    else:
        from shardtune.data.examples import load_examples
        from shardtune.recipe.schema import recipe_from_dict

        raw["data"]["streaming"] = False
        train_examples, held = load_examples(recipe_from_dict(raw).data)
        done = {"examples": len(train_examples) + len(held)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_bytes": peak, **done}))


def small_file(args) -> Path:
    """The big file's first ``--small-records`` records, beside the run."""
    path = Path(args.workdir) / "small.jsonl"
    with open(args.file, encoding="utf-8") as big, open(path, "w", encoding="utf-8") as small:
        for _, line in zip(range(args.small_records), big, strict=False):
            small.write(line)
    return path


def recipe(args) -> dict:
    return {
        "model": {"name": args.model},
        "adapter": {"method": "fossil", "rank": 16, "targets": "all-linear"},
        "data": {
            "path": str(args.file),
            "streaming": True,
            "eval_samples": 16,
            "max_length": args.max_length,
            "packing": True,
        },
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-4, "seed": 0},
        "eval": {"every": 0},
        "output": {"dir": str(Path(args.workdir) / "run"), "overwrite": True},
        "logging": {"every": max(1, args.steps // 5)},
    }


def run_variant(name: str, args) -> dict:
    """The variant in a child process, stopped above ``--cap-gb`` of resident memory."""
    argv = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT)
    cap, peak = int(args.cap_gb * 2**30), 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = next(
                int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")
            )
            peak = max(peak, rss)
        except (OSError, StopIteration):
            pass
        if peak > cap:
            proc.kill()
            proc.wait()
            return {"variant": name, "capped": True, "peak_rss_bytes": peak}
        time.sleep(0.25)
    out = proc.stdout.read()
    if proc.returncode != 0:
        errors.seek(0)
        raise SystemExit(f"{name}: exit {proc.returncode}: {errors.read().strip().splitlines()[-1:]}")
    return {"variant": name, "capped": False, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the generated JSONL file")
    ap.add_argument("--record-kb", type=float, default=1.0)
    ap.add_argument(
        "--file", type=Path, default=Path(tempfile.gettempdir()) / "shardtune-streaming-bench.jsonl"
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--small-records", type=int, default=2000)
    ap.add_argument("--cap-gb", type=float, default=16.0, help="stop a variant above this resident memory")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=["streamed", "small", "whole"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    meta = args.file.with_suffix(".json")
    known = json.loads(meta.read_text()) if meta.is_file() and args.file.is_file() else {}
    wanted = {
        "gb": args.gb,
        "record_kb": args.record_kb,
        "bytes": args.file.stat().st_size if known else None,
    }
    if not known or any(known.get(k) != v for k, v in wanted.items()):
        started = time.perf_counter()
        generate(args.file, args.gb, args.record_kb)
        print(f"generated {args.file} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    info = json.loads(meta.read_text())
    with tempfile.TemporaryDirectory() as work:
        if args.workdir is None:
            args.workdir = work
            sys.argv += ["--workdir", work]
        rows = [run_variant(name, args) for name in ("streamed", "small", "whole")]
    size = info["bytes"]
    print(
        f"{args.file} ({size / 2**30:.2f} GiB, {info['records']:,} records), {args.model}, "
        f"{args.steps} steps of {args.batch} packed rows of {args.max_length} tokens, {platform.machine()}"
    )
    print(f"{'variant':<10} {'peak RSS':>10} {'seconds':>8}  what it did")
    for r in rows:
        rss = f"> {args.cap_gb:g} GiB" if r["capped"] else f"{r['peak_rss_bytes'] / 2**30:.2f} GiB"
        what = (
            "stopped by the watchdog"
            if r["capped"]
            else (f"{r['steps']} steps trained" if "steps" in r else f"{r['examples']:,} examples read")
        )
        print(f"{r['variant']:<10} {rss:>10} {r.get('seconds', float('nan')):>8.1f}  {what}")
    streamed, small, whole = rows
    ratio = whole["peak_rss_bytes"] / streamed["peak_rss_bytes"]
    over_small = streamed["peak_rss_bytes"] / small["peak_rss_bytes"]
    print(f"whole read / streamed, peak resident memory: {'>' if whole['capped'] else ''}{ratio:.1f}x")
    print(f"streamed / small file, peak resident memory: {over_small:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "file": {"bytes": size, "records": info["records"]},
                    "cpus": os.cpu_count(),
                    "rows": rows,
                    "ratio": ratio,
                    "streamed_over_small": over_small,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
