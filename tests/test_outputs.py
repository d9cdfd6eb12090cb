"""Outputs never destroy inputs: --out over the inputs is refused, one run at a time writes into a
folder, SIGTERM leaves no temporary file, and file names that are not UTF-8 are handled."""

from __future__ import annotations

import codecs
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medfcn.errors import UserError
from medfcn.outputs import LOCK_NAME, output_lock, plural
from medfcn.training import train

from .conftest import BUNDLE, DICOM, REPO, need
from .test_bad_inputs import _good, _nifti, assert_user_error, run
from .test_train import SMALL

LATIN1_NAME = b"scan_\xe9.nii.gz"  # "scan_é" from an old Latin-1 export: not valid UTF-8


def _bytes_path(folder: Path, name: bytes) -> Path:
    """``folder / name`` for a name given as bytes (Python holds the bytes as surrogates)."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes, to show that a refused run changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["input folder", "its parent", "a link to it"])
def test_out_over_the_inputs_is_refused_even_with_overwrite(where, tmp_path):
    scan = _good(tmp_path)  # tmp_path/in/scan.nii.gz
    out = {"input folder": scan.parent, "its parent": tmp_path, "a link to it": tmp_path / "link"}[where]
    if where == "a link to it":
        out.symlink_to(scan.parent, target_is_directory=True)
    before = _snapshot(scan.parent)
    result = run("infer", BUNDLE, scan.parent, "--out", out, "--overwrite")
    assert_user_error(result, f"--out {out}: is or holds the input {scan}", "choose another --out")
    assert _snapshot(scan.parent) == before  # the scan byte-identical, nothing added


def test_mask_that_links_to_an_input_is_refused(tmp_path):
    scan = _good(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan.nii.gz").symlink_to(scan)  # the mask's name, pointing at the scan
    before = scan.read_bytes()
    result = run("infer", BUNDLE, scan, "--out", out, "--overwrite")
    assert_user_error(result, f"{out / 'scan.nii.gz'}: resolves to the input {scan}", "choose another --out")
    assert scan.read_bytes() == before and (out / "scan.nii.gz").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["scan.nii.gz"]  # no lock file left either


def test_out_holding_a_dicom_series_is_refused(tmp_path):
    series = tmp_path / "export" / "series"
    series.parent.mkdir()
    series.symlink_to(need(DICOM) / "PGBM-006_HippoCrop", target_is_directory=True)
    result = run("infer", BUNDLE, series, "--out", series.parent, "--overwrite")
    assert_user_error(result, f"--out {series.parent}: is or holds the input {series}")
    assert sorted(p.name for p in series.parent.iterdir()) == ["series"]


def test_package_over_its_run_or_bundle_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "medfcn_run.json").write_text(json.dumps({"bundle": str(bundle), "settings": {}}))
    before = _snapshot(tmp_path)
    result = run("package", run_dir, "--out", run_dir, "--overwrite")
    assert_user_error(result, f"--out {run_dir}: is or holds the training run {run_dir}")
    result = run("package", run_dir, "--out", bundle, "--overwrite")
    assert_user_error(result, f"--out {bundle}: is or holds the source bundle {bundle}")
    result = run("package", run_dir, "--out", tmp_path, "--overwrite")  # would replace both
    assert_user_error(result, f"--out {tmp_path}: is or holds the training run")
    assert _snapshot(tmp_path) == before


def test_folds_over_dataset_json_is_refused(spheres_dataset):
    index = spheres_dataset / "dataset.json"
    before = index.read_bytes()
    result = run("folds", spheres_dataset, "--out", index, "--n-folds", "2", "--overwrite")
    assert_user_error(result, f"--out {index}: is or holds the dataset file {index}")
    assert index.read_bytes() == before


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    scan = _good(tmp_path)
    out = tmp_path / "out"
    with output_lock(out, "medfcn infer"):  # as a run in another process would hold it
        result = run("infer", BUNDLE, scan, "--out", out, "--overwrite")
        assert_user_error(
            result, f"{out}: another medfcn infer (pid {os.getpid()}) is writing here; wait for it or choose another"
        )
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    assert not out.exists()  # the lock made the folder and removed it, still empty


def test_evaluate_into_a_locked_folder_is_refused(tmp_path):
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:5, 2:5, 2:5] = 1
    _nifti(tmp_path / "pred" / "a.nii.gz", mask)
    _nifti(tmp_path / "ref" / "a.nii.gz", mask)
    out = tmp_path / "metrics"
    with output_lock(out, "medfcn infer"):
        result = run("evaluate", tmp_path / "pred", tmp_path / "ref", "--out", out)
        assert_user_error(result, f"{out}: another medfcn infer (pid {os.getpid()}) is writing here")
    assert run("evaluate", tmp_path / "pred", tmp_path / "ref", "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"]


def test_train_into_a_locked_output_is_refused(spheres_dataset, tmp_path):
    out = tmp_path / "run"
    overrides = {**SMALL, "folds_file": str(spheres_dataset / "folds.json")}
    with output_lock(out, "medfcn train", "--output"):
        holder = f"another medfcn train \\(pid {os.getpid()}\\) is writing here; wait for it or choose another --output"
        with pytest.raises(UserError, match=holder):
            train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=out, overrides=overrides, device="cpu")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # no last.pt, no medfcn_run.json


def test_a_lock_file_left_by_a_killed_run_is_harmless(tmp_path):
    scan = _good(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999 medfcn infer\n")  # SIGKILL leaves the file, the kernel the lock
    result = run("infer", BUNDLE, scan, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["scan.nii.gz", "volumes.csv", "volumes.json"]


def _staged(out: Path) -> bool:
    """Whether a mask is staged: a hidden temporary ``.<case>.nii.gz.<random>.tmp.nii.gz`` in ``out``."""
    return out.is_dir() and any(p.name.startswith(".scan_") and p.name.endswith(".tmp.nii.gz") for p in out.iterdir())


def test_sigterm_while_staging_masks_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(8):  # several scans: the first masks wait, staged, while the next are segmented
        _nifti(tmp_path / "in" / f"scan_{k}.nii.gz", rng.random((48, 56, 44)).astype(np.float32))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medfcn", "infer", str(BUNDLE), str(tmp_path / "in"), "--out", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _staged(out):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no mask was staged in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "medfcn: terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], (left, stderr)  # no temporary file, no mask, no table, no lock


SWALLOWED_SIGTERM = """
import os, signal, time
from medfcn.outputs import exit_on_sigterm
exit_on_sigterm()
class Finalised:
    def __del__(self):  # Python swallows what is raised here ("Exception ignored in ...")
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100000))  # the handler runs in here
Finalised()
time.sleep(10)
print("carried on")
"""


def test_sigterm_inside_a_finaliser_still_ends_the_run():
    """A SIGTERM whose exit is swallowed in a ``__del__`` (nibabel has some) is sent again."""
    proc = subprocess.run([sys.executable, "-c", SWALLOWED_SIGTERM], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and proc.stderr == "medfcn: terminated (SIGTERM); removing unfinished output.\n"


def test_file_name_that_is_not_utf8(tmp_path):
    scan = _bytes_path(tmp_path / "in", LATIN1_NAME)
    _nifti(scan, np.random.default_rng(0).random((30, 34, 28)).astype(np.float32))
    out = tmp_path / "out"
    result = run("infer", BUNDLE, scan.parent, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "scan_\\xe9.nii.gz: anterior" in result.output  # printed with the byte escaped
    mask = _bytes_path(out, LATIN1_NAME)
    assert mask.is_file()  # the mask keeps the scan's own bytes, so it sorts beside it
    rows = list(csv.DictReader((out / "volumes.csv").read_text(encoding="utf-8").splitlines()))
    (listed,) = json.loads((out / "volumes.json").read_text(encoding="utf-8"))
    assert (listed["input"], listed["mask"]) == (rows[0]["input"], rows[0]["mask"])
    assert rows[0]["mask"].endswith("scan_\\xe9.nii.gz")
    # the escape is reversible: the table gives back the bytes of both names
    assert codecs.escape_decode(rows[0]["input"].encode())[0] == os.fsencode(scan)
    assert codecs.escape_decode(rows[0]["mask"].encode())[0] == os.fsencode(mask)
    notes = _bytes_path(tmp_path, b"notes_\xe9.txt")
    notes.write_text("not a scan")
    not_a_scan = run("infer", BUNDLE, notes, "--out", tmp_path / "o")
    assert_user_error(not_a_scan, "/notes_\\xe9.txt: not a NIfTI, NRRD or MetaImage file")


def test_dicom_file_name_that_is_not_utf8_is_refused(tmp_path):
    """SimpleITK's DICOM reader aborts the process on such a name: run in a subprocess."""
    series = tmp_path / "series"
    shutil.copytree(need(DICOM) / "PGBM-006_HippoCrop", series)
    first = sorted(series.iterdir())[0]
    first.rename(_bytes_path(series, b"slice_\xe9.dcm"))
    nifti_folder = _bytes_path(tmp_path, b"d\xe9j\xe0")  # a folder of NIfTI files is still read
    _good(tmp_path).parent.rename(nifti_folder)  # tmp_path/in -> tmp_path/d\xe9j\xe0
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medfcn", "infer", str(BUNDLE), nifti_folder, series, "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, timeout=300)
    stderr = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode == 2, stderr
    assert stderr == (
        f"medfcn: error: {series}/slice_\\xe9.dcm: file name is not valid UTF-8 (an old Latin-1 export?), which "
        "SimpleITK (the DICOM, NRRD and MetaImage reader) cannot open; rename it in UTF-8, "
        "e.g. `convmv -f latin1 -t utf8 -r --notest FOLDER`."
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("count", "spec", "text"),
    [
        (1, "g", "1 epoch"),
        (0, "g", "0 epochs"),
        (2, "g", "2 epochs"),
        (1.0, "g", "1 epoch"),
        (1.04, ".1f", "1.0 epochs"),
    ],
)
def test_plural_follows_the_number_as_written(count, spec, text):
    assert plural(count, "epoch", spec) == text
