"""Errors that reach the user as one line and a stable exit code.

Exit codes (stable, documented in docs/cli.md):

* 0 — success
* 1 — the run failed for a reason that is not the input's fault (an internal error; the full
  traceback is in the run's log file)
* 2 — bad input: recipe, command-line option, data or model file, adapter directory
* 3 — training diverged (NaN/inf loss)
* 4 — a process of a run over several processes was lost (its machine died, hangs or was cut off);
  the others stopped (continue from the last checkpoint with ``--resume``)
* 5 — the machine, not the input: the disk is full, the file system read-only, a file size limit
  (``ulimit -f``) hit, permission denied, … (:func:`environment_failure`)
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
EXIT_ENVIRONMENT = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's may run to many), else its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# The machine failing a read or write (errno → what it means and what the user can do); each is exit 5.
ENVIRONMENT_ERRNOS = {
    "ENOSPC": "no space left on the device; free space there, or write elsewhere",
    "EDQUOT": "the disk quota is used up; free space, or write elsewhere",
    "EROFS": "the file system is read-only; write elsewhere",
    "EFBIG": "the file is larger than the file size limit allows (ulimit -f, or the file system's "
    "largest file); raise the limit, or write elsewhere",
    "EACCES": "permission denied; write where you may, or change the permissions",
    "EPERM": "the operation is not permitted there (an immutable file, or another owner's); write elsewhere",
    "ENOTDIR": "a part of that path is a file, not a directory",
    "ELOOP": "a loop of symbolic links",
    "EIO": "an input/output error of the disk or network file system",
    "EMFILE": "too many open files (ulimit -n); raise the limit",
    "ENFILE": "too many open files on the machine",
}
# A library that reports the system's error only as text (safetensors' writer).
ENVIRONMENT_TEXTS = {
    "No space left on device": "ENOSPC",
    "Disk quota exceeded": "EDQUOT",
    "Read-only file system": "EROFS",
    "File too large": "EFBIG",
    "Permission denied": "EACCES",
}
WHERE_TO_WRITE = (
    "output.dir or --out for results, SHARDTUNE_CACHE for converted models, HF_HOME for downloads"
)


def error_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the errors it came from (its cause, or the error being handled when it was
    raised), at most 20."""
    chain = []
    while error is not None and len(chain) < 20:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def environment_failure(error: BaseException) -> str | None:
    """One line for a failure of the machine (full disk, read-only file system, size limit,
    permission, ...) found anywhere in ``error``'s chain, naming the file and what to do; None when
    it is not one (then it is a bug in shardtune, or another error's to say)."""
    import errno
    import os

    for e in error_chain(error):
        name = errno.errorcode.get(getattr(e, "errno", None) or -1) if isinstance(e, OSError) else None
        if name is None:
            name = next((code for text, code in ENVIRONMENT_TEXTS.items() if text in str(e)), None)
        if name in ENVIRONMENT_ERRNOS:
            where = getattr(e, "filename", None) if isinstance(e, OSError) else None
            place = f" ({os.fspath(where)})" if where else ""
            hint = ENVIRONMENT_ERRNOS[name]
            if "write elsewhere" in hint:
                hint += f" ({WHERE_TO_WRITE})"
            return f"the machine refused a file operation{place}: {hint} [{name}]"
    return None


# A reply of the hub that huggingface_hub could not read: it raised one of these plain Python errors
# from its own code (its own error classes say what went wrong themselves).
UNEXPECTED_ANSWER = (TypeError, AttributeError, KeyError, IndexError)


def hub_answer_failure(error: BaseException) -> str | None:
    """One line when huggingface_hub failed on an answer it did not expect (a JSON list where it
    reads an object, a field missing: a proxy, a mirror or an HF_ENDPOINT that is not a hub),
    found anywhere in ``error``'s chain; None otherwise."""
    import json
    import os

    for e in error_chain(error):
        if type(e) not in (*UNEXPECTED_ANSWER, json.JSONDecodeError) or e.__traceback__ is None:
            continue
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        if f"{os.sep}huggingface_hub{os.sep}" in tb.tb_frame.f_code.co_filename:
            endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
            return (
                f"the hub at {endpoint} answered in a shape huggingface_hub cannot read ({type(e).__name__}: "
                f"{first_line(e)}); check HF_ENDPOINT (a proxy or mirror that is not a hub?) or try again "
                "later (HF_HUB_OFFLINE=1 uses what is cached)"
            )
    return None


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
    except ShardtuneError as e:
        message = str(e)
        for key, name in names.items():
            if message.startswith(f"{key}:"):
                renamed = name + message[len(key) :]
                raise (BadInput(renamed) if isinstance(e, BadInput) else type(e)(renamed)) from None
        raise


class MachineError(ShardtuneError):
    """The machine refused a read or write (:func:`environment_failure`): exit 5, not the user's
    input and not a bug in shardtune."""

    exit_code = EXIT_ENVIRONMENT


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
