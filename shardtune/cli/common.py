"""What every command shares: the two consoles, common options, and bad input → one line + exit code."""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import signal
import sys
from typing import Annotated

import typer
from rich.console import Console

from shardtune.core.errors import (
    EXIT_ENVIRONMENT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    BadInput,
    ShardtuneError,
    StopSignal,
    environment_failure,
    hub_answer_failure,
)

# Not a terminal (a pipe, a file): nothing is wrapped or truncated — a width no line reaches.
UNBOUNDED = 1 << 20


def silence_stdout() -> None:
    """What is still to be printed goes nowhere, not even at exit (where Python would flush it into
    the closed pipe and complain on stderr)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class ReaderConsole(Console):
    """A console for readers that may not be people: not on a terminal, a table is plain aligned text
    under one header line (no box drawing, the same columns); a reader that leaves early (``| head``)
    is done: from then on nothing is printed, and the command goes on to its end (rich's own default
    is to exit 1 on the spot)."""

    def print(self, *objects, **kwargs) -> None:
        from rich.table import Table

        if self.is_terminal or not any(isinstance(o, Table) for o in objects):
            super().print(*objects, **kwargs)
            return
        for table in objects:
            if isinstance(table, Table):
                table.box, table.show_edge, table.pad_edge = None, False, False
        plain = io.StringIO()
        Console(file=plain, width=self.width, no_color=True, highlight=False).print(*objects, **kwargs)
        text = "\n".join(line.rstrip() for line in plain.getvalue().splitlines())
        super().print(text, markup=False, highlight=False, soft_wrap=True)

    def on_broken_pipe(self) -> None:
        self.quiet = True
        if not self.stderr:
            silence_stdout()


def console(stderr: bool) -> Console:
    """A rich console on stdout (results) or stderr (everything else); unbounded when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = hasattr(stream, "isatty") and stream.isatty()
    return ReaderConsole(stderr=stderr, highlight=False, width=None if terminal else UNBOUNDED)


err_console = console(stderr=True)
out_console = console(stderr=False)

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
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Run the model repository's own Python code (only for a model you trust)."
    ),
]


def print_table(title: str, table) -> None:
    """A title line, then the table, on stdout (a table's own title would wrap to the table's width)."""
    out_console.print(title, markup=False, soft_wrap=True)
    out_console.print(table)


def say_notes(recipe, quiet: bool = False) -> None:
    """What the --set overrides changed besides their keys (e.g. a method switch), on stderr."""
    from shardtune.recipe.schema import override_notes

    if not quiet:
        for note in override_notes(recipe):
            err_console.print(f"note: {note}", markup=False, soft_wrap=True)


def print_json(data: object) -> None:
    """One JSON document on one line of stdout: strict JSON, so a number that is not finite (a loss
    over no examples) is null, never NaN or Infinity, which JSON parsers reject."""
    text = json.dumps(finite_json(data), allow_nan=False) + "\n"
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader is done (`| head -c 10`): not an error
        silence_stdout()


def finite_json(data: object) -> object:
    """``data`` with every non-finite float replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(v) for v in data]
    return data


def launched_processes() -> int:
    """WORLD_SIZE as a launcher (accelerate launch, torchrun) sets it; 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_rank() -> int:
    """This process's rank among the launched ones; 0 outside a launch (RANK alone, as a cluster's
    environment may leave it, means nothing)."""
    if launched_processes() == 1:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK of a launch); 0 outside a launch."""
    if launched_processes() == 1:
        return 0
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def debugging() -> bool:
    """SHARDTUNE_DEBUG set to a true value (1, true, yes, on): tracebacks instead of one line."""
    return os.environ.get("SHARDTUNE_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def quiet_libraries() -> None:
    """No library progress bars (tqdm: huggingface_hub downloads, the GGUF conversion, datasets):
    they draw with carriage returns, which a log file or a pipe keeps as garbage. Called before the
    libraries are imported: when stderr is not a terminal, and for -q."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    try:  # already imported (a caller in the same process): tell them too
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
    except AttributeError:  # pragma: no cover
        pass


