"""NRRD and MetaImage scans keep their geometry, masks in the input's format, cohorts with
``--continue-on-error``, and the memory guard that counts the scan's own voxels."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medfcn.cli import app
from medfcn.data.checks import BYTES_PER_VOXEL, memory_need
from medfcn.data.datasets import case_id
from medfcn.data.readers import sitk_affine_ras
from medfcn.errors import UserError
from medfcn.formats import mask_suffix, scan_grid, stage_itk_mask
from medfcn.infer import infer
from medfcn.masks import mask_name

from .conftest import BUNDLE, DICOM, need

runner = CliRunner()
SHAPE = (30, 34, 28)  # x, y, z voxels: about the hippocampus crops the bundle was trained on


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_error_line(result) -> str:
    """The one ``medfcn: error:`` line of a run that exited with 2 (earlier scans' progress lines aside)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("medfcn: error:")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output
    return errors[0]


def nothing_in(folder) -> bool:
    """True when ``folder`` is absent or empty (infer creates --out before the scans are read)."""
    return not folder.exists() or not any(folder.iterdir())


def oblique_scan(path, seed: int = 0):
    """Write a random MR-like scan with anisotropic spacing (0.9, 1.1, 1.3 mm), a non-zero
    origin and a direction rotated 20 degrees about an oblique axis; return the SimpleITK image."""
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random(SHAPE[::-1]) * 1000).astype(np.float32))  # [z, y, x]
    image.SetSpacing((0.9, 1.1, 1.3))
    image.SetOrigin((-12.5, 40.25, 7.0))
    image.SetDirection(sitk.VersorTransform((0.3, 0.5, 0.8), np.deg2rad(20)).GetMatrix())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def labelled_index(mask: np.ndarray) -> tuple[int, int, int]:
    """The (x, y, z) index of a foreground voxel of ``mask`` (x, y, z)."""
    found = np.argwhere(mask > 0)
    assert len(found), "the mask is all background: nothing to compare"
    return tuple(int(i) for i in found[len(found) // 2])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_scan_gives_a_nifti_mask_with_its_geometry(suffix, tmp_path):
    scan = tmp_path / "in" / f"case{suffix}"
    image = oblique_scan(scan)
    # The folder is given: a .mhd's .raw companion must not be taken for a scan of its own.
    result = run("infer", BUNDLE, tmp_path / "in", "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case.nii.gz", "volumes.csv", "volumes.json"]
    mask = nib.load(tmp_path / "out" / "case.nii.gz")
    assert mask.shape == SHAPE
    np.testing.assert_allclose(mask.affine, sitk_affine_ras(image), atol=1e-5)
    # The physical point of a labelled voxel, as ITK (LPS) sees it in the scan and in the mask.
    index = labelled_index(np.asarray(mask.dataobj))
    itk_mask = sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz"))
    np.testing.assert_allclose(
        itk_mask.TransformIndexToPhysicalPoint(index), image.TransformIndexToPhysicalPoint(index), atol=1e-4
    )


@pytest.mark.parametrize(("suffix", "mask"), [(".nrrd", "case.nrrd"), (".mha", "case.mha"), (".mhd", "case.mha")])
def test_mask_format_input_keeps_the_scans_format_and_header(suffix, mask, tmp_path):
    scan = tmp_path / "in" / f"case{suffix}"
    oblique_scan(scan)
    image = sitk.ReadImage(str(scan))  # the geometry as the file states it (NRRD stores spacing * direction)
    out = tmp_path / "out"
    result = run("infer", BUNDLE, scan, "--out", out, "--device", "cpu", "--mask-format", "input")
    assert result.exit_code == 0, result.output
    written = sitk.ReadImage(str(out / mask))
    assert written.GetSize() == image.GetSize()
    assert written.GetPixelID() == sitk.sitkUInt8
    # copied from the scan's header: equal up to the last bit (a NRRD stores spacing * direction,
    # which ITK divides when reading and multiplies when writing)
    for got, want in [(written.GetOrigin(), image.GetOrigin()), (written.GetSpacing(), image.GetSpacing())]:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), rtol=0, atol=1e-12)
    labels = sitk.GetArrayFromImage(written).transpose(2, 1, 0)
    index = labelled_index(labels)
    np.testing.assert_allclose(
        written.TransformIndexToPhysicalPoint(index), image.TransformIndexToPhysicalPoint(index), rtol=0, atol=1e-9
    )
    row = json.loads((out / "volumes.json").read_text())[0]
    voxel_mm3 = 0.9 * 1.1 * 1.3
    assert row["anterior_mm3"] == pytest.approx((labels == 1).sum() * voxel_mm3, abs=1e-2)


