"""Ignite handlers shared by training and evaluation configs (``evaluate.json`` scores masks
with :class:`PerClassMetrics` too); the handlers only training uses are in
:mod:`medfcn.training.handlers` and :mod:`medfcn.training.monitoring`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

__all__ = ["PerClassMetrics"]


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
