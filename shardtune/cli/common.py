"""What every command shares: the two consoles, common options, and bad input → one line + exit code."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from shardtune.errors import EXIT_FAILURE, EXIT_INTERRUPTED, BadInput, ShardtuneError

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe key, e.g. --set train.lr=2e-4 --set adapter.rank=16 (repeatable).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for scripts).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


def print_json(data: object) -> None:
    """One JSON document on one line of stdout."""
    sys.stdout.write(json.dumps(data) + "\n")


def fail(message: str, code: int, same_on_every_process: bool = False) -> None:
    """Print `error: MESSAGE` and exit with CODE. Of several launched processes, the main one speaks for
    errors every process meets alike (a bad recipe or data file); others name their rank."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or not same_on_every_process:
        prefix = f"[process {rank}] " if rank else ""
        err_console.print(f"error: {prefix}{message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """One line and a stable exit code instead of a traceback (SHARDTUNE_DEBUG=1 shows tracebacks)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardtuneError as e:
            fail(str(e), e.exit_code, same_on_every_process=isinstance(e, BadInput))
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except typer.Exit:
            raise
        except Exception as e:
            if os.environ.get("SHARDTUNE_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            where = "details in the run's train.log; " if fn.__name__ == "train" else ""
            fail(
                f"internal error: {type(e).__name__}: {first} ({where}SHARDTUNE_DEBUG=1 shows the traceback)",
                EXIT_FAILURE,
            )

    return wrapper
