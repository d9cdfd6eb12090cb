"""``medfcn plan``: fingerprint a dataset, plan for the budget, write the bundle.

Example::

    from medfcn.planning.run import plan_bundle
    plan_bundle("datasets/LeftAtrium", "bundles/left_atrium_fcn", budget_minutes=60)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from medfcn.devices import check_device
from medfcn.errors import UserError
from medfcn.outputs import plural
from medfcn.planning.writer import check_out

__all__ = ["check_options", "plan_bundle"]


def check_options(
    dataset_dir: Path, out: Path, budget_minutes: float, device: str | None, dims: int | None, overwrite: bool
) -> None:
    """Refuse bad options in one line, before any data is read.

    Raises:
        UserError: no dataset folder, a budget that is not a positive number of minutes, dims
            other than 2 or 3, a device this machine lacks (cpu, cuda, cuda:N, mps), an ``out`` over or inside
            the dataset, or an existing ``out`` without ``overwrite``.
    """
    number = isinstance(budget_minutes, (int, float)) and not isinstance(budget_minutes, bool)
    if not (number and math.isfinite(budget_minutes) and budget_minutes > 0):
        shown = f"{budget_minutes:g}" if number else repr(budget_minutes)
        raise UserError(f"--budget-minutes {shown}: must be a positive number of minutes, e.g. 60.")
    if dims not in (None, 2, 3):
        raise UserError(f"--dims {dims}: must be 2 or 3 (or left out: the planner chooses).")
    if device is not None:
        check_device(device)  # a GPU this machine lacks: one line, before the data is read
    if not (dataset_dir / "dataset.json").is_file():
        what = "dataset folder not found" if not dataset_dir.exists() else "has no dataset.json"
        raise UserError(f"{dataset_dir}: {what}; pass the folder that holds an MSD dataset.json.")
    check_out(out, dataset_dir, overwrite)


def _every_tenth(say: Callable[[str], None]) -> Callable[[int, int], None]:
    """A fingerprint's progress (cases read, of all) as about ten lines, not one per case."""

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            say(f"  {done}/{total} cases read")

    return report


def plan_bundle(
    dataset_dir: str | os.PathLike,
    out: str | os.PathLike,
    budget_minutes: float = 60.0,
    device: str | None = None,
    dims: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Plan a bundle for the MSD dataset in ``dataset_dir`` and a training budget of
    ``budget_minutes`` on ``device`` (default: CUDA if present), write it into ``out`` and
    return ``out`` (the plan is in its ``configs/plan.json``).

    ``dims`` forces a 2D or 3D network; ``progress`` receives one line per step.

    Raises:
        UserError: a bad option (:func:`check_options`) or a bad dataset (one line, nothing written).
    """
    from medfcn import planning  # its lazy names: the stage's modules are loaded when used

    dataset_dir, out = Path(dataset_dir), Path(out)
    check_options(dataset_dir, out, budget_minutes, device, dims, overwrite)
    say = progress or (lambda line: None)
    say(f"fingerprint of {dataset_dir}")
    fingerprint = planning.fingerprint_dataset(dataset_dir, progress=_every_tenth(say) if progress else None)
    say(f"planning for {plural(budget_minutes, 'minute')} (timed probe of training steps)")
    plan = planning.make_plan(fingerprint, budget_minutes=budget_minutes, device=device, dims=dims)
    return planning.write_bundle(plan, fingerprint, out, overwrite=overwrite)
