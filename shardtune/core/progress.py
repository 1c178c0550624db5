"""How a run talks to people: on stderr always (stdout carries results only), a rich progress bar
on a terminal, plain periodic lines otherwise; ``--quiet`` silences it. Pipelines read stdout:
``--json`` prints one JSON object there at the end.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("shardtune")


class Reporter:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None

    @classmethod
    def for_cli(cls, quiet: bool) -> Reporter:
        """Talk on stderr, unwrapped when it is not a terminal."""
        terminal = sys.stderr.isatty()
        return cls(Console(stderr=True, highlight=False, width=None if terminal else 1 << 20), quiet=quiet)

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal and not self.quiet

    def info(self, message: str) -> None:
        log.info(message)
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        log.warning(message)
        if not self.quiet:
            self.console.print(f"warning: {message}", style="yellow", markup=False, soft_wrap=True)

    def start(self, total_steps: int) -> None:
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, metrics="")

    def step(self, step: int, metrics: dict, log_line: bool) -> None:
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "step")
        if log_line:
            log.info("step %d  %s", step, text)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, metrics=text)
        elif log_line and not self.quiet:
            self.console.print(f"step {step}  {text}", markup=False, soft_wrap=True)
            self.console.file.flush()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
