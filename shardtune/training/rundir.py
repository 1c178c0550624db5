"""A training run's directory (``output.dir``) through its life.

``claim`` — before anything is loaded. Every process checks the target
(:func:`shardtune.core.fileio.check_output_dir`: never the current directory, an input, someone else's
files, …) so that all stop alike. An existing run that will be replaced (``output.overwrite``) or
continued (``--resume``) is locked by the main process; a second run into the same directory cannot
get the lock (it exits 2 naming the holder), and the kernel drops it when a process dies, so
``--resume`` after a kill is never blocked. Nothing is written yet: what is logged waits in memory.

``start`` — once the model and the data are ready, so that a mistake in the recipe costs nothing:
a new directory is created (and locked), or the earlier run is renamed aside to ``.NAME.replaced-*``
and a fresh directory takes its place — the earlier run is deleted by ``finish``, when the new one
is complete (a run killed before that leaves both whole; the next run that finishes there deletes
it). ``train.log`` opens with what was logged so far; ``metrics.jsonl`` is emptied, or for a resumed
run cut back to the checkpoint's step, so each step appears once; ``recipe.yaml`` holds the resolved
recipe, which a resumed run is started from.

An internal error before ``start`` still leaves its traceback in ``train.log`` of a new or resumed
run (never in a run about to be replaced); bad input leaves nothing.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from shardtune.artifacts.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BEST_DIR,
    BEST_FILES,
    CHECKPOINT_FILES,
    RECIPE_FILE,
    list_checkpoints,
)
from shardtune.core.errors import BadInput, MachineError, environment_failure
from shardtune.core.fileio import (
    LOCK,
    atomic_write_text,
    check_output_dir,
    exclusive_lock,
    first_link_inside,
    make_directory,
    read_marker,
    resolved,
    write_marker,
    written_path,
)
from shardtune.recipe.schema import Recipe, recipe_to_yaml
from shardtune.training.tracking import LOGS

log = logging.getLogger("shardtune")

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
RESULT_FILE = "result.json"
# What a run directory holds: glob patterns of paths, down to the files in its directories
# (fileio.foreign_entries); anything else found in it is the user's, and the run is never replaced.
RUN_ENTRIES = [
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    RECIPE_FILE,
    METRICS_FILE,
    LOG_FILE,
    RESULT_FILE,
    *(f"checkpoint-[0-9]*/{name}" for name in CHECKPOINT_FILES),
    *(f"{BEST_DIR}/{name}" for name in BEST_FILES),
    "compare",  # `shardtune compare`'s runs: an output with its own marker
    # experiment trackers' files: TensorBoard's event files, and the hparams accelerate writes
    # (in the folder of logging.project)
    f"{LOGS}/*/events.out.tfevents.*",
    f"{LOGS}/*/*/events.out.tfevents.*",
    f"{LOGS}/*/*/hparams.yml",
]
# The kinds of output a run replaces (output.overwrite), with what this version writes in them (a run
# an older version marked is judged by these entries too).
RUN_KINDS = {"run": RUN_ENTRIES}
REPLACES = "replaces"  # marker key: the earlier run set aside, deleted when this one finishes


def legacy_run_entries(directory: Path) -> list[str] | None:
    """A run directory written before runs carried a marker: it has an adapter.json or checkpoints."""
    config = directory / ADAPTER_CONFIG
    try:
        is_run = json.loads(config.read_text(encoding="utf-8")).get("format") == "shardtune-adapter"
    except (OSError, ValueError, AttributeError):
        is_run = False
    return RUN_ENTRIES if is_run or list_checkpoints(directory) else None


class RunDirectory:
    """``output.dir`` of one run: :meth:`claim`, :meth:`start`, :meth:`finish`, :meth:`close`."""

    def __init__(self, recipe: Recipe, resume_from: Path | None, main: bool, level: str = "info"):
        self.recipe, self.main = recipe, main
        self.given = Path(recipe.output.dir).expanduser()  # as the user wrote it, for messages
        self.path = written_path(self.given)  # what is checked and what is written: one directory
        # Continuing this run (its own checkpoint); a checkpoint from elsewhere starts a new run here.
        self.resuming = resume_from is not None and resolved(resume_from).parent == resolved(self.path)
        self.level = level.upper()
        self.replacing = self.started = False
        self.aside: Path | None = None  # the earlier run, while this one replaces it
        self.keep_log = False  # set on an internal error: its traceback goes to train.log
        self._locks = ExitStack()
        self._log: logging.Handler | None = None

    # --- claim ------------------------------------------------------------------------------------

    def claim(self, agree: Callable[[bool], bool] = bool) -> None:
        """Check the target on every process; the main one locks an existing run and starts
        logging into memory. ``agree(failed)`` is true on every process when any failed (a
        collective with several processes), so that all stop alike."""
        error = None
        try:
            self.replacing = self._check()
            if self.main:
                if self.replacing or self.resuming:
                    self._lock()
                self._log = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
                self._log.setLevel(self.level)
                log.addHandler(self._log)
                log.setLevel(logging.DEBUG)
        except BadInput as e:
            error = e
        if agree(error is not None):
            self.close()
            raise error or BadInput(f"output.dir: {self.path} cannot be used by every process")

    def _check(self) -> bool:
        """Refuse what may not be written; True when an earlier run will be replaced."""
        if self.resuming:
            if not self.path.is_dir():
                raise BadInput(f"--resume: {self.given} is not a run directory")
            link = first_link_inside(self.path)
            if link is not None:
                raise BadInput(
                    f"--resume: {link} is a symbolic link inside the run directory; a run writes only its "
                    "own files (train.log, metrics.jsonl, logs/, checkpoints): move the link out"
                )
            return False
        if self.main and (self.path / LOCK).exists():
            with exclusive_lock(self.path / LOCK, "output.dir", f"run directory {self.path}"):
                pass  # a run in progress there says so before anything else
        model = Path(self.recipe.model.name).expanduser()
        return check_output_dir(
            self.given,
            "output.dir",
            replace=self.recipe.output.overwrite,
            what="a run",
            replace_hint="choose another directory, --set output.overwrite=true to replace it, "
            "or --resume to continue it",
            # (a model directory without config.json fails to load with its own message)
            inputs=[
                model if (model / "config.json").is_file() else None,
                *(source.path for source in self.recipe.data.source_list()),
                self.recipe.adapter.init_from,
            ],
            legacy=legacy_run_entries,
            kinds=RUN_KINDS,
        )

    def _lock(self) -> None:
        self._locks.enter_context(
            exclusive_lock(self.path / LOCK, "output.dir", f"run directory {self.path}")
        )

    # --- start ------------------------------------------------------------------------------------

    def start(self, resumed_step: int) -> None:
        """Main process: the directory is written from here on (module docstring)."""
        if not self.main:
            return
        if self.replacing:
            aside = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.replaced-", dir=self.path.parent))
            os.rename(self.path, aside)  # onto the empty placeholder; its lock stays held
            self.aside = aside
            log.info("the earlier run in %s is kept at %s until this run finishes", self.path, aside)
            self._create(**{REPLACES: aside.name})
        elif not self.resuming:
            self._create()
        elif read_marker(self.path) is None:
            write_marker(self.path, "run", RUN_ENTRIES)  # a run written before runs were marked
        self._open_file_log()
        metrics = self.path / METRICS_FILE
        if not self.resuming:
            atomic_write_text(metrics, "")
        elif metrics.is_file():
            atomic_write_text(metrics, "".join(_lines_up_to(metrics, resumed_step)))
        atomic_write_text(self.path / RECIPE_FILE, recipe_to_yaml(self.recipe))
        self.started = True

    def _create(self, **marker) -> None:
        """A new run directory, locked, then checked again: another run may have got here meanwhile."""
        try:
            make_directory(self.path)
        except OSError as e:
            machine = environment_failure(e)
            if machine is not None:  # a read-only or full disk, a permission: the machine's (exit 5)
                raise MachineError(f"output.dir: cannot create {self.path}: {machine}") from None
            raise BadInput(f"output.dir: cannot create {self.path}: {e.strerror or e}") from None
        self._lock()
        if any(p.name != LOCK for p in self.path.iterdir()):
            raise BadInput(
                f"output.dir: {self.path} was filled by another process meanwhile; choose another directory"
            )
        write_marker(self.path, "run", RUN_ENTRIES, **marker)

    def _open_file_log(self) -> None:
        """Write what was logged so far into train.log and go on there."""
        buffered = self._log
        self._log = logging.FileHandler(self.path / LOG_FILE, encoding="utf-8")
        self._log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._log.setLevel(self.level)
        log.addHandler(self._log)
        if isinstance(buffered, logging.handlers.MemoryHandler):
            log.removeHandler(buffered)
            buffered.setTarget(self._log)
            buffered.flush()
            buffered.close()

    # --- finish and close -------------------------------------------------------------------------

    def finish(self) -> None:
        """Main process, the run complete: delete the earlier run it replaced."""
        if not self.main:
            return
        marker = read_marker(self.path) or {}
        replaced = marker.get(REPLACES)
        if (
            isinstance(replaced, str)
            and replaced.startswith(f".{self.path.name}.replaced-")
            and "/" not in replaced
        ):
            shutil.rmtree(self.path.parent / replaced, ignore_errors=True)
            write_marker(self.path, "run", RUN_ENTRIES)
        self.aside = None

    def earlier_run_note(self) -> str:
        """For the error a replacing run ends with: where the run it was to replace is kept (a hidden
        directory beside it), and until when; empty when there is none."""
        if self.aside is None:
            return ""
        return f"; the earlier run in {self.path} is kept at {self.aside} until a run there finishes"

    def close(self) -> None:
        """Release the locks and close train.log. Before ``start``, what waited in memory is dropped —
        unless ``keep_log`` (an internal error) and the directory is new or resumed: then it is written."""
        if self.main and not self.started and self.keep_log and not self.replacing:
            try:
                if not self.resuming:
                    self._create()
                self._open_file_log()
            except (OSError, BadInput):
                pass
        if self._log is not None:
            log.removeHandler(self._log)
            self._log.close()
            self._log = None
        self._locks.close()


def _lines_up_to(metrics: Path, step: int) -> list[str]:
    """metrics.jsonl lines of steps up to ``step`` (a resumed run logs the later ones again)."""
    return [line for line, at in metrics_lines(metrics) if at <= step]


def metrics_lines(metrics: Path) -> list[tuple[str, int]]:
    """(line, its step) of a run's metrics.jsonl, each checked: a JSON object with a whole-number
    step. The last line may be cut short (a kill in the middle of writing it): left out; any other
    line that is not one is one error naming the file and the line (read before a resume writes)."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise BadInput(f"{metrics}: not text ({e.reason} at byte {e.start}); the file was damaged") from None
    found = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not line.endswith("\n"):
                continue  # cut short by a kill
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise BadInput(
                f"{metrics}: line {number} is not a metrics record (a JSON object with a whole-number "
                f"step): {line.strip()[:60]!r}; the file was edited or damaged (move it away to resume)"
            )
        found.append((line, step))
    return found
