"""Scans unlike a bundle's training data: the bundle records what its training cases looked like
(medfcn.data.profile), and `medfcn infer` says so on the scan's line, as a warning and in the
`warnings` column of volumes.csv / volumes.json."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medfcn.cli import app
from medfcn.data.datasets import fold_datalists
from medfcn.data.profile import PROFILE_KEY, RUN_PROFILE, geometry_ras, training_profile, unlike_training
from medfcn.data.readers import read_dicom_series, sitk_affine_ras
from medfcn.package import package_run
from medfcn.training import train

from .conftest import BUNDLE, DICOM, HIPPO, need, write_msd_dataset

runner = CliRunner()


def _infer(bundle, *scans, out, options=()):
    args = ["infer", str(bundle), *map(str, scans), "--out", str(out), "--device", "cpu", *options]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    with open(out / "volumes.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert json.loads((out / "volumes.json").read_text())[0]["warnings"] == rows[0]["warnings"]
    return result.output, rows


def _bundle_copy(tmp_path, profile=None):
    """The 3D hippocampus bundle with its weights linked and ``profile`` in its metadata
    (None: without a profile)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models"))
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").symlink_to(BUNDLE / "models" / "model.pt")
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta.pop(PROFILE_KEY)
    if profile is not None:
        meta[PROFILE_KEY] = profile
    meta_file.write_text(json.dumps(meta))
    return bundle


def _scan(path, shape, spacing=(1.0, 1.0, 1.0), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), np.diag([*spacing, 1.0])), path)
    return path


