"""Voxelwise and per-scan uncertainty of a softmax segmentation, and the largest-component cleanup.

- :func:`normalised_entropy`: the predictive entropy of the class probabilities ``(K, *S)``
  (the mean softmax over flips when ``--tta`` averaged them), divided by ``log K`` so that it
  lies in 0..1: 0 where one class has all the probability, 1 where all K are equally likely.
- :func:`boundary_band`: the voxels within ``width`` voxels of a change of label in the mask.
- :func:`uncertainty_score`: one number per scan, the entropy summed over that band and divided by
  the mask's foreground voxels: the voxels in doubt per voxel segmented, as 1 - Dice is the
  voxels wrong per voxel segmented (roughly). Most of a scan is confidently background (entropy
  ~0), so a mean over the whole scan measures the field of view more than the segmentation, and a
  mean over the band alone ignores the structure's size. bench/uncertainty.py compares it with
  other scores on Task04 and LeftAtrium (docs/experiments.md).
- :func:`keep_largest_components`: each label's largest connected component (26-connectivity),
  the others set to background.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

__all__ = ["BAND_WIDTH", "boundary_band", "keep_largest_components", "normalised_entropy", "uncertainty_score"]

# Half-width (voxels) of the band around the mask's boundaries that the per-scan score averages:
# chosen on Task04 fold 0 and checked on LeftAtrium fold 0 (bench/uncertainty.py)
BAND_WIDTH = 2


def normalised_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_k p_k log p_k / log K`` of ``probabilities`` ``(K, *S)`` (non-negative,
    summing to 1 over K): float32 ``(*S)`` in 0..1. K = 1 gives zeros."""
    p = probabilities.float().clamp(min=0)
    p = p / p.sum(0, keepdim=True).clamp(min=1e-12)  # interpolation onto the scan's grid keeps sums ~1, not exactly
    classes = p.shape[0]
    if classes < 2:
        return torch.zeros(p.shape[1:], dtype=torch.float32)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(0)  # p log p -> 0 as p -> 0
    return (entropy / math.log(classes)).clamp(0, 1).float()


def boundary_band(labels: np.ndarray, width: int = BAND_WIDTH) -> np.ndarray:
    """Boolean ``labels.shape``: the voxels with a voxel of another label within ``width``
    voxels along every axis (a ``2 * width + 1`` cube), i.e. both sides of every boundary,
    background-foreground and between labels. Empty for a mask of one label."""
    size = 2 * int(width) + 1
    return ndimage.maximum_filter(labels, size=size) != ndimage.minimum_filter(labels, size=size)


def uncertainty_score(entropy: np.ndarray, labels: np.ndarray, width: int = BAND_WIDTH) -> float | None:
    """``entropy`` (normalised, 0..1, shape of ``labels``) summed over :func:`boundary_band` of
    the mask ``labels`` and divided by its foreground (non-zero) voxel count: 0 for a mask the
    model is sure of, about the fraction of the structure in doubt otherwise (it can pass 1 for a
    small, doubtful structure). None for a mask without foreground: there is no structure to
    relate the doubt to (the volumes say it is empty)."""
    foreground = int(np.count_nonzero(labels))
    if not foreground:
        return None
    return float(entropy[boundary_band(labels, width)].sum(dtype=np.float64) / foreground)


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """``labels`` (integer ``(X, Y, Z)``) with every foreground label reduced to its largest
    connected component (26-connectivity: voxels touching by a face, edge or corner); the
    voxels of its other components become background (0). A copy; labels keep their values."""
    kept = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for value in np.unique(labels):
        if value == 0:
            continue
        components, count = ndimage.label(labels == value, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0  # not the label
            kept[(components > 0) & (components != int(sizes.argmax()))] = 0
    return kept
