"""Dice and HD95 of predicted masks against reference labels, matched by file name.

Metrics come from ``monai.metrics`` (``DiceMetric``, ``HausdorffDistanceMetric`` with the
95th percentile, computed in mm using the label's voxel spacing). Results: one row per case and
a summary (mean, std, median) per metric, written as CSV and JSON to a folder named for it
(never, unasked, into the mask folder). Labels keep their values in the tables (``dice_1``);
:func:`label_names` says what they are (a bundle's ``class_names``) for ``metrics.json`` and
the CLI's table.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from medfcn.data.datasets import case_id
from medfcn.data.nifti import check_gzip_integrity, scan_affine_mm, voxel_spacing
from medfcn.errors import UserError
from medfcn.io import atomic_write_text, csv_text, nifti_files, refuse_existing, writable_dir
from medfcn.masks import without_maps
from medfcn.outputs import output_lock

__all__ = ["evaluate_folders", "case_metrics", "label_names", "summarise"]


def _load_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The label map ``(X, Y, Z)`` in ``path`` (int64) and its affine in mm (metres, microns
    scaled), after the gzip CRC check of a ``.nii.gz``."""
    check_gzip_integrity(path)  # nibabel reads a damaged .nii.gz without complaint
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception as err:
        raise UserError(f"{path}: cannot be read as NIfTI ({err}); re-export the file.") from err
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3D label map, got shape {data.shape}.")
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
        raise UserError(f"{path}: label values must be whole numbers.")
    if data.size and data.min() < 0:
        negative = np.unique(data[data < 0])[:5].astype(np.int64).tolist()
        raise UserError(
            f"{path}: holds negative label values {negative}; labels are 0 (background) and positive whole "
            "numbers: map the negative values (e.g. to 0) and save the file again."
        )
    return data.astype(np.int64), scan_affine_mm(image, path)


def _dice(p: torch.Tensor, y: torch.Tensor) -> float:
    """Dice of one label's masks ``(1, 1, X, Y, Z)``; 0 when only one holds the label."""
    # ignore_empty=False: an empty reference gives 1 if the prediction is empty too, else 0
    return float(DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, y)[0, 0])


def _hd95(p: torch.Tensor, y: torch.Tensor, spacing: tuple[float, ...]) -> float:
    """95th-percentile Hausdorff distance (mm) of one label's masks ``(1, 1, X, Y, Z)``."""
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        # an empty mask is reported as a NaN HD95 by the caller and counted by evaluate_folders
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf", category=UserWarning)
        metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        return float(metric(p, y, spacing=spacing)[0, 0])


def case_metrics(pred: np.ndarray, label: np.ndarray, spacing: tuple[float, ...], labels: list[int]) -> dict:
    """Dice and HD95 (mm) per foreground label for one case.

    Args:
        pred, label: integer label maps ``(X, Y, Z)`` of the same shape.
        spacing: voxel size in mm along X, Y, Z.
        labels: foreground label values to score.

    Dice follows nnU-Net's convention: a label absent from both masks gets NaN (not scored,
    left out of means); a label in only one of them, a missed structure or a false positive,
    gets 0. HD95 is NaN when either mask lacks the label (no surface to measure from).
    """
    row = {}
    for k in labels:  # one label at a time: memory of two masks of the grid, whatever the label values
        p, y = (torch.as_tensor(m == k, dtype=torch.float32)[None, None] for m in (pred, label))
        in_pred, in_label = bool(p.any()), bool(y.any())
        row[f"dice_{k}"] = _dice(p, y) if in_pred or in_label else float("nan")
        row[f"hd95_{k}"] = _hd95(p, y, spacing) if in_pred and in_label else float("nan")
    return row


def summarise(rows: list[dict]) -> dict:
    """Mean, std, median over cases of every numeric column, ignoring NaN."""
    keys = [k for k in rows[0] if k != "case"]
    summary = {}
    for k in keys:
        values = np.array([r[k] for r in rows], dtype=float)
        values = values[~np.isnan(values)]
        summary[k] = {
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std()) if values.size else math.nan,
            "median": float(np.median(values)) if values.size else math.nan,
            "n": int(values.size),
        }
    return summary


