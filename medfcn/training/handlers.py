"""Training handlers that keep a run resumable and its result reproducible, used by the
bundles' ``train.json``:

- :class:`Resume`: MONAI's CheckpointLoader that also restores the trainer (and may take the
  checkpoint already read by the pre-flight checks, so ``last.pt`` is read once).
- :class:`ReseedEachEpoch`: each epoch's randomness a function of ``(seed, epoch)`` alone.
- :class:`ValidateEvery`: MONAI's ValidationHandler, but also after the last epoch.
- :class:`BestMetric`: makes the evaluator's best score (and its per-class scores) part of a checkpoint.
- :class:`WeightAverage`: an exponential moving average of the weights, the model validated
  (defined in :mod:`medfcn.handlers`, which the planner's probe uses too).
- :class:`CheckpointWriter`: atomic ``last.pt`` (resume) and ``best_model.pt`` (weights).
- :class:`BudgetKeeper`: ends a planned run within its time budget on a machine slower than
  planned, with the learning-rate schedule fitted to the epochs that fit.

Logging, progress and TensorBoard extras are in :mod:`medfcn.training.monitoring`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader, ValidationHandler

from medfcn import distributed
from medfcn.handlers import WeightAverage
from medfcn.io import atomic_torch_save

__all__ = [
    "BestMetric",
    "BudgetKeeper",
    "CheckpointWriter",
    "ReseedEachEpoch",
    "Resume",
    "ValidateEvery",
    "WeightAverage",
]


# The schedules a new length can be given mid-run, by the attribute that holds it. Their step is
# recursive (the next rate is the current one times a factor), so a new horizon continues from
# the current rate and reaches the schedule's end on the new last epoch.
_HORIZONS = {torch.optim.lr_scheduler.PolynomialLR: "total_iters", torch.optim.lr_scheduler.CosineAnnealingLR: "T_max"}
# checkpoint objects a last.pt of an older medfcn lacks: a resume goes on without them
OPTIONAL_CHECKPOINT_OBJECTS = ("budget",)


def horizon_attribute(scheduler) -> str | None:
    """The attribute holding ``scheduler``'s length in epochs, for the schedules of
    :data:`_HORIZONS`; None for others."""
    return next((attr for kind, attr in _HORIZONS.items() if isinstance(scheduler, kind)), None)


def restart_schedule(scheduler, epochs: int) -> None:
    """Make ``scheduler`` the schedule of ``epochs`` epochs at its current epoch: the horizon and
    the rate that schedule has there (its closed form), so a run extended after its rate decayed
    to 0 trains on at a rate again."""
    attr = horizon_attribute(scheduler)
    if attr is None:
        return
    setattr(scheduler, attr, epochs)
    done = min(scheduler.last_epoch, epochs)
    if isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR):
        rates = [base * (1.0 - done / epochs) ** scheduler.power for base in scheduler.base_lrs]
    else:
        eta = scheduler.eta_min
        rates = [eta + (base - eta) * (1 + math.cos(math.pi * done / epochs)) / 2 for base in scheduler.base_lrs]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports


class Resume(CheckpointLoader):
    """MONAI's CheckpointLoader (``weights_only=True``) that also restores the trainer it is
    attached to (epoch and iteration), which a config cannot reference from its own handlers.

    :attr:`checkpoint`: the contents of ``load_path`` when already read (``medfcn train``'s
    pre-flight checks read ``last.pt`` on the CPU and hand it over, so the file is read once);
    None (``python -m monai.bundle run``) reads ``load_path`` as MONAI does.
    """

    checkpoint: dict | None = None

    def attach(self, engine: Engine) -> None:
        self.load_dict = {**self.load_dict, "trainer": engine}
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        # A scheduler's state dict carries its horizon (PolynomialLR.total_iters, T_max): keep
        # the run length this run was configured with, so `--epochs` can extend a finished run.
        # Other schedules (a LinearLR warm-up's total_iters...) are not the run's length: restored.
        horizons = {
            (key, attr): getattr(obj, attr)
            for key, obj in self.load_dict.items()
            if (attr := horizon_attribute(obj)) is not None
        }
        if not self.strict_shape:  # MONAI's partial loading: not what a resume may do
            raise ValueError("Resume loads every object of last.pt; strict_shape false is not supported.")
        checkpoint = self.checkpoint
        if checkpoint is None:  # `python -m monai.bundle run`: read here, as MONAI's loader does
            checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        self._restore(engine, checkpoint)
        self.checkpoint = None  # its tensors now live in the objects; free the copy
        for (key, attr), configured in horizons.items():
            scheduler = self.load_dict[key]
            saved = getattr(scheduler, attr)
            setattr(scheduler, attr, configured)
            if configured != saved and scheduler.last_epoch >= saved:
                # a run its schedule had ended (rate decayed to 0), extended with `--epochs`: the
                # rate of the new length's schedule, or it would train on at 0. A run stopped
                # mid-schedule keeps the rate it had (the optimizer's state holds it).
                restart_schedule(scheduler, configured)

    def _restore(self, engine: Engine, checkpoint: dict) -> None:
        """What MONAI's ``CheckpointLoader.__call__`` does after its ``torch.load`` (with the
        default ``strict_shape``): load every object (those of :data:`OPTIONAL_CHECKPOINT_OBJECTS`
        where the checkpoint has them), keep the engine's ``max_epochs``."""
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        to_load = {k: v for k, v in self.load_dict.items() if k in checkpoint or k not in OPTIONAL_CHECKPOINT_OBJECTS}
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint, strict=self.strict)
        if epoch_length and engine.state.epoch_length != epoch_length:
            # a run resumed on another number of processes: each one's share of an epoch, in steps,
            # is this run's (last.pt is written at the end of an epoch, so the count stays whole)
            engine.state.epoch_length = epoch_length
            engine.state.iteration = engine.state.epoch * epoch_length
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(
                f"Epoch count ({engine.state.epoch}) in checkpoint is larger than the "
                f"`engine.state.max_epochs` ({max_epochs}) of engine."
            )
        engine.state.max_epochs = max_epochs
        self.logger.info(f"Restored all variables from {self.load_path}")


