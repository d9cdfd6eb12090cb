"""The planner's decisions: from a dataset's fingerprint (:mod:`medfcn.planning.fingerprint`)
and the time budget to a :class:`Plan`, each decision with the reason it was taken.

(Rules to be written: target spacing, normalisation, 2D/3D, patch, network and pooling per
axis, augmentation, batch and epochs from the timed probe.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Plan", "make_plan"]


@dataclass
class Plan:
    """What ``medfcn plan`` decided; every entry becomes an entry of the bundle's common.json.

    Attributes:
        dims: 2 or 3 (the network's spatial dimensions).
        slice_axis: for ``dims == 2``, the RAS axis the 2D network slices along (0, 1 or 2);
            None for 3D.
        pixdim: target voxel size in mm along R-L, A-P, S-I (``Spacingd``'s ``pixdim``).
        modality: ``"MRI"`` or ``"CT"`` (what :func:`medfcn.data.intensity_normalization` takes).
        hu_window: CT: ``[low, high]`` in HU (foreground percentiles 0.5 and 99.5); MRI: the
            bundles' default ``[-160, 240]``, unused.
        intensity_stats: CT: ``[mean, std]`` of the foreground in HU; MRI: None.
        in_channels: image channels (modalities).
        num_classes: background + labels.
        class_names: one per foreground label, from dataset.json.
        patch_size: training patch and sliding window, voxels, one per spatial axis.
        features: channels per encoder scale, finest first (``medfcn.FCN``'s ``features``).
        strides: per scale past the first (``len(features) - 1`` entries), the pooling factor
            per spatial axis (1 or 2): ``medfcn.FCN``'s ``strides``.
        encoder_blocks: two-convolution blocks per encoder scale (``medfcn.FCN``).
        deep_supervision: supervised coarser decoder scales (``medfcn.FCN``).
        batch_size: patches per training step.
        epochs: training epochs (one patch per training case per epoch).
        val_interval: epochs between validations.
        flip_axes: spatial axes the training flips along (and test-time augmentation uses).
        ema_decay: the weight average's decay (None: off).
        learning_rate: AdamW's initial learning rate.
        seconds_per_step: measured by the probe: one training step (batch_size patches,
            augmentation, forward, backward, update) on the planned device, seconds.
        seconds_per_validation: measured or estimated: one validation pass over the held-out
            cases of a fold, seconds.
        seconds_setup: estimated: loading and preprocessing every case once (the cache), s.
        budget_minutes: the budget asked for.
        planned_minutes: the training time the plan expects, minutes.
        device: where the probe ran (``"cpu"``, ``"cuda"``).
        reasons: decision name (``"pixdim"``, ``"patch_size"``, ...) -> why, one sentence each.
    """

    dims: int
    pixdim: list[float]
    modality: str
    in_channels: int
    num_classes: int
    class_names: list[str]
    patch_size: list[int]
    features: list[int]
    strides: list[list[int]]
    encoder_blocks: list[int]
    deep_supervision: int
    batch_size: int
    epochs: int
    val_interval: int
    flip_axes: list[int]
    budget_minutes: float
    device: str
    slice_axis: int | None = None
    hu_window: list[float] = field(default_factory=lambda: [-160.0, 240.0])
    intensity_stats: list[float] | None = None
    ema_decay: float | None = 0.999
    learning_rate: float = 0.002
    seconds_per_step: float = 0.0
    seconds_per_validation: float = 0.0
    seconds_setup: float = 0.0
    planned_minutes: float = 0.0
    reasons: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON (written into ``configs/plan.json`` of the bundle)."""
        return asdict(self)


def make_plan(fingerprint: dict, budget_minutes: float = 60.0, device: str | None = None, dims: int | None = None):
    """The plan for a dataset's ``fingerprint`` and a training budget on ``device``."""
    raise NotImplementedError("being written")
