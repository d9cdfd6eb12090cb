"""Preprocessing choices that depend on the data, as MONAI dictionary transforms.

The pipelines themselves are written out in each bundle's config; this module supplies the
pieces a config cannot express as a single MONAI transform.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged

__all__ = ["intensity_normalization"]


def intensity_normalization(
    keys: str | Sequence[str], modality: str = "MRI", hu_window: Sequence[float] = (-160.0, 240.0)
) -> MapTransform:
    """The intensity normalisation suited to ``modality``.

    - ``MRI`` (arbitrary units): z-score per channel over the whole volume, since MR
      intensities have no absolute scale.
    - ``CT`` (Hounsfield units): clip to ``hu_window`` (HU, default a soft-tissue window)
      and scale to [0, 1], since HU are absolute and air/bone extremes only add noise.

    Args:
        keys: the image key(s).
        modality: ``"MRI"`` or ``"CT"`` (case-insensitive; ``"MR"`` is accepted).
        hu_window: ``(low, high)`` in HU, CT only.
    """
    kind = modality.upper()
    if kind in ("MRI", "MR"):
        return NormalizeIntensityd(keys=keys, nonzero=False, channel_wise=True)
    if kind == "CT":
        low, high = hu_window
        return ScaleIntensityRanged(keys=keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    raise ValueError(f"unknown modality {modality!r}; use 'MRI' or 'CT'.")
