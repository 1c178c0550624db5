"""Judging evaluations during training: the best one so far (``output.keep_best``) and early stopping
(``train.early_stopping``).

For a metric m with direction d (``eval_loss``: lower is better, d = −1; ``task_score``: higher is
better, d = +1), evaluated at steps s₁ < s₂ < …:

* best: the step sᵢ whose value is best, the first of equals — an evaluation replaces it only when
  strictly better, d·(vᵢ − v_best) > 0;
* early stopping with patience P and min_delta δ: a reference r (the first value, then every value
  that improved on r by more than δ, d·(vᵢ − r) > δ) and a count c of evaluations since r was set;
  the run stops at the evaluation where c reaches P (Keras's ``EarlyStopping``).

The whole state (best per metric, r, c) is a few numbers kept in every checkpoint, so a resumed run
judges exactly as the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HIGHER_IS_BETTER = {"eval_loss": False, "task_score": True}


def better_by(metric: str, value: float, than: float) -> float:
    """How much ``value`` improves on ``than`` (negative: worse)."""
    return value - than if HIGHER_IS_BETTER[metric] else than - value


@dataclass
class Selection:
    best: dict[str, dict] = field(default_factory=dict)  # metric → {"step": s, "value": v}
    reference: float | None = None  # early stopping's r
    stale: int = 0  # early stopping's c

    def improves_best(self, metric: str, step: int, value: float) -> bool:
        """Note an evaluation; True when it is the best so far."""
        now = self.best.get(metric)
        if now is not None and better_by(metric, value, now["value"]) <= 0:
            return False
        self.best[metric] = {"step": step, "value": value}
        return True

    def exhausted(self, metric: str, value: float, patience: int, min_delta: float) -> bool:
        """Note an evaluation of early stopping's metric; True when the patience has run out."""
        if self.reference is None or better_by(metric, value, self.reference) > min_delta:
            self.reference, self.stale = value, 0
            return False
        self.stale += 1
        return self.stale >= patience

    def to_json(self) -> dict:
        return {"best": self.best, "reference": self.reference, "stale": self.stale}

    @classmethod
    def from_json(cls, data: dict | None) -> Selection:
        if not data:
            return cls()
        return cls(dict(data.get("best", {})), data.get("reference"), int(data.get("stale", 0)))
