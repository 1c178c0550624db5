"""`shardtune compare`: the same recipe trained with several methods, side by side.

Every method gets the recipe's data, steps, schedule and seed; its adapter section keeps the keys
that method understands (rank, targets, dropout, …) and uses its own defaults for the rest. Before
anything trains, every method is built on the model's config (meta device): a method that was named
and does not fit the model is a one-line error; with ``all`` (every registered method, the default) it
is left out with a note (``skipped`` in compare.json), e.g. VB-LoRA whose vector length does not
divide the model's sizes. Each run
goes to ``<output.dir>/compare/<method>``; the table holds eval loss, task score, trainable
parameters and the mean time per optimizer step, and ``compare.json`` / a loss-curve PNG are written
beside them.

Budgets (``--budgets 1/32,1/8,1/2,1``): the reference is LoRA with the recipe's rank and targets;
for each fraction every method gets the value of its size option (``budget_option``: ``rank``, MoS's
``equivalent_rank``) whose trainable parameter count is nearest ``fraction × reference``
(:func:`fit_budget`, counted on the model's config). A method whose nearest count is more than
``BUDGET_TOLERANCE`` off is left out of that budget with a note. Runs go to
``compare/<method>@<a>-<b>``; the table gets the budget, the chosen option and the actual count, and
``--plot`` draws score and eval loss against trainable parameters (:func:`plot_frontier`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from shardtune.adapters import METHODS
from shardtune.core.errors import BadInput
from shardtune.core.fileio import (
    atomic_write_text,
    check_output_dir,
    check_plot_path,
    make_directory,
    save_figure,
    write_marker,
)
from shardtune.core.progress import Reporter
from shardtune.recipe.schema import Recipe, apply_override, load_recipe, recipe_from_dict
from shardtune.training.rundir import RUN_KINDS

COMPARE_FILE = "compare.json"
COMPARE_ENTRIES = [*METHODS, *(f"{m}@*" for m in METHODS), COMPARE_FILE]  # run directories, summary
BUDGET_TOLERANCE = 0.25  # a budget's nearest count may be this far off (relative); beyond: left out
BUDGET_LIMIT = 1 << 16  # the largest size option tried


def parse_methods(text: str, key: str = "--methods") -> list[str]:
    """``"lora,fossil"`` → the method names, each once (``all``: every method that fits the model)."""
    names = [t.strip() for t in text.split(",")]
    if not any(names):
        raise BadInput(f"{key}: names no method; give some, e.g. lora,fossil, or all")
    if "" in names:
        raise BadInput(f"{key}: {text!r} has an empty name between its commas")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise BadInput(f"{key}: {repeated} is given twice")
    return names


def parse_budgets(text: str, key: str = "--budgets") -> list[Fraction]:
    """``"1/32,1/8,0.5,1"`` → fractions of the reference (positive, at most 64, no repeats)."""
    budgets: list[Fraction] = []
    for item in (t.strip() for t in text.split(",")):
        try:
            value = Fraction(item)
        except (ValueError, ZeroDivisionError):
            raise BadInput(f"{key}: {item!r} is not a fraction like 1/8, 0.5 or 1") from None
        if not 0 < value <= 64:
            raise BadInput(f"{key}: {item} must be a fraction above 0 and at most 64 of the LoRA reference")
        if value in budgets:
            raise BadInput(f"{key}: {item} is given twice")
        budgets.append(value)
    return budgets


def budget_label(budget: Fraction) -> str:
    return str(budget)


@dataclass(frozen=True)
class BudgetFit:
    method: str
    budget: Fraction
    target: int  # budget × the reference's trainable parameters
    option: str  # the size option set (rank, equivalent_rank, …)
    value: int | None  # its value; None: the method cannot reach the budget
    trainable: int | None  # the actual count with that value
    note: str = ""

    @property
    def off(self) -> float | None:
        return None if self.trainable is None else self.trainable / self.target - 1


def reference_count(config, options: dict) -> int:
    """Trainable parameters of the reference: LoRA with ``options``' rank and targets."""
    from shardtune.inspection.params import count_trainable, method_options

    fields = METHODS["lora"].Options.model_fields
    lora = {k: v for k, v in options.items() if k in fields and k != "method"}
    return count_trainable(config, method_options("lora", **lora))[0]


