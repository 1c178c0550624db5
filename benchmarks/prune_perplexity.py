"""Held-out perplexity of SmolLM2-135M-Instruct after magnitude, Wanda and SparseGPT pruning.

    python benchmarks/prune_perplexity.py                      # CPU: ~32 CPU-minutes (2 cores)
    python benchmarks/prune_perplexity.py --device cuda --samples 128 --eval-seqs 128

Text: English prose that every machine with this project has and nobody downloads — the docstrings
of Python standard-library modules (read with ``ast``, so they are the same for a given Python
version). Calibration modules and held-out modules are disjoint. Calibration goes through the same
path as ``shardtune prune --recipe``: a recipe whose ``data.path`` is a JSONL of text records (the
calibration docstrings packed into ~1,100-character records, ``max_length`` 256), ``--samples`` of
them. Perplexity is ``exp`` of the mean next-token loss over ``--eval-seqs`` held-out windows of 256
tokens. Every linear layer of the 30 blocks is pruned (embeddings and the tied head are not).

Prints a table and writes JSON (default ``benchmarks/results/prune_perplexity-<device>-smollm2.json``).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardtune.artifacts.prune import calibration_batches, prune_model, sparsity_of  # noqa: E402
from shardtune.models.loading import load_model  # noqa: E402

CALIBRATION_MODULES = [
    "argparse", "logging/__init__", "subprocess", "threading", "pathlib", "unittest/case", "http/client",
    "email/message", "collections/__init__", "configparser", "shutil", "tempfile", "inspect", "typing",
]  # fmt: skip
HELDOUT_MODULES = [
    "asyncio/tasks", "tarfile", "zipfile", "difflib", "textwrap", "datetime", "fractions", "statistics",
    "functools", "heapq", "calendar", "csv", "smtplib", "ftplib", "imaplib", "pickle", "random", "decimal",
]  # fmt: skip
SEQ = 256


def docstrings(modules: list[str]) -> list[str]:
    """Module, class and function docstrings of these standard-library modules, in source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for name in modules:
        path = root / f"{name}.py"
        if not path.is_file():
            path = root / name / "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= 80:
                    found.append(doc)
    return found


def calibration_recipe(workdir: Path) -> Path:
    """A recipe whose data is the calibration docstrings, packed into ~1,100-character text records."""
    records, current = [], ""
    for doc in docstrings(CALIBRATION_MODULES):
        current = f"{current}\n\n{doc}" if current else doc
        if len(current) >= 1100:
            records.append({"text": current})
            current = ""
    data = workdir / "calibration.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {
        "model": {"name": "smollm2-135m-instruct"},
        "adapter": {"method": "lors"},
        "data": {"path": str(data), "format": "text", "max_length": SEQ, "eval_samples": 1, "seed": 0},
    }
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def heldout_windows(tokenizer, n: int) -> torch.Tensor:
    text = "\n\n".join(docstrings(HELDOUT_MODULES))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n * SEQ:
        raise SystemExit(f"held-out text has {ids.numel()} tokens, fewer than {n} windows of {SEQ}")
    return ids[: n * SEQ].reshape(n, SEQ)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: str, batch: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        ids = windows[start : start + batch].to(device)
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=64, help="calibration records (of ≤ 256 tokens)")
    parser.add_argument("--eval-seqs", type=int, default=32, help="held-out windows of 256 tokens")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_model("smollm2-135m-instruct", "float32")
    model.to(args.device).eval()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    windows = heldout_windows(tokenizer, args.eval_seqs)
    rows = [
        {
            "method": "dense",
            "pattern": "-",
            "sparsity": 0.0,
            "perplexity": perplexity(model, windows, args.device),
        }
    ]
    print(f"dense: perplexity {rows[0]['perplexity']:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = calibration_recipe(Path(tmp))
        batches = list(calibration_batches(recipe, tokenizer, args.samples))
        calib_tokens = int(sum(b["attention_mask"].sum() for b in batches))
        for pattern in ("50%", "2:4"):
            for method in ("magnitude", "wanda", "sparsegpt"):
                model.load_state_dict(dense_state)
                start = time.perf_counter()
                prune_model(
                    model,
                    method,
                    sparsity=0.5 if pattern == "50%" else None,
                    pattern=None if pattern == "50%" else pattern,
                    calibration=[{k: v.to(args.device) for k, v in b.items()} for b in batches],
                )
                seconds = time.perf_counter() - start
                ppl = perplexity(model, windows, args.device)
                rows.append(
                    {
                        "method": method,
                        "pattern": pattern,
                        "sparsity": round(sparsity_of(model), 4),
                        "perplexity": ppl,
                        "prune_seconds": round(seconds, 1),
                    }
                )
                print(f"{method} {pattern}: perplexity {ppl:.2f} (pruned in {seconds:.0f} s)", flush=True)

    print("\n| pruning | magnitude | Wanda | SparseGPT |\n|---|---|---|---|")
    print(f"| none (dense) | {rows[0]['perplexity']:.2f} | | |")
    for pattern in ("50%", "2:4"):
        cells = [f"{r['perplexity']:.2f}" for r in rows if r["pattern"] == pattern]
        print(f"| {'50 % unstructured' if pattern == '50%' else '2:4'} | " + " | ".join(cells) + " |")
    result = {
        "model": "smollm2-135m-instruct (fp32)",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "calibration": {
            "records": sum(b["input_ids"].shape[0] for b in batches),
            "tokens": calib_tokens,
            "modules": CALIBRATION_MODULES,
        },
        "heldout": {"windows": args.eval_seqs, "tokens_per_window": SEQ, "modules": HELDOUT_MODULES},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rows": rows,
    }
    out = args.out or Path(__file__).parent / "results" / f"prune_perplexity-{args.device}-smollm2.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
