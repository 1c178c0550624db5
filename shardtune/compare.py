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
"""

from __future__ import annotations

import json
from pathlib import Path

from shardtune.adapters import METHODS
from shardtune.errors import BadInput
from shardtune.fileio import (
    atomic_write_text,
    check_output_dir,
    check_plot_path,
    make_directory,
    save_figure,
    write_marker,
)
from shardtune.progress import Reporter
from shardtune.recipe import Recipe, recipe_from_dict

COMPARE_FILE = "compare.json"
COMPARE_ENTRIES = [*METHODS, COMPARE_FILE]  # one run directory per method, and the summary


def method_recipe(recipe: Recipe, method: str, out_dir: Path) -> Recipe:
    raw = recipe.model_dump(mode="json")
    fields = METHODS[method].Options.model_fields
    raw["adapter"] = {k: v for k, v in raw["adapter"].items() if k in fields and k != "method"} | {
        "method": method
    }
    raw["output"] = {"dir": str(out_dir / method), "overwrite": True}
    return recipe_from_dict(raw)


def unfit_methods(recipe: Recipe, methods: list[str], out_dir: Path) -> dict[str, str]:
    """Method → why its adapter cannot be built on the recipe's model (from the config, meta device)."""
    from shardtune.errors import ShardtuneError
    from shardtune.export import count_trainable
    from shardtune.models import load_config

    config = load_config(recipe.model.name, recipe.model.trust_remote_code)
    unfit = {}
    for method in methods:
        try:
            count_trainable(config, method_recipe(recipe, method, out_dir).adapter)
        except ShardtuneError as e:
            unfit[method] = str(e)
    return unfit


def compare(recipe: Recipe, methods: list[str], reporter: Reporter, plot: Path | None = None) -> dict:
    from shardtune.train import train

    every = methods == ["all"]
    methods = list(METHODS) if every else methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BadInput(f"--methods: unknown method {unknown[0]!r}; available: all, {', '.join(METHODS)}")
    out_dir = Path(recipe.output.dir).expanduser() / "compare"
    model = Path(recipe.model.name).expanduser()
    if plot is not None:
        check_plot_path(plot, "--plot", inputs=[model if model.is_dir() else None, recipe.data.path])
    skipped = unfit_methods(recipe, methods, out_dir)
    if skipped and not every:
        method, why = next(iter(skipped.items()))
        raise BadInput(f"--methods: {method} does not fit this model: {why}")
    check_output_dir(
        out_dir,
        "output.dir",
        replace=recipe.output.overwrite,
        what="an earlier comparison",
        replace_hint="--set output.overwrite=true to replace it, or choose another output.dir",
        inputs=[model if (model / "config.json").is_file() else None, recipe.data.path],
        legacy=lambda d: COMPARE_ENTRIES if (d / COMPARE_FILE).is_file() else None,
    )
    for method, why in skipped.items():
        reporter.info(f"— {method} — left out: {why}")
    make_directory(out_dir)
    write_marker(out_dir, "compare", COMPARE_ENTRIES)
    rows, curves = [], {}
    for method in [m for m in methods if m not in skipped]:
        reporter.info(f"— {method} —")
        result = train(method_recipe(recipe, method, out_dir), reporter)
        metrics = [
            json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
        curves[method] = [(m["step"], m["loss"]) for m in metrics]
        rows.append(
            {
                "method": method,
                "eval_loss": result.eval_loss,
                "task_score": result.task_score,
                "task_score_base": result.task_score_base,
                "trainable_parameters": result.trainable_parameters,
                "seconds_per_step": result.train_seconds / max(result.steps, 1),
                "final_loss": result.final_loss,
                "run_dir": result.run_dir,
            }
        )
    report = {
        "recipe_model": recipe.model.name,
        "steps": recipe.train.max_steps,
        "rows": rows,
        "curves": curves,
        "skipped": skipped,
    }
    atomic_write_text(out_dir / COMPARE_FILE, json.dumps(report, indent=2) + "\n")
    if plot is not None:
        plot_curves(curves, plot)
    return report


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
