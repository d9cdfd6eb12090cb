"""The fingerprint of an MSD dataset: what the planner decides from (schema in
:mod:`medfcn.planning`).

Every case is read once, with nibabel, after its gzip check (nibabel never checks the CRC, and
SimpleITK reads a truncated ``.nii.gz`` as zeros), and reoriented to the closest RAS, as the
bundles' ``Orientationd("RAS")`` does, so shapes, spacings and centroids are in R-L, A-P, S-I
order. Intensities are sampled inside the foreground (label > 0): at most
:data:`SAMPLES_PER_CASE` voxels per case, drawn by a seeded generator (the same dataset gives
the same fingerprint), pooled over the cases, as nnU-Net does for its CT normalisation. Only one
case is in memory at a time.

Bad datasets are refused before any work, each in one line (:class:`~medfcn.errors.UserError`
naming the file and the fix): no folder or ``dataset.json``, fewer than 2 cases, a case that
cannot be read, image and label on different grids, label values not in ``dataset.json``,
mixed channel counts, modalities that do not match the channels, an empty foreground.

Example::

    from medfcn.planning.fingerprint import fingerprint_dataset
    fingerprint = fingerprint_dataset("../shared/datasets/LeftAtrium")
    fingerprint["summary"]["median_spacing_mm"]  # [0.625, 0.625, 0.625]
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from medfcn.data.checks import check_label_grid
from medfcn.data.classes import label_classes
from medfcn.data.datasets import case_id, user_datalist
from medfcn.data.nifti import check_gzip_integrity, check_nifti_geometry, refuse_non_mm
from medfcn.data.profile import geometry_ras, volume_quantiles
from medfcn.errors import InputWarning, UserError
from medfcn.outputs import plural

__all__ = ["FINGERPRINT_VERSION", "SAMPLES_PER_CASE", "SEED", "fingerprint_dataset"]

FINGERPRINT_VERSION = 1
SAMPLES_PER_CASE = 10_000  # foreground voxels per case for the intensity statistics (nnU-Net's count)
SEED = 0
PERCENTILES = (0.5, 50.0, 99.5)  # CT: clip to [0.5, 99.5] of the foreground, as nnU-Net does


def fingerprint_dataset(dataset_dir: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> dict:
    """Read every training case of the MSD dataset in ``dataset_dir`` once and describe it.

    Args:
        dataset_dir: the folder holding ``dataset.json`` (``training`` list, ``labels``,
            ``modality``), ``imagesTr`` and ``labelsTr`` (or wherever the list points).
        progress: called as ``progress(cases_done, cases_total)`` after each case.

    Returns:
        The fingerprint, plain JSON (schema: :mod:`medfcn.planning`).

    Raises:
        UserError: a bad dataset (see the module's docstring), before anything is written.
    """
    dataset_dir = Path(dataset_dir)
    meta, datalist = _read_index(dataset_dir)
    index = dataset_dir / "dataset.json"
    labels = _label_names(meta, index)
    modality = _modality_names(meta, index)
    rng = np.random.default_rng(SEED)
    cases, samples = [], []
    for done, item in enumerate(datalist, start=1):
        case, sample = _read_case(item, labels, rng)
        if cases:
            _refuse_mixed_channels(cases[0], datalist[0]["image"], case, item["image"])
        else:  # at the first case, not after reading them all
            _refuse_modality_mismatch(index, modality, case, item["image"])
        cases.append(case)
        samples.append(sample)
        if progress is not None:
            progress(done, len(datalist))
    pooled = np.concatenate(samples, axis=0)  # (voxels, channels)
    if len(pooled) == 0:
        raise UserError(
            f"{index}: every label file is empty (all 0), so there is nothing to segment; check the labels."
        )
    name = meta.get("name") if isinstance(meta.get("name"), str) else dataset_dir.name
    return {
        "medfcn_fingerprint": FINGERPRINT_VERSION,
        "dataset": {
            "name": name,
            "dir": os.path.abspath(dataset_dir),
            "modality": modality,
            "labels": {str(value): text for value, text in labels.items()},
            "num_cases": len(cases),
        },
        "cases": cases,
        "intensity": _intensity_stats(pooled, modality),
        "labels": _label_stats(cases, labels, index),
        "summary": _summary(cases),
    }


def _read_index(dataset_dir: Path) -> tuple[dict, list[dict]]:
    """``dataset.json`` parsed, and its training cases sorted by case id (at least 2)."""
    datalist = user_datalist(dataset_dir)
    index = dataset_dir / "dataset.json"
    meta = json.loads(index.read_text())  # valid JSON: load_msd_datalist read it
    if len(datalist) < 2:
        raise UserError(
            f"{index}: lists {plural(len(datalist), 'labelled case')}; a plan needs at least 2 labelled cases "
            "(one to train on, one to validate); add cases."
        )
    return meta, sorted(datalist, key=lambda item: case_id(item["image"]))


def _label_names(meta: dict, index: Path) -> dict[int, str]:
    """dataset.json's ``labels`` as ``{value: name}`` (MSD: ``{"0": "background", "1": ...}``)."""
    labels = meta.get("labels")
    example = '"labels": {"0": "background", "1": "tumour"}'
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{index}: has no 'labels' mapping; add one as MSD writes it, e.g. {example}.")
    try:
        names = {int(value): str(text) for value, text in labels.items()}
    except ValueError:
        raise UserError(
            f"{index}: 'labels' keys {list(labels)[:4]} are not label values; key each name by its value, e.g. "
            f"{example}."
        ) from None
    if min(names) < 0 or not any(value > 0 for value in names):
        raise UserError(f"{index}: 'labels' has no foreground label (a value above 0); add them, e.g. {example}.")
    # what `medfcn train` takes: 0..N, 0 the background, distinct names (refused here, before any case is read)
    label_classes(index, labels, "as medfcn trains on labels 0..N with 0 the background")
    return dict(sorted(names.items()))


def _modality_names(meta: dict, index: Path) -> dict[str, str]:
    """dataset.json's ``modality`` (``{"0": "CT"}``; one entry per channel, keys 0, 1, ...)."""
    modality = meta.get("modality")
    example = '"modality": {"0": "MRI"} (or "CT"; one entry per image channel)'
    if not isinstance(modality, dict) or not modality:
        raise UserError(f"{index}: has no 'modality' mapping; add one, e.g. {example}.")
    if set(modality) != {str(k) for k in range(len(modality))}:
        raise UserError(f"{index}: 'modality' keys {sorted(modality)} are not 0, 1, ...; write it as {example}.")
    return {key: str(modality[key]) for key in sorted(modality, key=int)}


def _load_nifti(path: str) -> nib.Nifti1Image:
    """``path`` checked (gzip CRC and length, header, data size, units in mm) and loaded lazily."""
    data_bytes = check_gzip_integrity(path)
    image = check_nifti_geometry(path, data_bytes)
    if not isinstance(image, nib.Nifti1Image):  # also Nifti2Image; nibabel reads MGH, Analyze, ... too
        raise UserError(f"{path}: is a {type(image).__name__}, not NIfTI; convert the case to .nii.gz.")
    refuse_non_mm(image, path)
    if len(image.shape) < 3:
        raise UserError(
            f"{path}: has shape {image.shape}; save the case as a volume (x, y, z), one slice is (x, y, 1)."
        )
    return image


def _ras_voxels(image: nib.Nifti1Image, path: str) -> np.ndarray:
    """The voxels of ``image``, read once and reoriented to the closest RAS (the first three
    axes; ``nib.as_closest_canonical``); UserError when they cannot be read."""
    try:
        return np.asanyarray(nib.as_closest_canonical(image).dataobj)
    except Exception as err:
        raise UserError(f"{path}: cannot be read as NIfTI ({err}); re-export or remove the case.") from err


def _read_case(item: dict, labels: dict[int, str], rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """One case's entry of ``cases``, and its foreground intensities ``(n, channels)``, ``n`` at
    most :data:`SAMPLES_PER_CASE`, as float64."""
    image_path, label_path = item["image"], item["label"]
    image_file, label_file = _load_nifti(image_path), _load_nifti(label_path)
    check_label_grid(image_file, label_file, image_path, label_path)
    channels = int(np.prod(image_file.shape[3:], dtype=int))
    label_map = _label_map(_ras_voxels(label_file, label_path), label_path, labels)
    voxels = _ras_voxels(image_file, image_path).reshape(*label_map.shape, channels)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise UserError(f"{image_path}: has NaN/Inf voxels; fix the image or drop the case from dataset.json.")
    foreground = np.flatnonzero(label_map)  # C-order indices into the (x, y, z) grid
    chosen = foreground
    if len(foreground) > SAMPLES_PER_CASE:
        chosen = np.sort(rng.choice(foreground, SAMPLES_PER_CASE, replace=False))
    sample = voxels[np.unravel_index(chosen, label_map.shape)].astype(np.float64)
    _, spacing = geometry_ras(image_file.affine, image_file.shape)
    # |det| (right for oblique grids too), rounded to 1e-9 mm^3: 1 x 1 x 3 mm voxels hold 3, not 3.0000000000000004
    voxel_mm3 = round(float(abs(np.linalg.det(image_file.affine[:3, :3]))), 9)
    counts, centroids = _label_counts_and_centroids(label_map, foreground, labels)
    case = {
        "case": case_id(image_path),
        "shape": [int(n) for n in label_map.shape],
        "spacing_mm": [float(s) for s in spacing],
        "orientation": "".join(nib.aff2axcodes(image_file.affine)),
        "channels": channels,
        "voxel_volume_mm3": voxel_mm3,
        "label_voxels": {str(v): int(counts[v]) for v in labels if v > 0},
        "label_volume_mm3": {str(v): float(counts[v] * voxel_mm3) for v in labels if v > 0},
        "label_centroids_vox": centroids,
    }
    return case, sample


def _label_map(voxels: np.ndarray, path: str, labels: dict[int, str]) -> np.ndarray:
    """``voxels`` as an ``(x, y, z)`` integer array whose values are all in ``labels``.

    Raises:
        UserError: more than one channel, values that are no whole numbers, or values that
            dataset.json's ``labels`` does not list (naming them).
    """
    if voxels.ndim > 3 and int(np.prod(voxels.shape[3:])) != 1:
        raise UserError(f"{path}: has shape {voxels.shape}, a label map has one channel; save it as (x, y, z).")
    voxels = _whole_numbers(voxels.reshape(voxels.shape[:3]), path)
    low, high = int(voxels.min()), int(voxels.max())
    in_range = 0 <= low and high <= max(labels)
    if in_range and len(labels) == max(labels) + 1:  # dataset.json lists every value 0..max: all known
        return np.ascontiguousarray(voxels)
    # the values present: a bincount is 10x faster than np.unique where they are few and >= 0
    found = np.flatnonzero(np.bincount(voxels.ravel())) if in_range else np.unique(voxels)
    unknown = sorted(set(found.tolist()) - set(labels))
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise UserError(
            f"{path}: label values {shown} are not in dataset.json's labels ({', '.join(map(str, labels))}); "
            "add them to 'labels' or fix the label file."
        )
    return np.ascontiguousarray(voxels)  # C order: the flat indices below are views, not copies


def _whole_numbers(voxels: np.ndarray, path: str) -> np.ndarray:
    """``voxels`` as integers: integer files keep their (small) type; floats must hold whole,
    finite numbers (UserError naming a few others), booleans become 0 and 1."""
    if voxels.dtype.kind == "f":
        bad = voxels[~np.isfinite(voxels) | (voxels != np.round(voxels))]
        if bad.size:
            shown = ", ".join(f"{v:g}" for v in np.unique(bad)[:3])
            raise UserError(
                f"{path}: label values {shown} are not whole numbers (an interpolated or probability map?); "
                "save the label as integers."
            )
        return voxels.astype(np.int64)
    if voxels.dtype.kind == "b" or voxels.dtype == np.uint64:  # np.bincount takes neither
        return voxels.astype(np.int64)
    return voxels


def _label_counts_and_centroids(
    label_map: np.ndarray, foreground: np.ndarray, labels: dict[int, str]
) -> tuple[np.ndarray, dict[str, list[float] | None]]:
    """Voxel count per label value (index: the value) and each foreground label's centroid in
    RAS voxel indices (None where the label is absent), from the foreground's flat indices."""
    values = label_map.ravel()[foreground]
    counts = np.bincount(values, minlength=max(labels) + 1)
    counts[0] = label_map.size - len(foreground)
    coords = np.unravel_index(foreground, label_map.shape)
    sums = [np.bincount(values, weights=axis, minlength=max(labels) + 1) for axis in coords]
    centroids = {}
    for value in (v for v in labels if v > 0):
        present = counts[value] > 0
        centroids[str(value)] = [round(float(s[value] / counts[value]), 2) for s in sums] if present else None
    return counts, centroids


def _refuse_mixed_channels(first: dict, first_image: str, case: dict, image: str) -> None:
    """UserError when ``case`` (read from ``image``) has another channel count than the first."""
    if case["channels"] != first["channels"]:
        raise UserError(
            f"{image}: has {plural(case['channels'], 'channel')}, but {first_image} has {first['channels']}; "
            "every case needs the same modalities (the 4th image axis): fix or remove the odd case."
        )


def _refuse_modality_mismatch(index: Path, modality: dict[str, str], case: dict, image_path: str) -> None:
    """UserError when dataset.json's ``modality`` lists another number of entries than the images
    have channels."""
    if len(modality) != case["channels"]:
        listed = f"{len(modality)} {'modality' if len(modality) == 1 else 'modalities'}"
        raise UserError(
            f"{index}: 'modality' lists {listed} ({', '.join(modality.values())}), but the images "
            f"have {plural(case['channels'], 'channel')} (e.g. {image_path}); list one modality per channel."
        )


def _intensity_stats(pooled: np.ndarray, modality: dict[str, str]) -> dict[str, dict]:
    """Per channel statistics of the pooled foreground sample ``pooled`` ``(voxels, channels)``."""
    stats = {}
    for channel, name in modality.items():
        values = pooled[:, int(channel)]
        low, median, high = np.percentile(values, PERCENTILES)
        stats[channel] = {
            "name": name,
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "percentile_00_5": float(low),
            "percentile_50_0": float(median),
            "percentile_99_5": float(high),
            "foreground_voxels_sampled": int(len(values)),
        }
    return stats


def _spread(values: list[float], quantiles: bool = False) -> dict:
    """``{"min", "median", "max"}`` of ``values`` (None each when there are none), and with
    ``quantiles`` their percentiles (:func:`medfcn.data.profile.volume_quantiles`)."""
    spread = {"min": None, "median": None, "max": None}
    if values:
        spread = {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}
    return {**spread, "quantiles": volume_quantiles(values)} if quantiles else spread


def _label_stats(cases: list[dict], labels: dict[int, str], index: Path) -> dict[str, dict]:
    """Per foreground label: cases where present, and voxel counts and volumes (mm^3) over them.
    Warns (:class:`~medfcn.errors.InputWarning`) for a label that no case holds."""
    stats = {}
    for value in (v for v in labels if v > 0):
        key = str(value)
        present = [case for case in cases if case["label_voxels"][key] > 0]
        if not present:
            warnings.warn(
                InputWarning(f"{index}: label {key} ({labels[value]!r}) is in no case; the model cannot learn it."),
                stacklevel=3,
            )
        stats[key] = {
            "name": labels[value],
            "cases_present": len(present),
            "voxels": _spread([case["label_voxels"][key] for case in present]),
            "volume_mm3": _spread([case["label_volume_mm3"][key] for case in present], quantiles=True),
        }
    return stats


def _summary(cases: list[dict]) -> dict:
    """Median, smallest and largest shape and spacing per RAS axis over ``cases``; channels."""
    shapes = np.array([case["shape"] for case in cases], dtype=float)
    spacings = np.array([case["spacing_mm"] for case in cases], dtype=float)
    return {
        "median_shape": np.median(shapes, axis=0).tolist(),
        "min_shape": shapes.min(axis=0).astype(int).tolist(),
        "max_shape": shapes.max(axis=0).astype(int).tolist(),
        "median_spacing_mm": np.median(spacings, axis=0).tolist(),
        "min_spacing_mm": spacings.min(axis=0).tolist(),
        "max_spacing_mm": spacings.max(axis=0).tolist(),
        "channels": int(cases[0]["channels"]),
    }
