"""medfcn.evaluate: Dice/HD95 over folders with monai.metrics; mismatches are clear errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medfcn.errors import UserError
from medfcn.evaluate import case_metrics, evaluate_folders


def _save(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4) if affine is None else affine), path)


def _cube(shape=(20, 20, 20)):
    label = np.zeros(shape, dtype=np.uint8)
    label[4:10, 4:10, 4:10] = 1
    label[12:16, 12:16, 12:16] = 2
    return label


def test_perfect_and_shifted_masks(tmp_path):
    label = _cube()
    _save(tmp_path / "labels" / "a.nii.gz", label)
    _save(tmp_path / "labels" / "b.nii.gz", label)
    _save(tmp_path / "labels" / "unused.nii.gz", label)  # labels without a prediction are ignored
    _save(tmp_path / "pred" / "a.nii.gz", label)
    _save(tmp_path / "pred" / "b.nii.gz", np.roll(label, 2, axis=0))
    (tmp_path / "pred" / "._a.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # a macOS companion: not a mask
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    a, b = rows
    assert a["dice_1"] == pytest.approx(1.0) and a["hd95_1"] == pytest.approx(0.0)
    assert b["dice_1"] == pytest.approx(2 * 4 * 36 / (2 * 216))  # 4 of 6 slices overlap
    assert b["hd95_2"] == pytest.approx(2.0)  # shifted 2 voxels of 1 mm
    assert summary["dice_mean"]["n"] == 2
    saved = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert saved["cases"][0]["case"] == "a"
    assert (tmp_path / "pred" / "metrics.csv").read_text().startswith("case,")


def test_hd95_is_in_mm():
    label = _cube()
    shifted = np.roll(label, 1, axis=2)
    row = case_metrics(shifted, label, (1.0, 1.0, 3.0), [1])
    assert row["hd95_1"] == pytest.approx(3.0)


@pytest.mark.parametrize(
    "change, message",
    [("missing", "no label named"), ("shape", "shape"), ("affine", "affine")],
)
def test_mismatches_are_user_errors(tmp_path, change, message):
    label = _cube()
    _save(tmp_path / "pred" / "a.nii.gz", label)
    if change == "shape":
        _save(tmp_path / "labels" / "a.nii.gz", label[:-1])
    elif change == "affine":
        _save(tmp_path / "labels" / "a.nii.gz", label, np.diag([2.0, 1, 1, 1]))
    else:
        (tmp_path / "labels").mkdir()
    with pytest.raises(UserError, match=message):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels")


def test_label_only_in_prediction_scores_zero_and_lowers_the_mean(tmp_path):
    label = _cube()
    label[label == 2] = 0  # the reference has label 1 only
    pred = _cube()  # ... the prediction adds a label 2
    row = case_metrics(pred, label, (1.0, 1.0, 1.0), [1, 2])
    assert row["dice_1"] == pytest.approx(1.0) and row["dice_2"] == 0.0
    assert np.isnan(row["hd95_2"])
    _save(tmp_path / "labels" / "a.nii.gz", label)
    _save(tmp_path / "pred" / "a.nii.gz", pred)
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert rows[0]["dice_mean"] == pytest.approx(0.5)
    assert summary["dice_2"]["false_positive"] == 1 and summary["dice_2"]["missed"] == 0
    assert summary["hd95_2"]["not_scored"] == 1 and summary["hd95_2"]["n"] == 0


def test_label_in_neither_mask_is_not_scored():
    label = _cube()
    label[label == 2] = 0
    row = case_metrics(label, label, (1.0, 1.0, 1.0), [1, 2])
    assert np.isnan(row["dice_2"]) and np.isnan(row["hd95_2"])
    assert row["dice_1"] == pytest.approx(1.0)


def test_missed_structure_scores_zero_and_is_counted(tmp_path):
    label = _cube()
    pred = label.copy()
    pred[pred == 2] = 0  # the prediction misses label 2
    _save(tmp_path / "labels" / "a.nii.gz", label)
    _save(tmp_path / "labels" / "b.nii.gz", label)
    _save(tmp_path / "pred" / "a.nii.gz", pred)
    _save(tmp_path / "pred" / "b.nii.gz", label)
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert rows[0]["dice_2"] == 0.0 and rows[0]["dice_mean"] == pytest.approx(0.5)
    assert summary["dice_2"]["n"] == 2 and summary["dice_2"]["mean"] == pytest.approx(0.5)
    assert summary["dice_2"]["missed"] == 1 and summary["dice_2"]["false_positive"] == 0
    assert summary["hd95_2"]["n"] == 1 and summary["hd95_2"]["not_scored"] == 1
    assert summary["hd95_1"]["not_scored"] == 0
    saved = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert saved["summary"]["dice_2"]["missed"] == 1


def test_labels_without_common_voxels_are_counted(tmp_path):
    """Swapped labels score Dice 0 with both present (HD95 scored): counted as no_overlap, so a
    swap is told apart from a poor mask."""
    label = _cube()
    swapped = np.select([label == 1, label == 2], [2, 1], 0)
    _save(tmp_path / "labels" / "a.nii.gz", label)
    _save(tmp_path / "labels" / "b.nii.gz", label)
    _save(tmp_path / "pred" / "a.nii.gz", swapped)
    _save(tmp_path / "pred" / "b.nii.gz", label)
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert rows[0]["dice_1"] == 0.0 and rows[0]["dice_2"] == 0.0 and not np.isnan(rows[0]["hd95_1"])
    for k in (1, 2):
        assert summary[f"dice_{k}"]["no_overlap"] == 1
        assert summary[f"dice_{k}"]["missed"] == 0 and summary[f"hd95_{k}"]["not_scored"] == 0


def test_upper_case_suffixes_are_listed_and_matched(tmp_path):
    """A mask ``A.NII.GZ`` is scored against the label ``A.nii.gz``: the suffix's letter case
    is no part of the case name."""
    label = _cube()
    _save(tmp_path / "labels" / "A.nii.gz", label)
    _save(tmp_path / "pred" / "A.nii.gz", label)
    (tmp_path / "pred" / "A.nii.gz").rename(tmp_path / "pred" / "A.NII.GZ")
    rows, _ = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert [r["case"] for r in rows] == ["A"] and rows[0]["dice_mean"] == pytest.approx(1.0)