def _raw_nrrd(path, header_lines: list[str], data: np.ndarray, detached: bool = False) -> None:
    """Write an NRRD by hand (as 3D Slicer does, in RAS space): header, blank line, raw voxels."""
    lines = ["NRRD0004", "type: float", "dimension: 3", *header_lines, "encoding: raw", "endian: little"]
    raw = data.astype("<f4").tobytes(order="F")  # x fastest
    if detached:
        (path.with_suffix(".raw")).write_bytes(raw)
        path.write_text("\n".join([*lines, f"data file: {path.with_suffix('.raw').name}"]) + "\n")
    else:
        path.write_bytes(("\n".join(lines) + "\n\n").encode() + raw)


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr"])
def test_nrrd_in_ras_space_is_placed_where_its_header_says(suffix, tmp_path):
    """A NRRD whose ``space`` is right-anterior-superior: its directions and origin are RAS
    already, so the mask's affine is exactly them (ITK turns them into LPS, medfcn back)."""
    rng = np.random.default_rng(1)
    scan = tmp_path / "in" / f"case{suffix}"
    scan.parent.mkdir()
    header = [
        "space: right-anterior-superior",
        f"sizes: {' '.join(map(str, SHAPE))}",
        "space directions: (0,-1.1,0) (0.9,0,0) (0,0,1.3)",
        "kinds: domain domain domain",
        "space origin: (10.5,-20.25,30)",
    ]
    _raw_nrrd(scan, header, rng.random(SHAPE) * 1000, detached=suffix == ".nhdr")
    result = run("infer", BUNDLE, tmp_path / "in", "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    expected = np.array([[0, 0.9, 0, 10.5], [-1.1, 0, 0, -20.25], [0, 0, 1.3, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(nib.load(tmp_path / "out" / "case.nii.gz").affine, expected, atol=1e-5)


def test_nifti_scan_gives_an_mha_mask_with_its_affine(tmp_path):
    affine = np.array([[0, -1.1, 0, 5.0], [0.9, 0, 0, -7.0], [0, 0, 1.3, 11.0], [0, 0, 0, 1]])
    rng = np.random.default_rng(2)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image((rng.random(SHAPE) * 1000).astype(np.float32), affine), scan)
    result = run("infer", BUNDLE, scan, "--out", tmp_path / "out", "--device", "cpu", "--mask-format", "mha")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(sitk_affine_ras(sitk.ReadImage(str(tmp_path / "out" / "scan.mha"))), affine, atol=1e-6)