def fit_budget(
    config,
    method: str,
    options: dict,
    budget: Fraction,
    reference: int,
    tolerance: float = BUDGET_TOLERANCE,
    counted: dict[int, int | None] | None = None,
) -> BudgetFit:
    """The value of ``method``'s size option whose trainable count on ``config`` is nearest
    ``budget × reference`` (the rest of ``options`` kept). Counts are linear in the option for every
    method, so two probes give an estimate and its neighbours are counted exactly; past the largest
    value that fits the model (e.g. a rank above a layer's size) the largest that does is taken.
    ``counted``: value → count of earlier calls with the same method and options (filled in)."""
    from shardtune.core.errors import ShardtuneError
    from shardtune.inspection.params import count_trainable, method_options

    knob = METHODS[method].budget_option
    target = max(1, round(budget * reference))
    counted = {} if counted is None else counted
    why = ""

    def count(value: int) -> int | None:
        nonlocal why
        if value not in counted:
            try:
                counted[value] = count_trainable(config, method_options(method, **{**options, knob: value}))[
                    0
                ]
            except ShardtuneError as e:
                counted[value], why = None, str(e)
        return counted[value]

    probes = []
    for value in (1, 2, 3, 4, 8, 16, 32, 64):
        if len(probes) < 2 and count(value) is not None:
            probes.append(value)
    if len(probes) < 2:
        return BudgetFit(method, budget, target, knob, None, None, why or f"no {knob} fits this model")
    (v1, v2), (c1, c2) = probes, (counted[probes[0]], counted[probes[1]])
    slope = (c2 - c1) / (v2 - v1)
    guess = v1 + (target - c1) / slope if slope > 0 else v1
    guess = min(max(guess, 1), BUDGET_LIMIT)
    near = range(max(1, math.floor(guess) - 2), min(math.ceil(guess) + 2, BUDGET_LIMIT) + 1)
    counts = [count(v) for v in near]  # every neighbour counted (all() would stop at the first)
    if all(c is None for c in counts):  # outside what fits: the value nearest it that does
        below = [v for v, c in counted.items() if c is not None and v < near[0]]
        above = [v for v, c in counted.items() if c is not None and v > near[-1]]
        low, high, up = (max(below), near[0], True) if below else (near[-1], min(above), False)
        while high - low > 1:  # fits at low (up) or at high (down), not on the other side
            middle = (low + high) // 2
            fits = count(middle) is not None
            low, high = (middle, high) if fits == up else (low, middle)
    valid = {v: c for v, c in counted.items() if c is not None}
    value = min(valid, key=lambda v: (abs(valid[v] - target), v))
    fit = BudgetFit(method, budget, target, knob, value, valid[value])
    if abs(fit.off) > tolerance:
        note = (
            f"its nearest count is {valid[value]:,} ({knob} {value}), {100 * fit.off:+.0f}% off the budget "
            f"of {target:,}"
        )
        return BudgetFit(method, budget, target, knob, None, None, note)
    return fit


def fit_budgets(
    recipe: Recipe, methods: list[str], budgets: list[Fraction], out_dir: Path, extra: dict | None = None
) -> tuple[int, list[BudgetFit]]:
    """The reference count and, per budget and method, the fitted option (or why it is left out)."""
    from shardtune.models.loading import load_config

    config = load_config(recipe.model.name, recipe.model.trust_remote_code)
    reference = reference_count(config, recipe.adapter.model_dump(mode="json"))
    fits, counts = [], {m: {} for m in methods}
    for budget in budgets:
        for method in methods:
            adapter = method_recipe(recipe, method, out_dir, extra).adapter.model_dump(mode="json")
            options = {k: v for k, v in adapter.items() if k != "method"}
            fits.append(fit_budget(config, method, options, budget, reference, counted=counts[method]))
    return reference, fits


