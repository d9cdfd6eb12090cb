"""Ignite handlers that MONAI does not provide, used by the bundle configs.

- :class:`ValidateEvery`: MONAI's ValidationHandler, but also after the last epoch.
- :class:`PerClassMetrics`: one scalar per class from a metric's per-case details.
- :class:`CheckpointWriter`: atomic ``last.pt`` (resume) and ``best_model.pt`` (weights).
- :class:`BestMetric`: makes the evaluator's best score part of a checkpoint.
- :class:`WeightAverage`: an exponential moving average of the weights, the model validated.
- :class:`EpochProgress`: one line per epoch with loss, Dice, speed and ETA.
- :class:`LearningRateWriter`, :class:`OverlayWriter`: TensorBoard extras.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, ValidationHandler
from monai.handlers.utils import from_engine

from medfcn.io import atomic_torch_save

__all__ = [
    "ReseedEachEpoch",
    "Resume",
    "ValidateEvery",
    "PerClassMetrics",
    "BestMetric",
    "WeightAverage",
    "CheckpointWriter",
    "EpochProgress",
    "LearningRateWriter",
    "OverlayWriter",
    "overlay_slice",
]

logger = logging.getLogger("medfcn")


class Resume(CheckpointLoader):
    """MONAI's CheckpointLoader (``weights_only=True``) that also restores the trainer it is
    attached to (epoch and iteration), which a config cannot reference from its own handlers."""

    def attach(self, engine: Engine) -> None:
        self.load_dict = {**self.load_dict, "trainer": engine}
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        # A scheduler's state dict carries its horizon (PolynomialLR.total_iters, T_max...):
        # keep the one this run was configured with, so `--epochs` can extend a finished run.
        horizons = {
            (key, attr): getattr(obj, attr)
            for key, obj in self.load_dict.items()
            if isinstance(obj, torch.optim.lr_scheduler.LRScheduler)
            for attr in ("total_iters", "T_max")
            if hasattr(obj, attr)
        }
        super().__call__(engine)
        for (key, attr), value in horizons.items():
            setattr(self.load_dict[key], attr, value)


class ValidateEvery(ValidationHandler):
    """Run the validator every ``interval`` epochs and after the final epoch, so a run
    shorter than ``interval`` still reports a validation score."""

    def attach(self, engine: Engine) -> None:
        def due(engine: Engine, epoch: int) -> bool:
            return epoch % self.interval == 0 or epoch == engine.state.max_epochs

        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=due), self)


class PerClassMetrics:
    """Put one scalar per class into ``engine.state.metrics``: ``{prefix}_{class_name}``.

    Reads ``engine.state.metric_details[metric_name]``, the ``(cases, classes)`` table a MONAI
    metric handler keeps with ``save_details=True``; classes absent from a case (NaN) are
    left out of that class's mean. Attach it before the handlers that log the metrics.
    """

    def __init__(self, metric_name: str, class_names: Sequence[str], prefix: str = "val_dice"):
        self.metric_name = metric_name
        self.class_names = list(class_names)
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        details = torch.as_tensor(engine.state.metric_details[self.metric_name], dtype=torch.float32)
        per_class = torch.nanmean(details.reshape(-1, details.shape[-1]), dim=0)
        if per_class.numel() != len(self.class_names):
            raise ValueError(f"{self.metric_name} has {per_class.numel()} classes, expected {self.class_names}.")
        for name, value in zip(self.class_names, per_class.tolist(), strict=True):
            engine.state.metrics[f"{self.prefix}_{name}"] = value


class ReseedEachEpoch:
    """Make each epoch's randomness a function of ``(seed, epoch)`` alone.

    At every epoch start the sampler's shuffle (``set_epoch``, as for a DistributedSampler) and
    all random transforms are reseeded from the epoch number. A run resumed at epoch k then
    draws the same batches and augmentations as an uninterrupted one, with no random state to
    save, and ends with the same weights on CPU.
    """

    def __init__(self, transforms, sampler, seed: int = 0):
        self.transforms = transforms
        self.sampler = sampler
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        self.sampler.set_epoch(epoch)
        self.transforms.set_random_state(seed=(self.seed * 100_003 + epoch) % (2**32))


class BestMetric:
    """The evaluator's best key metric and its epoch, as a state dict, so that a resumed run
    keeps comparing against the best score reached before the interruption."""

    def __init__(self, evaluator: Engine):
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


class WeightAverage:
    """Exponential moving average (EMA) of a network's weights, updated after every iteration.

    The averaged copy (:attr:`network`) is what the evaluator validates and what
    ``best_model.pt`` holds: late in training the weights oscillate around a minimum and their
    average generalises better than any single iterate, at no inference cost.

    The decay after ``n`` updates is ``min(decay, (1 + n) / (10 + n))``, so the average follows
    the fast early changes (decay 0.1 at the first update, 0.96 after 200) and reaches ``decay``
    only after ``~10 / (1 - decay)`` updates; ``decay`` 0 or ``None`` disables averaging and
    :attr:`network` is the trained network itself.

    Also a checkpoint object (``state_dict``): put it in ``last.pt`` so a resumed run continues
    the same average.
    """

    def __init__(self, network: torch.nn.Module, decay: float | None = 0.999):
        self.decay = float(decay or 0.0)
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}.")
        self.source = network
        self.updates = 0
        self.network = network
        if self.decay > 0:
            self.network = copy.deepcopy(network).requires_grad_(False)

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def __call__(self, engine: Engine | None = None) -> None:
        weight = 1.0 - self.current_decay()
        averaged = list(self.network.parameters()) + list(self.network.buffers())
        current = list(self.source.parameters()) + list(self.source.buffers())
        for avg, cur in zip(averaged, current, strict=True):
            if avg.is_floating_point():
                avg.lerp_(cur.detach(), weight)
            else:  # integer buffers (e.g. BatchNorm's num_batches_tracked) are copied
                avg.copy_(cur)
        self.updates += 1

    def state_dict(self) -> dict:
        if not self.enabled:
            return {}
        return {"updates": self.updates, "network": self.network.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the average; a checkpoint written with averaging on/off against this
        handler's decay raises (never a silent drop of the average)."""
        if not self.enabled:
            if state:
                raise ValueError("the checkpoint holds a weight average; resume it with ema_decay set, not null.")
            return
        if not state:
            raise ValueError("the checkpoint has no weight average; resume it with ema_decay null.")
        self.updates = int(state["updates"])
        self.network.load_state_dict(state["network"])


