"""medfcn.losses: deep supervision over the FCN's stacked output."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss

from medfcn.losses import DeepSupervisionLoss


def test_stacked_output_gives_the_weighted_sum_of_scale_losses():
    base = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = DeepSupervisionLoss(base)
    target = torch.randint(0, 3, (2, 1, 8, 9, 7))
    scales = torch.randn(2, 3, 3, 8, 9, 7)
    expected = base(scales[:, 0], target) + 0.5 * base(scales[:, 1], target) + 0.25 * base(scales[:, 2], target)
    assert torch.allclose(loss(scales, target), expected)


def test_plain_output_is_the_plain_loss():
    base = DiceCELoss(to_onehot_y=True, softmax=True)
    target = torch.randint(0, 3, (2, 1, 8, 9, 7))
    pred = torch.randn(2, 3, 8, 9, 7)
    assert torch.allclose(DeepSupervisionLoss(base)(pred, target), base(pred, target))