def test_sheared_affine_is_refused_for_itk_masks(tmp_path):
    import contextlib

    sheared = np.array([[1.0, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    with contextlib.ExitStack() as stack, pytest.raises(UserError, match="not perpendicular.*--mask-format nifti"):
        stage_itk_mask(stack, np.zeros(SHAPE, np.uint8), sheared, tmp_path / "scan.nii.gz", tmp_path / "scan.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_names_and_refusals_of_itk_inputs(tmp_path):
    for name in ("a.nrrd", "a.NHDR", "a.mha", "a.MHD", "a.nii.gz"):
        assert case_id(tmp_path / name) == "a"
    assert mask_name(tmp_path / "b.nhdr", mask_suffix(tmp_path / "b.nhdr", "input")) == "b.nrrd"
    assert mask_suffix(tmp_path / "dicom_folder", "input") == ".nii.gz"
    oblique_scan(tmp_path / "in" / "case.nrrd")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), tmp_path / "in" / "case.nii.gz")
    line = one_error_line(run("infer", BUNDLE, tmp_path / "in", "--out", tmp_path / "out"))
    assert "same case name, so both masks would be case.nii.gz" in line
    oblique_scan(tmp_path / "mhd" / "case.mhd")
    line = one_error_line(run("infer", BUNDLE, tmp_path / "mhd" / "case.raw", "--out", tmp_path / "out"))
    assert "case.raw: not a NIfTI, NRRD or MetaImage file" in line
    (tmp_path / "mhd" / "case.raw").unlink()
    line = one_error_line(run("infer", BUNDLE, tmp_path / "mhd" / "case.mhd", "--out", tmp_path / "out"))
    assert "case.mhd: its data file " in line and "case.raw is missing; put it beside the header" in line
    line = one_error_line(run("infer", BUNDLE, tmp_path / "in", "--out", tmp_path / "o", "--mask-format", "png"))
    assert "--mask-format 'png': not a mask format; use nifti, input, nrrd, mha." in line
    assert nothing_in(tmp_path / "out") and nothing_in(tmp_path / "o")


# --- cohorts: --continue-on-error ---


def _cohort(tmp_path):
    """Two good scans (NIfTI, MetaImage) and one with a NaN voxel between them."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(nib.Nifti1Image((rng.random(SHAPE) * 1000).astype(np.float32), np.eye(4)), folder / "a.nii.gz")
    bad = (rng.random(SHAPE) * 1000).astype(np.float32)
    bad[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), folder / "b_nan.nii.gz")
    oblique_scan(folder / "c.mha")
    return folder


def test_continue_on_error_lists_the_bad_scan_and_writes_the_others(tmp_path):
    folder = _cohort(tmp_path)
    out = tmp_path / "out"
    one_error_line(run("infer", BUNDLE, folder, "--out", out, "--device", "cpu"))
    assert nothing_in(out)  # all or nothing without the flag

    result = run("infer", BUNDLE, folder, "--out", out, "--device", "cpu", "--continue-on-error")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert f"medfcn: failed: {folder / 'b_nan.nii.gz'}: has 1 NaN/Inf voxels" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "a.nii.gz",
        "c.nii.gz",
        "failures.csv",
        "failures.json",
        "volumes.csv",
        "volumes.json",
    ]
    with open(out / "failures.csv", newline="") as table:
        failures = list(csv.DictReader(table))
    assert failures == [
        {"input": str(folder / "b_nan.nii.gz"), "reason": "has 1 NaN/Inf voxels; fix or mask them before segmenting."}
    ]
    assert json.loads((out / "failures.json").read_text()) == failures
    with open(out / "volumes.csv", newline="") as table:
        assert [row["input"] for row in csv.DictReader(table)] == [str(folder / "a.nii.gz"), str(folder / "c.mha")]


def test_continue_on_error_python_api_and_all_failed(tmp_path):
    folder = _cohort(tmp_path)
    rows = infer(BUNDLE, [folder / "b_nan.nii.gz"], tmp_path / "out", device="cpu", continue_on_error=True)
    assert rows == [] and [f["input"] for f in rows.failures] == [str(folder / "b_nan.nii.gz")]
    assert (tmp_path / "out" / "volumes.csv").read_text().startswith("input,mask,shape,")  # header only
    # Errors that are not about one scan still stop everything: a missing input, a bad bundle.
    for args in ([BUNDLE, folder / "missing.nii.gz"], [tmp_path / "no_bundle", folder]):
        line = one_error_line(run("infer", *args, "--out", tmp_path / "o2", "--continue-on-error"))
        assert "not found" in line
        assert nothing_in(tmp_path / "o2")


def test_continue_on_error_lists_a_broken_dicom_series(tmp_path):
    """A series folder with a slice missing is a bad scan of the cohort, not the end of the run."""
    import shutil

    broken = tmp_path / "in" / "series_gap"
    shutil.copytree(need(DICOM) / "PGBM-002_HippoCrop", broken)
    (broken / "16.dcm").unlink()  # a slice from the middle
    good = tmp_path / "in" / "good.mha"
    oblique_scan(good)
    out = tmp_path / "out"
    one_error_line(run("infer", BUNDLE, broken, good, "--out", out, "--device", "cpu"))
    assert nothing_in(out)
    result = run("infer", BUNDLE, broken, good, "--out", out, "--device", "cpu", "--continue-on-error")
    assert result.exit_code == 3, result.output
    failures = json.loads((out / "failures.json").read_text())
    assert [f["input"] for f in failures] == [str(broken)]
    assert failures[0]["reason"].startswith("slice positions are uneven")
    assert (out / "good.nii.gz").exists() and not (out / "series_gap.nii.gz").exists()


# --- memory guard: the scan's own voxels count too ---


def test_memory_guard_counts_the_scans_own_grid(tmp_path):
    """A 0.125 mm scan: 120 x 120 x 80 voxels is 15 x 15 x 10 at the model's 1 mm. The
    model grid alone needs 0.14 MB, the scan's own grid (loaded, inverted probabilities, labels)
    about 74 MB: a 0.01 GiB budget lies between and must refuse it."""
    shape, spacing = (120, 120, 80), (0.125, 0.125, 0.125)
    need_bytes, model_voxels, input_voxels = memory_need(shape, spacing, 1, (1.0, 1.0, 1.0), 3)
    budget = 0.01 * 2**30
    assert model_voxels * BYTES_PER_VOXEL < budget < need_bytes
    scan = tmp_path / "fine.nii"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.diag([*spacing, 1.0])), scan)
    result = run("infer", BUNDLE, scan, "--out", tmp_path / "out", env={"MEDFCN_MAX_MEMORY_GB": "0.01"})
    line = one_error_line(result)
    assert f"{scan}: needs about 0.0688 GiB (1.15 M voxels on its own grid, 0.00225 M at the model's spacing)" in line
    assert "over the 0.01 GiB budget; crop the scan or raise MEDFCN_MAX_MEMORY_GB." in line
    assert nothing_in(tmp_path / "out")


def _truncated_nifti(path, shape, zooms):
    """A .nii whose header promises ``shape`` uint8 voxels while the file holds a few bytes."""
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.diag([*zooms, 1.0])), path)
    header = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    header.set_data_shape(shape)
    path.write_bytes(header.binaryblock + path.read_bytes()[348:])


def _truncated_mha(path, shape, zooms):
    lines = ["ObjectType = Image", "NDims = 3", f"DimSize = {' '.join(map(str, shape))}"]
    lines += [f"ElementSpacing = {' '.join(map(str, zooms))}", "ElementType = MET_UCHAR", "ElementDataFile = LOCAL"]
    path.write_bytes(("\n".join(lines) + "\n").encode() + bytes(16))


@pytest.mark.parametrize("make", [_truncated_nifti, _truncated_mha], ids=["nii", "mha"])
def test_memory_guard_refuses_before_reading_the_voxels(make, tmp_path):
    """The header says 400^3 voxels of 0.1 mm (3.8 GiB to segment) but the file holds 16 bytes:
    only a refusal from the header alone names the memory, reading would fail first."""
    scan = tmp_path / ("huge.nii" if make is _truncated_nifti else "huge.mha")
    make(scan, (400, 400, 400), (0.1, 0.1, 0.1))
    result = run("infer", BUNDLE, scan, "--out", tmp_path / "out", env={"MEDFCN_MAX_MEMORY_GB": "1"})
    assert f"{scan}: needs about 3.82 GiB (64 M voxels on its own grid" in one_error_line(result)


def test_header_grid_of_a_dicom_series_matches_the_read_series():
    folder = need(DICOM) / "PGBM-002_HippoCrop"
    from medfcn.data.readers import read_dicom_series

    image = read_dicom_series(folder)
    grid = scan_grid(folder)
    assert grid.shape == image.GetSize()
    np.testing.assert_allclose(grid.spacing, image.GetSpacing(), rtol=1e-4)
