"""Start-up time of cheap commands, side by side with `python -c pass` (medians of interleaved rounds).

    python benchmarks/startup.py [--rounds 7]

Targets (issue 15): `--help`, `methods`, `models`, `tasks` under 0.5 s; `params` under 2.5 s; an
offline run that names a model missing from the cache fails in well under 2 s. `params` reads the
model's layout from shardtune's cache once it has counted on that model (shardtune.inspection.layout); the row
"no layout cached" runs each time with an empty SHARDTUNE_CACHE, the first count on a model. Prints a
table and writes benchmarks/results/startup-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "shardtune --help": [sys.executable, "-m", "shardtune", "--help"],
    "shardtune methods": [sys.executable, "-m", "shardtune", "methods"],
    "shardtune models": [sys.executable, "-m", "shardtune", "models"],
    "shardtune tasks": [sys.executable, "-m", "shardtune", "tasks"],
    "shardtune params -m tiny-llama": [sys.executable, "-m", "shardtune", "params", "-m", "tiny-llama"],
    "shardtune params --method fossil": [sys.executable, "-m", "shardtune", "params", "--method", "fossil"],
    "params -m tiny-llama, no layout cached": [sys.executable, "-m", "shardtune", "params", "-m", "tiny-llama"],
    "offline, model not cached (exit 2)": [
        sys.executable, "-m", "shardtune", "--offline", "train", str(ROOT / "recipes" / "tiny.yaml"),
        "--set", "model.name=org/not-in-the-cache",
    ],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for command in COMMANDS.values():  # warm the caches (and convert the embedded model once)
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True)
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            with tempfile.TemporaryDirectory() as empty:
                cold = {"SHARDTUNE_CACHE": empty} if "no layout cached" in name else {}
                start = time.perf_counter()
                subprocess.run(command, cwd=ROOT, env={**env, **cold}, capture_output=True)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c pass"])
    rows = []
    print(f"{'command':40} {'median s':>9} {'- python':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"command": name, "median_s": median, "over_python_s": median - base, "runs": values})
        print(f"{name:40} {median:9.3f} {median - base:9.3f}")
    out = (
        args.json
        or ROOT / "benchmarks" / "results" / f"startup-{platform.machine()}-{os.cpu_count()}cpu.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "rounds": args.rounds}
    out.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
