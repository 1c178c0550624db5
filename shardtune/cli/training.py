"""`shardtune train` and `shardtune compare`: runs that train adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shardtune.cli.common import (
    JsonOption,
    QuietOption,
    SetOption,
    err_console,
    launched_processes,
    out_console,
    print_json,
    print_table,
    process_rank,
    quiet_libraries,
    say_notes,
)

RecipeArgument = Annotated[
    Path,
    typer.Argument(
        metavar="RECIPE",
        help="Recipe YAML file, or the name of a shipped recipe (`shardtune recipes`).",
        show_default=False,
    ),
]


def train(
    recipe: RecipeArgument,
    set_: SetOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue from the run's newest checkpoint (a given one: --resume-from DIR)."
        ),
    ] = False,
    resume_from: Annotated[  # (a str: typer makes an empty Path the current directory)
        str | None, typer.Option("--resume-from", help="Continue from this checkpoint-N directory.")
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Processes to launch on this machine through Accelerate (GPUs, or gloo on CPUs); "
            "with --launch-args over several machines, on each of them.",
        ),
    ] = 1,
    launch_args: Annotated[
        str | None,
        typer.Option(
            "--launch-args",
            help='Extra `accelerate launch` flags, e.g. "--num_machines 2 --machine_rank 0 --main_process_ip HOST".',
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the recipe, print it resolved, and stop.")
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train an adapter as the RECIPE says; the run directory gets the adapter, metrics and log.

    Exit codes: 0 done, 1 internal error, 2 bad recipe/data/model, 3 diverged (NaN loss), 4 a process
    of a run over several was lost (the others stopped), 130 interrupted, 143 stopped by SIGTERM (a
    checkpoint was written; continue with --resume).
    """
    from dataclasses import asdict

    from shardtune.core.progress import Reporter
    from shardtune.models.hub import check_recipe_sources
    from shardtune.recipe.schema import load_recipe, recipe_to_yaml
    from shardtune.training.launcher import launch, machine_count
    from shardtune.training.tracking import check_trackers

    if quiet:
        quiet_libraries()
    check_resume_options(resume, resume_from)
    resolved = load_recipe(recipe, set_)
    say_notes(resolved, quiet)
    check_trackers(resolved.logging.report_to)  # (a dry run says it too)
    if dry_run:
        if json_output:
            print_json(resolved.model_dump(mode="json"))
        else:
            out_console.print(recipe_to_yaml(resolved), markup=False, end="")
        return
    check_recipe_sources(resolved)  # offline and not cached: said now, before torch loads
    if (nproc > 1 or machine_count(launch_args) > 1) and launched_processes() == 1:
        forwarded = [str(recipe)] + [a for item in set_ or [] for a in ("--set", item)]
        forwarded += ["--resume"] if resume else []
        forwarded += ["--resume-from", resume_from] if resume_from is not None else []
        forwarded += ["--json"] if json_output else []
        forwarded += ["-q"] if quiet else []
        raise typer.Exit(launch(nproc, forwarded, launch_args, cpu=resolved.train.cpu))
    from shardtune.training.loop import train as run_training

    # (a Path: a checkpoint directory may be named "latest", which as a string means --resume)
    which = Path(resume_from) if resume_from is not None else ("latest" if resume else None)
    result = run_training(resolved, Reporter.for_cli(quiet), resume=which)
    if json_output and process_rank() == 0:  # one summary, from the main process
        print_json(asdict(result))


def check_resume_options(resume: bool, resume_from: str | None) -> None:
    """``--resume`` (the newest checkpoint) and ``--resume-from DIR`` (that one) exclude each other, and
    ``--resume-from`` needs a directory: an empty value would be the current one."""
    from shardtune.core.errors import BadInput

    if resume and resume_from is not None:
        raise BadInput(
            "--resume and --resume-from: give one (--resume continues from the run's newest checkpoint, "
            "--resume-from DIR from that checkpoint)"
        )
    if resume_from is not None and not resume_from.strip():
        raise BadInput("--resume-from: the value is empty; give a checkpoint-N directory")


