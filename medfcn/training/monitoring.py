"""What a training run shows while it runs: the per-epoch line with a progress bar inside each
epoch (:class:`EpochProgress`), ``curves.csv`` and ``curves.png`` in the run folder
(:class:`CurveWriter`), and TensorBoard extras (:class:`LearningRateWriter`, :class:`OverlayWriter`,
:func:`grouped_metrics`). TensorBoard tags are grouped: ``train/loss``,
``train/learning_rate``, ``val/mean_dice``, ``val/dice_<class>``, ``val/overlay``. Handlers read
``engine.state.output`` by MONAI's ``CommonKeys``.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from monai.utils import CommonKeys
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medfcn.data.datasets import case_id
from medfcn.io import atomic_path, atomic_write_text, csv_text
from medfcn.masks import LABEL_COLOURS, label_colour

__all__ = [
    "CurveWriter",
    "EpochProgress",
    "LearningRateWriter",
    "OverlayWriter",
    "grouped_metrics",
    "overlay_figure",
    "overlay_slice",
]


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

    def __init__(self, summary_writer, optimizer: torch.optim.Optimizer, tag: str = "train/learning_rate"):
        self.writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.writer.add_scalar(self.tag, self.optimizer.param_groups[0]["lr"], engine.state.epoch)
        self.writer.flush()


# LABEL_COLOURS as 0..255 red, green, blue (labels 1, 2, ...)
_PALETTE = np.round(np.array([to_rgb(colour) for colour in LABEL_COLOURS], dtype=np.float32) * 255)


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
    lab = labels.astype(np.int64)
    mask = lab > 0
    colour = _PALETTE[(lab - 1) % len(_PALETTE)].transpose(2, 0, 1)  # read where mask only
    rgb[:, mask] = (1 - alpha) * rgb[:, mask] + alpha * colour[:, mask]
    return rgb.clip(0, 255).astype(np.uint8)


def grouped_metrics(prefix: str = "val/") -> Callable:
    """An ``epoch_event_writer`` for MONAI's ``TensorBoardStatsHandler``: each of the engine's
    metrics under ``prefix`` without its ``val_`` (``val_mean_dice`` as ``val/mean_dice``), at the
    engine's epoch (an evaluator's is the trainer's), so TensorBoard shows them as one group."""

    def write(engine: Engine, writer) -> None:
        for name, value in engine.state.metrics.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"{prefix}{name.removeprefix('val_')}", value, engine.state.epoch)
        writer.flush()

    return write


def _display(plane: np.ndarray) -> np.ndarray:
    """An axial slice ``(X, Y, ...)`` of a RAS volume as rows and columns to draw: anterior up,
    the patient's right on the left of the picture (radiological view, as viewers show it)."""
    # RAS: x grows to the patient's right, y to the front; rows top-down, columns left-right
    return np.swapaxes(plane, 0, 1)[::-1, ::-1]


