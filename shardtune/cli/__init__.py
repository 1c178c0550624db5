"""The `shardtune` command line: parses arguments and calls library functions, nothing more.

One module per command group — :mod:`~shardtune.cli.training` (train, compare),
:mod:`~shardtune.cli.artifacts` (merge, export, prune), :mod:`~shardtune.cli.inspection` (generate,
eval, routing, params, listings) — registered on one Typer app here. Every command turns a
:class:`shardtune.core.errors.ShardtuneError` into one line on stderr and its exit code
(:mod:`~shardtune.cli.common`, docs/cli.md); ``--json`` prints one JSON object on stdout for scripts.

May import: every layer of shardtune (the top one; nothing imports it but ``shardtune.__main__``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Annotated

import typer
import typer.core

try:  # typer ≥ 0.20 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

import shardtune
from shardtune.cli import artifacts, inspection, training
from shardtune.cli.common import (
    err_console,
    handle_errors,
    launched_processes,
    out_console,
    quiet_libraries,
    reader_gone,
    silence_stdout,
    stdout_flushed,
    warnings_to_log,
)
from shardtune.cli.help import PlainCommand, PlainGroup
from shardtune.core.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED


class Commands(PlainGroup):
    """The command group; a usage error (unknown command or option, a missing or bad value) is one
    line ``error: …`` with a hint and exit code 2, like every other bad input."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except SystemExit as e:
            # typer ends a write into a closed stdout (`shardtune --help | head -1`) with exit 1
            if e.code != 1 or type(sys.stdout).__name__ != "PacifyFlushWrapper" or not reader_gone():
                raise
            silence_stdout()
            code = 0
        except click_exceptions.NoArgsIsHelpError as e:
            out_console.print(e.ctx.get_help(), markup=False)  # (a closed stdout: the console goes quiet)
            code = 0
        except click_exceptions.UsageError as e:
            command = e.ctx.command_path if e.ctx is not None else "shardtune"
            message = e.format_message().strip().splitlines()[0].rstrip(".")
            hint = f"see '{command} --help'"
            if "unexpected extra argument" in message and "--resume" in (kwargs.get("args") or sys.argv):
                hint = "--resume takes no value; to continue from a given checkpoint: --resume-from DIR"
            err_console.print(f"error: {message} ({hint})", markup=False, soft_wrap=True)
            code = EXIT_BAD_INPUT
        except click_exceptions.ClickException as e:
            err_console.print(f"error: {e.format_message()}", markup=False, soft_wrap=True)
            code = e.exit_code
        except typer.Abort:
            code = EXIT_INTERRUPTED
        code = stdout_flushed(code if isinstance(code, int) else 0)
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    name="shardtune",
    help="Fine-tune language models with shard-sharing low-rank adapters (LoRA, FOSSIL/MiSS, MoS, ShareLoRA, "
    "LoRS, VeRA, VB-LoRA, Tied-LoRA, PRoLoRA).",
    cls=Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
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
    "recipes": training.recipes,
    "init": training.init,
}
for _name, _command in COMMANDS.items():
    app.command(_name, cls=PlainCommand)(handle_errors(_command))


def _version(value: bool) -> None:
    if value:
        out_console.print(f"shardtune {shardtune.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline",
            help="No network at all: models and data sets only from the local caches (as HF_HUB_OFFLINE=1).",
        ),
    ] = False,
) -> None:
    """Fine-tune language models with shard-sharing low-rank adapters.

    Start with shardtune recipes and shardtune train tiny; see docs/ for recipes and methods.
    """
    warnings_to_log()
    if not sys.stderr.isatty():
        quiet_libraries()
    if offline:  # before anything imports huggingface_hub, which reads it once
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def main() -> None:
    from shardtune.cli import common

    common.DONE_IGNORES_CTRL_C = True  # (for this command line only: not for a caller in the same process)
    signal.signal(signal.SIGTERM, _stopped_by_sigterm)  # (training catches it itself, to checkpoint)
    try:
        _run_command_line(sys.argv[1:])
    except SystemExit as e:
        if e.code in (EXIT_TERMINATED, EXIT_INTERRUPTED):
            # Stopped by a signal, its line printed and its files rolled back: leave now. A library's
            # worker thread may still wait on the network (a hub request without an answer), and the
            # interpreter would wait for it at exit.
            stdout_flushed(0)
            sys.stderr.flush()
            os._exit(e.code)
        raise
    finally:
        common.DONE_IGNORES_CTRL_C = False


def _stopped_by_sigterm(*_) -> None:
    """SIGTERM to a command (a scheduler's notice, ``timeout``, ``kill``): it stops where it is, within
    seconds (a hub download, a long evaluation), with one line and exit 143; what it was writing is
    rolled back as after any error (every output is written atomically)."""
    from shardtune.core.errors import StopSignal

    raise StopSignal("stopped by SIGTERM")


def _run_command_line(argv: list[str]) -> None:
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
