"""Ignite handlers shared by stages: :class:`PerClassMetrics` (training and evaluation configs;
``evaluate.json`` scores masks with it too) and :class:`WeightAverage` (training, and the
planner's probe, which times training steps with it). The handlers only training uses are in
:mod:`medfcn.training.handlers` (which also exports :class:`WeightAverage`, as the bundles'
``train.json`` name it) and :mod:`medfcn.training.monitoring`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

__all__ = ["PerClassMetrics", "WeightAverage"]


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
