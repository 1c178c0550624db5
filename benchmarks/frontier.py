"""Quality per parameter: every method at several trainable-parameter budgets, with a learning-rate sweep.

    python benchmarks/frontier.py                       # CPU: the facts run in docs/benchmarks.md
    python benchmarks/frontier.py --task translate --num-samples 800 --max-length 32 --budgets 1,1/16,1/8,1/2 \
        --sweep-at 1/16,1,1/8                           # CPU: the generalisation run in docs/benchmarks.md
    python benchmarks/frontier.py --device cuda --num-samples 2000 --eval-items 200 --batch 32 --steps 1500
    python benchmarks/frontier.py --quick               # tiny random model, seconds (a test runs it)
    python benchmarks/frontier.py --report results/frontier-cpu-smollm2.json --plot f.png   # tables again
    python benchmarks/frontier.py --methods vblora,vblora+one-rate --budgets 1/4,1 --sweep-at 1/4,1 \
        --set adapter.vector_length=64 --variant one-rate:train.param_groups.logits.lr_scale=1
                                                        # one method at two settings (docs/benchmarks.md)

The budgets are fractions of a reference, LoRA of rank ``--rank`` on every linear layer; each method
gets the value of its size option (rank; MoS: equivalent_rank, its per-layer rank stays ``--rank``)
whose trainable count is nearest the budget (``shardtune.training.compare.fit_budget``, the same arithmetic as
``shardtune compare --budgets``); a method that cannot come within 25 % of a budget is left out of it
(said on stderr). A method written ``METHOD+NAME`` is a *variant*: ``METHOD`` with the recipe
keys of ``--variant NAME:KEY=VALUE`` changed (its rows carry the label and the keys), so one method
can be compared with itself at other settings, e.g. VB-LoRA with its paper's two learning rates
against one. ``--set KEY=VALUE`` changes every run's recipe (adapter options a method lacks are
ignored for it, as ``shardtune compare --set`` does). Every run trains through ``shardtune.training.loop.train`` on the same task items, steps,
batch and seed. Learning rates: each method tries ``--lrs`` (default: per method, below) at the
``--sweep-at`` budget(s) and keeps the one with the lowest validation loss (``--select score``: the
best validation score, ties broken by the loss); every other budget trains with the rate chosen at
the swept budget nearest it (by ratio). The validation items and the scored
(test) items come from ``Task.split``: for ``facts`` two disjoint samples of the trained facts
(recall), for ``sort`` new lists that are in neither the training set nor each other.

Seeds: the sweeps train with ``train.seed`` 42; once the frontier is chosen, each chosen point (method,
budget, option, rate) trains again with seeds 43 … 41 + ``--seeds`` (default 3: the adapter's init and
the data order differ, the task items do not), and the report's ``spread`` holds the mean, min and max
of the score and eval loss over them (a table "over training seeds").

``--reuse EARLIER.json`` takes each run of an earlier report whose settings, method, budget, option,
rate, variant, seed and the ``--set adapter.…`` options that reach the method are the same (training is
seeded: it would repeat), so a long run continues across sessions and methods can be added to a
finished report (``--set adapter.vector_length=64`` for VB-LoRA does not make LoRA's runs new); other
``--set`` recipe keys than the earlier report's are refused.

Prints the sweep and the frontier tables (markdown), writes JSON (default
``benchmarks/results/frontier-<device>-smollm2.json``, rewritten after every run so a cut-off run
keeps what it measured) and a plot of score and eval loss against trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardtune.data.tasks import TASKS  # noqa: E402
from shardtune.recipe.schema import apply_override, recipe_from_dict  # noqa: E402
from shardtune.training.compare import fit_budgets, parse_budgets, plot_frontier  # noqa: E402

# A small grid per method around what its paper or our quickstart uses.
# The lowest rate of each was added after a longer run (120 steps of 8) chose the lowest of the first
# grid for every method: a chosen rate should sit inside its grid, not at its edge.
DEFAULT_LRS = {
    "lora": [1e-3, 2e-3, 5e-3],
    "fossil": [5e-4, 1e-3, 2e-3, 5e-3],  # no α/r scale: at high ranks 5e-3 diverges, so lower rates
    "mos": [2e-3, 5e-3, 1e-2],
    "sharelora": [1e-3, 2e-3, 5e-3],
    # VB-LoRA's paper: bank 1e-3 and logits 1e-2 (the logits at 10× the rate by default, lr_scales);
    # the grid reaches a decade either side so that one rate for both has its best inside it too.
    "vblora": [5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2],
    # VeRA trains only its scaling vectors: its paper's rates are 10× LoRA's and more
    "vera": [5e-3, 1e-2, 2e-2, 5e-2],
    "tiedlora": [1e-3, 2e-3, 5e-3, 1e-2],  # one A and B per layer type: fewer parameters, a higher rate
    "prolora": [1e-3, 2e-3, 5e-3],
    "lors": [1e-3, 2e-3, 5e-3],  # LoRA on a pruned base (its own track: --model a pruned directory)
}
# translate: a first pass with the grids above chose the highest rate of LoRA, FOSSIL and ShareLoRA at
# 1/16, so the grids reach one step higher there.
TASK_LRS = {
    "translate": {
        "lora": [1e-3, 2e-3, 5e-3, 1e-2],
        "fossil": [5e-4, 1e-3, 2e-3, 5e-3, 1e-2],
        "mos": [2e-3, 5e-3, 1e-2, 2e-2],
        "sharelora": [1e-3, 2e-3, 5e-3, 1e-2],
    }
}
FALLBACK_LRS = [2e-3, 5e-3]
MAX_NEW_TOKENS = {"facts": 8, "sort": 24, "translate": 16}  # other tasks: 32
FIRST_SEED = 42  # train.seed of the sweeps; --seeds N adds 43 … 42 + N − 1 for the chosen points


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny random model, a few steps (for the tests)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", choices=sorted(TASKS), default="facts")
    p.add_argument(
        "--methods",
        default="lora,fossil,mos,sharelora,vera,vblora,tiedlora,prolora",
        help="comma-separated; METHOD+NAME is METHOD with the keys of --variant NAME:... changed",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="a recipe key of the variant NAME (repeat for several keys or variants)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe key for every run (repeatable; adapter options reach the methods that have them)",
    )
    p.add_argument("--budgets", default="1/8,1,1/2,1/16,2", help="run in this order (tables sort them)")
    p.add_argument("--rank", type=int, default=16, help="rank of the LoRA reference (all linear layers)")
    p.add_argument("--num-samples", type=int, default=200, help="training items (facts: the facts)")
    p.add_argument("--eval-items", type=int, default=50, help="validation items and as many test items")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument(
        "--lrs",
        default=None,
        help="comma-separated learning rates for every method (default: per method, task)",
    )
    p.add_argument(
        "--sweep-at",
        default="1,1/8,1/2,1/16",
        help="budgets whose runs choose the lr (in this order; a budget not among them takes the rate of "
        "the nearest one), or 'all' (--budgets order)",
    )
    p.add_argument(
        "--select",
        choices=["loss", "score"],
        default="loss",
        help="what picks the lr on the validation items",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="task seed (the items; training seeds: --seeds)")
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="training seeds of every chosen point (train.seed 42, 43, …: the adapter's init and the data "
        "order); the sweeps run with 42, the chosen configuration again with each other seed",
    )
    p.add_argument("--json", type=Path, default=None, help="output JSON")
    p.add_argument("--plot", type=Path, default=None, help="output PNG (needs matplotlib)")
    p.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temp dir)")
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="JSON of an earlier run with the same settings: its runs (method, budget, option, lr) are taken",
    )
    p.add_argument(
        "--report", type=Path, default=None, help="print the tables (and --plot) of this JSON, run nothing"
    )
    if p.parse_args(argv).quick:  # other defaults; options given on the command line still win
        p.set_defaults(model="tiny-llama", rank=8, budgets="1/4,1/2,1", sweep_at="1/2")
        p.set_defaults(num_samples=16, eval_items=4, steps=3, batch=4, max_length=96, seeds=1)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def base_recipe(args, out: Path) -> dict:
    return {
        "model": {"name": args.model},
        "adapter": {"method": "lora", "rank": args.rank, "targets": "all-linear"},
        # plain prompts (no chat template): a third of the tokens of SmolLM2's chat format
        "data": {
            "task": args.task,
            "num_samples": args.num_samples,
            "eval_samples": 0,
            "max_length": args.max_length,
            "chat_template": False,
            "seed": args.seed,
        },
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": 1e-3,
            "warmup_steps": max(1, args.steps // 10),
            "schedule": "cosine",
            "seed": FIRST_SEED,
            "cpu": args.device == "cpu",
        },
        "eval": {"score": False},
        "output": {"dir": str(out), "overwrite": True},
        "logging": {"every": max(1, args.steps // 5)},
    }


def measure(model, tokenizer, examples, args) -> dict:
    """Exact-match score and token-weighted loss of ``model`` on ``examples``."""
    from torch.utils.data import DataLoader

    from shardtune.data.examples import Collator, encode_all
    from shardtune.inspection.evaluate import heldout_loss, score_task

    score = score_task(model, tokenizer, examples, False, MAX_NEW_TOKENS.get(args.task, 32), 32)
    features, _ = encode_all(examples, tokenizer, args.max_length, False)
    loader = DataLoader(features, batch_size=32, collate_fn=Collator(tokenizer.pad_token_id))
    return {"score": score.accuracy, "loss": heldout_loss(model, loader)}


SAME_SETTINGS = (
    "model",
    "task",
    "rank",
    "num_samples",
    "eval_items",
    "steps",
    "batch",
    "max_length",
    "seed",
)


def adapter_set(method: str, extra: dict | None = None) -> list[str]:
    """The ``--set adapter.KEY=VALUE`` items (``extra``, default this run's) that reach ``method`` (those
    it has an option for): part of its runs' identity, so that ``--reuse`` takes a LoRA run made before
    ``--set adapter.vector_length=64`` was added for VB-LoRA, and no run made with other options."""
    from shardtune.adapters import METHODS

    fields = METHODS[method].Options.model_fields
    return sorted(f"adapter.{k}={v}" for k, v in (EXTRA if extra is None else extra).items() if k in fields)


def recipe_set(items: list[str]) -> list[str]:
    """The ``--set`` items that are not adapter options (every run's recipe)."""
    return sorted(i for i in items if not i.partition("=")[0].strip().startswith("adapter."))


def parse_methods(args) -> dict[str, tuple[str, list[str]]]:
    """``--methods`` and ``--variant`` → label → (method, the variant's ``KEY=VALUE`` items)."""
    from shardtune.adapters import METHODS

    variants: dict[str, list[str]] = {}
    for item in args.variant:
        name, sep, override = item.partition(":")
        if not sep or not name.strip() or "=" not in override:
            raise SystemExit(f"--variant {item}: expected NAME:KEY=VALUE")
        variants.setdefault(name.strip(), []).append(override.strip())
    labels: dict[str, tuple[str, list[str]]] = {}
    for label in (m.strip() for m in args.methods.split(",") if m.strip()):
        method, _, name = label.partition("+")
        if method not in METHODS:
            raise SystemExit(f"--methods: unknown method {method!r} (known: {', '.join(METHODS)})")
        if name and name not in variants:
            raise SystemExit(f"--methods: {label} names no --variant {name}:KEY=VALUE")
        labels[label] = (method, variants.get(name, []))
    unused = set(variants) - {label.partition("+")[2] for label in labels}
    if unused:
        raise SystemExit(f"--variant {', '.join(sorted(unused))}: no METHOD+NAME in --methods uses it")
    return labels


def split_overrides(items: list[str]) -> tuple[list[str], dict]:
    """``--set`` items → (those for the recipe, the adapter options as a dict for ``method_recipe``)."""
    adapter: dict = {}
    rest = []
    for item in items:
        if item.partition("=")[0].strip().startswith("adapter."):
            apply_override(adapter, item)
        else:
            rest.append(item)
    return rest, adapter.get("adapter", {})


REUSED: dict[tuple, dict] = {}
LABELS: dict[str, tuple[str, list[str]]] = {}  # label → (method, the variant's KEY=VALUE items)
EXTRA: dict = {}  # adapter options of --set


def load_reused(args) -> None:
    """Runs of an earlier JSON whose settings equal these (training is seeded, so they would repeat)."""
    if args.reuse is None:
        return
    earlier = json.loads(args.reuse.read_text())
    differ = [k for k in SAME_SETTINGS if earlier["settings"].get(k) != getattr(args, k)]
    overrides = earlier["settings"].get("overrides", [])  # (older files: none)
    if recipe_set(overrides) != recipe_set(args.overrides):
        differ.append("--set (recipe keys)")
    if differ:
        raise SystemExit(f"--reuse: {args.reuse} was run with other {', '.join(differ)}")
    extra = split_overrides(overrides)[1]
    for row in earlier["sweep"] + earlier["rows"] + earlier.get("seeds", []):
        key = (row["method"], row["budget"], row["option"], row["lr"], tuple(row.get("variant", [])))
        options = row.get("adapter_set", adapter_set(row["method"].partition("+")[0], extra))
        REUSED[(*key, row.get("seed", FIRST_SEED), tuple(options))] = {
            **row,
            "reused": str(args.reuse.name),
        }


def run_one(args, raw: dict, fit, lr: float, split, work: Path, seed: int = FIRST_SEED) -> dict:
    method, variant = LABELS[fit.method]
    key = (fit.method, str(fit.budget), f"{fit.option}={fit.value}", lr, tuple(variant), seed)
    key += (tuple(adapter_set(method)),)
    if key in REUSED:
        print(
            f"{fit.method} @ {fit.budget} lr {lr:g} seed {seed}: taken from {args.reuse}",
            file=sys.stderr,
            flush=True,
        )
        return dict(REUSED[key])
    return train_one(args, raw, fit, lr, split, work, seed)


def train_one(args, raw: dict, fit, lr: float, split, work: Path, seed: int = FIRST_SEED) -> dict:
    from shardtune.artifacts.checkpoint import load_adapted_model
    from shardtune.core.progress import Reporter
    from shardtune.training.compare import method_recipe
    from shardtune.training.loop import train

    label = str(fit.budget).replace("/", "-")
    raw = json.loads(json.dumps(raw))
    raw["train"]["lr"] = lr
    raw["train"]["seed"] = seed
    method, variant = LABELS[fit.method]
    out = work / label / f"lr{lr:g}" / fit.method.replace("+", "-")
    if seed != FIRST_SEED:
        out = out.with_name(f"{out.name}-seed{seed}")
    resolved = method_recipe(recipe_from_dict(raw), method, out, EXTRA).model_dump(mode="json")
    resolved["adapter"][fit.option] = fit.value
    for item in variant:
        apply_override(resolved, item)
    recipe = recipe_from_dict(resolved)
    result = train(recipe, Reporter(quiet=True))
    model, tokenizer, _ = load_adapted_model(result.run_dir)
    model.to(args.device)
    val, test = measure(model, tokenizer, split[0], args), measure(model, tokenizer, split[1], args)
    del model
    row = {
        "method": fit.method,
        "budget": str(fit.budget),
        "option": f"{fit.option}={fit.value}",
        **({"variant": variant} if variant else {}),
        **({"adapter_set": adapter_set(method)} if adapter_set(method) else {}),
        "trainable_parameters": result.trainable_parameters,
        "budget_parameters": fit.target,
        "lr": lr,
        "seed": seed,
        "run": str(Path(result.run_dir).relative_to(work)),
        "val_score": val["score"],
        "val_loss": val["loss"],
        "task_score": test["score"],
        "eval_loss": test["loss"],
        "final_train_loss": result.final_loss,
        "seconds_per_step": result.train_seconds / max(result.steps, 1),
        "seconds": result.seconds,
    }
    print(
        f"{fit.method} @ {fit.budget} ({row['option']}, {row['trainable_parameters']:,}) lr {lr:g} seed {seed}: "
        f"val {100 * val['score']:.1f}% / {val['loss']:.3f}, test {100 * test['score']:.1f}% / "
        f"{test['loss']:.3f}  ({result.seconds:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return row


def fit_labels(recipe, budgets: list[Fraction], work: Path):
    """:func:`fit_budgets` for every label: a variant is sized with its own adapter keys."""
    from dataclasses import replace

    reference, fits = None, []
    for label, (method, variant) in LABELS.items():
        extra = {"adapter": dict(EXTRA)}
        for item in variant:
            if item.startswith("adapter."):
                apply_override(extra, item)
        reference, found = fit_budgets(recipe, [method], budgets, work, extra["adapter"])
        fits += [replace(f, method=label) for f in found]
    return reference, fits


def best(rows: list[dict], select: str) -> dict:
    """The run with the lowest validation loss (``select="loss"``) or the best validation score, ties
    broken by the loss (``"score"``: coarse on a few items, one item is several points)."""
    if select == "loss":
        return min(rows, key=lambda r: r["val_loss"])
    return max(rows, key=lambda r: (r["val_score"], -r["val_loss"]))


def sweep(args, raw, report, usable, method, budget, budgets, split, work, save) -> float:
    """Train ``method`` at ``budget`` with each learning rate; the one the validation items prefer
    is recorded (and is the budget's row when the budget is on the frontier)."""
    grids = TASK_LRS.get(args.task, DEFAULT_LRS)
    base = LABELS[method][0]
    lrs = (
        [float(x) for x in args.lrs.split(",")]
        if args.lrs
        else grids.get(base, DEFAULT_LRS.get(base, FALLBACK_LRS))
    )
    tried = []
    for lr in lrs:  # (each run saved as it ends: a cut-off sweep is taken by --reuse next time)
        tried.append(run_one(args, raw, usable[method, budget], lr, split, work))
        report["sweep"].append(tried[-1])
        save()
    pick = best(tried, args.select)
    report["chosen_lr"][f"{method}@{budget}"] = pick["lr"]
    if budget in budgets:
        report["rows"].append(pick)
    save()
    return pick["lr"]


def spread(report: dict) -> dict:
    """Per chosen point (``METHOD@BUDGET``): its seeds, and the mean, min and max over them of the
    test score and the eval loss (the chosen row is the first seed's run, ``report["seeds"]`` the
    others)."""
    runs: dict[str, list[dict]] = {}
    for r in report["rows"] + report.get("seeds", []):
        runs.setdefault(f"{r['method']}@{r['budget']}", []).append(r)
    out = {}
    for point, rows in runs.items():
        rows = sorted(rows, key=lambda r: r.get("seed", FIRST_SEED))
        out[point] = {"seeds": [r.get("seed", FIRST_SEED) for r in rows]}
        for metric in ("task_score", "eval_loss"):
            values = [r[metric] for r in rows]
            out[point][metric] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


def with_spread(report: dict) -> list[dict]:
    """The frontier's rows, each with its point's spread over seeds (the plot draws min–max bars)."""
    points = report.get("spread") or spread(report)
    return [{**r, "spread": points.get(f"{r['method']}@{r['budget']}")} for r in report["rows"]]


def nearest(budget: Fraction, swept: dict[Fraction, float]) -> Fraction:
    """The swept budget nearest ``budget`` by ratio (1/8 is nearer 1/16 than 1/2); a tie goes to the
    smaller one."""
    return min(swept, key=lambda b: (abs(math.log(b / budget)), b))


def print_tables(report: dict) -> None:
    print(f"\nlearning-rate sweep (chosen by validation {report['settings'].get('select', 'score')}):\n")
    print("| method | budget | lr | val score | val loss | chosen |\n|---|---|---|---|---|---|")
    for r in report["sweep"]:
        chosen = "yes" if r["lr"] == report["chosen_lr"].get(f"{r['method']}@{r['budget']}") else ""
        print(
            f"| {r['method']} | {r['budget']} | {r['lr']:g} | {100 * r['val_score']:.1f} % | "
            f"{r['val_loss']:.3f} | {chosen} |"
        )
    state = "" if report["complete"] else ", INCOMPLETE: the run was cut short"
    print(
        f"\nfrontier ({report['task']}, test items; base model: {100 * report['base']['score']:.1f} %{state}):\n"
    )
    print(
        f"| budget | method | option | trainable | × LoRA r{report['settings']['rank']} | lr | score | eval loss | s/step |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for r in sorted(report["rows"], key=lambda r: (Fraction(r["budget"]), r["method"])):
        print(
            f"| {r['budget']} | {r['method']} | {r['option']} | {r['trainable_parameters']:,} | "
            f"{r['trainable_parameters'] / report['reference_parameters']:.3f} | {r['lr']:g} | "
            f"{100 * r['task_score']:.1f} % | {r['eval_loss']:.3f} | {r['seconds_per_step']:.2f} |"
        )
    points = report.get("spread") or {}
    if any(len(p["seeds"]) > 1 for p in points.values()):
        print("\nover training seeds (mean, min–max; the chosen configuration of each point):\n")
        print("| budget | method | seeds | score | eval loss |\n|---|---|---|---|---|")
        for point, p in sorted(points.items(), key=lambda kv: (Fraction(kv[0].split("@")[1]), kv[0])):
            method, budget = point.split("@")
            score, loss = p["task_score"], p["eval_loss"]
            print(
                f"| {budget} | {method} | {len(p['seeds'])} | {100 * score['mean']:.1f} % "
                f"({100 * score['min']:.1f}–{100 * score['max']:.1f}) | {loss['mean']:.3f} "
                f"({loss['min']:.3f}–{loss['max']:.3f}) |"
            )
    variants = {r["method"]: r["variant"] for r in report["sweep"] + report["rows"] if r.get("variant")}
    for label, items in sorted(variants.items()):
        print(f"{label}: {' '.join(items)}")
    for note in report["left_out"]:
        print(f"left out: {note}")


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.report is not None:  # e.g. the JSON of a run that was cut short
        report = json.loads(args.report.read_text())
        print_tables(report)
        if args.plot is not None:
            plot_frontier(with_spread(report), args.plot, f"{report['model']}, {report['task']}")
        return 0
    torch.manual_seed(0)
    load_reused(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from shardtune.models.loading import load_model

    LABELS.update(parse_methods(args))
    methods = list(LABELS)
    recipe_items, adapter_items = split_overrides(args.overrides)
    EXTRA.update(adapter_items)
    budgets = parse_budgets(args.budgets)
    sweep_at = budgets if args.sweep_at == "all" else parse_budgets(args.sweep_at, "--sweep-at")
    name = "quick" if args.quick else f"{args.device}-smollm2"
    name += "" if args.task == "facts" else f"-{args.task}"  # one file per task
    out = args.json or Path(__file__).parent / "results" / f"frontier-{name}.json"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        raw = base_recipe(args, work / "run")
        for item in recipe_items:
            apply_override(raw, item)
        recipe = recipe_from_dict(raw)
        reference, fits = fit_labels(recipe, sorted(set(budgets) | set(sweep_at)), work)
        left_out = [f"{f.method} at {f.budget}: {f.note}" for f in fits if f.value is None]
        for note in left_out:
            print(f"left out: {note}", file=sys.stderr)
        task = TASKS[args.task]
        parts = task.split(args.num_samples, args.eval_items, args.seed, args.eval_items)
        split = [[_example(p) for p in parts.validation], [_example(p) for p in parts.held]]
        base_model, tokenizer = load_model(args.model)
        base_model.to(args.device)
        base = measure(base_model, tokenizer, split[1], args)
        del base_model
        report = {
            "benchmark": "frontier",
            "model": args.model,
            "task": args.task,
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "reference": f"lora rank {args.rank}, all-linear",
            "reference_parameters": reference,
            "base": base,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "left_out": left_out,
            "sweep": [],
            "chosen_lr": {},
            "rows": [],
            "seeds": [],  # the chosen points again, with the other training seeds
            "complete": False,
        }

        def save() -> None:
            report["wall_seconds"] = round(time.perf_counter() - started, 1)
            report["spread"] = spread(report)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")

        usable = {(f.method, f.budget): f for f in fits if f.value is not None}
        swept: dict[str, dict[Fraction, float]] = {m: {} for m in methods}  # method → budget → chosen lr
        for budget in sweep_at:  # the sweeps first, budget by budget in the order given
            for method in methods:
                if (method, budget) in usable:
                    lr = sweep(args, raw, report, usable, method, budget, budgets, split, work, save)
                    swept[method][budget] = lr
        for method in methods:  # a method that reaches no sweep budget sweeps at its first budget
            reachable = [b for b in budgets if (method, b) in usable]
            if not swept[method] and reachable:
                lr = sweep(args, raw, report, usable, method, reachable[0], budgets, split, work, save)
                swept[method][reachable[0]] = lr
        # then the other budgets, largest first, each with the rate chosen at the nearest swept budget
        for budget in sorted(budgets, reverse=True):
            for method in methods:
                done = {r["budget"] for r in report["rows"] if r["method"] == method}
                if (method, budget) in usable and str(budget) not in done:
                    lr = swept[method][nearest(budget, swept[method])]
                    row = run_one(args, raw, usable[method, budget], lr, split, work)
                    report["rows"].append(row)
                    save()
        seeds = range(FIRST_SEED + 1, FIRST_SEED + args.seeds)
        for row in sorted(report["rows"], key=lambda r: (-Fraction(r["budget"]), r["method"])):
            fit = usable[row["method"], Fraction(row["budget"])]
            for seed in seeds:  # the chosen configuration again, each other training seed
                report["seeds"].append(run_one(args, raw, fit, row["lr"], split, work, seed))
                save()
        report["complete"] = True
        save()
    print_tables(report)
    plot = args.plot
    if plot is None and not args.quick:
        plot = Path(__file__).resolve().parents[1] / "docs" / f"frontier-{name}.png"
    if plot is not None:
        plot_frontier(with_spread(report), plot, f"{args.model}, {args.task}: score and eval loss per budget")
        print(f"plot written to {plot}", file=sys.stderr)
    print(f"\nwritten to {out} ({report['wall_seconds']:.0f} s)", file=sys.stderr)
    return 0


def _example(pair):
    from shardtune.data.examples import Example

    return Example(*pair)


if __name__ == "__main__":
    sys.exit(main())