def compare_recipe(path: Path, overrides: list[str] | None, methods: list[str]) -> tuple[Recipe, dict]:
    """The recipe ``compare`` trains, with the ``--set`` overrides, and apart from it the adapter
    options that its own method lacks but a compared method has (``--set adapter.mode=mini`` on a LoRA
    recipe, for FOSSIL), for :func:`method_recipe`. An adapter option given with ``--set`` that none of
    the compared methods has is refused (it would change nothing); one no method has at all is the
    recipe's unknown key."""
    compared = list(METHODS) if methods == ["all"] else [m for m in methods if m in METHODS]
    adapter_items, rest = {}, []
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        name = key.removeprefix("adapter.")
        if key.startswith("adapter.") and "." not in name and name != "method":
            adapter_items[name] = item
        else:
            rest.append(item)
    own = type(load_recipe(path, rest).adapter).model_fields
    theirs = {k for m in compared for k in METHODS[m].Options.model_fields}
    apart = {k: item for k, item in adapter_items.items() if k not in own and k in theirs}
    recipe = load_recipe(path, [*rest, *(item for k, item in adapter_items.items() if k not in apart)])
    for name, item in adapter_items.items():
        if name not in apart and name in own and name not in theirs:
            raise BadInput(
                f"--set {item}: none of the compared methods ({', '.join(compared)}) has this option"
            )
    extra: dict = {}
    for item in apart.values():
        apply_override(extra, item)
    return recipe, extra.get("adapter", {})


def method_recipe(recipe: Recipe, method: str, out_dir: Path, extra: dict | None = None) -> Recipe:
    """The recipe with ``method``: the recipe's adapter options that method has, and of ``extra``
    (``--set`` options the recipe's own method lacks, :func:`compare_recipe`) those it has."""
    raw = recipe.model_dump(mode="json")
    fields = METHODS[method].Options.model_fields
    options = raw["adapter"] | (extra or {})
    raw["adapter"] = {k: v for k, v in options.items() if k in fields and k != "method"} | {"method": method}
    raw["output"] = {"dir": str(out_dir / method), "overwrite": True}
    return recipe_from_dict(raw)


def unfit_methods(
    recipe: Recipe, methods: list[str], out_dir: Path, extra: dict | None = None
) -> dict[str, str]:
    """Method → why its adapter cannot be built on the recipe's model (from the config, meta device)."""
    from shardtune.core.errors import ShardtuneError
    from shardtune.inspection.params import count_trainable
    from shardtune.models.loading import load_config

    config = load_config(recipe.model.name, recipe.model.trust_remote_code)
    unfit = {}
    for method in methods:
        try:
            count_trainable(config, method_recipe(recipe, method, out_dir, extra).adapter)
        except ShardtuneError as e:
            unfit[method] = str(e)
    return unfit


def budget_recipe(recipe: Recipe, fit: BudgetFit, out_dir: Path, extra: dict | None = None) -> Recipe:
    """The method's recipe with its size option set for the budget; runs in ``<method>@<a>-<b>``."""
    label = f"{fit.method}@{str(fit.budget).replace('/', '-')}"
    raw = method_recipe(recipe, fit.method, out_dir, extra).model_dump(mode="json")
    raw["adapter"][fit.option] = fit.value
    raw["output"]["dir"] = str(out_dir / label)
    return recipe_from_dict(raw)


