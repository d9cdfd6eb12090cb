"""NIfTI integrity and geometry: a damaged .nii.gz is refused everywhere it decides a result, and
a mask carries its scan's qform, sform, codes and units, so nibabel and ITK place every mask
voxel where they place the scan's."""

from __future__ import annotations

import gzip
import shutil
import struct
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medfcn.cli import app
from medfcn.data.checks import check_training_pairs
from medfcn.data.nifti import check_gzip_integrity, check_nifti_geometry
from medfcn.data.readers import quiet_itk
from medfcn.errors import InputWarning, UserError
from medfcn.evaluate import evaluate_folders
from medfcn.infer import infer

from .conftest import BUNDLE, HIPPO, need

runner = CliRunner()
CASE = "hippocampus_004.nii.gz"  # 36 x 52 x 38 voxels of 1 mm, with both labels
# RAS affine of the variants: x flipped (a radiological file) and an offset
AFFINE = np.array([[-1.0, 0, 0, 10], [0, 1.0, 0, -20], [0, 0, 1.0, 5], [0, 0, 0, 1]])


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output, result.exception)
    assert lines[0].startswith("medfcn: error:") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def flip_a_bit(source, target):
    """Copy ``source`` (.nii.gz) to ``target`` with one bit flipped in the middle of its deflate
    data, at the first position from the middle where nibabel still reads the file without
    complaint but reads other voxels: the silent case."""
    data = bytearray(source.read_bytes())
    expected = np.asarray(nib.load(source).dataobj)
    for position in range(len(data) // 2, len(data) - 8):
        damaged = data.copy()
        damaged[position] ^= 0x10
        target.write_bytes(bytes(damaged))
        try:
            voxels = np.asarray(nib.load(target).dataobj)
        except Exception:
            continue
        if voxels.shape == expected.shape and not np.array_equal(voxels, expected):
            return target
    raise AssertionError("no silent bit flip found")


@pytest.fixture
def damaged(tmp_path):
    """A copy of a real case with one bit flipped, in ``tmp_path / "in"``."""
    (tmp_path / "in").mkdir()
    return flip_a_bit(need(HIPPO) / "imagesTr" / CASE, tmp_path / "in" / CASE)


def test_flipped_bit_is_refused_by_infer(damaged, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run("infer", BUNDLE, damaged, "--out", out), str(damaged), "is corrupt", "re-copy")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("which", ["imagesTr", "labelsTr"])
def test_flipped_bit_is_refused_by_training_checks(which, spheres_dataset, tmp_path):
    path = spheres_dataset / which / "case_003.nii.gz"
    flip_a_bit(path, path.with_name("tmp.nii.gz")).replace(path)
    sets = ["--set", f"folds_file={spheres_dataset / 'folds.json'}"]
    result = run("train", BUNDLE, "--data", spheres_dataset, "--output", tmp_path / "run", "--epochs", "1", *sets)
    assert_one_line_error(result, f"{which}/case_003.nii.gz: is corrupt", "CRC")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("which", ["pred", "labels"])
def test_flipped_bit_is_refused_by_evaluate(which, tmp_path):
    label = need(HIPPO) / "labelsTr" / CASE
    for folder in ("pred", "labels"):
        (tmp_path / folder).mkdir()
        shutil.copy(label, tmp_path / folder / CASE)
    flip_a_bit(label, tmp_path / which / CASE)
    result = run("evaluate", tmp_path / "pred", tmp_path / "labels")
    assert_one_line_error(result, f"{which}/{CASE}: is corrupt", "CRC")
    assert not (tmp_path / "pred" / "metrics.csv").exists()


@pytest.mark.parametrize("field, reason", [(-8, "gzip CRC check failed"), (-1, "gzip length check failed")])
def test_every_gzip_member_is_checked(field, reason, tmp_path):
    """A .gz may hold several members; the second one's CRC32 (8 bytes from the end) and length
    (the last 4 bytes) are checked too."""
    path = tmp_path / "two_members.nii.gz"
    stream = bytearray(gzip.compress(b"first member " * 100) + gzip.compress(b"second member " * 100))
    path.write_bytes(bytes(stream))
    check_gzip_integrity(path)  # intact: no error
    stream[field] ^= 0x01
    path.write_bytes(bytes(stream))
    with pytest.raises(UserError, match=f"two_members.nii.gz: is corrupt \\({reason}"):
        check_gzip_integrity(path)


def _variant(tmp_path, name, qform, sform, units="mm", qcode=1, scode=1):
    """The real case with the given qform, sform (4x4, in ``units``), codes and units."""
    source = nib.load(need(HIPPO) / "imagesTr" / CASE)
    image = nib.Nifti1Image(np.asarray(source.dataobj, dtype=np.float32), None)
    image.set_qform(qform, code=qcode)
    image.set_sform(sform, code=scode)
    image.header.set_xyzt_units(units)
    path = tmp_path / "in" / f"{name}.nii.gz"
    path.parent.mkdir(exist_ok=True)
    nib.save(image, path)
    return path


def _segment(path, tmp_path):
    """infer on ``path``: the row, the mask and the InputWarnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        row = infer(BUNDLE, [path], tmp_path / "out" / path.name.split(".")[0], device="cpu")[0]
    said = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
    return row, nib.load(row["mask"]), said


def _assert_same_geometry(mask, scan_path):
    """Mask and scan: equal qform, sform, codes, qfac, voxel sizes and units (unknown: mm), and
    a labelled voxel placed at one position by nibabel and by ITK (its own qform/sform choice)."""
    scan = nib.load(scan_path)
    for form in ("get_qform", "get_sform"):  # (affine or None when its code is 0, code)
        (mine, my_code), (theirs, their_code) = getattr(mask, form)(coded=True), getattr(scan, form)(coded=True)
        assert my_code == their_code, (form, my_code, their_code)
        assert (mine is None and theirs is None) or np.array_equal(mine, theirs), (form, mine, theirs)
    assert np.array_equal(mask.header["pixdim"][:4], scan.header["pixdim"][:4])
    unit = scan.header.get_xyzt_units()[0]
    assert mask.header.get_xyzt_units()[0] == ("mm" if unit == "unknown" else unit)
    assert mask.shape == scan.shape
    labelled = np.argwhere(np.asarray(mask.dataobj) > 0)
    assert len(labelled), "the mask is empty"
    ijk = labelled[len(labelled) // 2]
    np.testing.assert_array_equal(mask.affine @ [*ijk, 1], scan.affine @ [*ijk, 1])
    with quiet_itk():  # ITK warns about a sheared sform (and then uses the qform)
        scan_itk, mask_itk = sitk.ReadImage(str(scan_path)), sitk.ReadImage(str(mask.get_filename()))
    index = [int(i) for i in ijk]
    assert scan_itk.TransformIndexToPhysicalPoint(index) == mask_itk.TransformIndexToPhysicalPoint(index)


def test_disagreeing_qform_and_sform_are_both_kept_and_warned(tmp_path):
    flipped = AFFINE.copy()
    flipped[0] = [1.0, 0, 0, -29]  # left-right flipped and 39 mm off across the volume
    path = _variant(tmp_path, "disagree", AFFINE, flipped, scode=2)
    row, mask, said = _segment(path, tmp_path)
    _assert_same_geometry(mask, path)
    assert len(said) == 1 and "qform and sform disagree (up to 39 mm apart)" in said[0], said


def test_sheared_sform_is_kept_and_volumes_use_the_true_voxel_volume(tmp_path):
    sheared = AFFINE.copy()
    sheared[0, 1] = 0.3  # columns of 1 and 1.044 mm, voxels of 1 mm^3
    path = _variant(tmp_path, "shear", AFFINE, sheared, scode=2)
    row, mask, _ = _segment(path, tmp_path)
    _assert_same_geometry(mask, path)
    labels = np.asarray(mask.dataobj)
    assert row["anterior_mm3"] == pytest.approx(float((labels == 1).sum()) * 1.0)
    assert row["spacing_mm"] == "1x1.044x1"


@pytest.mark.parametrize("units, scale", [("meter", 1e-3), ("micron", 1e3)])
def test_metres_and_microns_give_the_labels_and_volumes_of_mm(units, scale, tmp_path):
    in_mm = _variant(tmp_path, "mm", AFFINE, AFFINE)
    other = np.diag([scale] * 3 + [1.0]) @ AFFINE
    path = _variant(tmp_path, units, other, other, units=units)
    reference, reference_mask, _ = _segment(in_mm, tmp_path)
    row, mask, said = _segment(path, tmp_path)
    assert said == []
    _assert_same_geometry(mask, path)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(reference_mask.dataobj))
    assert reference["anterior_mm3"] > 0 and reference["posterior_mm3"] > 0
    for key in ("anterior_mm3", "posterior_mm3", "spacing_mm"):
        assert row[key] == reference[key]


def test_no_qform_and_no_sform_is_warned_and_kept(tmp_path):
    path = _variant(tmp_path, "nocode", AFFINE, AFFINE, qcode=0, scode=0)
    row, mask, said = _segment(path, tmp_path)
    _assert_same_geometry(mask, path)
    assert len(said) == 1, said
    assert "no qform and no sform (both codes 0)" in said[0] and "assumed LAS axes and 1 x 1 x 1 mm voxels" in said[0]


def test_mm_scan_from_the_dataset_gives_no_geometry_warning(tmp_path):
    path = need(HIPPO) / "imagesTr" / CASE  # qform = sform, code 1, mm
    row, mask, said = _segment(path, tmp_path)
    assert said == []
    _assert_same_geometry(mask, path)


@pytest.mark.parametrize("defect", ["zero_voxel_size", "collinear_axes"])
def test_singular_affine_is_refused_in_one_line(defect, tmp_path):
    if defect == "zero_voxel_size":  # a qform alone, with pixdim[2] = 0
        path = _variant(tmp_path, defect, AFFINE, AFFINE, scode=0)
        image = nib.load(path)
        image = nib.Nifti1Image(np.asarray(image.dataobj), None, header=image.header.copy())
        image.header["pixdim"][2] = 0
        nib.save(image, path)
        fragment = "its qform is singular (voxel size 1 x 0 x 1"
    else:
        collinear = AFFINE.copy()
        collinear[:3, 1] = collinear[:3, 0]
        path = _variant(tmp_path, defect, AFFINE, collinear, scode=2)
        fragment = "its sform is singular"
    out = tmp_path / "out"
    assert_one_line_error(run("infer", BUNDLE, path, "--out", out), str(path), fragment, "fix the header")
    assert not out.exists() or not any(out.iterdir())


def test_qfac_zero_is_read_as_one_not_refused(tmp_path):
    """pixdim[0] (qfac) = 0, common in old files, is 1 by the NIfTI standard: no error, no
    warning (nibabel's raw qform would raise on it)."""
    path = tmp_path / "qfac0.nii"
    rotation = AFFINE @ np.diag([1.0, -1.0, 1.0, 1.0])  # det +1: qfac 1 and 0 mean the same
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    image.set_qform(rotation, code=1)
    image.set_sform(rotation, code=0)
    nib.save(image, path)
    stored = bytearray(path.read_bytes())
    stored[76:80] = struct.pack("<f", 0.0)  # pixdim[0], which nibabel will not save as 0
    path.write_bytes(bytes(stored))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        np.testing.assert_allclose(check_nifti_geometry(path).affine, rotation)


def test_training_refuses_files_not_in_mm(spheres_dataset):
    path = spheres_dataset / "imagesTr" / "case_001.nii.gz"
    image = nib.load(path)
    image.header.set_xyzt_units("meter")
    nib.save(image, path)
    datalist = [{"image": str(path), "label": str(spheres_dataset / "labelsTr" / "case_001.nii.gz")}]
    with pytest.raises(UserError, match="case_001.nii.gz: spatial units are meters"):
        check_training_pairs(datalist, num_classes=3)


def test_evaluate_compares_and_measures_in_mm(tmp_path):
    """A mask in metres over a label in mm of the same grid is scored, with HD95 in mm."""
    label = np.zeros((20, 20, 20), np.uint8)
    label[5:10, 5:10, 5:10] = 1
    pred = np.roll(label, 2, axis=0)
    for folder, units, scale, data in [("labels", "mm", 1.0, label), ("pred", "meter", 1e-3, pred)]:
        image = nib.Nifti1Image(data, np.diag([2 * scale] * 3 + [1.0]))
        image.header.set_xyzt_units(units)
        (tmp_path / folder).mkdir()
        nib.save(image, tmp_path / folder / "a.nii.gz")
    rows, _ = evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    assert rows[0]["hd95_1"] == pytest.approx(4.0)  # 2 voxels of 2 mm