def overlay_figure(
    image: np.ndarray, label: np.ndarray, pred: np.ndarray, class_names: Sequence[str], title: str
) -> Figure:
    """``image | reference | prediction`` of one axial slice ``(X, Y)`` (RAS), each label
    filled in its colour, with ``title`` and a legend naming ``class_names`` (labels 1, 2...)."""
    figure = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
    axes = figure.subplots(1, 3)
    panels = {"scan": np.zeros_like(label), "reference": label, "prediction": pred}
    for ax, (name, labels) in zip(axes, panels.items(), strict=True):
        ax.imshow(_display(overlay_slice(image, labels).transpose(1, 2, 0)), interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    handles = [Patch(color=label_colour(k), label=n) for k, n in enumerate(class_names, 1)]
    figure.legend(handles=handles, loc="outside lower center", ncols=max(len(handles), 1), frameon=False)
    figure.suptitle(title)
    return figure


def figure_rgb(figure: Figure) -> np.ndarray:
    """The figure drawn as ``(3, H, W)`` uint8 RGB."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].transpose(2, 0, 1).copy()


class OverlayWriter:
    """Write ``scan | reference | prediction`` of one validation case to TensorBoard
    (``val/overlay``): the first case of each validation run, its axial slice (last axis) with the
    most labelled voxels, drawn 12 x 4.8 inches at 100 dpi, titled with the case's name, the
    slice and the epoch, with a legend of ``class_names``; at the trainer's epoch (the
    evaluator's global epoch).
    """

    main_rank_only = True  # medfcn.distributed.main_rank_only: rank 0 alone writes

    def __init__(self, summary_writer, class_names: Sequence[str] = (), tag: str = "val/overlay"):
        self.writer = summary_writer
        self.class_names = list(class_names)
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        item = _first_item(engine.state.output)
        image = _as_numpy(item[CommonKeys.IMAGE])[0]
        label, pred = (_labels(item[k]) for k in (CommonKeys.LABEL, CommonKeys.PRED))
        where = ""
        if image.ndim == 3:
            z = int(np.argmax((label > 0).sum(axis=(0, 1))))
            image, label, pred = image[..., z], label[..., z], pred[..., z]
            where = f", axial slice {z}"
        names = self.class_names or [f"label {k}" for k in range(1, int(max(label.max(), pred.max())) + 1)]
        title = f"{_case_name(item)}{where}, epoch {engine.state.epoch}"
        figure = overlay_figure(image, label, pred, names, title)
        self.writer.add_image(self.tag, figure_rgb(figure), engine.state.epoch, dataformats="CHW")
        self.writer.flush()


def _case_name(item: dict) -> str:
    """The case a validation item was read from (its image's file name), or ``validation case``."""
    meta = getattr(item[CommonKeys.IMAGE], "meta", {}) or {}
    source = meta.get("filename_or_obj")
    return case_id(str(source)) if source else "validation case"


class CurveWriter:
    """``curves.csv`` and ``curves.png`` in the run folder, for people who do not run TensorBoard.

    One row per epoch: ``epoch``, ``minutes`` (wall time since training began, validation
    included; a resumed run goes on from the last row's), ``loss`` (the epoch's mean training
    loss), ``learning_rate`` (the rate the epoch trained with), then the validation metrics of
    the epochs that validated (``val_mean_dice``, ``val_dice_<class>``; empty otherwise). The
    CSV is rewritten every epoch, the picture (loss, Dice, learning rate against epochs, minutes
    on the top axis) at each validation and at the end; both atomically.

    Attach to the trainer after the validation handler, so each row holds its epoch's scores.
    """

    main_rank_only = True  # medfcn.distributed.main_rank_only: rank 0 alone writes

    def __init__(
        self, output_dir: str | os.PathLike, optimizer: torch.optim.Optimizer, evaluator: Engine | None = None
    ):
        self.output_dir = Path(output_dir)
        self.optimizer = optimizer
        self.evaluator = evaluator
        self.rows: list[dict] = []
        self._losses: list[float] = []
        self._rate = float("nan")
        self._t0 = 0.0
        self._minutes0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        """Keep the rows of a resumed run's earlier epochs (an earlier run's later ones go)."""
        self.rows = [row for row in _read_rows(self.output_dir / "curves.csv") if row["epoch"] <= engine.state.epoch]
        self._minutes0 = self.rows[-1]["minutes"] if self.rows else 0.0
        self._t0 = time.perf_counter()

    def _epoch_started(self, engine: Engine) -> None:
        self._rate = float(self.optimizer.param_groups[0]["lr"])  # the scheduler moves it at the epoch's end
        self._losses.clear()

    def _iteration(self, engine: Engine) -> None:
        self._losses.append(float(_first_item(engine.state.output)[CommonKeys.LOSS]))

    def _epoch(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        row = {
            "epoch": epoch,
            "minutes": round(self._minutes0 + (time.perf_counter() - self._t0) / 60, 3),
            "loss": round(float(np.mean(self._losses)), 6) if self._losses else float("nan"),
            "learning_rate": self._rate,
        }
        validated = self.evaluator is not None and self.evaluator.state.epoch == epoch
        if validated:
            row.update({k: round(float(v), 6) for k, v in self.evaluator.state.metrics.items() if _is_number(v)})
        self.rows.append(row)
        atomic_write_text(csv_text(self.rows), self.output_dir / "curves.csv")
        if validated:
            self.draw()

    def _completed(self, engine: Engine) -> None:
        if self.rows:
            self.draw()

    def draw(self) -> None:
        """Write ``curves.png`` from the rows so far."""
        figure = curves_figure(self.rows)
        with atomic_path(self.output_dir / "curves.png", suffix=".png") as tmp:
            FigureCanvasAgg(figure).print_png(str(tmp))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_rows(path: Path) -> list[dict]:
    """The rows of an earlier ``curves.csv`` as numbers (empty cells left out); none when absent."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""} for row in csv.DictReader(f)
        ]


def curves_figure(rows: list[dict]) -> Figure:
    """Loss, validation metrics and learning rate against epochs (bottom axis) and minutes (top)."""
    figure = Figure(figsize=(15, 4.5), dpi=100, layout="constrained")
    loss_ax, metric_ax, rate_ax = figure.subplots(1, 3)
    epochs = np.array([row["epoch"] for row in rows])
    loss_ax.plot(epochs, [row["loss"] for row in rows], color="tab:blue")
    loss_ax.set_ylabel("training loss (epoch mean)")
    for name in dict.fromkeys(k for row in rows for k in row if k.startswith("val_")):
        points = [(row["epoch"], row[name]) for row in rows if name in row]
        style = {"linewidth": 2.5, "color": "black"} if name == "val_mean_dice" else {"linewidth": 1.2}
        metric_ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=name[4:], **style)
    if metric_ax.lines:
        metric_ax.legend(loc="lower right")
    metric_ax.set_ylabel("validation Dice")
    rate_ax.plot(epochs, [row["learning_rate"] for row in rows], color="tab:orange")
    rate_ax.set_ylabel("learning rate")
    minutes = np.array([row["minutes"] for row in rows])
    for ax in (loss_ax, metric_ax, rate_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        _minutes_on_top(ax, epochs, minutes)
    return figure


def _minutes_on_top(ax, epochs: np.ndarray, minutes: np.ndarray) -> None:
    """A top axis with the minutes at which the bottom axis's epochs ended."""
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    ticks = [t for t in ax.get_xticks() if epochs.min() <= t <= epochs.max()]
    top.set_xticks(ticks)
    digits = 1 if minutes.max() < 10 else 0  # a short run's ticks would all read 0
    top.set_xticklabels([f"{np.interp(t, epochs, minutes):.{digits}f}" for t in ticks])
    top.set_xlabel("minutes")


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
