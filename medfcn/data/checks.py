"""Input checks that turn bad scans and datasets into one clear :class:`UserError` each.

Readers are not trusted to complain: SimpleITK reads a truncated .nii.gz as zeros and turns NaN
into 0, so the checks look at the loaded voxels themselves (finite values, dimensions, channel
count, size) and at image/label pairs (shape, affine, label values).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch

from medfcn.data.nifti import check_gzip_integrity, refuse_non_mm, voxel_spacing
from medfcn.errors import InputWarning, UserError
from medfcn.outputs import plural

__all__ = [
    "BYTES_PER_VOXEL",
    "memory_budget",
    "memory_need",
    "check_memory",
    "check_scan",
    "warn_if_label_map",
    "check_training_pairs",
    "check_label_grid",
]

# float32 bytes per voxel at the model's spacing during inference: the input, the logits and
# their softmax (3 classes each), the sliding-window sum and weight maps, and the inverted
# probabilities on the original grid (~4 + 12 + 12 + 12 + 4 + 12), rounded up.
BYTES_PER_VOXEL = 64


def memory_budget() -> int:
    """Bytes one scan may take: ``$MEDFCN_MAX_MEMORY_GB`` (GiB), else half the machine's RAM.

    Raises:
        UserError: the variable is set but not a positive, finite number.
    """
    value = os.environ.get("MEDFCN_MAX_MEMORY_GB", "").strip()
    if value:
        try:
            gib = float(value)
        except ValueError:
            gib = math.nan
        if not 0 < gib < math.inf:  # also NaN
            raise UserError(f"MEDFCN_MAX_MEMORY_GB={value!r}: not a number of GiB; e.g. MEDFCN_MAX_MEMORY_GB=8.")
        return int(gib * 2**30)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):  # no sysconf: assume 4 GiB
        return 4 * 2**30


def _amount(x: float) -> str:
    """3 significant digits, no exponent above 100: ``0.0123``, ``1.5``, ``12.3``, ``1234``."""
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def check_scan(
    image: torch.Tensor,
    path: str | os.PathLike,
    in_channels: int,
    target_spacing: Sequence[float] | None = None,
    slice_axis: int | None = None,
    num_classes: int = 3,
) -> None:
    """Check a freshly loaded scan (before channel-first, resampling and normalisation).

    Args:
        image: the loaded array, ``(X, Y, Z)`` or ``(X, Y, Z, C)``, with MONAI metadata.
        path: the file or folder, named in messages.
        in_channels: channels the bundle's network takes.
        target_spacing: the bundle's voxel size in mm, to estimate the resampled size.
        slice_axis: for a bundle that segments slice by slice, its slice axis after
            reorientation to RAS (0: sagittal); one slice across it is a valid input.
        num_classes: the network's output classes (background included), for the memory estimate.

    Raises:
        UserError: wrong dimensionality or channel count, an empty axis, a single slice, NaN/Inf
            voxels, all voxels of one value (a blank image), or a volume that needs more than
            :func:`memory_budget` (:func:`check_memory`).
    """
    shape = tuple(int(s) for s in image.shape)
    meta = getattr(image, "meta", {})
    spatial = tuple(int(s) for s in meta.get("spatial_shape", shape[:3]))
    _check_layout(path, shape, spatial, in_channels)
    affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    _refuse_single_slice(path, spatial, affine, slice_axis)
    finite = torch.isfinite(torch.as_tensor(image))
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise UserError(f"{path}: has {bad} NaN/Inf voxels; fix or mask them before segmenting.")
    _refuse_blank(image, path)
    check_memory(path, spatial, voxel_spacing(affine), in_channels, target_spacing, num_classes)


def _check_layout(path: str | os.PathLike, shape: tuple[int, ...], spatial: tuple[int, ...], in_channels: int) -> None:
    """UserError unless the array ``shape`` is a 3D volume ``spatial`` with ``in_channels``
    channels (last axis) and no empty axis."""
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


def _refuse_single_slice(
    path: str | os.PathLike, spatial: tuple[int, ...], affine: np.ndarray, slice_axis: int | None
) -> None:
    """A one-voxel axis gives the 3D network nothing to see: the mask comes out all background.
    Only a slice-by-slice bundle reads a lone slice across its own slice axis (as it reads each)."""
    ras_axes = list(nib.io_orientation(affine)[:, 0])  # the RAS axis each stored axis becomes
    own_axis = ras_axes.index(slice_axis) if slice_axis in ras_axes else None
    if any(size < 2 and axis != own_axis for axis, size in enumerate(spatial)):
        what = "a single slice" if sum(size < 2 for size in spatial) == 1 else "not a volume"
        dims = " x ".join(map(str, spatial))
        raise UserError(f"{path}: is {what} ({dims}); this bundle segments 3D volumes.")


def _refuse_blank(image: torch.Tensor, path: str | os.PathLike) -> None:
    """UserError for a scan whose voxels all hold one value (an export that lost its pixels):
    the network still draws structures on it (the hippocampus bundle: 2076 mm^3 "anterior" on
    an all-zero crop, exit 0)."""
    flat = torch.as_tensor(image).as_subclass(torch.Tensor).reshape(-1)
    if flat.numel() and bool((flat == flat[0]).all()):
        raise UserError(
            f"{path}: every voxel is {float(flat[0]):g} (a blank image), so there is nothing to segment; "
            "check the export or the file."
        )


def memory_need(
    shape: Sequence[int],
    spacing: Sequence[float],
    in_channels: int,
    target_spacing: Sequence[float] | None,
    num_classes: int = 3,
) -> tuple[float, float, float]:
    """Bytes inference needs for a scan of ``shape`` voxels of ``spacing`` mm.

    Returns:
        ``(bytes, model_voxels, input_voxels)``: :data:`BYTES_PER_VOXEL` per channel on the
        model's grid (``target_spacing`` mm; the scan's own grid when None) plus
        :func:`bytes_per_input_voxel` on the scan's own grid.
    """
    input_voxels = float(np.prod(np.asarray(shape, dtype=float)))
    model_voxels = input_voxels
    if target_spacing is not None:
        extent = np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)  # mm
        model_voxels = float(np.prod(np.ceil(extent / np.asarray(target_spacing, dtype=float))))
    need = model_voxels * BYTES_PER_VOXEL * max(in_channels, 1) + input_voxels * bytes_per_input_voxel(num_classes)
    return need, model_voxels, input_voxels


def bytes_per_input_voxel(num_classes: int) -> int:
    """Bytes per voxel of the scan's own grid: the loaded float32 array and its copies (4 + 4
    per channel), and per class the probabilities inverted onto that grid (inverse resampling,
    inverse reorientation) and the labels (16 per class); 64 for 3 classes, measured 53-60
    (docs/robustness.md, "How large is too large")."""
    return 16 * (1 + num_classes)


def check_memory(
    path: str | os.PathLike,
    shape: Sequence[int],
    spacing: Sequence[float],
    in_channels: int,
    target_spacing: Sequence[float] | None,
    num_classes: int = 3,
) -> None:
    """UserError when segmenting a scan of ``shape`` voxels of ``spacing`` mm needs more than
    :func:`memory_budget` (estimate: :func:`memory_need`)."""
    need, model_voxels, input_voxels = memory_need(shape, spacing, in_channels, target_spacing, num_classes)
    budget = memory_budget()
    if need > budget:
        raise UserError(
            f"{path}: needs about {_amount(need / 2**30)} GiB ({_amount(input_voxels / 1e6)} M voxels on its own "
            f"grid, {_amount(model_voxels / 1e6)} M at the model's spacing), over the {_amount(budget / 2**30)} GiB "
            "budget; crop the scan or raise MEDFCN_MAX_MEMORY_GB."
        )


def warn_if_label_map(image: torch.Tensor, path: str | os.PathLike, max_values: int = 8) -> None:
    """Warn (:class:`~medfcn.errors.InputWarning`) when ``image`` holds at most ``max_values``
    distinct whole numbers, as a label map does and no MR or CT scan does.

    A label map passed instead of its scan segments without error into a meaningless mask. The
    values of a subsample of about 10^6 voxels decide (cheap on large scans); the message lists
    those of the whole image.
    """
    flat = torch.as_tensor(image).as_subclass(torch.Tensor).reshape(-1)
    sample = flat[:: max(1, flat.numel() // 1_000_000)]
    if sample.is_floating_point() and not bool((sample == sample.round()).all()):
        return
    if len(torch.unique(sample)) > max_values:
        return
    values = torch.unique(flat)
    if len(values) < 2 or len(values) > max_values:  # a constant image is blank, not a label map
        return
    listed = ", ".join(str(int(v)) for v in values.tolist())
    warnings.warn(
        InputWarning(f"{path}: looks like a label map (values {listed}), not a scan; segmenting it anyway."),
        stacklevel=2,
    )


def check_training_pairs(datalist: Sequence[dict], num_classes: int, in_channels: int | None = None) -> None:
    """Check every image/label pair of a training datalist.

    Shapes, affines and channel counts (axes after the third: MSD stores modalities as
    ``(X, Y, Z, C)``) come from the NIfTI headers; label values and finite image voxels from
    the data; ``.nii.gz`` files must pass their gzip CRC check and be in mm. ``in_channels``:
    the channels the network takes (not checked when None).
    Raises UserError naming the first offending file.
    """
    for item in datalist:
        image_path, label_path = item["image"], item.get("label")
        check_gzip_integrity(image_path)  # nibabel reads a damaged .nii.gz without complaint
        try:
            image = nib.load(image_path)
            voxels = np.asarray(image.dataobj)
        except Exception as err:
            raise UserError(f"{image_path}: cannot be read as NIfTI ({err}); re-export or remove the case.") from err
        refuse_non_mm(image, image_path)
        if not np.all(np.isfinite(voxels)):
            raise UserError(f"{image_path}: has NaN/Inf voxels; fix the image or drop the case from dataset.json.")
        channels = int(np.prod(image.shape[3:], dtype=int))
        if in_channels is not None and channels != in_channels:
            raise UserError(
                f"{image_path}: has {plural(channels, 'channel')} (shape {image.shape}) but the network takes "
                f"{in_channels}; "
                f"pass --set network_def#in_channels={channels} (and the same in configs/common.json)."
            )
        if label_path is None:
            continue
        check_gzip_integrity(label_path)
        try:
            label = nib.load(label_path)
            values = np.unique(np.asarray(label.dataobj)).tolist()
        except Exception as err:
            raise UserError(f"{label_path}: cannot be read as NIfTI ({err}); re-export or remove the case.") from err
        refuse_non_mm(label, label_path)
        check_label_grid(image, label, image_path, label_path)
        unknown = [v for v in values if v != np.round(v) or not 0 <= v < num_classes]
        if unknown:
            raise UserError(
                f"{label_path}: label values {unknown[:5]} outside 0..{num_classes - 1}; "
                "map them to the bundle's labels."
            )


# label and image affines further apart than this (any entry; mm for the offsets) are a different
# grid: float32 headers written by different tools differ by about 1e-5
AFFINE_ATOL = 1e-3


def check_label_grid(
    image: nib.Nifti1Image, label: nib.Nifti1Image, image_path: str | os.PathLike, label_path: str | os.PathLike
) -> None:
    """UserError when ``label`` does not lie on ``image``'s voxel grid: a different shape (the
    first three axes) or an affine different by more than :data:`AFFINE_ATOL`; the message says
    which, and how (voxel size, orientation or origin)."""
    if label.shape[:3] != image.shape[:3]:
        raise UserError(
            f"{label_path}: shape {label.shape} differs from its image's {image.shape} ({image_path}); "
            "resample the label onto the image."
        )
    if not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL):
        raise UserError(
            f"{label_path}: affine differs from its image's ({image_path}: {_affine_difference(image, label)}); "
            "resample the label onto the image."
        )


def _affine_difference(image: nib.Nifti1Image, label: nib.Nifti1Image) -> str:
    """How two affines differ, in words: voxel size, axis directions, or origin (mm)."""
    image_sizes, label_sizes = voxel_spacing(image.affine), voxel_spacing(label.affine)
    if not np.allclose(image_sizes, label_sizes, atol=AFFINE_ATOL):
        sizes = [" x ".join(f"{s:.4g}" for s in v) for v in (label_sizes, image_sizes)]
        return f"voxel size {sizes[0]} mm vs {sizes[1]} mm"
    image_axes, label_axes = "".join(nib.aff2axcodes(image.affine)), "".join(nib.aff2axcodes(label.affine))
    offset = float(np.linalg.norm(label.affine[:3, 3] - image.affine[:3, 3]))
    if image_axes != label_axes or offset <= AFFINE_ATOL:
        return f"orientation {label_axes} vs {image_axes}, axis directions differ"
    return f"origin {offset:.3g} mm apart"