class CheckpointWriter:
    """Write checkpoints atomically (temporary file, then rename).

    - ``{save_dir}/last.pt`` after every epoch: every object of ``save_dict`` (network,
      optimizer, scheduler, trainer, ...), enough to resume.
    - ``{save_dir}/best_model.pt`` whenever the evaluator's key metric improves: the state dict
      of the network validated (``best_network``, default ``save_dict[network_key]``) alone,
      the file a bundle ships as ``models/model.pt``; its tensors are on the CPU whatever the
      training device, so a plain ``torch.load`` reads it on a machine without a GPU.

    Attach to the trainer after the validation handler, so ``last.pt`` records the best score
    including the epoch just validated.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        evaluator: Engine | None = None,
        network_key: str = "network",
        best_network: torch.nn.Module | None = None,
    ):
        self.save_dir = Path(save_dir)
        self.save_dict = save_dict
        self.evaluator = evaluator
        self.best_network = best_network if best_network is not None else save_dict[network_key]

    def attach(self, trainer: Engine) -> None:
        self.save_dict = {**self.save_dict, "trainer": trainer}
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.save_best)

    def save_last(self, engine: Engine) -> None:
        atomic_torch_save({k: v.state_dict() for k, v in self.save_dict.items()}, self.save_dir / "last.pt")

    def save_best(self, evaluator: Engine) -> None:
        if evaluator.state.best_metric_epoch == evaluator.state.epoch:
            state = self.best_network.state_dict()
            weights = OrderedDict((k, v.cpu()) for k, v in state.items())
            weights._metadata = getattr(state, "_metadata", None)  # as load_state_dict expects it
            atomic_torch_save(weights, self.save_dir / "best_model.pt")


class EpochProgress:
    """Print one line per epoch: mean loss, latest validation scores, seconds per epoch, ETA.

    Attach to the trainer after the validation handler so the line shows that epoch's scores.
    """

    def __init__(self, evaluator: Engine | None = None, print_fn=print):
        self.evaluator = evaluator
        self.print_fn = print_fn
        self._losses: list[float] = []
        self._t0 = 0.0
        self._epoch0 = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()
        self._epoch0 = engine.state.epoch  # non-zero when resuming

    def _iteration(self, engine: Engine) -> None:
        self._losses.append(float(from_engine(["loss"], first=True)(engine.state.output)))

    def _epoch(self, engine: Engine) -> None:
        epoch, total = engine.state.epoch, engine.state.max_epochs
        per_epoch = (time.perf_counter() - self._t0) / max(epoch - self._epoch0, 1)
        eta = per_epoch * (total - epoch)
        parts = [f"epoch {epoch}/{total}", f"loss {np.mean(self._losses):.4f}"]
        validated = self.evaluator is not None and self.evaluator.state.epoch == epoch
        if validated and self.evaluator.state.metrics:
            scores = " ".join(f"{k.replace('val_', '')} {v:.4f}" for k, v in self.evaluator.state.metrics.items())
            parts.append(scores)
        parts += [f"{per_epoch:.1f} s/epoch", f"ETA {int(eta // 60)}:{int(eta % 60):02d}"]
        self.print_fn("  ".join(parts), flush=True)
        self._losses.clear()


class LearningRateWriter:
    """Write the first parameter group's learning rate to TensorBoard at each epoch end."""

    def __init__(self, summary_writer, optimizer: torch.optim.Optimizer, tag: str = "learning_rate"):
        self.writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

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

    def __init__(self, summary_writer, tag: str = "val_overlay"):
        self.writer = summary_writer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        item = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        image = _as_numpy(item["image"])[0]
        label, pred = (_labels(item[k]) for k in ("label", "pred"))
        if image.ndim == 3:
            z = int(np.argmax((label > 0).sum(axis=(0, 1))))
            image, label, pred = image[..., z], label[..., z], pred[..., z]
        panels = [overlay_slice(image, np.zeros_like(label)), overlay_slice(image, label), overlay_slice(image, pred)]
        self.writer.add_image(self.tag, np.concatenate(panels, axis=2), engine.state.epoch, dataformats="CHW")
        self.writer.flush()


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _labels(x) -> np.ndarray:
    """``(C, *S)`` one-hot or ``(1, *S)`` label map to ``(*S)`` labels."""
    arr = _as_numpy(x)
    return arr.argmax(0) if arr.shape[0] > 1 else arr[0].round().astype(np.int64)
