"""A training run's directory (``output.dir``) through its life.

``claim`` — before anything is loaded. Every process checks the target
(:func:`shardtune.fileio.check_output_dir`: never the current directory, an input, someone else's
files, …) so that all stop alike; the main process takes the run's lock, which a second run into the
same directory cannot get (it exits 2 naming the holder) and which the kernel drops when a process
dies, so ``--resume`` after a kill is never blocked.

* absent or empty → created, marked as a run, locked; ``train.log`` opened at once;
* an earlier run and ``output.overwrite`` → that run is locked and left as it is until ``start``;
  what is logged meanwhile waits in memory;
* ``--resume`` → the run is locked; ``train.log`` is appended to.

``start`` — once the model and the data are ready (so a typo in the recipe never costs the earlier
run). Replacing: the earlier run is renamed aside to ``.NAME.replaced-*`` and a fresh directory takes
its place; it is deleted by ``finish``, when the new run is complete (a run killed before that keeps
both whole; the next run that finishes there deletes it). Fresh: ``metrics.jsonl`` is emptied;
resumed: it is cut back to the checkpoint's step, so each step appears once. The resolved recipe is
written to ``recipe.yaml`` (what a resumed run is started from).
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

from shardtune.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECIPE_FILE, list_checkpoints
from shardtune.errors import BadInput
from shardtune.fileio import (
    LOCK,
    atomic_write_text,
    check_output_dir,
    exclusive_lock,
    make_directory,
    read_marker,
    resolved,
    write_marker,
)
from shardtune.recipe import Recipe, recipe_to_yaml

log = logging.getLogger("shardtune")

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
RESULT_FILE = "result.json"
# What a run directory holds (glob patterns); `compare` writes its runs into `compare/`.
RUN_ENTRIES = [
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    RECIPE_FILE,
    METRICS_FILE,
    LOG_FILE,
    RESULT_FILE,
    "checkpoint-*",
    "compare",
]
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
    """``output.dir`` of one run: :meth:`claim`, :meth:`start`, :meth:`finish`, :meth:`close` (module docstring)."""

    def __init__(self, recipe: Recipe, resume_from: Path | None, main: bool, level: str = "info"):
        self.recipe, self.main = recipe, main
        self.path = Path(recipe.output.dir).expanduser()
        # Continuing this run (its own checkpoint); a checkpoint from elsewhere starts a new run here.
        self.resuming = resume_from is not None and resolved(resume_from).parent == resolved(self.path)
        self.level = level
        self.replacing = False
        self._locks = ExitStack()
        self._locked: set[Path] = set()
        self._log: logging.Handler | None = None

    def claim(self, agree: Callable[[bool], bool] = bool) -> None:
        """Check the target on every process, then lock (and create) it on the main one.
        ``agree(failed)`` is true on every process when any failed (a collective with several
        processes: all stop alike, and none looks at the directory while the main one writes it)."""
        for step in (self._check_all, self._prepare):
            error = None
            try:
                step()
            except BadInput as e:
                error = e
            if agree(error is not None):
                self.close()
                raise error or BadInput(f"output.dir: {self.path} cannot be used by every process")

    def _check_all(self) -> None:
        if self.main and self.path.is_dir() and (self.path / LOCK).exists():
            self._lock(self.path)  # a run in progress says so before anything else
        self.replacing = self._check()

    def _check(self) -> bool:
        """True when an earlier run will be replaced."""
        if self.resuming:
            if not self.path.is_dir():
                raise BadInput(f"--resume: {self.path} is not a run directory")
            return False
        data = self.recipe.data
        model = Path(self.recipe.model.name).expanduser()
        return check_output_dir(
            self.path,
            "output.dir",
            replace=self.recipe.output.overwrite,
            what="a run",
            replace_hint="choose another directory, --set output.overwrite=true to replace it, "
            "or --resume to continue it",
            # (a model directory without config.json fails to load with its own message)
            inputs=[model if (model / "config.json").is_file() else None, data.path],
            legacy=legacy_run_entries,
        )

    def _prepare(self) -> None:
        """Main process: lock the directory; a fresh one is created and marked, its log opened."""
        if not self.main:
            return
        if not self.path.is_dir():
            make_directory(self.path)
        if not self.replacing and not self.resuming:
            write_marker(self.path, "run", RUN_ENTRIES)
        self._lock(self.path)
        if self.replacing:
            self._log = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        else:
            self._log = self._file_log(self.path)
        self._log.setLevel(self.level.upper())
        log.addHandler(self._log)
        log.setLevel(logging.DEBUG)

    def _lock(self, directory: Path, again: bool = False) -> None:
        """Take the lock of ``directory`` once (``again``: a new directory now under the same name)."""
        if directory in self._locked and not again:
            return
        self._locks.enter_context(
            exclusive_lock(directory / LOCK, "output.dir", f"run directory {self.path}")
        )
        self._locked.add(directory)

    def _file_log(self, directory: Path) -> logging.Handler:
        handler = logging.FileHandler(directory / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return handler

    def start(self, resumed_step: int) -> None:
        """Main process: the directory is written from here on (module docstring)."""
        if not self.main:
            return
        if self.replacing:
            aside = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.replaced-", dir=self.path.parent))
            os.rename(self.path, aside)
            make_directory(self.path)
            self._lock(self.path, again=True)
            log.info("the earlier run in %s is kept at %s until this run finishes", self.path, aside)
            self._marked(**{REPLACES: aside.name})
            self._open_file_log()
        elif read_marker(self.path) is None:
            self._marked()  # a run written before runs were marked
        metrics = self.path / METRICS_FILE
        if not self.resuming:
            atomic_write_text(metrics, "")
        elif metrics.is_file():
            atomic_write_text(metrics, "".join(_lines_up_to(metrics, resumed_step)))
        atomic_write_text(self.path / RECIPE_FILE, recipe_to_yaml(self.recipe))

    def _marked(self, **extra) -> None:
        write_marker(self.path, "run", RUN_ENTRIES, **extra)

    def _open_file_log(self) -> None:
        """Write what was logged so far into the new directory's train.log and go on there."""
        buffered = self._log
        self._log = self._file_log(self.path)
        self._log.setLevel(self.level.upper())
        log.addHandler(self._log)
        if buffered is not None:
            log.removeHandler(buffered)
            buffered.setTarget(self._log)
            buffered.flush()
            buffered.close()

    def finish(self) -> None:
        """Main process, the run complete: delete the earlier run it replaced."""
        if not self.main:
            return
        replaced = (read_marker(self.path) or {}).get(REPLACES)
        if (
            replaced
            and Path(replaced).name == replaced
            and replaced.startswith(f".{self.path.name}.replaced-")
        ):
            shutil.rmtree(self.path.parent / replaced, ignore_errors=True)
            self._marked()

    def close(self) -> None:
        """Release the locks and close train.log (what waited in memory is dropped: nothing was written)."""
        if self._log is not None:
            log.removeHandler(self._log)
            self._log.close()
            self._log = None
        self._locks.close()


def _lines_up_to(metrics: Path, step: int) -> list[str]:
    """metrics.jsonl lines of steps up to ``step`` (a resumed run logs the later ones again)."""
    kept = []
    for line in metrics.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by a kill
    return kept
