"""Losses for training with deep supervision.

:class:`medfcn.FCN` with ``deep_supervision > 0`` returns, in training mode, the logits of every
supervised scale stacked on dim 1. MONAI's :class:`monai.losses.DeepSupervisionLoss` takes a list
of tensors; :class:`DeepSupervisionLoss` unstacks first, so the same loss works with MONAI's
``SupervisedTrainer``, which passes the network output to the loss as it is.
"""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss as _MonaiDeepSupervisionLoss

__all__ = ["DeepSupervisionLoss"]


class DeepSupervisionLoss(_MonaiDeepSupervisionLoss):
    """Weighted sum of ``loss`` over the scales of a deeply supervised output.

    Takes MONAI's ``DeepSupervisionLoss`` arguments: ``loss``, the per-scale loss, e.g.
    ``DiceCELoss(to_onehot_y=True, softmax=True)``; ``weight_mode`` and ``weights`` as in MONAI
    (``"exp"``: 1, 0.5, 0.25, ... finest first).

    ``input``: ``(B, L, C, *S)`` (L scales, finest first) or a plain ``(B, C, *S)``;
    ``target``: ``(B, 1, *S)`` labels.
    """

    def forward(self, input: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and input.dim() == target.dim() + 1:
            input = list(torch.unbind(input, dim=1))
        return super().forward(input, target)
