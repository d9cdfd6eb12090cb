"""What a bundle's training data looked like, and whether a scan or its mask is unlike it.

A network trained on hippocampus crops still returns a mask for a whole head, with volumes
tens of times too large. To say so, a bundle records in ``configs/metadata.json`` (key
``medfcn_training_data``) the range of its training cases' field of view and voxel size (mm,
per axis after reorientation to RAS) and of each label's volume (mm^3). ``medfcn infer``
compares every scan and its mask with it (:func:`unlike_training`).

Example::

    from medfcn.data.profile import training_profile
    profile = training_profile(train_cases, ["anterior", "posterior"])
    profile["field_of_view_mm"]["max"]  # [R-L, A-P, S-I] in mm
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medfcn.data.nifti import voxel_spacing
from medfcn.errors import InputWarning, UserError
from medfcn.io import atomic_write_text

__all__ = [
    "PROFILE_KEY",
    "MARGIN",
    "geometry_ras",
    "training_profile",
    "bundle_profile",
    "unlike_training",
    "volume_quantiles",
    "warn_if_unlike_training",
    "write_run_profile",
    "RUN_PROFILE",
]

PROFILE_KEY = "medfcn_training_data"

# A scan is "unlike the training data" when a fact lies outside [min / MARGIN, max * MARGIN] of
# the training cases. 1.5 leaves room for what a model generalises to without complaint: crops a
# few voxels larger or smaller, 0.7 mm or 1.4 mm voxels (all resampled to the model's grid), and
# structure volumes beyond the training range by 50 %, more than atrophy or growth in adults
# (hippocampus: about 20-30 % between healthy and Alzheimer's). A model run on a scan it was not
# trained for is off by factors: the whole head given to the hippocampus bundle has 4-5 times its
# in-plane field of view and gave 18-40 times its largest training volumes.
MARGIN = 1.5
_AXES = "R-L x A-P x S-I"


def geometry_ras(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Field of view and voxel size (both mm, 3 values each) along R-L, A-P, S-I.

    Args:
        affine: 4x4 voxel-to-world (RAS) matrix in mm.
        shape: the voxel grid's first three sizes.

    Each voxel axis is assigned to the world axis it is closest to, as reorientation to RAS
    (``nibabel.as_closest_canonical``, MONAI's ``Orientation``) assigns it.
    """
    affine = np.asarray(affine, dtype=float)
    spacing = voxel_spacing(affine)
    order = nib.orientations.io_orientation(affine)[:, 0].astype(int)  # world axis of each voxel axis
    fov, voxel = np.zeros(3), np.zeros(3)
    fov[order] = np.asarray(shape[:3], dtype=float) * spacing
    voxel[order] = spacing
    return fov, voxel


# The percentiles of each label's training volumes a profile records (medfcn report flags a
# volume outside 1-99 %).
QUANTILES = (1, 5, 25, 50, 75, 95, 99)


def volume_quantiles(values: Sequence[float]) -> dict[str, float] | None:
    """``{"1": ..., "5": ..., ..., "99": ...}``: the :data:`QUANTILES` percentiles of ``values``
    (mm^3, linear interpolation, rounded to 0.01); None for no values."""
    if len(values) == 0:
        return None
    return {str(q): round(float(v), 2) for q, v in zip(QUANTILES, np.percentile(values, QUANTILES), strict=True)}


def _range(values: np.ndarray) -> dict:
    """``{"min": ..., "max": ...}`` over the first axis, rounded to 0.01 (mm or mm^3)."""
    return {"min": np.round(values.min(axis=0), 2).tolist(), "max": np.round(values.max(axis=0), 2).tolist()}


