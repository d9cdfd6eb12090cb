"""Every bad input gets one clear line naming the file, exit code 2, no traceback, no partial output."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfcn import FCN
from medfcn.cli import app

from .conftest import BUNDLE, DICOM, NO_CUDA_DEVICE, need

runner = CliRunner()


def run(*args: str, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_user_error(result, *fragments: str):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medfcn: error:"), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _nifti(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _good(tmp_path, name="scan.nii.gz"):
    rng = np.random.default_rng(0)
    return _nifti(tmp_path / "in" / name, rng.random((30, 34, 28)).astype(np.float32))


def _make_bad_scan(kind: str, tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.random((30, 34, 28)).astype(np.float32)
    if kind == "not_an_image":
        path = tmp_path / "in" / "notes.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(b"this is a text file, not a NIfTI image"))
        return path, "notes.nii.gz"
    if kind == "truncated":
        good = _nifti(tmp_path / "full.nii.gz", vol)
        path = tmp_path / "in" / "cut.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return path, "cut.nii.gz"
    if kind == "nan":
        vol[3, 4, 5] = np.nan
        vol[6, 7, 8] = np.inf
        return _nifti(tmp_path / "in" / "nan.nii.gz", vol), "2 NaN/Inf voxels"
    if kind == "4d":
        return _nifti(tmp_path / "in" / "series.nii.gz", np.stack([vol, vol], -1)), "2 channels"
    if kind == "2d":
        return _nifti(tmp_path / "in" / "flat.nii.gz", vol[..., 0]), "2D image"
    if kind == "single_slice":  # how 2D images often come as NIfTI
        return _nifti(tmp_path / "in" / "slice.nii.gz", vol[..., :1]), "is a single slice (30 x 34 x 1)"
    if kind == "zero_length":
        return _nifti(tmp_path / "in" / "empty.nii.gz", np.zeros((0, 5, 5), np.float32)), "empty.nii.gz"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["not_an_image", "truncated", "nan", "4d", "2d", "single_slice", "zero_length"])
def test_bad_scans(kind, tmp_path):
    path, fragment = _make_bad_scan(kind, tmp_path)
    out = tmp_path / "out"
    result = run("infer", BUNDLE, path, "--out", out)
    assert_user_error(result, str(path.name), fragment)
    assert not list(out.glob("*.nii.gz"))  # no partial mask


def test_missing_path_and_empty_folder(tmp_path):
    assert_user_error(run("infer", BUNDLE, tmp_path / "nope.nii.gz", "--out", tmp_path / "o"), "nope.nii.gz: not found")
    (tmp_path / "empty").mkdir()
    empty = run("infer", BUNDLE, tmp_path / "empty", "--out", tmp_path / "o")
    assert_user_error(empty, "no NIfTI, NRRD or MetaImage files")


def test_volume_over_memory_budget(tmp_path):
    scan = _good(tmp_path)
    result = run("infer", BUNDLE, scan, "--out", tmp_path / "o", env={"MEDFCN_MAX_MEMORY_GB": "0.0001"})
    # small budgets keep their digits: not "needs about 0.0 GiB ... over the 0.0 GiB budget"
    assert_user_error(result, "scan.nii.gz", "needs about 0.00", "over the 0.0001 GiB budget", "MEDFCN_MAX_MEMORY_GB")


@pytest.mark.parametrize("value", ["lots", "0", "-2", "nan"])
def test_memory_budget_that_is_not_a_positive_number(value, tmp_path):
    result = run("infer", BUNDLE, _good(tmp_path), "--out", tmp_path / "o", env={"MEDFCN_MAX_MEMORY_GB": value})
    assert_user_error(result, f"MEDFCN_MAX_MEMORY_GB={value!r}: not a number of GiB; e.g. MEDFCN_MAX_MEMORY_GB=8.")


def test_output_folder_problems(tmp_path):
    scan = _good(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run("infer", BUNDLE, scan, "--out", blocker / "sub"), f"{blocker}: is a file, not a folder")
    assert_user_error(run("infer", BUNDLE, scan, "--out", blocker), f"{blocker}: is a file, not a folder")
    assert run("infer", BUNDLE, scan, "--out", tmp_path / "o").exit_code == 0
    assert_user_error(run("infer", BUNDLE, scan, "--out", tmp_path / "o"), "already exists", "--overwrite")


def test_bundle_without_weights_and_with_foreign_weights(tmp_path):
    scan = _good(tmp_path)
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    assert_user_error(run("infer", bundle, scan, "--out", tmp_path / "o"), "model.pt: missing")
    (bundle / "models").mkdir()
    torch.save(FCN(3, 1, 3, features=(8, 16)).state_dict(), bundle / "models" / "model.pt")
    assert_user_error(run("infer", bundle, scan, "--out", tmp_path / "o"), "does not fit the bundle")


def test_nifti_folder_with_macos_junk_and_no_itk_noise(tmp_path, capfd):
    """An MSD-like folder: a scan and its AppleDouble twin ``._<name>``. The junk is skipped and
    nothing but medfcn's own lines reaches stderr (GDCM's "No Series were found" included)."""
    scan = _good(tmp_path, "hippocampus_004.nii.gz")
    (scan.parent / "._hippocampus_004.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    result = run("infer", BUNDLE, scan.parent, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "o").glob("*.nii.gz")) == ["hippocampus_004.nii.gz"]
    err = capfd.readouterr().err
    assert "GDCM" not in err and "WARNING" not in err, err


def test_label_map_as_input_is_one_warning_line(tmp_path):
    labels = np.zeros((30, 34, 28), np.uint8)
    labels[5:12, 6:14, 4:10] = 1
    labels[14:20, 10:18, 8:16] = 2
    path = _nifti(tmp_path / "in" / "label.nii.gz", labels)
    result = run("infer", BUNDLE, path, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    # a label map is also unlike the bundle's training data (its volumes): tests/test_ood.py checks that warning
    warned = [line for line in result.output.splitlines() if "warning" in line.lower() and "training data" not in line]
    assert warned == [
        f"medfcn: warning: {path}: looks like a label map (values 0, 1, 2), not a scan; segmenting it anyway."
    ], result.output
    assert (tmp_path / "o" / "label.nii.gz").is_file()


def test_dicom_missing_slice_and_mixed_series(tmp_path):
    source = need(DICOM)
    gap = tmp_path / "gap"
    shutil.copytree(source / "PGBM-002_HippoCrop", gap)
    (gap / "16.dcm").unlink()
    assert_user_error(run("infer", BUNDLE, gap, "--out", tmp_path / "o"), "gap", "missing")
    mixed = tmp_path / "mixed"
    shutil.copytree(source / "PGBM-002_HippoCrop", mixed)
    for f in (source / "PGBM-006_HippoCrop").iterdir():
        shutil.copy(f, mixed / f"b_{f.name}")
    assert_user_error(run("infer", BUNDLE, mixed, "--out", tmp_path / "o"), "mixed", "2 DICOM series")


@pytest.mark.parametrize("kind", ["shape", "affine", "label_values", "missing_file"])
def test_bad_training_pairs(kind, spheres_dataset, tmp_path):
    case = "case_003.nii.gz"
    label = spheres_dataset / "labelsTr" / case
    data = np.asarray(nib.load(label).dataobj)
    if kind == "shape":
        _nifti(label, data[:-2])
        fragment = "shape"
    elif kind == "affine":
        _nifti(label, data, np.diag([1.0, 1.0, 2.0, 1.0]))
        fragment = "affine"
    elif kind == "label_values":
        data = data.copy()
        data[0, 0, 0] = 7
        _nifti(label, data)
        fragment = "label values [7]"
    else:
        label.unlink()
        fragment = "missing file"
    sets = ["--set", f"folds_file={spheres_dataset / 'folds.json'}"]
    result = run("train", BUNDLE, "--data", spheres_dataset, "--output", tmp_path / "run", "--epochs", "1", *sets)
    assert_user_error(result, fragment, "case_003")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_unknown_fold_and_folds_naming_unknown_cases(spheres_dataset, tmp_path):
    sets = ["--set", f"folds_file={spheres_dataset / 'folds.json'}"]
    assert_user_error(run("train", BUNDLE, "--data", spheres_dataset, "--fold", "4", *sets), "unknown fold 4")
    split = json.loads((spheres_dataset / "folds.json").read_text())
    split["folds"][0].append("case_999")
    (spheres_dataset / "folds.json").write_text(json.dumps(split))
    assert_user_error(run("train", BUNDLE, "--data", spheres_dataset, *sets), "case_999")


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("no_folder", ["nonexistent: dataset folder not found"]),
        ("no_index", ["dataset.json: not found", "MSD dataset.json"]),
        ("empty_training", ["dataset.json: has no 'training' list of cases", '"image"']),
        ("too_many_folds", ["dataset.json: lists 12 cases, cannot make 13 folds", "--n-folds between 2 and 12"]),
        ("one_fold", ["dataset.json: lists 12 cases, cannot make 1 fold;", "--n-folds between 2 and 12"]),
        ("out_under_a_file", ["a_file: is a file, not a folder", "choose another --out"]),
        ("out_is_a_folder", ["is a folder", "folds.json"]),
    ],
)
def test_folds_bad_inputs(case, fragments, spheres_dataset, tmp_path):
    dataset, out, n_folds = spheres_dataset, tmp_path / "out" / "folds.json", "2"
    if case == "no_folder":
        dataset = tmp_path / "nonexistent"
    elif case == "no_index":
        (dataset / "dataset.json").unlink()
    elif case == "empty_training":
        meta = json.loads((dataset / "dataset.json").read_text())
        (dataset / "dataset.json").write_text(json.dumps({**meta, "training": []}))
    elif case in ("too_many_folds", "one_fold"):
        n_folds = "13" if case == "too_many_folds" else "1"
    elif case == "out_under_a_file":
        (tmp_path / "a_file").write_text("not a folder")
        out = tmp_path / "a_file" / "folds.json"
    else:
        out = tmp_path
    assert_user_error(run("folds", dataset, "--out", out, "--n-folds", n_folds), *fragments)
    assert not (tmp_path / "out").exists()


def test_folds_keeps_an_existing_split_without_overwrite(spheres_dataset, tmp_path):
    out = tmp_path / "folds.json"
    out.write_text("an earlier split")
    assert_user_error(run("folds", spheres_dataset, "--out", out), "folds.json: already exists", "--overwrite")
    assert out.read_text() == "an earlier split"
    assert run("folds", spheres_dataset, "--out", out, "--overwrite").exit_code == 0
    assert json.loads(out.read_text())["n_folds"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Spheres", "folds.json"]  # no temporary file left


def test_evaluate_missing_label(tmp_path):
    _nifti(tmp_path / "pred" / "a.nii.gz", np.zeros((4, 4, 4), np.uint8))
    (tmp_path / "labels").mkdir()
    assert_user_error(run("evaluate", tmp_path / "pred", tmp_path / "labels"), "a.nii.gz", "no label named")


def test_dicom_folder_with_non_image_files_is_read_without_them(tmp_path):
    import pydicom

    folder = tmp_path / "series"
    shutil.copytree(need(DICOM) / "PGBM-002_HippoCrop", folder)
    report = pydicom.dcmread(folder / "1.dcm")
    del report.PixelData
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a structured report: no pixels
    report.Modality = "SR"
    report.SOPInstanceUID = pydicom.uid.generate_uid()  # the image's UID + ".9" passed VR UI's 64 characters
    report.save_as(folder / "report.dcm")
    (folder / "DICOMDIR").write_bytes(b"not really a DICOMDIR")
    (folder / "notes.txt").write_text("scanner notes")
    result = run("infer", BUNDLE, folder, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert nib.load(tmp_path / "o" / "series.nii.gz").shape == (35, 51, 32)


def test_bad_scan_in_a_batch_leaves_no_output(tmp_path):
    good = _good(tmp_path, "a_good.nii.gz")
    bad, _ = _make_bad_scan("truncated", tmp_path)
    out = tmp_path / "out"
    result = run("infer", BUNDLE, good, bad, "--out", out)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"medfcn: error: {bad}: is corrupt")
    assert not out.exists() or not any(out.iterdir())  # not even the good scan's mask


def test_existing_tables_and_exports_are_kept_without_overwrite(tmp_path):
    scan = _good(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "volumes.csv").write_text("an earlier run's table")
    assert_user_error(run("infer", BUNDLE, scan, "--out", out), "volumes.csv", "--overwrite")
    assert (out / "volumes.csv").read_text() == "an earlier run's table"
    assert run("infer", BUNDLE, scan, "--out", out, "--overwrite").exit_code == 0
    assert (out / "volumes.csv").read_text().startswith("input,mask")

    labels = tmp_path / "labels"
    shutil.copytree(out, labels, ignore=shutil.ignore_patterns("volumes.*"))
    assert run("evaluate", out, labels, "--out", out).exit_code == 0  # into the mask folder: only when told
    assert_user_error(run("evaluate", out, labels, "--out", out), "metrics.csv", "--overwrite")
    assert run("evaluate", out, labels, "--out", out, "--overwrite").exit_code == 0

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("model.ts", "eval"))
    (bundle / "models" / "model.ts").write_text("an earlier export")
    assert "choose another output" not in assert_user_error(run("export", bundle), "model.ts", "--overwrite")
    assert (bundle / "models" / "model.ts").read_text() == "an earlier export"


def test_export_of_foreign_weights(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.save(FCN(3, 1, 3, features=(8, 16)).state_dict(), bundle / "models" / "model.pt")
    assert_user_error(run("export", bundle), "model.pt", "does not fit the bundle")
    (bundle / "models" / "model.pt").write_bytes(b"not a checkpoint")
    assert_user_error(run("export", bundle), "model.pt", "not a readable PyTorch checkpoint")
    assert not (bundle / "models" / "model.ts").exists()


def test_resume_from_a_checkpoint_of_another_network(spheres_dataset, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    foreign = {"network": FCN(3, 1, 3, features=(8, 16)).state_dict(), "trainer": {"iteration": 2, "epoch_length": 1}}
    torch.save(foreign, run_dir / "last.pt")
    sets = ["--set", f"folds_file={spheres_dataset / 'folds.json'}"]
    result = run("train", BUNDLE, "--data", spheres_dataset, "--output", run_dir, "--epochs", "4", "--resume", *sets)
    assert_user_error(result, "last.pt", "does not fit the bundle")


@pytest.mark.parametrize(
    ("option", "fragment"),
    [(["--overlap", "1.5"], "--overlap 1.5"), (["--sw-batch-size", "0"], "--sw-batch-size 0")],
)
def test_bad_inference_options(option, fragment, tmp_path):
    assert_user_error(run("infer", BUNDLE, _good(tmp_path), "--out", tmp_path / "o", *option), fragment)


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        (
            ["--device", f"cuda:{torch.cuda.device_count()}"],
            f"--device cuda:{torch.cuda.device_count()}: {NO_CUDA_DEVICE}",
        ),
        (["--device", "nonsense"], "--device 'nonsense': not a device name"),
        pytest.param(
            ["--device", "mps"],
            "--device mps: no Apple GPU (MPS) on this machine; use --device cpu",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU"),
        ),
        (["--device", "xla"], "--device xla: unsupported; use cpu, cuda, cuda:N or mps"),
        (["--set", 'device="cpu"'], "--set device: use --device"),  # it would escape the check
    ],
)
def test_train_refuses_a_device_it_cannot_use(option, fragment, tmp_path, spheres_dataset):
    result = run("train", BUNDLE, "--data", spheres_dataset, "--output", tmp_path / "run", *option)
    assert_user_error(result, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_a_gpu(tmp_path):
    result = run("infer", BUNDLE, _good(tmp_path), "--out", tmp_path / "o", "--device", "cuda")
    assert_user_error(result, "--device cuda", "--device cpu")


def test_output_names_cannot_leave_the_output_folder(tmp_path):
    rng = np.random.default_rng(1)
    sneaky = _nifti(tmp_path / "in" / "...hidden.nii.gz", rng.random((20, 22, 18)).astype(np.float32))
    out = tmp_path / "deep" / "out"
    assert run("infer", BUNDLE, sneaky, "--out", out).exit_code == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.nii.gz") if p != sneaky)
    assert written == [out.relative_to(tmp_path) / "hidden.nii.gz"]
