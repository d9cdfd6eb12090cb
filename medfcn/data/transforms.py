"""Preprocessing choices that depend on the data, as MONAI dictionary transforms.

The pipelines themselves are written out in each bundle's config; this module supplies the
pieces a config cannot express as a single MONAI transform.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged

from medfcn.data.nifti import is_nifti, use_file_affine

__all__ = ["FileAffined", "intensity_normalization"]


class FileAffined(MapTransform):
    """Give each image just loaded from a NIfTI file (a MetaTensor from ``LoadImaged``) nibabel's
    affine of its file in mm (:func:`medfcn.data.nifti.use_file_affine`): MONAI's loader keeps
    metres or microns as they are and replaces a sheared sform by the qform, which would resample
    the scan onto another grid than the one its mask carries. Images from other files pass
    unchanged. ``medfcn infer`` applies the same function, so both inference paths resample
    alike."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key].meta.get("filename_or_obj")
            if path and is_nifti(str(path)):
                use_file_affine(d[key], nib.load(str(path)))
        return d


def intensity_normalization(
    keys: str | Sequence[str],
    modality: str = "MRI",
    hu_window: Sequence[float] | None = (-160.0, 240.0),
    intensity_stats: Sequence[float] | None = None,
) -> MapTransform:
    """The intensity normalisation suited to ``modality``, one deterministic transform (which a
    cache of the preprocessing keeps).

    - ``MRI`` (arbitrary units): z-score per channel over the whole volume, since MR
      intensities have no absolute scale.
    - ``CT`` (Hounsfield units): clip to ``hu_window`` (HU), since HU are absolute and air/bone
      extremes only add noise; then, with ``intensity_stats = (mean, std)`` (HU, of the
      training foreground, as ``medfcn plan`` measures them), ``(x - mean) / std``, as nnU-Net
      normalises CT; without, scale the window to [0, 1] (the shipped bundles' choice).

    Args:
        keys: the image key(s).
        modality: ``"MRI"`` or ``"CT"`` (case-insensitive; ``"MR"`` is accepted).
        hu_window: ``(low, high)`` in HU, CT only (default a soft-tissue window); None for MRI.
        intensity_stats: ``(mean, std)`` in HU, ``std > 0``, CT only; None: scale to [0, 1].
    """
    kind = modality.upper()
    if kind in ("MRI", "MR"):
        return NormalizeIntensityd(keys=keys, nonzero=False, channel_wise=True)
    if kind != "CT":
        raise ValueError(f"unknown modality {modality!r}; use 'MRI' or 'CT'.")
    if hu_window is None:
        raise ValueError("modality CT needs hu_window [low, high] in HU, e.g. --set 'hu_window=[-160, 240]'.")
    low, high = (float(v) for v in hu_window)
    if intensity_stats is None:
        return ScaleIntensityRanged(keys=keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    mean, std = (float(v) for v in intensity_stats)
    if not std > 0:
        raise ValueError(f"intensity_stats {list(intensity_stats)}: the standard deviation must be > 0.")
    # clipped to the window, then z-scored with the foreground statistics: one linear map of the
    # window, (x - mean) / std at both ends, so that the normalisation stays a single transform
    # (a Compose counts as random: a cache of the preprocessing would stop before it)
    b_min, b_max = (low - mean) / std, (high - mean) / std
    return ScaleIntensityRanged(keys=keys, a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=True)
