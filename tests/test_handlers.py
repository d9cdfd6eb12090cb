"""medfcn.handlers: per-class metrics, overlays, epoch filter of validation."""

from __future__ import annotations

from unittest.mock import create_autospec

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.engines import Evaluator

from medfcn.handlers import PerClassMetrics, ValidateEvery, overlay_slice


def test_overlay_colours_only_labelled_pixels():
    image = np.linspace(0, 1, 20).reshape(4, 5)
    labels = np.zeros((4, 5), dtype=int)
    labels[1, 2] = 1
    rgb = overlay_slice(image, labels)
    assert rgb.shape == (3, 4, 5) and rgb.dtype == np.uint8
    plain = overlay_slice(image, np.zeros_like(labels))
    assert np.array_equal(rgb[:, 0], plain[:, 0])
    assert not np.array_equal(rgb[:, 1, 2], plain[:, 1, 2])
    assert np.all(plain[0] == plain[1])  # grey where nothing is labelled


def test_per_class_metrics_ignore_nan_cases():
    engine = Engine(lambda e, b: None)
    engine.state.metric_details = {"dice": torch.tensor([[0.8, float("nan")], [0.6, 0.5]])}
    engine.state.metrics = {}
    PerClassMetrics("dice", ["a", "b"])(engine)
    assert engine.state.metrics == pytest.approx({"val_dice_a": 0.7, "val_dice_b": 0.5})
    with pytest.raises(ValueError, match="classes"):
        PerClassMetrics("dice", ["a", "b", "c"])(engine)


def test_validate_every_also_runs_after_last_epoch():
    validator = create_autospec(Evaluator, instance=True)
    trainer = Engine(lambda e, b: None)
    ValidateEvery(validator=validator, interval=3, epoch_level=True).attach(trainer)
    trainer.run([0, 1], max_epochs=7)
    assert [c.args[0] for c in validator.run.call_args_list] == [3, 6, 7]