class ValidateEvery(ValidationHandler):
    """Run the validator every ``interval`` epochs and after the final epoch, so a run
    shorter than ``interval`` still reports a validation score."""

    def attach(self, engine: Engine) -> None:
        def due(engine: Engine, epoch: int) -> bool:
            return epoch % self.interval == 0 or epoch == engine.state.max_epochs

        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=due), self)


class ReseedEachEpoch:
    """Make each epoch's randomness a function of ``(seed, epoch)`` alone.

    At every epoch start the sampler's shuffle (``set_epoch``, as for a DistributedSampler) and
    all random transforms are reseeded from the epoch number (and the process's rank, in a
    distributed run). A run resumed at epoch k on as many processes then draws the same batches
    and augmentations as an uninterrupted one, with no random state to save, and ends with the
    same weights on CPU.
    """

    def __init__(self, transforms, sampler, seed: int = 0):
        self.transforms = transforms
        self.sampler = sampler
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        self.sampler.set_epoch(epoch)  # the same shuffle on every process: each takes its share
        # each process its own augmentations (rank 0 those of a single-process run)
        seed = self.seed * 100_003 + epoch + 1_000_003 * distributed.rank()
        self.transforms.set_random_state(seed=seed % (2**32))


class BestMetric:
    """The evaluator's best key metric, its epoch and every metric of that validation (the
    per-class Dice of :class:`medfcn.handlers.PerClassMetrics`), as a state dict, so that a
    resumed run keeps comparing against the best score reached before the interruption and
    the end of a run can say how good its best model is per class.

    Construct it after the evaluator's metric handlers: it reads their results at the end of
    each validation.
    """

    def __init__(self, evaluator: Engine):
        self.evaluator = evaluator
        self.metrics: dict[str, float] = {}
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def _record(self, evaluator: Engine) -> None:
        if evaluator.state.best_metric_epoch == evaluator.state.epoch:
            self.metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}

    def state_dict(self) -> dict:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "metrics": dict(self.metrics),
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        self.metrics = dict(state.get("metrics", {}))  # absent from checkpoints of older medfcn


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

    main_rank_only = True  # medfcn.distributed.main_rank_only: rank 0 alone writes

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