def label_names(bundle: str | os.PathLike | None = None, class_names: str | None = None) -> dict[int, str]:
    """Names of labels 1, 2, ...: ``bundle``'s ``class_names`` (as its inference configs state
    them), or ``class_names`` given as text, ``"anterior,posterior"``; ``{}`` when neither.

    Raises:
        UserError: both given, the bundle is incomplete or names no classes, or a name is empty.
    """
    if bundle is not None and class_names is not None:
        raise UserError("--bundle and --class-names both name the labels; give one of them.")
    if bundle is not None:
        from medfcn.bundle import bundle_files, read_config

        config = read_config(bundle_files(bundle, "inference.json")["config_files"])
        if "class_names" not in config:
            raise UserError(f"{bundle}: its configs name no class_names; use --class-names instead.")
        names = [str(n) for n in config.get_parsed_content("class_names")]
    elif class_names is not None:
        names = [n.strip() for n in class_names.split(",")]
        if not all(names):
            raise UserError(f"--class-names {class_names!r}: an empty name; e.g. --class-names anterior,posterior.")
    else:
        names = []
    return {k: name for k, name in enumerate(names, start=1)}


def _pairs(pred_dir: Path, label_dir: Path, labels: list[int] | None) -> list[tuple[Path, Path]]:
    """``(mask, reference label)`` for every mask in ``pred_dir``, matched by case name (the
    uncertainty and probability maps ``medfcn infer`` writes beside a mask left out).

    Raises:
        UserError: a negative label value asked for, a folder missing, no masks, or a mask
            without a reference label.
    """
    negative = [k for k in labels or () if k < 0]
    if negative:  # no mask holds one (they are refused), so it would be scored NaN, exit 0
        raise UserError(
            f"--labels {negative[0]}: label values are 0 (background) and positive whole numbers; "
            "e.g. --labels 1 --labels 2."
        )
    for folder in (pred_dir, label_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder not found.")
    preds = without_maps(nifti_files(pred_dir))  # an infer output folder's uncertainty maps are no masks
    if not preds:
        raise UserError(f"{pred_dir}: no NIfTI masks in this folder.")
    references = {case_id(p): p for p in nifti_files(label_dir)}
    for pred_path in preds:
        if case_id(pred_path) not in references:
            raise UserError(f"{pred_path}: no label named {case_id(pred_path)}.nii.gz in {label_dir}.")
    return [(pred_path, references[case_id(pred_path)]) for pred_path in preds]


def _load_pair(pred_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """The mask and reference label maps ``(X, Y, Z)`` and the voxel spacing (mm) of the label.

    Raises:
        UserError: either file is unreadable, or the mask is not on the label's grid.
    """
    pred, pred_affine = _load_labels(pred_path)
    label, label_affine = _load_labels(label_path)
    if pred.shape != label.shape:
        raise UserError(f"{pred_path}: shape {pred.shape} differs from its label's {label.shape}.")
    if not np.allclose(pred_affine, label_affine, atol=1e-3):
        raise UserError(f"{pred_path}: affine differs from its label's; masks must be on the label's grid.")
    return pred, label, tuple(float(s) for s in voxel_spacing(label_affine))


class _Counts:
    """Cases per label where Dice 0 needs telling apart from a poor mask: ``missed`` (the
    reference has label k, the prediction not), ``false_positive`` (the reverse) and
    ``no_overlap`` (both have it, in no voxel in common)."""

    def __init__(self) -> None:
        self.missed: Counter[int] = Counter()
        self.false_positive: Counter[int] = Counter()
        self.no_overlap: Counter[int] = Counter()
        self.held: set[int] = set()  # the foreground labels of all masks, either side

    def add(self, row: dict, in_pred: set[int], in_label: set[int], case_labels: list[int]) -> None:
        """Count the case of ``row`` (its ``dice_<k>``) for each of ``case_labels``."""
        self.held |= {int(v) for v in in_pred | in_label if v > 0}
        for k in case_labels:
            self.missed[k] += k in in_label and k not in in_pred
            self.false_positive[k] += k in in_pred and k not in in_label
            # both masks hold the label and Dice is 0: a structure found in the wrong place or
            # under another label, which the mean alone does not tell from a merely poor mask
            self.no_overlap[k] += k in in_label and k in in_pred and row[f"dice_{k}"] == 0.0

    def add_to(self, summary: dict) -> None:
        """Put the counts into ``summary``'s ``dice_<k>`` and ``hd95_<k>`` (``not_scored``)."""
        for k in sorted(self.missed):
            missed, false_positive = self.missed[k], self.false_positive[k]
            summary[f"dice_{k}"].update(missed=missed, false_positive=false_positive, no_overlap=self.no_overlap[k])
            summary[f"hd95_{k}"]["not_scored"] = missed + false_positive


def _score_case(pred_path: Path, label_path: Path, labels: list[int] | None, counts: _Counts) -> dict:
    """One case's row (``case``, ``dice_<k>``, ``hd95_<k>``, ``dice_mean``), counted in ``counts``."""
    pred, label, spacing = _load_pair(pred_path, label_path)
    in_label, in_pred = set(np.unique(label).tolist()), set(np.unique(pred).tolist())
    case_labels = labels or sorted(int(v) for v in in_label | in_pred if v > 0)
    row = {"case": case_id(pred_path), **case_metrics(pred, label, spacing, case_labels)}
    counts.add(row, in_pred, in_label, case_labels)
    dices = [row[f"dice_{k}"] for k in case_labels if not math.isnan(row[f"dice_{k}"])]
    row["dice_mean"] = float(np.mean(dices)) if dices else math.nan
    return row


def _write_metrics(out: Path, rows: list[dict], columns: list[str], metrics: dict, overwrite: bool) -> None:
    """``metrics.csv`` (``rows``) and ``metrics.json`` (``metrics``) in ``out``, under its lock."""
    with output_lock(out, "medfcn evaluate", "--out"):  # the two tables of one run, not one of each of two
        refuse_existing([out / "metrics.csv", out / "metrics.json"], overwrite)  # another run may have written them
        atomic_write_text(csv_text(rows, columns), out / "metrics.csv")
        atomic_write_text(json.dumps(metrics, indent=1) + "\n", out / "metrics.json")


def _refuse_unnamed(scored: set[int], class_names: dict[int, str]) -> None:
    """With names given, every scored label needs one: a table naming some labels and not
    others reads as if the masks came from the bundle they were named after."""
    unnamed = sorted(k for k in scored if k not in class_names) if class_names else []
    if unnamed:
        names = ", ".join(f"{k} {n}" for k, n in sorted(class_names.items()))
        raise UserError(
            f"label {unnamed[0]}: in the masks but not named (names: {names}); give one name per label "
            "with --class-names, or --bundle with the bundle that made the masks."
        )


def evaluate_folders(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    labels: list[int] | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    class_names: dict[int, str] | None = None,
) -> tuple[list[dict], dict]:
    """Score every mask in ``pred_dir`` against the same-named file in ``label_dir``.

    Labels in ``label_dir`` without a prediction are ignored (the folder may hold more cases);
    a prediction without a label, or with another shape or affine, is an error.

    Returns:
        ``(rows, summary)``; rows hold ``case``, ``dice_<k>``, ``hd95_<k>`` (mm) and
        ``dice_mean`` (over the case's labels that are in either mask). The summary holds
        :func:`summarise`'s statistics per column; ``dice_<k>`` adds ``missed`` (cases whose
        reference has label k and whose prediction has none) and ``false_positive`` (the
        reverse), both scored Dice 0, and ``no_overlap`` (both masks hold label k, in no voxel
        in common: Dice 0 too); ``hd95_<k>`` adds ``not_scored``, the sum of ``missed`` and
        ``false_positive`` (no HD95 without both surfaces). Written to ``out_dir`` as
        ``metrics.csv`` and ``metrics.json`` (with ``class_names``, label -> name, when given)
        only when given: nothing is written into the mask folder unless it is ``out_dir``;
        existing tables are replaced only with ``overwrite``.
    """
    pairs = _pairs(Path(pred_dir), Path(label_dir), labels)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:  # refused before the scoring, not after it
        refuse_existing([out / "metrics.csv", out / "metrics.json"], overwrite)
        writable_dir(out, fix="choose another --out")
    counts = _Counts()
    rows = [_score_case(pred_path, label_path, labels, counts) for pred_path, label_path in pairs]
    absent = [k for k in labels or () if k not in counts.held]
    if absent:  # a table of nan with n 0, exit 0, would pass for a result
        held = ", ".join(map(str, sorted(counts.held))) or "none"
        raise UserError(
            f"--labels {absent[0]}: in none of the {len(pairs)} predictions and references "
            f"(their labels: {held}); e.g. --labels {min(counts.held, default=1)}."
        )
    _refuse_unnamed(counts.held & set(labels or counts.held), class_names or {})
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
    rows = [{k: r.get(k, math.nan) for k in columns} for r in rows]
    summary = summarise(rows)
    counts.add_to(summary)
    if out is not None:
        metrics = {"cases": rows, "summary": summary}
        if class_names:
            metrics["class_names"] = {str(k): name for k, name in sorted(class_names.items())}
        _write_metrics(out, rows, columns, metrics, overwrite)
    return rows, summary