def compare(
    recipe: Recipe,
    methods: list[str],
    reporter: Reporter,
    plot: Path | None = None,
    budgets: list[Fraction] | None = None,
    extra: dict | None = None,
) -> dict:
    """Train the recipe with each method (``extra``: adapter options for the methods that have them,
    :func:`compare_recipe`); the rows, loss curves and what was left out, also in compare.json."""
    every = methods == ["all"]
    methods = list(METHODS) if every else methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BadInput(f"--methods: unknown method {unknown[0]!r}; available: all, {', '.join(METHODS)}")
    out_dir = Path(recipe.output.dir).expanduser() / "compare"
    model = Path(recipe.model.name).expanduser()
    data_paths = [source.path for source in recipe.data.source_list()]
    if plot is not None:
        check_plot_path(plot, "--plot", inputs=[model if model.is_dir() else None, *data_paths])
    skipped = unfit_methods(recipe, methods, out_dir, extra)
    if skipped and not every:
        method, why = next(iter(skipped.items()))
        raise BadInput(f"--methods: {method} does not fit this model: {why}")
    methods = [m for m in methods if m not in skipped]
    runs = [(m, method_recipe(recipe, m, out_dir, extra), None) for m in methods]
    reference = None
    if budgets:
        reference, fits = fit_budgets(recipe, methods, budgets, out_dir, extra)
        runs = [(f.method, budget_recipe(recipe, f, out_dir, extra), f) for f in fits if f.value is not None]
        skipped |= {f"{f.method}@{f.budget}": f.note for f in fits if f.value is None}
    check_output_dir(
        out_dir,
        "output.dir",
        replace=recipe.output.overwrite,
        what="an earlier comparison",
        replace_hint="--set output.overwrite=true to replace it, or choose another output.dir",
        inputs=[model if (model / "config.json").is_file() else None, *data_paths],
        legacy=lambda d: COMPARE_ENTRIES if (d / COMPARE_FILE).is_file() else None,
        kinds={"compare": COMPARE_ENTRIES},
        within=RUN_KINDS,  # its runs
    )
    for method, why in skipped.items():
        reporter.info(f"— {method} — left out: {why}")
    make_directory(out_dir)
    write_marker(out_dir, "compare", COMPARE_ENTRIES)
    rows, curves = [], {}
    for method, run_recipe, fit in runs:
        key = method if fit is None else f"{method}@{fit.budget}"
        reporter.info(f"— {key} —" if fit is None else f"— {key} ({fit.option} {fit.value}) —")
        row, curves[key] = _train_row(run_recipe, reporter)
        if fit is not None:
            row |= {
                "budget": str(fit.budget),
                "option": f"{fit.option}={fit.value}",
                "budget_parameters": fit.target,
            }
        rows.append(row)
    report = {
        "recipe_model": recipe.model.name,
        "steps": recipe.train.max_steps,
        "rows": rows,
        "curves": curves,
        "skipped": skipped,
        **({"reference_parameters": reference} if budgets else {}),
    }
    atomic_write_text(out_dir / COMPARE_FILE, json.dumps(report, indent=2) + "\n")
    if plot is not None and budgets:
        plot_frontier(rows, plot, f"{recipe.model.name}: score and eval loss per budget")
    elif plot is not None:
        plot_curves(curves, plot)
    return report


def _train_row(recipe: Recipe, reporter: Reporter) -> tuple[dict, list]:
    """Train one run: its row of the table and its loss curve."""
    from shardtune.training.loop import train

    result = train(recipe, reporter)
    metrics = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    row = {
        "method": recipe.adapter.method,
        "eval_loss": result.eval_loss,
        "task_score": result.task_score,
        "task_score_base": result.task_score_base,
        "trainable_parameters": result.trainable_parameters,
        "seconds_per_step": result.train_seconds / max(result.steps, 1),
        "final_loss": result.final_loss,
        "run_dir": result.run_dir,
    }
    return row, [(m["step"], m["loss"]) for m in metrics]


def plot_curves(curves: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=method)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


def spread_bars(points: list[dict], metric: str, scale: float = 1.0) -> tuple[list[float], list[list[float]]]:
    """The values a frontier plot draws for ``metric``: each point's mean over its seeds where it has
    a ``spread`` (``{metric: {"mean", "min", "max"}}``), else its own value; and the error bars down to
    the min and up to the max (0 for a single run)."""
    values, below, above = [], [], []
    for r in points:
        seeds = (r.get("spread") or {}).get(metric)
        value = scale * (seeds["mean"] if seeds else (r.get(metric) or 0))
        values.append(value)
        below.append(value - scale * seeds["min"] if seeds else 0.0)
        above.append(scale * seeds["max"] - value if seeds else 0.0)
    return values, [below, above]


def plot_frontier(rows: list[dict], path: Path, title: str = "") -> None:
    """Task score and eval loss against trainable parameters (log scale), one line per method; a row
    with a ``spread`` over training seeds is drawn at its mean with a min–max bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("--plot needs matplotlib: pip install matplotlib") from None
    fig, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["trainable_parameters"])
        x = [r["trainable_parameters"] for r in points]
        if any(r.get("task_score") is not None for r in points):
            y, bars = spread_bars(points, "task_score", 100)
            score_ax.errorbar(x, y, yerr=bars, marker="o", capsize=3, label=method)
        y, bars = spread_bars(points, "eval_loss")
        loss_ax.errorbar(x, y, yerr=bars, marker="o", capsize=3, label=method)
    for ax, label in ((score_ax, "task score (%)"), (loss_ax, "eval loss")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 10^k labels only, no overlap
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
