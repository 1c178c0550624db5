"""Errors that reach the user as one line and a stable exit code.

Exit codes (stable, documented in docs/cli.md):

* 0 — success
* 1 — the run failed for a reason that is not the input's fault (an internal error; the full
  traceback is in the run's log file)
* 2 — bad input: recipe, command-line option, data or model file, adapter directory
* 3 — training diverged (NaN/inf loss)
* 130 — interrupted (Ctrl-C)
* 143 — stopped by SIGTERM after writing a checkpoint (resume with ``--resume``)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class ShardtuneError(Exception):
    """Base class: an error with a one-line message meant for the user."""

    exit_code = EXIT_FAILURE


class BadInput(ShardtuneError):
    """The user's input is wrong: the message names the recipe key, option or file."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(BadInput):
    """A recipe key is unknown, missing or has a wrong value."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class Diverged(ShardtuneError):
    exit_code = EXIT_DIVERGED


class Terminated(ShardtuneError):
    exit_code = EXIT_TERMINATED
