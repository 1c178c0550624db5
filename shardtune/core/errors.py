"""Errors that reach the user as one line and a stable exit code.

Exit codes (stable, documented in docs/cli.md):

* 0 — success
* 1 — the run failed for a reason that is not the input's fault (an internal error; the full
  traceback is in the run's log file)
* 2 — bad input: recipe, command-line option, data or model file, adapter directory
* 3 — training diverged (NaN/inf loss)
* 4 — a process of a run over several processes was lost (its machine died, hangs or was cut off);
  the others stopped (continue from the last checkpoint with ``--resume``)
* 130 — interrupted (Ctrl-C); a training run names its last checkpoint and how to continue
* 143 — stopped by SIGTERM after writing a checkpoint (resume with ``--resume``)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_LOST = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's may run to many), else its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ShardtuneError(Exception):
    """Base class: an error with a one-line message meant for the user."""

    exit_code = EXIT_FAILURE
    # Met by every process of a run at once (they agreed on it): the first process of each machine
    # says it, so that every machine's log ends with the one line, not with one line per process.
    once_per_machine = False


class BadInput(ShardtuneError):
    """The user's input is wrong: the message names the recipe key, option or file."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(BadInput):
    """A recipe key is unknown, missing or has a wrong value."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


@contextmanager
def named_as(names: dict[str, str]) -> Iterator[None]:
    """Bad input the library names by a recipe key (``model.name: ...``) while it reads a value that
    came from elsewhere, names where that value came from: ``{"model.name": "--model"}`` for a
    command-line option, or the field of a saved file that recorded it."""
    try:
        yield
    except BadInput as e:
        message = str(e)
        for key, name in names.items():
            if message.startswith(f"{key}:"):
                raise BadInput(name + message[len(key) :]) from None
        raise


class Diverged(ShardtuneError):
    """A non-finite loss on any process (every process learns it at the same step)."""

    exit_code = EXIT_DIVERGED
    once_per_machine = True


class Terminated(ShardtuneError):
    """Stopped by SIGTERM (every process at the same step) after writing a checkpoint."""

    exit_code = EXIT_TERMINATED
    once_per_machine = True


class StopSignal(BaseException):
    """SIGTERM raised where it arrives (anywhere but the training loop, which finishes its step and
    checkpoints): a BaseException, as KeyboardInterrupt is, so that no library's ``except Exception``
    swallows it and goes on waiting. The command line ends it as :class:`Terminated`."""

    exit_code = EXIT_TERMINATED


class Interrupted(ShardtuneError):
    """Ctrl-C (SIGINT) while training: no checkpoint is written; the message names the last one."""

    exit_code = EXIT_INTERRUPTED
    once_per_machine = True


class ProcessLost(ShardtuneError):
    """Another process of the run stopped answering (:mod:`shardtune.training.peers`); the message names it."""

    exit_code = EXIT_LOST
    once_per_machine = True
