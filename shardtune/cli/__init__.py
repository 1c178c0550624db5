"""The `shardtune` command line: parses arguments and calls library functions, nothing more.

One module per command group — :mod:`~shardtune.cli.training` (train, compare),
:mod:`~shardtune.cli.artifacts` (merge, export, prune), :mod:`~shardtune.cli.inspection` (generate,
eval, routing, params, listings) — registered on one Typer app here. Every command turns a
:class:`shardtune.errors.ShardtuneError` into one line on stderr and its exit code
(:mod:`~shardtune.cli.common`, docs/cli.md); ``--json`` prints one JSON object on stdout for scripts.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

import shardtune
from shardtune.cli import artifacts, inspection, training
from shardtune.cli.common import handle_errors, launched_processes, out_console, warnings_to_log

app = typer.Typer(
    name="shardtune",
    help="Fine-tune language models with shard-sharing low-rank adapters (LoRA, FOSSIL/MiSS, MoS, ShareLoRA, LoRS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

COMMANDS = {
    "train": training.train,
    "generate": inspection.generate,
    "eval": inspection.eval_command,
    "routing": inspection.routing,
    "prune": artifacts.prune,
    "merge": artifacts.merge,
    "export": artifacts.export,
    "params": inspection.params,
    "compare": training.compare,
    "models": inspection.models,
    "tasks": inspection.tasks,
    "methods": inspection.methods,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(handle_errors(_command))


def _version(value: bool) -> None:
    if value:
        out_console.print(f"shardtune {shardtune.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Fine-tune language models with shard-sharing low-rank adapters.

    Start with [bold]shardtune train recipes/tiny.yaml[/bold]; see docs/ for recipes and methods.
    """
    from shardtune.models import offline_and_quiet

    warnings_to_log()
    offline_and_quiet()


def main() -> None:
    # `--resume CHECKPOINT_DIR` is accepted as a spelling of `--resume-from CHECKPOINT_DIR`.
    argv = sys.argv[1:]
    for i, arg in enumerate(argv[:-1]):
        if arg == "--resume" and Path(argv[i + 1]).is_dir():
            argv[i] = "--resume-from"
    if launched_processes() == 1:
        app(args=argv, prog_name="shardtune")
        return
    # One of several launched processes: once the command is done, leave without the interpreter's
    # exit-time teardown. There, the collective backend's threads (gloo) are destroyed in an order
    # that now and then aborts a finished process ("terminate called without an active exception"),
    # turning a successful run into a failed launch. Everything is written and flushed by then.
    code = 0
    try:
        app(args=argv, prog_name="shardtune")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
