"""Where the slices of issue 22 meet: cohorts (--continue-on-error) with broken DICOM series,
non-UTF-8 names and exports; stray odd names in NIfTI folders; training-data profiles; ITK masks
on a full disk."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
import SimpleITK as sitk

from medfcn.data.profile import RUN_PROFILE, write_run_profile
from medfcn.errors import UserError
from medfcn.infer import infer

from .conftest import BUNDLE, DICOM, REPO, need
from .test_bad_inputs import _good, assert_user_error, run
from .test_outputs import _bytes_path


def _broken_series(tmp_path, name):
    """A copy of a real series with its middle slice removed (refused: a slice is missing)."""
    series = tmp_path / name
    shutil.copytree(need(DICOM) / "PGBM-002_HippoCrop", series)
    files = sorted(series.iterdir())
    files[len(files) // 2].unlink()
    return series


def _failures(out):
    with open(out / "failures.csv", newline="") as table:
        return list(csv.DictReader(table))


def test_cohort_lists_a_dicom_folder_with_a_non_utf8_name_instead_of_aborting(tmp_path):
    """GDCM aborts the process on such a name; the cohort run lists the folder as failed (it
    once probed it with GDCM after the refusal: exit 134, nothing cleaned up)."""
    series = tmp_path / "series"
    shutil.copytree(need(DICOM) / "PGBM-006_HippoCrop", series)
    sorted(series.iterdir())[0].rename(_bytes_path(series, b"slice_\xe9.dcm"))
    good, out = _good(tmp_path), tmp_path / "out"
    command = [sys.executable, "-m", "medfcn", "infer", str(BUNDLE), str(good), str(series), "--out", str(out)]
    proc = subprocess.run([*command, "--continue-on-error"], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 3, proc.stderr.decode("utf-8", "replace")
    (failure,) = _failures(out)
    assert failure["input"] == str(series) and "not valid UTF-8" in failure["reason"]
    assert (out / "scan.nii.gz").is_file()


def test_cohort_writes_tables_for_a_failed_scan_with_a_non_utf8_name(tmp_path):
    """The failure's input and reason name the file as text (\\xNN): the tables are written and
    the good scan's mask kept (a surrogate once failed the table after all the work)."""
    good = _good(tmp_path)
    bad = _bytes_path(good.parent, b"bad_\xe9.nii.gz")
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit: the gzip CRC check refuses it
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = run("infer", BUNDLE, good.parent, "--out", out, "--continue-on-error")
    assert result.exit_code == 3, result.output
    (failure,) = _failures(out)
    assert failure["input"].endswith("bad_\\xe9.nii.gz") and "is corrupt" in failure["reason"]
    assert json.loads((out / "failures.json").read_text())[0]["input"] == failure["input"]
    assert (out / "scan.nii.gz").is_file()


def test_cohort_lists_a_broken_series_of_an_export_and_segments_the_others(tmp_path):
    export = tmp_path / "export"
    shutil.copytree(need(DICOM) / "PGBM-002_HippoCrop", export / "P1" / "S1")
    _broken_series(tmp_path, "broken").rename(export / "P2")
    rows = infer(BUNDLE, [export], tmp_path / "out", continue_on_error=True)
    assert [row["mask"] for row in rows] == [str(tmp_path / "out" / "P1_S1.nii.gz")]
    assert [f["input"] for f in rows.failures] == [str(export / "P2")]
    assert "a slice is missing" in rows.failures[0]["reason"]
    with pytest.raises(UserError, match="a slice is missing"):  # without the flag: all or nothing
        infer(BUNDLE, [export], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_out_over_a_series_left_out_of_a_cohort_is_refused(tmp_path):
    broken = _broken_series(tmp_path, "broken")
    before = sorted(p.name for p in broken.iterdir())
    result = run("infer", BUNDLE, _good(tmp_path), broken, "--out", broken, "--continue-on-error")
    assert_user_error(result, "is or holds the input")
    assert sorted(p.name for p in broken.iterdir()) == before


def test_a_stray_non_utf8_file_in_a_nifti_folder_is_no_reason_to_refuse(tmp_path):
    good = _good(tmp_path)
    _bytes_path(good.parent, b"notes_\xe9.txt").write_text("not a scan")
    result = run("infer", BUNDLE, good.parent, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "scan.nii.gz").is_file()


@pytest.mark.parametrize(
    "edit", [lambda p: p.pop("cases"), lambda p: p.update(volume_mm3=[1, 2])], ids=["no_cases", "volumes_list"]
)
def test_profile_missing_what_the_warning_reads_is_one_line(edit, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    edit(meta["medfcn_training_data"])
    meta_file.write_text(json.dumps(meta))
    result = run("infer", bundle, _good(tmp_path), "--out", tmp_path / "out")
    assert_user_error(result, "metadata.json: medfcn_training_data is malformed")
    assert not (tmp_path / "out").exists()


def test_a_new_run_replaces_the_profile_a_failed_run_left(tmp_path):
    cases = [{"image": str(_good(tmp_path))}]
    (tmp_path / RUN_PROFILE).write_text('{"stale": true}\n')
    write_run_profile(tmp_path, cases, ["anterior", "posterior"], "resume", replace=False)
    assert json.loads((tmp_path / RUN_PROFILE).read_text()) == {"stale": True}  # a resume keeps it
    write_run_profile(tmp_path, cases, ["anterior", "posterior"], "new run")
    assert json.loads((tmp_path / RUN_PROFILE).read_text())["cases"] == 1


def test_full_disk_writing_an_itk_mask_is_one_line(tmp_path, monkeypatch):
    def no_space(image, path, *args):
        with open(path, "wb") as partial:
            partial.write(b"NRRD0004\n")
        raise RuntimeError(f"itk::ERROR: NrrdImageIO: Write: Error writing {path}: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", no_space)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"scan.nrrd: cannot be written \(No space left on device\); free space"):
        infer(BUNDLE, [_good(tmp_path)], out, mask_format="nrrd")
    assert not out.exists() or not any(out.iterdir())
