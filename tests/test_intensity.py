"""The intensity normalisations a bundle's ``modality``, ``hu_window`` and ``intensity_stats``
select (medfcn.data.intensity_normalization), on values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfcn.data import intensity_normalization

HU = torch.tensor([[-1000.0, -100.0, 0.0, 100.0, 3000.0]])  # (channel, voxels), HU


def _apply(transform, image: torch.Tensor) -> np.ndarray:
    return np.asarray(transform({"image": image.clone()})["image"], dtype=np.float64)


def test_ct_with_foreground_statistics_clips_then_z_scores():
    # clip to [-150, 250]: -150, -100, 0, 100, 250; then (x - 40) / 60
    out = _apply(intensity_normalization("image", "CT", [-150, 250], [40.0, 60.0]), HU)
    np.testing.assert_allclose(out, [[-190 / 60, -140 / 60, -40 / 60, 60 / 60, 210 / 60]], rtol=1e-6)


@pytest.mark.parametrize(
    ("modality", "window", "stats"), [("MRI", None, None), ("CT", [-150, 250], None), ("CT", [-150, 250], [40.0, 60.0])]
)
def test_every_normalisation_is_one_deterministic_transform_a_cache_keeps(modality, window, stats):
    from monai.data import CacheDataset
    from monai.transforms import Compose, RandomizableTrait

    transform = intensity_normalization("image", modality, window, stats)
    assert not isinstance(transform, (Compose, RandomizableTrait))  # a Compose would end the cached part
    cached = CacheDataset([{"image": HU.clone()}], Compose([transform]), progress=False)
    assert np.array_equal(np.asarray(cached._cache[0]["image"]), _apply(transform, HU).astype(np.float32))


def test_ct_without_statistics_scales_the_window_to_0_1():
    out = _apply(intensity_normalization("image", "CT", [-160, 240]), HU)
    np.testing.assert_allclose(out, [[0.0, 60 / 400, 160 / 400, 260 / 400, 1.0]], rtol=1e-6)


def test_mri_is_z_scored_per_volume_whatever_the_window():
    image = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = _apply(intensity_normalization("image", "MRI", [-160, 240], [40.0, 60.0]), image)
    np.testing.assert_allclose(out.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.std(), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("modality", "window", "stats", "message"),
    [
        ("PET", [-100, 100], None, "unknown modality"),
        ("CT", [-100, 100], [0, 0], "> 0"),
        ("CT", None, None, "modality CT needs hu_window"),  # a planned MRI bundle's null, --set modality=CT
    ],
)
def test_bad_values_are_refused(modality, window, stats, message):
    with pytest.raises(ValueError, match=message):
        intensity_normalization("image", modality, window, stats)


def test_mri_needs_no_window():
    image = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(_apply(intensity_normalization("image", "MRI", None), image).mean(), 0.0, atol=1e-6)