def compare(
    recipe: RecipeArgument,
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods, or all (every method that fits the model).")
    ] = "all",
    budgets: Annotated[
        str | None,
        typer.Option(
            "--budgets",
            help="Comma-separated fractions of the trainable parameters of LoRA with the recipe's rank and "
            "targets, e.g. 1/32,1/8,1/2,1: each method is sized to each budget (its rank; MoS: "
            "equivalent_rank) and trained; methods that cannot come near a budget are left out of it.",
        ),
    ] = None,
    set_: SetOption = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="PNG (needs matplotlib): loss curves; with --budgets score and eval loss vs size."
        ),
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the recipe with each method on the same data and steps; compare eval loss, task score, size, speed.

    The recipe's adapter options reach every compared method that has them.
    """
    from shardtune.core.progress import Reporter
    from shardtune.models.hub import check_recipe_sources
    from shardtune.training.compare import compare_recipe, parse_budgets, parse_methods

    fractions = parse_budgets(budgets) if budgets is not None else None
    names = parse_methods(methods)
    resolved, other_options = compare_recipe(recipe, set_, names)
    say_notes(resolved, quiet)
    check_recipe_sources(resolved)
    from shardtune.training.compare import compare as run_compare

    report = run_compare(resolved, names, Reporter.for_cli(quiet), plot, fractions, other_options)
    if json_output:
        print_json(report["rows"])
        return
    print_table(f"compare on {report['recipe_model']}", comparison_table(report))


def comparison_table(report: dict):
    """The rows of `compare` as a table; with budgets, the budget, the size option and × the reference."""
    from rich.table import Table

    reference = report.get("reference_parameters")
    columns = ["method", "eval loss", "task score", "trainable", "s/step"]
    if reference:
        columns = ["budget", "method", "option", "trainable", "× LoRA", "eval loss", "task score", "s/step"]
    table = Table()
    for col in columns:
        table.add_column(col, justify="left" if col in ("method", "option", "budget") else "right")
    for r in report["rows"]:
        cells = {
            "budget": r.get("budget"),
            "method": r["method"],
            "option": r.get("option"),
            "trainable": f"{r['trainable_parameters']:,}",
            "× LoRA": f"{r['trainable_parameters'] / reference:.3f}" if reference else None,
            "eval loss": f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-",
            "task score": f"{100 * r['task_score']:.1f}%" if r["task_score"] is not None else "-",
            "s/step": f"{r['seconds_per_step']:.3f}",
        }
        table.add_row(*(cells[c] for c in columns))
    return table


def recipes(json_output: JsonOption = False) -> None:
    """List the recipes shipped with shardtune: name, model, method and what each is for.

    Train one by name (shardtune train quickstart) or copy it to edit (shardtune init quickstart).
    """
    from shardtune.recipe.shipped import shipped_recipes

    found = shipped_recipes()
    if json_output:
        print_json({name: r.as_dict() for name, r in found.items()})
        return
    rows = [("name", "model", "method", "summary")] + [
        (r.name, r.model, r.method, r.summary) for r in found.values()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3]
        out_console.print(line.rstrip(), markup=False, soft_wrap=True)


def init(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A shipped recipe (`shardtune recipes`).")],
    path: Annotated[
        Path | None,
        typer.Argument(
            metavar="PATH",
            help="Where to write the copy: a file, or a directory for NAME.yaml [default: NAME.yaml here].",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace PATH if it is a copy that shardtune init wrote (nothing else)."
        ),
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Write a copy of a shipped recipe to edit, then train it with shardtune train PATH.

    An existing file is never replaced unless it is an earlier copy written by init and --overwrite is
    given. Prints the path written.
    """
    from shardtune.recipe.shipped import init_recipe

    written = init_recipe(name, path, overwrite)
    if json_output:
        print_json({"recipe": name.removesuffix(".yaml"), "path": str(written)})
    else:
        out_console.print(str(written), markup=False, soft_wrap=True)
    if not quiet:
        err_console.print(
            f"wrote {written}, a copy of the shipped recipe {name}; train it with: shardtune train {written}",
            markup=False,
            soft_wrap=True,
        )