def test_geometry_is_measured_along_ras_axes():
    # voxel axes stored (A-P, R-L, S-I), flipped, 1.5 x 1 x 2 mm: as a scan exported in LPS order
    affine = np.array([[0, -1.0, 0, 10], [1.5, 0, 0, -4], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    fov, voxel = geometry_ras(affine, (30, 40, 20))
    assert fov.tolist() == [40.0, 45.0, 40.0]
    assert voxel.tolist() == [1.0, 1.5, 2.0]


def test_profile_of_a_synthetic_dataset(tmp_path):
    data = write_msd_dataset(tmp_path / "Spheres", n_cases=4, shape=(28, 32, 24))
    big = _scan(tmp_path / "big.nii.gz", (40, 20, 24), spacing=(1.0, 2.0, 0.5))
    cases = [*fold_datalists(data, data / "folds.json", 0)[0], {"image": big}]  # 2 labelled + 1 unlabelled
    profile = training_profile(cases, ["dim", "bright"], source="test")
    assert profile["cases"] == 3 and profile["source"] == "test"
    assert profile["field_of_view_mm"] == {"min": [28.0, 32.0, 12.0], "max": [40.0, 40.0, 24.0]}
    assert profile["voxel_size_mm"] == {"min": [1.0, 1.0, 0.5], "max": [1.0, 2.0, 1.0]}
    counts = [np.bincount(nib.load(c["label"]).get_fdata().astype(int).ravel(), minlength=3) for c in cases[:2]]
    bright = [c[2] for c in counts]
    quantiles = dict(
        zip(["1", "5", "25", "50", "75", "95", "99"], np.percentile(bright, [1, 5, 25, 50, 75, 95, 99]), strict=True)
    )
    assert profile["volume_mm3"]["bright"] == {
        "min": min(bright),
        "max": max(bright),
        "quantiles": pytest.approx(quantiles, abs=0.01),
    }
    assert profile["volume_mm3"]["dim"]["max"] == max(c[1] for c in counts)
    # within the margin (x1.5 beyond the range) nothing is said; beyond it each fact is named
    affine = np.eye(4)
    assert unlike_training(profile, affine, (40, 50, 30), {"dim": counts[0][1], "bright": counts[0][2]}) == {}
    unlike = unlike_training(profile, np.diag([0.5, 0.5, 0.5, 1]), (200, 60, 40), {"dim": 0.0, "bright": 1e6})
    assert set(unlike) == {"field of view", "voxel size", "dim volume", "bright volume"}
    assert unlike_training(None, affine, (200, 60, 40), {}) == {}


def test_infer_flags_a_scan_far_larger_than_the_training_crops(tmp_path):
    big = _scan(tmp_path / "in" / "big.nii.gz", (70, 56, 40))  # 70 mm R-L; the crops were 31-43 mm
    crop = _scan(tmp_path / "in" / "crop.nii.gz", (36, 52, 38))  # noise: its volumes may be flagged
    output, rows = _infer(BUNDLE, big, crop, out=tmp_path / "out")
    progress = [line for line in output.splitlines() if line.startswith("[")]
    assert "WARNING unlike the training data: field of view" in progress[0]
    assert "field of view" not in progress[1]
    warning = [line for line in output.splitlines() if line.startswith("medfcn: warning:") and "big.nii" in line]
    assert len(warning) == 1 and "big.nii.gz: unlike the bundle's training data (166 cases" in warning[0]
    assert "field of view 70 x 56 x 40 mm" in warning[0] and "training 31-43 x 40-59 x 24-47" in warning[0]
    assert "cropped around the structure" in warning[0]
    assert rows[0]["warnings"] == warning[0].removeprefix("medfcn: warning: ")
    assert "field of view" not in rows[1]["warnings"]
    assert (tmp_path / "out" / "big.nii.gz").is_file()  # a warning, not a refusal


def test_infer_flags_a_volume_outside_the_training_range(tmp_path):
    profile = json.loads((BUNDLE / "configs" / "metadata.json").read_text())[PROFILE_KEY]
    profile["volume_mm3"]["posterior"] = {"min": 1e6, "max": 2e6}  # no crop has that much hippocampus
    profile["volume_mm3"]["anterior"] = {"min": 0, "max": 1e9}  # a noise scan's anterior volume is anything
    bundle = _bundle_copy(tmp_path, profile)
    scan = _scan(tmp_path / "in" / "crop.nii.gz", (36, 52, 38))
    output, rows = _infer(bundle, scan, out=tmp_path / "out")
    assert "WARNING unlike the training data: posterior volume" in output
    posterior = float(rows[0]["posterior_mm3"])
    assert f"posterior {posterior:.0f} mm3 (training 1000000-2000000)" in rows[0]["warnings"]
    assert "field of view" not in rows[0]["warnings"] and "anterior" not in rows[0]["warnings"]
    assert "check the mask before using its volumes" in rows[0]["warnings"]


def test_a_bundle_without_profile_checks_nothing_but_keeps_other_warnings(tmp_path):
    bundle = _bundle_copy(tmp_path, profile=None)
    big = _scan(tmp_path / "in" / "big.nii.gz", (70, 56, 40))
    labels = np.zeros((36, 52, 38), np.float32)
    labels[10:20, 10:30, 10:20], labels[20:30, 10:30, 10:20] = 1, 2
    label_map = tmp_path / "in" / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), label_map)
    output, rows = _infer(bundle, big, label_map, out=tmp_path / "out")
    assert rows[0]["warnings"] == "" and "unlike" not in output
    # the scan's other InputWarnings are collected in its row too, and still printed
    assert "looks like a label map" in rows[1]["warnings"]
    assert "WARNING: 1 input warning, see above" in output
    assert "medfcn: warning:" in output and "labels.nii.gz: looks like a label map" in output


def test_malformed_profile_is_one_line(tmp_path):
    bundle = _bundle_copy(tmp_path, profile={"cases": 3, "field_of_view_mm": {"min": [1, 2]}})
    scan = _scan(tmp_path / "a.nii.gz", (8, 8, 8))
    result = runner.invoke(app, ["infer", str(bundle), str(scan), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.startswith("medfcn: error:"), result.output
    assert f"{PROFILE_KEY} is malformed" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _dicom_slab(tmp_path, n_slices: int = 4):
    """The middle ``n_slices`` files of the whole-head series, copied: the same in-plane field
    of view and voxel size as the whole series, which takes half a minute to segment on 2 cores."""
    series = need(DICOM / "PGBM-003_T1post")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))  # sorted along the slice normal
    start = (len(files) - n_slices) // 2
    slab = tmp_path / "PGBM-003_T1post_slab"
    slab.mkdir()
    for name in files[start : start + n_slices]:
        shutil.copy(name, slab)
    return series, slab


