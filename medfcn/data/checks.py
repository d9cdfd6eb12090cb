"""Input checks that turn bad scans and datasets into one clear :class:`UserError` each.

Readers are not trusted to complain: SimpleITK reads a truncated .nii.gz as zeros and turns NaN
into 0, so the checks look at the loaded voxels themselves (finite values, dimensions, channel
count, size) and at image/label pairs (shape, affine, label values).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch

from medfcn.errors import UserError

__all__ = ["BYTES_PER_VOXEL", "memory_budget", "check_scan", "check_training_pairs"]

# float32 bytes per voxel at the model's spacing during inference: the input, the logits and
# their softmax (3 classes each), the sliding-window sum and weight maps, and the inverted
# probabilities on the original grid (~4 + 12 + 12 + 12 + 4 + 12), rounded up.
BYTES_PER_VOXEL = 64


def memory_budget() -> int:
    """Bytes one scan may take: ``$MEDFCN_MAX_MEMORY_GB``, else half the machine's RAM."""
    if os.environ.get("MEDFCN_MAX_MEMORY_GB"):
        return int(float(os.environ["MEDFCN_MAX_MEMORY_GB"]) * 2**30)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):  # no sysconf: assume 8 GiB
        return 4 * 2**30


def check_scan(
    image: torch.Tensor, path: str | os.PathLike, in_channels: int, target_spacing: Sequence[float] | None = None
) -> None:
    """Check a freshly loaded scan (before channel-first, resampling and normalisation).

    Args:
        image: the loaded array, ``(X, Y, Z)`` or ``(X, Y, Z, C)``, with MONAI metadata.
        path: the file or folder, named in messages.
        in_channels: channels the bundle's network takes.
        target_spacing: the bundle's voxel size in mm, to estimate the resampled size.

    Raises:
        UserError: wrong dimensionality or channel count, an empty axis, NaN/Inf voxels, or a
            volume whose resampled size exceeds :func:`memory_budget`.
    """
    shape = tuple(int(s) for s in image.shape)
    meta = getattr(image, "meta", {})
    spatial = tuple(int(s) for s in meta.get("spatial_shape", shape[:3]))
    channels = 1 if len(shape) == len(spatial) else shape[-1]
    if len(spatial) != 3:
        raise UserError(f"{path}: is a {len(spatial)}D image {shape}; this bundle segments 3D volumes.")
    if len(shape) > 4:
        raise UserError(f"{path}: has shape {shape}; expected a 3D volume (x, y, z) with at most one channel axis.")
    if channels != in_channels:
        raise UserError(
            f"{path}: has {channels} channels (shape {shape}); the bundle expects {in_channels}. "
            "Pass a single 3D volume, not a 4D series."
        )
    if min(spatial) < 1:
        raise UserError(f"{path}: has an empty axis (shape {shape}).")
    finite = torch.isfinite(torch.as_tensor(image))
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise UserError(f"{path}: has {bad} NaN/Inf voxels; fix or mask them before segmenting.")
    if target_spacing is not None:
        affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        voxels = float(np.prod(np.ceil(np.array(spatial) * spacing / np.asarray(target_spacing, dtype=float))))
        need = voxels * BYTES_PER_VOXEL * max(in_channels, 1)
        budget = memory_budget()
        if need > budget:
            raise UserError(
                f"{path}: needs about {need / 2**30:.1f} GiB at the model's spacing ({voxels / 1e6:.0f} M voxels), "
                f"over the {budget / 2**30:.1f} GiB budget; crop the scan or raise MEDFCN_MAX_MEMORY_GB."
            )


def check_training_pairs(datalist: Sequence[dict], num_classes: int, in_channels: int | None = None) -> None:
    """Check every image/label pair of a training datalist.

    Shapes, affines and channel counts (axes after the third: MSD stores modalities as
    ``(X, Y, Z, C)``) come from the NIfTI headers; label values and finite image voxels from
    the data. ``in_channels``: the channels the network takes (not checked when None).
    Raises UserError naming the first offending file.
    """
    for item in datalist:
        image_path, label_path = item["image"], item.get("label")
        try:
            image = nib.load(image_path)
            voxels = np.asarray(image.dataobj)
        except Exception as err:
            raise UserError(f"{image_path}: cannot be read as NIfTI ({err}); re-export or remove the case.") from err
        if not np.all(np.isfinite(voxels)):
            raise UserError(f"{image_path}: has NaN/Inf voxels; fix the image or drop the case from dataset.json.")
        channels = int(np.prod(image.shape[3:], dtype=int))
        if in_channels is not None and channels != in_channels:
            raise UserError(
                f"{image_path}: has {channels} channel(s) (shape {image.shape}) but the network takes {in_channels}; "
                f"pass --set network_def#in_channels={channels} (and the same in configs/inference.json)."
            )
        if label_path is None:
            continue
        try:
            label = nib.load(label_path)
            values = np.unique(np.asarray(label.dataobj)).tolist()
        except Exception as err:
            raise UserError(f"{label_path}: cannot be read as NIfTI ({err}); re-export or remove the case.") from err
        if label.shape[:3] != image.shape[:3]:
            raise UserError(f"{label_path}: shape {label.shape} differs from its image's {image.shape}.")
        if not np.allclose(label.affine, image.affine, atol=1e-3):
            raise UserError(f"{label_path}: affine differs from its image's; resample the label onto the image.")
        unknown = [v for v in values if v != np.round(v) or not 0 <= v < num_classes]
        if unknown:
            raise UserError(
                f"{label_path}: label values {unknown[:5]} outside 0..{num_classes - 1}; "
                "map them to the bundle's labels."
            )
