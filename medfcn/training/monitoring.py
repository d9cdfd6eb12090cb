"""What a training run shows while it runs: the per-epoch line with a progress bar inside each
epoch (:class:`EpochProgress`), and TensorBoard extras (:class:`LearningRateWriter`,
:class:`OverlayWriter`). Handlers read ``engine.state.output`` by MONAI's ``CommonKeys``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["EpochProgress", "LearningRateWriter", "OverlayWriter", "overlay_slice"]


class _EpochBar:
    """A bar of one epoch's iterations (done/total, latest loss, time left), drawn on a terminal
    and erased when the epoch's iterations are done. Redrawn on each iteration only (no refresh
    thread), so an exception leaves nothing running."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def start(self, title: str, iterations: int) -> None:
        self.stop()
        self.progress = Progress(
            TextColumn("epoch {task.fields[title]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            auto_refresh=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("", total=iterations, title=title, loss="-")
        self.progress.refresh()

    def advance(self, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4f}", refresh=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class EpochProgress:
    """Print one line per epoch: mean loss, latest validation scores, seconds per epoch, ETA.

    On a terminal (``console``, default stderr) a bar inside each epoch shows the iterations
    done, the latest loss and the time left, so a long epoch does not look like a hang; it is
    erased before the epoch's validation and line. Elsewhere (a log file, a pipe) only the
    lines are written. Attach to the trainer after the validation handler so the line shows
    that epoch's scores. With ``budget_minutes`` the line says where the run will end against
    it, by the clock of ``budget_keeper`` (the run's
    :class:`~medfcn.training.handlers.BudgetKeeper`, which counts the time before a resume too)
    when given.
    """

    main_rank_only = True  # medfcn.distributed.main_rank_only: rank 0 alone writes

    def __init__(
        self,
        evaluator: Engine | None = None,
        print_fn: Callable[..., None] = print,
        console: Console | None = None,
        budget_minutes: float | None = None,
        budget_keeper=None,
    ):
        self.evaluator = evaluator
        self.print_fn = print_fn
        # the training time `medfcn plan` fitted the epochs to: the ETA says where the run will end
        # against it, counted as the run's BudgetKeeper counts it (from the trainer's start, the
        # time before a resume included), else from here
        self.budget_minutes = budget_minutes
        self.budget_keeper = budget_keeper
        self._clock0 = time.perf_counter()
        self._over_said = False
        self._first_done: float | None = None  # when this run's first epoch ended
        console = console if console is not None else Console(stderr=True)
        self._bar = _EpochBar(console) if console.is_terminal else None
        self._losses: list[float] = []
        self._t0 = 0.0
        self._epoch0 = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()
        self._epoch0 = engine.state.epoch  # non-zero when resuming

    def _epoch_started(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.start(f"{engine.state.epoch}/{engine.state.max_epochs}", engine.state.epoch_length)

    def _iteration(self, engine: Engine) -> None:
        loss = float(_first_item(engine.state.output)[CommonKeys.LOSS])
        self._losses.append(loss)
        if self._bar is not None:
            self._bar.advance(loss)
            if engine.state.iteration % engine.state.epoch_length == 0:  # the epoch's last: validation follows
                self._bar.stop()

    def _epoch(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.stop()
        epoch, total = engine.state.epoch, engine.state.max_epochs
        per_epoch = self._seconds_per_epoch(epoch)
        eta = per_epoch * (total - epoch)
        parts = [f"epoch {epoch}/{total}", f"loss {np.mean(self._losses):.4f}"]
        validated = self.evaluator is not None and self.evaluator.state.epoch == epoch
        if validated and self.evaluator.state.metrics:
            scores = " ".join(f"{k.replace('val_', '')} {v:.4f}" for k, v in self.evaluator.state.metrics.items())
            parts.append(scores)
        parts += [f"{per_epoch:.1f} s/epoch", f"ETA {int(eta // 60)}:{int(eta % 60):02d}"]
        # settled from the third epoch: the first pays one-off costs, and the BudgetKeeper shortens
        # a slow run before the third
        parts += self._budget_parts(eta, settled=epoch - self._epoch0 >= 3)
        self.print_fn("  ".join(parts), flush=True)
        self._losses.clear()

    def _seconds_per_epoch(self, epoch: int) -> float:
        """The mean epoch time of this run so far, the first epoch left out once there is a later
        one: it pays one-off costs (the first steps' allocations) the others do not."""
        now = time.perf_counter()
        if epoch == self._epoch0 + 1:
            self._first_done = now
        if epoch - self._epoch0 >= 2:
            return (now - self._first_done) / (epoch - self._epoch0 - 1)
        return now - self._t0

    def _budget_parts(self, eta: float, settled: bool) -> list[str]:
        """``(ends at 19.6 of the 20-min budget)``, and once a note when the run will overrun it
        by more than 10 %: the machine is slower than when the epochs were planned, and even the
        BudgetKeeper's shorter run overruns (``settled``: from this run's third epoch, once the
        keeper has judged)."""
        if not self.budget_minutes:
            return []
        keeper = self.budget_keeper
        spent = keeper.spent() if keeper is not None else time.perf_counter() - self._clock0
        total = (spent + eta) / 60
        parts = [f"(ends at {total:.1f} of the {self.budget_minutes:g}-min budget)"]
        if settled and total > 1.1 * self.budget_minutes and not self._over_said:
            self._over_said = True
            parts.append(
                "-- over the budget by more than 10 %: this machine is slower (or busier) than when the bundle was "
                "planned; plan again here, or lower --epochs"
            )
        return parts


class LearningRateWriter:
    """Write the first parameter group's learning rate to TensorBoard at each epoch's start, at
    that epoch's step: the rate the epoch trains with (at its end the scheduler has already moved
    on to the next epoch's, and the starting rate would never show)."""

    main_rank_only = True  # medfcn.distributed.main_rank_only: rank 0 alone writes

    def __init__(self, summary_writer, optimizer: torch.optim.Optimizer, tag: str = "learning_rate"):
        self.writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.epoch)
        self.writer.flush()


_COLOURS = np.array([[0, 0, 0], [230, 60, 60], [60, 120, 230], [60, 200, 90], [230, 200, 40]], dtype=np.float32)


def overlay_slice(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a label map over a grey image.

    Args:
        image: ``(H, W)`` intensities, any scale (min-max scaled here).
        labels: ``(H, W)`` integer labels; 0 is left transparent.

    Returns:
        ``(3, H, W)`` uint8 RGB.
    """
    lo, hi = float(image.min()), float(image.max())
    grey = (image - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(image)
    rgb = np.repeat(grey[None].astype(np.float32), 3, axis=0)
    lab = np.clip(labels.astype(np.int64), 0, len(_COLOURS) - 1)
    mask = lab > 0
    colour = _COLOURS[lab].transpose(2, 0, 1)
    rgb[:, mask] = (1 - alpha) * rgb[:, mask] + alpha * colour[:, mask]
    return rgb.clip(0, 255).astype(np.uint8)


class OverlayWriter:
    """Write ``image | label | prediction`` of one validation case to TensorBoard.

    Takes the first case of each validation run, the axial slice (last axis) with the most
    labelled voxels, and writes the three overlays side by side as one RGB image, at the
    trainer's epoch (the evaluator's global epoch).
    """

    main_rank_only = True  # medfcn.distributed.main_rank_only: rank 0 alone writes

    def __init__(self, summary_writer, tag: str = "val_overlay"):
        self.writer = summary_writer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        item = _first_item(engine.state.output)
        image = _as_numpy(item[CommonKeys.IMAGE])[0]
        label, pred = (_labels(item[k]) for k in (CommonKeys.LABEL, CommonKeys.PRED))
        if image.ndim == 3:
            z = int(np.argmax((label > 0).sum(axis=(0, 1))))
            image, label, pred = image[..., z], label[..., z], pred[..., z]
        panels = [overlay_slice(image, np.zeros_like(label)), overlay_slice(image, label), overlay_slice(image, pred)]
        self.writer.add_image(self.tag, np.concatenate(panels, axis=2), engine.state.epoch, dataformats="CHW")
        self.writer.flush()


def _first_item(output: dict | list[dict]) -> dict:
    """The first case of an engine's output: a list of per-case dicts once MONAI's engines
    decollate the batch, else the batch's dict."""
    return output[0] if isinstance(output, list) else output


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _labels(x) -> np.ndarray:
    """``(C, *S)`` one-hot or ``(1, *S)`` label map to ``(*S)`` labels."""
    arr = _as_numpy(x)
    return arr.argmax(0) if arr.shape[0] > 1 else arr[0].round().astype(np.int64)