def test_real_whole_head_is_flagged_and_real_crops_are_not(tmp_path):
    series, slab = _dicom_slab(tmp_path)
    crop = need(DICOM / "PGBM-002_HippoCrop")
    task04 = need(HIPPO / "imagesTr" / "hippocampus_004.nii.gz")
    # --overlap 0: 20 windows instead of 80 on the slab (the whole series gave 105,729 mm3 anterior)
    output, rows = _infer(BUNDLE, slab, crop, task04, out=tmp_path / "out", options=["--overlap", "0"])
    assert "field of view 193 x 220 x 26 mm" in rows[0]["warnings"]
    assert "voxel size 0.688 x 0.688 x 6.5 mm" in rows[0]["warnings"]
    assert f"anterior {float(rows[0]['anterior_mm3']):.0f} mm3 (training 1119-2593)" in rows[0]["warnings"]
    note = "WARNING unlike the training data: field of view, voxel size, anterior volume, posterior volume"
    assert note in output
    assert rows[1]["warnings"] == rows[2]["warnings"] == ""
    # the whole series, as infer would load it: its geometry alone is flagged
    image = read_dicom_series(series)
    profile = json.loads((BUNDLE / "configs" / "metadata.json").read_text())[PROFILE_KEY]
    unlike = unlike_training(profile, sitk_affine_ras(image), image.GetSize(), {})
    assert unlike["field of view"].startswith("field of view 193 x 220 x 143 mm")


def test_train_records_the_profile_and_package_ships_it(tmp_path):
    data = write_msd_dataset(tmp_path / "Spheres", n_cases=4, shape=(24, 24, 20))
    overrides = {
        "folds_file": str(data / "folds.json"),
        "patch_size": [16, 16, 16],
        "network_def#features": [8, 16, 32],
        "network_def#deep_supervision": 1,
        "class_names": ["dim", "bright"],
        "batch_size": 2,
        "val_interval": 1,
        "bf16": False,
    }
    run = train(BUNDLE, data, fold=0, epochs=1, output_dir=tmp_path / "run", overrides=overrides)
    recorded = json.loads((run / RUN_PROFILE).read_text())
    expected = training_profile(fold_datalists(data, data / "folds.json", 0)[0], ["dim", "bright"])
    assert recorded["cases"] == 2 and recorded["field_of_view_mm"] == expected["field_of_view_mm"]
    assert recorded["volume_mm3"] == expected["volume_mm3"]
    bundle = package_run(run, tmp_path / "spheres_fcn")
    shipped = json.loads((bundle / "configs" / "metadata.json").read_text())[PROFILE_KEY]
    assert shipped == recorded  # the run's cases, not the hippocampus bundle's 166
    # without the run's file it is computed from the run's data and split; without those, left out
    (run / RUN_PROFILE).unlink()
    again = package_run(run, tmp_path / "again")
    assert json.loads((again / "configs" / "metadata.json").read_text())[PROFILE_KEY] == recorded
    shutil.rmtree(data)
    gone = package_run(run, tmp_path / "gone")
    assert PROFILE_KEY not in json.loads((gone / "configs" / "metadata.json").read_text())


@pytest.mark.parametrize("bundle", ["hippocampus_fcn", "hippocampus_fcn_2d"])
def test_shipped_bundles_carry_their_fold0_training_profile(bundle):
    profile = json.loads((BUNDLE.parent / bundle / "configs" / "metadata.json").read_text())[PROFILE_KEY]
    assert profile["cases"] == 166 and "fold 0" in profile["source"]
    assert set(profile["volume_mm3"]) == {"anterior", "posterior"}