def warnings_to_log() -> None:
    """Library warnings go to shardtune's log (a run's train.log), never to stderr, which carries
    shardtune's own words only; SHARDTUNE_DEBUG shows them as Python does. Both kinds: the ``warnings``
    module's and what a library logs through ``logging`` (bitsandbytes' casts, once per layer and
    step), which Python would otherwise print on stderr for want of a handler."""
    if debugging():
        return
    import logging
    import warnings

    def to_log(message, category, filename, lineno, file=None, line=None):
        logging.getLogger("shardtune").warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)

    warnings.showwarning = to_log
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryRecordsToLog) for h in root.handlers):
        root.addHandler(_LibraryRecordsToLog())
    # DeepSpeed's logger prints on stdout through its own handler (it does not propagate) from the
    # moment it is imported (Accelerate imports it where it is installed): its records go to the log.
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _RecordsToLogInstead) for f in deepspeed.filters):
        deepspeed.addFilter(_RecordsToLogInstead())


class _LibraryRecordsToLog(logging.Handler):
    """At the root logger: hands a library's log records (not shardtune's own) to shardtune's logger,
    whose handlers are the run's log file; each record once (it comes back here by propagation)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "shardtune" or record.name.startswith("shardtune.") or hasattr(record, "_to_log"):
            return
        record._to_log = True
        logging.getLogger("shardtune").handle(record)


class _RecordsToLogInstead(logging.Filter):
    """On a library's logger that has its own handlers: each record goes to shardtune's logger (the
    run's log file) instead of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record._to_log = True
        logging.getLogger("shardtune").handle(record)
        return False


def fail(
    message: str, code: int, same_on_every_process: bool = False, once_per_machine: bool = False
) -> None:
    """Print `error: MESSAGE` and exit with CODE. Of several launched processes, the main one speaks for
    errors every process meets alike (a bad recipe or data file), the first process of each machine for
    those every machine should report (SIGTERM, a lost process); others name their rank."""
    rank = process_rank()
    if once_per_machine:
        if local_rank() == 0:
            err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    elif rank == 0 or not same_on_every_process:
        prefix = f"[process {rank}] " if rank else ""
        err_console.print(f"error: {prefix}{message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def reader_gone() -> bool:
    """stdout is a pipe or socket whose reader has closed it (``shardtune models | head -1``)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test's capture)
        return False


def stdout_flushed(code: int) -> int:
    """``code`` once stdout is flushed; a reader that left before the end is done, not an error."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    except (OSError, ValueError):
        pass
    return code


# Set by the command-line entry point (not by a library caller or a test runner in the same process):
# once a command has done its work, Ctrl-C can no longer stop it, so its exit code stays 0.
DONE_IGNORES_CTRL_C = False


def handle_errors(fn):
    """One line and a stable exit code instead of a traceback (SHARDTUNE_DEBUG=1 shows tracebacks)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            if DONE_IGNORES_CTRL_C:  # its output is complete: an exit code of 130 would say otherwise
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (and 143)
            return result
        except ShardtuneError as e:
            fail(str(e), e.exit_code, isinstance(e, BadInput), e.once_per_machine)
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except StopSignal as e:
            fail(str(e), e.exit_code, once_per_machine=True)
        except typer.Exit:
            raise
        except Exception as e:
            if debugging():
                raise
            machine = environment_failure(e) or hub_answer_failure(e)
            if (
                machine is not None
            ):  # the disk or the hub, not shardtune: its own code, never "internal error"
                fail(machine, EXIT_ENVIRONMENT)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            where = "details in the run's train.log; " if fn.__name__ == "train" else ""
            fail(
                f"internal error: {type(e).__name__}: {first} ({where}SHARDTUNE_DEBUG=1 shows the traceback)",
                EXIT_FAILURE,
            )

    return wrapper