def training_profile(cases: Sequence[dict], class_names: Sequence[str], source: str = "") -> dict:
    """Ranges of field of view, voxel size and label volumes over ``cases``.

    Args:
        cases: ``[{"image": path, "label": path}, ...]`` NIfTI files (an MSD datalist); a case
            without a label counts for the geometry only.
        class_names: foreground label names; label ``k`` is ``class_names[k - 1]``.
        source: a sentence saying which cases these are (stored with the numbers).

    Returns:
        The profile stored as ``metadata.json``'s ``medfcn_training_data``: ``cases``,
        ``source``, ``computed_by``, ``axes``, ``field_of_view_mm`` and ``voxel_size_mm``
        (``min``/``max``, 3 values each, mm, RAS), ``volume_mm3`` (per class name:
        ``min``/``max`` mm^3 over the labelled cases, and their ``quantiles``,
        :func:`volume_quantiles`).
    """
    fovs, voxels, volumes = [], [], []
    for case in cases:
        image = nib.load(str(case["image"]))  # header only: the geometry needs no voxels
        fov, voxel = geometry_ras(image.affine, image.shape)
        fovs.append(fov)
        voxels.append(voxel)
        if case.get("label"):
            label = nib.load(str(case["label"]))
            counts = np.bincount(np.asarray(label.dataobj).astype(np.int64).ravel(), minlength=len(class_names) + 1)
            voxel_mm3 = abs(np.linalg.det(label.affine[:3, :3]))
            volumes.append(counts[1 : len(class_names) + 1] * voxel_mm3)
    if not fovs:
        raise ValueError("no cases to profile")
    profile = {
        "cases": len(fovs),
        "source": source,
        "computed_by": "medfcn.data.profile.training_profile: NIfTI headers reoriented to RAS (nibabel), "
        "label voxel counts times the voxel volume",
        "axes": _AXES,
        "field_of_view_mm": _range(np.array(fovs)),
        "voxel_size_mm": _range(np.array(voxels)),
    }
    if volumes:
        ranges = _range(np.array(volumes))
        profile["volume_mm3"] = {
            name: {
                "min": ranges["min"][k],
                "max": ranges["max"][k],
                "quantiles": volume_quantiles(np.array(volumes)[:, k]),
            }
            for k, name in enumerate(class_names)
        }
    return profile


RUN_PROFILE = "training_data.json"  # a run's profile, beside its medfcn_run.json


def write_run_profile(
    run_dir: str | os.PathLike, cases: Sequence[dict], class_names: Sequence[str], source: str, replace: bool = True
) -> None:
    """Store the profile of a run's training ``cases`` in ``run_dir/training_data.json``, for
    ``medfcn package`` to put in the bundle. ``replace=False`` (a resume, which trains on the
    same cases) keeps a profile already there instead of reading the data again."""
    target = Path(run_dir) / RUN_PROFILE
    if replace or not target.is_file():
        text = json.dumps(training_profile(cases, class_names, source=source), indent=1)
        atomic_write_text(text + "\n", target)


def bundle_profile(meta_file: str | os.PathLike) -> dict | None:
    """The training-data profile in a bundle's ``metadata.json``; None when the file or the key
    is absent (a bundle from before profiles: nothing to compare with).

    Raises:
        UserError: the file is not JSON, or the profile lacks its ranges.
    """
    meta_file = Path(meta_file)
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_file}: not valid JSON ({err}); fix the file.") from err
    profile = meta.get(PROFILE_KEY) if isinstance(meta, dict) else None
    if profile is None:
        return None
    try:  # everything unlike_training and its warning read
        int(profile["cases"])
        for key in ("field_of_view_mm", "voxel_size_mm"):
            np.asarray([profile[key]["min"], profile[key]["max"]], dtype=float).reshape(2, 3)
        volumes = profile.get("volume_mm3", {})
        if not isinstance(volumes, dict):
            raise TypeError(f"volume_mm3 is a {type(volumes).__name__}, not a mapping of class names")
        for limits in volumes.values():
            float(limits["min"]), float(limits["max"])
            [float(v) for v in (limits.get("quantiles") or {}).values()]
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise UserError(
            f"{meta_file}: {PROFILE_KEY} is malformed ({type(err).__name__}: {err}); "
            "remove the entry or write it again with python -m medfcn.data.profile."
        ) from err
    return profile


def _outside(value: float, low: float, high: float) -> bool:
    return value < low / MARGIN or value > high * MARGIN


