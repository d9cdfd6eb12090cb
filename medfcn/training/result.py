"""What a finished run reports: its best validation, read from the run folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medfcn.io import read_checkpoint

__all__ = ["BestValidation", "best_validation"]

# PerClassMetrics' names for one class's score: val_dice_<class name>
_CLASS_PREFIX = "val_dice_"


@dataclass(frozen=True)
class BestValidation:
    """The best validation of a run.

    Attributes:
        mean: the key metric (mean Dice over the foreground classes, 0-1).
        epoch: the epoch it was reached at (1-based).
        per_class: Dice (0-1) of each class at that epoch, by class name; empty for runs of
            older medfcn versions, which did not record it.
    """

    mean: float
    epoch: int
    per_class: dict[str, float]


def best_validation(run_dir: str | os.PathLike) -> BestValidation | None:
    """The best validation recorded in ``run_dir/last.pt`` (its ``best`` entry); None when the
    run has not validated yet, or keeps no ``last.pt`` (a config whose own checkpoint writer
    names it otherwise), or its checkpoint holds no such entry."""
    last = Path(run_dir) / "last.pt"
    if not last.is_file():
        return None
    saved = read_checkpoint(last, fix="resume or retrain the run")
    best = saved.get("best") if isinstance(saved, dict) else None
    if not best or int(best.get("best_metric_epoch", -1)) < 1:
        return None
    metrics = best.get("metrics", {})
    per_class = {k[len(_CLASS_PREFIX) :]: float(v) for k, v in metrics.items() if k.startswith(_CLASS_PREFIX)}
    return BestValidation(float(best["best_metric"]), int(best["best_metric_epoch"]), per_class)
