"""Experiment trackers: ``logging.report_to: [tensorboard, wandb, mlflow, …]`` through Accelerate's
tracker classes, on the main process.

Each tracker receives the resolved recipe as hyper-parameters (flattened: ``train.lr``,
``adapter.rank``, …) when the run starts, and every metric that goes to ``metrics.jsonl`` (loss, lr,
grad_norm, tokens_per_s, eval_loss) at its step. Trackers that keep files write them under the run
directory's ``logs/`` (TensorBoard's event files: ``logs/<logging.project>/``); wandb and mlflow follow
their own settings (``WANDB_DIR``, ``MLFLOW_TRACKING_URI``, …). ``logging.project``, ``run_name``,
``tags`` and ``tracker_kwargs`` say where and under what name (:func:`start_kwargs`). A tracker whose package is missing is a
one-line error naming what to install, before anything is loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shardtune.core.errors import RecipeError
from shardtune.recipe.schema import LoggingSection

# tracker → (a module that must import, what to pip install)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}
LOGS = "logs"
PROJECT = "shardtune"  # logging.project's default


def check_trackers(names: list[str]) -> None:
    """Every tracker's package imports; else one line naming what to install."""
    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            extra = (
                f" (or pip install 'shardtune[{name}]')" if name in ("tensorboard", "wandb", "mlflow") else ""
            )
            raise RecipeError(
                "logging.report_to", f"{name} needs the {package} package: pip install {package}{extra}"
            )


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` → ``{"train.lr": 1e-3}``; lists and None become strings (trackers
    take scalars)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def start_kwargs(name: str, logging: LoggingSection, run_dir: Path) -> dict:
    """What a tracker's start takes beside the project: the run's name and tags where the tracker has
    them (wandb: ``name``, ``tags``; mlflow: ``run_name``, ``tags`` as a mapping), then the recipe's
    ``logging.tracker_kwargs`` for it."""
    run_name = logging.run_name or run_dir.name
    named = {
        "wandb": {"name": run_name, "tags": list(logging.tags)},
        "mlflow": {"run_name": run_name, "tags": dict.fromkeys(logging.tags, "true")},
    }
    return {**named.get(name, {}), **logging.tracker_kwargs.get(name, {})}


class Trackers:
    """The run's trackers: :meth:`log` a step's metrics, :meth:`finish` at the end (or on an error)."""

    def __init__(self, logging: LoggingSection, run_dir: Path, config: dict):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        check_trackers(logging.report_to)
        self.trackers = []
        for name in logging.report_to:
            tracker_class = LOGGER_TYPE_TO_CLASS[name]
            kwargs = start_kwargs(name, logging, run_dir)
            if tracker_class.requires_logging_directory:
                tracker = tracker_class(logging.project, str(run_dir / LOGS), **kwargs)
            else:
                tracker = tracker_class(logging.project, **kwargs)
            tracker.start()
            tracker.store_init_configuration(flatten(config))
            self.trackers.append(tracker)

    def log(self, metrics: dict, step: int) -> None:
        values = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, int | float)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