def _per_axis(name: str, values: np.ndarray, limits: dict, unit: str) -> str | None:
    """``"field of view 193 x 220 x 143 mm (training 31-43 x ...)"`` if any axis is outside."""
    low, high = np.asarray(limits["min"], dtype=float), np.asarray(limits["max"], dtype=float)
    if not any(_outside(v, lo, hi) for v, lo, hi in zip(values, low, high, strict=True)):
        return None
    given = " x ".join(f"{v:.3g}" for v in values)
    seen = " x ".join(f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(low, high, strict=True))
    return f"{name} {given} {unit} ({_AXES}; training {seen})"


def unlike_training(
    profile: dict | None, affine: np.ndarray, shape: Sequence[int], volumes_mm3: dict[str, float]
) -> dict[str, str]:
    """What about a scan and its mask lies outside the training data, beyond :data:`MARGIN`.

    Args:
        profile: the bundle's profile (:func:`bundle_profile`); None: nothing to compare.
        affine, shape: the scan's RAS affine (mm) and voxel grid.
        volumes_mm3: the mask's volume per class name (mm^3).

    Returns:
        ``{what: phrase}``, e.g. ``{"anterior volume": "anterior 105729 mm3 (training 1119-2593)"}``;
        empty when the scan and its mask are like the training data.
    """
    if not profile:
        return {}
    fov, voxel = geometry_ras(affine, shape)
    found = {
        "field of view": _per_axis("field of view", fov, profile["field_of_view_mm"], "mm"),
        "voxel size": _per_axis("voxel size", voxel, profile["voxel_size_mm"], "mm"),
    }
    for name, limits in profile.get("volume_mm3", {}).items():
        low, high = float(limits["min"]), float(limits["max"])
        if name in volumes_mm3 and _outside(volumes_mm3[name], low, high):
            found[f"{name} volume"] = f"{name} {volumes_mm3[name]:.0f} mm3 (training {low:.0f}-{high:.0f})"
    return {what: phrase for what, phrase in found.items() if phrase}


def warn_if_unlike_training(
    profile: dict | None,
    scan: str | os.PathLike,
    affine: np.ndarray,
    shape: Sequence[int],
    volumes_mm3: dict[str, float],
) -> dict[str, str]:
    """:func:`unlike_training`, and an :class:`InputWarning` naming ``scan`` when anything is."""
    unlike = unlike_training(profile, affine, shape, volumes_mm3)
    if not unlike:
        return unlike
    if "field of view" in unlike or "voxel size" in unlike:
        fix = "give a scan like the training scans, e.g. cropped around the structure, at a similar voxel size"
    else:
        fix = "check the mask before using its volumes (does the scan show what the bundle segments?)"
    warnings.warn(
        InputWarning(
            f"{scan}: unlike the bundle's training data ({profile['cases']} cases, margin x{MARGIN}): "
            f"{'; '.join(unlike.values())}; its mask and volumes may be wrong: {fix}."
        ),
        stacklevel=2,
    )
    return unlike


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m medfcn.data.profile BUNDLE DATASET FOLDS --fold 0 [--write]``: the profile of
    the fold's training cases, printed, or written into the bundle's metadata.json."""
    from medfcn.data.datasets import fold_datalists

    parser = argparse.ArgumentParser(prog="python -m medfcn.data.profile", description=_main.__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("dataset", type=Path, help="MSD dataset folder (dataset.json)")
    parser.add_argument("folds", type=Path, help="fold split JSON")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="store it in BUNDLE/configs/metadata.json")
    args = parser.parse_args(argv)
    train_cases, _ = fold_datalists(args.dataset, args.folds, args.fold)
    meta_file = args.bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    # inference.json merged onto common.json, where the bundle states its classes
    configs = [args.bundle / "configs" / name for name in ("common.json", "inference.json")]
    merged = {k: v for path in configs if path.is_file() for k, v in json.loads(path.read_text()).items()}
    classes = merged["class_names"]
    source = f"training cases of fold {args.fold} of {args.folds} (all folds but {args.fold}), {args.dataset.name}"
    profile = training_profile(train_cases, classes, source=source)
    if not args.write:
        print(json.dumps(profile, indent=4))
        return
    meta[PROFILE_KEY] = profile
    meta_file.write_text(json.dumps(meta, indent=4) + "\n")


if __name__ == "__main__":
    _main()