class BudgetKeeper:
    """End a run within its time budget when the machine is slower than when it was planned.

    ``medfcn plan`` fits the epochs to ``budget_minutes`` from a timed probe, but a shared or
    throttled machine can run the same step 1.6x slower for minutes at a time (row 79 of
    docs/experiments.md). Before each epoch (from the third of this process on: the first pays
    one-off costs) the keeper takes the mean time of an epoch so far, validation and checkpoint
    included, and projects the run's end. When that end is more than ``tolerance`` of the budget
    away from it, the trainer's last epoch becomes the last one that ends within the budget,
    never past the planned epochs (a run that slowed down and sped up again gets its epochs
    back). The learning-rate schedule's horizon follows, so the rate still decays to its end on
    the last epoch instead of training being cut at a high rate.

    The budget counts from the trainer's start (the data sets are cached before it; the plan
    counts that time apart). Also a checkpoint object (``last.pt``'s ``budget``): the seconds trained so far and
    the last epoch set, so a resumed run goes on counting and keeps the shorter length. Given a
    ``last.pt`` without it (an older medfcn), a resumed run has the planned share of the budget,
    ``budget * (planned - done) / planned``.

    Args:
        budget_minutes: the training time the epochs were planned for; None: no keeping.
        lr_scheduler: a :class:`~torch.optim.lr_scheduler.PolynomialLR` or
            :class:`~torch.optim.lr_scheduler.CosineAnnealingLR`, stepped once per epoch.
        tolerance: how far (a fraction of the budget) the projected end may be from it before
            the length changes; a smaller one would change it back and forth by one epoch.
        print_fn: where the line saying a change of length goes.
        clock: seconds, monotonic (tests give a fake one).

    Raises:
        ValueError: a budget with another kind of scheduler (no horizon to fit).
    """

    def __init__(
        self,
        budget_minutes: float | None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        tolerance: float = 0.03,
        print_fn: Callable[..., None] = print,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.budget_minutes = budget_minutes
        self.budget_s = None if budget_minutes is None else 60.0 * float(budget_minutes)
        self.scheduler = lr_scheduler
        if self.budget_s is not None and horizon_attribute(lr_scheduler) is None:
            raise ValueError(
                f"budget_minutes: the lr_scheduler {type(lr_scheduler).__name__} cannot be given a new length "
                "(PolynomialLR and CosineAnnealingLR can); set budget_minutes null."
            )
        self.tolerance = float(tolerance)
        self.print_fn = print_fn
        self.clock = clock
        self._clock0 = clock()
        self._spent_before = 0.0  # seconds trained before this process (from last.pt)
        self._saved: dict | None = None  # last.pt's record of the keeper
        self.last_epoch: int | None = None  # the last epoch the keeper set; None: the planned one
        self._planned = 0
        self._epoch0 = 0
        self._second_started = 0.0  # when this process's second epoch started
        self._said = False

    def spent(self) -> float:
        """Seconds of training so far, before this process included."""
        return self._spent_before + self.clock() - self._clock0

    def state_dict(self) -> dict:
        return {
            "seconds": self.spent(),
            "last_epoch": self.last_epoch,
            "planned": self._planned,
            "budget_minutes": self.budget_minutes,
        }

    def load_state_dict(self, state: dict) -> None:
        self._saved = dict(state)
        self._spent_before = float(state["seconds"])

    def attach(self, engine: Engine) -> None:
        """Attach after :class:`Resume` (so the epochs done are known) and before the handlers
        that show the epoch count."""
        if self.budget_s is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)

    def _started(self, engine: Engine) -> None:
        # the budget counts from the trainer's start: a resume builds its handlers before it fills
        # the training cache, a new run after
        self._clock0 = self.clock()
        self._planned = int(engine.state.max_epochs)
        self._epoch0 = int(engine.state.epoch)
        if not self._epoch0:
            return
        if self._saved is None:  # resumed from a last.pt that does not say the time spent
            self.budget_s *= max(self._planned - self._epoch0, 0) / self._planned
            return
        last = self._saved.get("last_epoch")
        same = self._saved.get("planned") == self._planned and self._saved.get("budget_minutes") == self.budget_minutes
        if last is not None and same and last >= self._epoch0:
            # the length set before the interruption (the epochs done: the run has ended), and
            # the schedule's horizon with it; the optimizer's state holds the rate it had
            self.last_epoch = engine.state.max_epochs = int(last)
            setattr(self.scheduler, horizon_attribute(self.scheduler), self.last_epoch)

    def _epoch_started(self, engine: Engine) -> None:
        epoch = engine.state.epoch  # the epoch starting now (Ignite counts it before this event)
        now = self.clock()
        if epoch == self._epoch0 + 2:
            self._second_started = now
        if epoch < self._epoch0 + 3:
            return
        per_epoch = (now - self._second_started) / (epoch - self._epoch0 - 2)
        # rank 0's clock decides for every process of a distributed run, or they would stop apart
        last = distributed.broadcast(self._fitting_last(engine, epoch, per_epoch))
        if last is not None and last != engine.state.max_epochs:
            self._set_length(engine, last, per_epoch)

    def _fitting_last(self, engine: Engine, epoch: int, per_epoch: float) -> int | None:
        """The last epoch that ends within the budget at ``per_epoch`` seconds an epoch, from
        ``epoch`` (starting now) on; None while the planned end is within the tolerance."""
        spent = self.spent()
        projected = spent + per_epoch * (engine.state.max_epochs - epoch + 1)
        if abs(projected - self.budget_s) <= self.tolerance * self.budget_s:
            return None
        fitting = math.floor((self.budget_s - spent) / per_epoch) if per_epoch > 0 else self._planned
        return min(self._planned, max(epoch, epoch - 1 + fitting))  # epochs epoch..last fit

    def _set_length(self, engine: Engine, last: int, per_epoch: float) -> None:
        """End the run after epoch ``last``; said once, the first time (the epoch lines show the
        new count after that)."""
        before = engine.state.max_epochs
        engine.state.max_epochs = last
        self.last_epoch = None if last == self._planned else last
        # the horizon only: the recursive step continues from the current rate, with no jump
        setattr(self.scheduler, horizon_attribute(self.scheduler), last)
        if not self._said and distributed.is_main():
            self._said = True
            self.print_fn(
                f"budget: training ends after epoch {last} instead of {before}, the last to end within the "
                f"{self.budget_minutes:.4g}-min budget at {per_epoch:.1f} s/epoch (this machine is slower "
                "than when the epochs were planned), with the learning rate decayed to its end there; the count "
                "follows the machine's speed from here on",
                flush=True,
            )
