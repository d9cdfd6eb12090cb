"""medfcn.evaluate: Dice/HD95 over folders with monai.metrics; mismatches are clear errors."""

from __future__ import annotations

import contextlib
import json
import re
import resource
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfcn.errors import UserError
from medfcn.evaluate import case_metrics, evaluate_folders, label_names

from .conftest import BUNDLE


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
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels", out_dir=tmp_path / "pred")
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
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels", out_dir=tmp_path / "pred")
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


@pytest.mark.parametrize("which", ["pred", "labels"])
def test_negative_label_values_are_one_line(tmp_path, which):
    from typer.testing import CliRunner

    from medfcn.cli import app

    label = _cube().astype(np.int16)
    _save_int16(tmp_path / "labels" / "a.nii.gz", label)
    _save_int16(tmp_path / "pred" / "a.nii.gz", label)
    signed = label.copy()
    signed[0, 0, 0] = -1  # a signed mask, e.g. -1 for "unknown"
    _save_int16(tmp_path / which / "a.nii.gz", signed)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"medfcn: error: {tmp_path / which / 'a.nii.gz'}: holds negative label values [-1]")
    assert "map the negative values" in lines[0]
    assert not (tmp_path / "pred" / "metrics.csv").exists()


def _save_int16(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.eye(4)), path)


@contextlib.contextmanager
def _address_space_limit(extra_bytes: int):
    """Let this process map at most ``extra_bytes`` more than it has mapped now (RLIMIT_AS):
    an allocation beyond that fails with MemoryError/RuntimeError instead of swapping the
    machine. torch's allocator bypasses tracemalloc, so this is what bounds it."""
    mapped = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc to read the mapped size")
def test_freesurfer_label_values_are_scored_in_memory_of_the_grid(tmp_path):
    # FreeSurfer-style values on a 96^3 grid: one-hot encoding up to 2035 took 7.2 GB
    label = np.zeros((96, 96, 96), np.int16)
    label[10:40, 10:40, 10:40] = 2035
    label[50:80, 50:80, 50:80] = 17
    pred = label.copy()
    pred[12:42, 10:40, 10:40][pred[12:42, 10:40, 10:40] == 0] = 2035  # grown by 2 voxels along x
    pred[60:70, 60:70, 60:70] = 1006  # a false positive
    _save_int16(tmp_path / "labels" / "a.nii.gz", label)
    _save_int16(tmp_path / "pred" / "a.nii.gz", pred)
    with _address_space_limit(2**30):
        rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    row = rows[0]
    for k in (17, 1006, 2035):  # Dice computed directly
        p, y = pred == k, label == k
        assert row[f"dice_{k}"] == pytest.approx(2 * (p & y).sum() / (p.sum() + y.sum()))
    # the same scores as for the same masks with small label values
    compact = {17: 1, 1006: 2, 2035: 3}
    small = case_metrics(*(np.vectorize(lambda v: compact.get(v, 0))(m) for m in (pred, label)), (1.0,) * 3, [1, 2, 3])
    for k, c in compact.items():
        for metric in ("dice", "hd95"):
            np.testing.assert_equal(row[f"{metric}_{k}"], small[f"{metric}_{c}"])
    assert row["hd95_2035"] == pytest.approx(2.0) and summary["dice_1006"]["false_positive"] == 1


def test_nothing_is_written_unless_an_output_folder_is_given(tmp_path):
    """The mask folder is an input: evaluate writes its tables only where it is told to."""
    label = _cube()
    _save(tmp_path / "labels" / "a.nii.gz", label)
    _save(tmp_path / "pred" / "a.nii.gz", label)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert rows[0]["dice_mean"] == pytest.approx(1.0) and summary["dice_1"]["n"] == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_class_names_go_into_metrics_json_and_columns_keep_label_values(tmp_path):
    label = _cube()
    _save(tmp_path / "labels" / "a.nii.gz", label)
    _save(tmp_path / "pred" / "a.nii.gz", label)
    names = {1: "anterior", 2: "posterior"}
    evaluate_folders(tmp_path / "pred", tmp_path / "labels", out_dir=tmp_path / "m", class_names=names)
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert saved["class_names"] == {"1": "anterior", "2": "posterior"}
    assert "dice_1" in saved["summary"] and "dice_anterior" not in saved["summary"]
    header = (tmp_path / "m" / "metrics.csv").read_text().splitlines()[0]
    assert header == "case,dice_1,dice_2,dice_mean,hd95_1,hd95_2"
    evaluate_folders(tmp_path / "pred", tmp_path / "labels", out_dir=tmp_path / "plain")
    assert "class_names" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())


def test_label_names_from_a_bundle_or_the_command_line():
    assert label_names(BUNDLE) == {1: "anterior", 2: "posterior"}  # the bundle's inference configs
    assert label_names(class_names="left, right") == {1: "left", 2: "right"}
    assert label_names() == {}
    with pytest.raises(UserError, match="give one of them"):
        label_names(BUNDLE, "a,b")
    with pytest.raises(UserError, match="an empty name"):
        label_names(class_names="a,,b")
    with pytest.raises(UserError, match="bundle folder not found"):
        label_names("bundles/does_not_exist")


def test_a_label_in_no_mask_is_refused(tmp_path):
    """`--labels 3` on masks holding 1 and 2 (a typo, another tool's numbering) is one line, not a
    table of nan with n 0 and exit code 0; nothing is written."""
    _save(tmp_path / "pred" / "a.nii.gz", _cube())
    _save(tmp_path / "ref" / "a.nii.gz", _cube())
    with pytest.raises(
        UserError, match=r"--labels 3: in none of the 1 predictions and references \(their labels: 1, 2\)"
    ):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels=[1, 3], out_dir=tmp_path / "m")
    assert not (tmp_path / "m" / "metrics.csv").exists()
    rows, _ = evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels=[2])
    assert rows[0]["dice_2"] == 1.0


def test_a_label_without_a_name_is_refused_when_names_are_given(tmp_path):
    """Two labels in the masks, one name given: a table naming label 1 only would pass for the
    result of a one-class model."""
    label = _cube()
    _save(tmp_path / "labels" / "a.nii.gz", label)
    _save(tmp_path / "pred" / "a.nii.gz", label)
    with pytest.raises(UserError, match=r"label 2: in the masks but not named \(names: 1 anterior\)"):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", out_dir=tmp_path / "m", class_names={1: "anterior"})
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())
    rows, _ = evaluate_folders(tmp_path / "pred", tmp_path / "labels", labels=[1], class_names={1: "anterior"})
    assert "dice_1" in rows[0]  # scoring only the named label is fine


def test_an_infer_output_folder_is_scored_without_its_maps(tmp_path, spheres_dataset):
    from medfcn.infer import Extras, infer

    scans = [spheres_dataset / "imagesTr" / f"case_00{k}.nii.gz" for k in (0, 1)]
    infer(BUNDLE, scans, tmp_path / "out", extras=Extras(uncertainty=True, probabilities=True))
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 6  # 2 masks, 2 x 2 maps
    rows, _ = evaluate_folders(tmp_path / "out", spheres_dataset / "labelsTr")
    assert [row["case"] for row in rows] == ["case_000", "case_001"]
