"""A quantized frozen base (model.quantize) vs an unquantized one: peak memory and step time, side by side.

    python benchmarks/quant_memory.py                                   # CPU, small Llama shape, fp32
    python benchmarks/quant_memory.py --device cuda --shape 1b --dtype bf16 --batch 4 --seq 1024

A random Llama of the given shape is saved once to a temporary model directory; every variant loads
it through shardtune's own loading path (``shardtune.models.loading.load_model``: unquantized, or quantized by
bitsandbytes through transformers' ``BitsAndBytesConfig``), adapts all seven projections of every
block (LoRA at rank 16, or MoS at the same rank with budget R = r/4), and runs forward + backward +
AdamW steps. ``--dtype`` is the unquantized base's dtype and the 4-bit layers' compute dtype.

Each variant runs in a fresh process (so one variant's allocator state cannot inflate another's), and
the variants are run interleaved, round after round (``--repeats``); the table gives medians, so the
ratios to the unquantized base are measured side by side in one run. Memory:

* ``weights`` — the base's parameters as held (quantized layers as codes + scales) plus the adapter,
  counted tensor by tensor (exact, any device);
* ``peak`` — on a GPU ``torch.cuda.max_memory_allocated`` over the training steps (reset after
  loading); on the CPU the process's peak resident memory over the training steps (``VmHWM``, reset
  after loading through ``/proc/self/clear_refs``; Linux) minus its resident memory before the model
  was loaded: weights, optimizer state, activations and temporaries.

Prints a table and writes JSON (``benchmarks/results/quant_memory-<device>-<shape>.json``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_time import SHAPES, TARGETS, build_base  # noqa: E402

BASES = {
    "unquantized": None,
    "nf4": ("nf4", True),
    "nf4 (no double quant)": ("nf4", False),
    "int8": ("int8", True),
}
METHOD_CHOICES = ("lora", "mos")


def adapter_options(method: str, rank: int, n_layers: int):
    from shardtune.adapters import METHODS

    if method == "lora":
        return METHODS["lora"].Options(method="lora", rank=rank, alpha=2 * rank, targets=TARGETS)
    budget = max(2, rank // 4)
    while rank - 1 > (budget - 1) * n_layers:  # the pool must hold r − p public vectors per layer
        budget += 1
    return METHODS["mos"].Options(
        method="mos", rank=rank, equivalent_rank=budget, private_rank=1, shards_per_vector=2, targets=TARGETS
    )


def resident_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def run_variant(args) -> dict:
    """One variant in this (fresh) process: load, adapt, train; memory and per-round step times."""
    from shardtune.adapters.model import adapter_named_parameters, inject_adapter
    from shardtune.models import quant
    from shardtune.models.loading import load_model

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = args.device.startswith("cuda")
    quant.require_bitsandbytes()  # every variant imports the same libraries before the baseline
    import transformers.quantizers.auto  # noqa: F401

    release_freed_memory()
    before = torch.cuda.memory_allocated() if cuda else resident_bytes("VmRSS")
    spec = BASES[args.base]
    quantization = quant.Quantization(spec[0], spec[1], dtype) if spec else None
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    model, _ = load_model(args.model_dir, name, quantization=quantization, device=args.device)
    if quantization is None:  # a quantized base is loaded where it runs
        model.to(args.device)
    inject_adapter(model, adapter_options(args.method, args.rank, SHAPES[args.shape][2]))
    adapter = [p for _, p in adapter_named_parameters(model)]
    held = quant.base_memory(model, dtype, leave_out=adapter)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapter)
    params = [p for p in adapter if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(
        0, SHAPES[args.shape][5], (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(args.device)
    autocast = dtype if dtype != torch.float32 else None

    def step():
        with torch.autocast(args.device.split(":")[0], dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    release_freed_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident size starts again from now
    model.train()
    step()
    step()
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else resident_bytes("VmHWM")
    times = []
    for _ in range(args.rounds):
        sync()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        times.append((time.perf_counter() - started) / args.steps)
    return {
        "base_bytes_held": held.stored_bytes,
        "base_bytes_unquantized": held.unquantized_bytes,
        "adapter_bytes": adapter_bytes,
        "peak_bytes": peak - before,
        "step_s": statistics.median(times),
        "quantized_layers": held.quantized_layers,
    }


def save_random_model(shape: str, directory: Path) -> None:
    from shardtune.models.loading import byte_tokenizer

    model = build_base(shape, torch.float32, "cpu")
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)  # load_model reads a tokenizer; ids are drawn directly


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", default="lora,mos")
    ap.add_argument("--bases", default=",".join(BASES), help="comma-separated: " + ", ".join(BASES))
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant process")
    ap.add_argument("--steps", type=int, default=2, help="steps per timed round")
    ap.add_argument("--repeats", type=int, default=2, help="processes per variant, interleaved")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process's part
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    methods = [m for m in args.methods.split(",") if m]
    bases = [b for b in args.bases.split(",") if b]
    for m in methods:
        assert m in METHOD_CHOICES, f"--methods: {m} (one of {', '.join(METHOD_CHOICES)})"
    for b in bases:
        assert b in BASES, f"--bases: {b} (one of {', '.join(BASES)})"
    runs: dict[tuple[str, str], list[dict]] = {(m, b): [] for m in methods for b in bases}
    with tempfile.TemporaryDirectory() as tmp:
        save_random_model(args.shape, Path(tmp))
        for _ in range(args.repeats):
            for method, base in runs:
                command = [sys.executable, __file__, "--variant", "1", "--base", base, "--method", method]
                command += ["--model-dir", tmp, "--shape", args.shape, "--device", args.device]
                command += ["--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq)]
                command += [
                    "--rank",
                    str(args.rank),
                    "--rounds",
                    str(args.rounds),
                    "--steps",
                    str(args.steps),
                ]
                command += ["--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    sys.exit(f"{method} on a {base} base failed:\n{done.stderr[-3000:]}")
                runs[(method, base)].append(json.loads(done.stdout.strip().splitlines()[-1]))

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"\nquantized base vs unquantized — {args.shape} Llama shape, {args.dtype}, batch {args.batch} × seq "
        f"{args.seq}, rank {args.rank}, all seven projections, {device_name}, {args.threads} threads"
    )
    header = f"{'method':7} {'base':22} {'weights MiB':>11} {'peak MiB':>9} {'peak ×unq':>9} {'ms/step':>9} {'time ×unq':>9}"
    print(header)
    rows = []
    for method, base in runs:
        measured = runs[(method, base)]
        row = {key: statistics.median(r[key] for r in measured) for key in measured[0]}
        unquantized = runs.get((method, "unquantized"))
        reference = (
            {key: statistics.median(r[key] for r in unquantized) for key in row} if unquantized else None
        )
        weights = row["base_bytes_held"] + row["adapter_bytes"]
        peak_ratio = row["peak_bytes"] / reference["peak_bytes"] if reference else None
        time_ratio = row["step_s"] / reference["step_s"] if reference else None
        print(
            f"{method:7} {base:22} {weights / 2**20:>11.1f} {row['peak_bytes'] / 2**20:>9.1f} "
            f"{peak_ratio or 0:>9.2f} {1000 * row['step_s']:>9.1f} {time_ratio or 0:>9.2f}"
        )
        rows.append(
            {
                "method": method,
                "base": base,
                **row,
                "weights_bytes": weights,
                "peak_vs_unquantized": peak_ratio,
                "time_vs_unquantized": time_ratio,
                "repeats": measured,
            }
        )
    import bitsandbytes

    path = Path(
        args.json
        or ROOT / "benchmarks" / "results" / f"quant_memory-{args.device.split(':')[0]}-{args.shape}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "device": device_name,
    }
    path.write_text(
        json.dumps({"args": vars(args), "environment": environment, "rows": rows}, indent=2) + "\n"
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
