"""medfcn.infer: masks in the scan's own geometry (NIfTI non-RAS, anisotropic CT, DICOM), volumes."""

from __future__ import annotations

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medfcn.errors import InputWarning, UserError
from medfcn.infer import expand_inputs, infer, label_volumes
from medfcn.masks import mask_name
from medfcn.segmenter import load_segmenter

from .conftest import BUNDLE, BUNDLE_2D, BUNDLES, DICOM, HIPPO, SPLEEN, need


def _same_geometry_as_simpleitk(mask_path, reference: sitk.Image):
    """The mask opens where the scan is: same size, spacing, origin, direction per SimpleITK."""
    mask = sitk.ReadImage(str(mask_path))
    assert mask.GetSize() == reference.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(mask.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask.GetDirection(), reference.GetDirection(), atol=1e-5)
    assert mask.GetPixelID() == sitk.sitkUInt8


def test_reoriented_nifti_gets_the_same_mask_in_world_space(tmp_path):
    """A real case stored with permuted, flipped axes (non-RAS affine): the mask must follow it."""
    case = sorted((need(HIPPO) / "imagesTr").glob("*.nii.gz"))[0]
    original = nib.load(str(case))
    ornt = np.array([[1, -1], [0, 1], [2, -1]])  # stored as (y flipped, x, z flipped): 'PRI'-like
    moved = original.as_reoriented(ornt)
    assert nib.aff2axcodes(moved.affine) != ("R", "A", "S")
    (tmp_path / "in").mkdir()
    nib.save(original, tmp_path / "in" / "ras.nii.gz")
    nib.save(moved, tmp_path / "in" / "moved.nii.gz")
    rows = infer(BUNDLE, [tmp_path / "in"], tmp_path / "out")
    assert [r["mask"].split("/")[-1] for r in rows] == ["moved.nii.gz", "ras.nii.gz"]
    a = nib.load(str(tmp_path / "out" / "ras.nii.gz"))
    b = nib.load(str(tmp_path / "out" / "moved.nii.gz"))
    np.testing.assert_allclose(b.affine, moved.affine, atol=1e-5)
    assert b.shape == moved.shape
    back = b.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(b.affine), nib.io_orientation(a.affine)))
    assert np.mean(np.asarray(back.dataobj) == np.asarray(a.dataobj)) > 0.999
    assert (np.asarray(a.dataobj) > 0).sum() > 1000  # it found a hippocampus
    _same_geometry_as_simpleitk(
        tmp_path / "out" / "moved.nii.gz", sitk.ReadImage(str(tmp_path / "in" / "moved.nii.gz"))
    )


def test_anisotropic_ct_is_resampled_inside_and_back(tmp_path):
    scan = need(SPLEEN) / "imagesTr" / "spleen_2.nii.gz"
    rows = infer(BUNDLE, [scan], tmp_path)
    assert rows[0]["shape"] == "164x166x26" and rows[0]["spacing_mm"] == "0.7949x0.7949x5"
    _same_geometry_as_simpleitk(tmp_path / "spleen_2.nii.gz", sitk.ReadImage(str(scan)))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_dicom_series_masks_match_simpleitk_geometry(tmp_path, bundle):
    folders = [need(DICOM) / f"PGBM-00{k}_HippoCrop" for k in (2, 3, 6)]
    rows = infer(bundle, folders, tmp_path)
    for folder, row in zip(folders, rows, strict=True):
        reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
        _same_geometry_as_simpleitk(tmp_path / f"{folder.name}.nii.gz", reference)
        # a hippocampus is 1.5-5 cm3 per part; both parts must be found on these real crops
        assert 1000 < row["anterior_mm3"] < 5000 and 1000 < row["posterior_mm3"] < 5000, row
    table = json.loads((tmp_path / "volumes.json").read_text())
    assert [t["anterior_mm3"] for t in table] == [r["anterior_mm3"] for r in rows]
    assert (tmp_path / "volumes.csv").read_text().startswith("input,mask,shape")


def test_existing_mask_needs_overwrite(tmp_path, spheres_dataset):
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    out = tmp_path / "out"  # not tmp_path, which holds the scan (refused: tests/test_outputs.py)
    infer(BUNDLE, [scan], out)
    before = (out / "case_000.nii.gz").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        infer(BUNDLE, [scan], out)
    assert (out / "case_000.nii.gz").read_bytes() == before
    infer(BUNDLE, [scan], out, overwrite=True, tta=True)


def test_tta_flips_along_the_trained_axes():
    """--tta on the 3D bundle averages over its left-right flip (axis 0), the one it trained with."""
    assert load_segmenter(BUNDLE, device="cpu", tta=True).inferer.inferer.spatial_axes == [0]
    assert load_segmenter(BUNDLE, device="cpu").inferer.inferer.spatial_axes == []


def test_tta_needs_a_bundle_trained_with_flips(tmp_path, spheres_dataset):
    """The 2D bundle trains on sagittal slices without flips: --tta would only repeat the same
    passes, so it is refused in one line and nothing is written."""
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    with pytest.raises(
        UserError, match=r"common\.json: this model was trained without flips, so --tta has nothing to average"
    ):
        infer(BUNDLE_2D, [scan], tmp_path / "out", tta=True)
    assert not (tmp_path / "out").exists()
    infer(BUNDLE_2D, [scan], tmp_path / "out")
    assert (tmp_path / "out" / "case_000.nii.gz").is_file()


def test_volumes_use_voxel_size():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, :2] = 1
    labels[1, 1, 1] = 2
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    assert label_volumes(labels, affine, ["a", "b"]) == {"a_mm3": 6.0, "b_mm3": 3.0}


def test_input_expansion_and_safe_names(tmp_path):
    with pytest.raises(UserError, match="not found"):
        expand_inputs([tmp_path / "missing.nii.gz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="and no DICOM series in this folder"):
        expand_inputs([tmp_path / "empty"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a NIfTI"):
        expand_inputs([tmp_path / "notes.txt"])
    assert mask_name(tmp_path / ".." / "..hidden.nii.gz") == "hidden.nii.gz"
    assert mask_name(tmp_path / "CASE_1.NII.GZ") == "CASE_1.nii.gz"  # not CASE_1.NII.GZ.nii.gz
    assert "/" not in mask_name(tmp_path / "a" / "b.nii.gz")


def test_bundle_without_weights_is_a_user_error(tmp_path, spheres_dataset):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    with pytest.raises(UserError, match="model.pt: missing"):
        infer(bundle, [spheres_dataset / "imagesTr" / "case_000.nii.gz"], tmp_path / "out")


def _scan(path, shape=(24, 28, 20), affine=None, seed=0):
    """A small float32 noise volume written as NIfTI (a scan, as far as the checks can tell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_probing_a_nifti_folder_prints_nothing(tmp_path, capfd):
    """GDCM writes "WARNING: ... No Series were found" to file descriptor 2 when a folder
    without DICOM is probed; the probe silences it, and restores ITK's setting afterwards."""
    scan = _scan(tmp_path / "in" / "case.nii.gz")
    (tmp_path / "empty").mkdir()
    assert expand_inputs([tmp_path / "in"]) == [scan]
    with pytest.raises(UserError, match="no NIfTI, NRRD or MetaImage files"):
        expand_inputs([tmp_path / "empty"])
    captured = capfd.readouterr()
    assert "GDCM" not in captured.err and "WARNING" not in captured.err, captured.err
    assert captured.err.strip() == ""
    assert sitk.ProcessObject.GetGlobalWarningDisplay()


def test_hidden_files_in_a_folder_are_skipped(tmp_path):
    """macOS AppleDouble files (``._case.nii.gz``, in MSD tarballs) are not scans and must not
    fail the batch; a hidden file named explicitly is still an input."""
    scan = _scan(tmp_path / "in" / "case.nii.gz")
    junk = tmp_path / "in" / "._case.nii.gz"
    junk.write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    assert expand_inputs([tmp_path / "in"]) == [scan]
    assert expand_inputs([junk]) == [junk]


def test_folder_listing_ignores_the_suffixs_letter_case(tmp_path):
    """Scans exported as ``CASE.NII.GZ`` or ``case.Nii`` (Windows tools) are NIfTI files too;
    a link to a missing file is named as such, not as an unreadable image."""
    # renamed after writing: nibabel picks its writer by the lower-case suffix
    upper = _scan(tmp_path / "in" / "a.nii.gz").rename(tmp_path / "in" / "A.NII.GZ")
    mixed = _scan(tmp_path / "in" / "b.nii", seed=1).rename(tmp_path / "in" / "b.Nii")
    (tmp_path / "in" / "notes.txt").write_text("x")
    assert expand_inputs([tmp_path / "in"]) == [upper, mixed]
    (tmp_path / "in" / "c.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(UserError, match=r"c.nii.gz: links to .*gone.nii.gz, which is missing"):
        expand_inputs([tmp_path / "in"])


def test_a_scan_named_twice_is_segmented_once(tmp_path):
    scan = _scan(tmp_path / "in" / "case.nii.gz")
    again = tmp_path / "in" / ".." / "in" / "case.nii.gz"
    assert expand_inputs([tmp_path / "in", scan, again]) == [scan]
    rows = infer(BUNDLE, [scan, tmp_path / "in"], tmp_path / "out")
    assert len(rows) == 1 and json.loads((tmp_path / "out" / "volumes.json").read_text())[0]["input"] == str(scan)


def test_two_scans_with_one_case_name_are_both_named(tmp_path):
    a = _scan(tmp_path / "a" / "case.nii.gz")
    b = _scan(tmp_path / "b" / "case.nii.gz", seed=1)
    with pytest.raises(UserError, match="same case name") as info:
        infer(BUNDLE, [a, b], tmp_path / "out")
    assert str(a) in str(info.value) and str(b) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_written_mask_states_millimetres(tmp_path):
    infer(BUNDLE, [_scan(tmp_path / "case.nii.gz")], tmp_path / "out")
    assert nib.load(tmp_path / "out" / "case.nii.gz").header.get_xyzt_units()[0] == "mm"


def test_single_slice_is_refused_except_across_a_2d_bundles_slice_axis(tmp_path):
    """A one-slice volume gives the 3D network nothing to see (it came out all background); the
    2D bundle segments sagittal slices, so one sagittal slice is a valid input for it alone."""
    axial = _scan(tmp_path / "axial.nii.gz", shape=(24, 28, 1))
    sagittal = _scan(tmp_path / "sagittal.nii.gz", shape=(1, 28, 20))
    with pytest.raises(UserError, match=r"axial.nii.gz: is a single slice \(24 x 28 x 1\)"):
        infer(BUNDLE, [axial], tmp_path / "o1")
    with pytest.raises(UserError, match="sagittal.nii.gz: is a single slice"):
        infer(BUNDLE, [sagittal], tmp_path / "o1")
    with pytest.raises(UserError, match="axial.nii.gz: is a single slice"):
        infer(BUNDLE_2D, [axial], tmp_path / "o2")
    assert not list(tmp_path.glob("o*/*.nii.gz"))
    # stored with the sagittal axis last: still one sagittal slice once reoriented to RAS
    turned = _scan(tmp_path / "turned.nii.gz", shape=(28, 20, 1), affine=np.eye(4)[:, [1, 2, 0, 3]])
    rows = infer(BUNDLE_2D, [sagittal, turned], tmp_path / "o2")
    assert [r["shape"] for r in rows] == ["1x28x20", "28x20x1"]


def test_a_label_map_as_input_warns(tmp_path):
    labels = np.zeros((24, 28, 20), np.uint8)
    labels[5:10, 5:12, 4:9] = 1
    labels[12:18, 8:14, 6:12] = 2
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "in" / "label.nii.gz")
    scan = _scan(tmp_path / "in" / "scan.nii.gz")
    with pytest.warns(InputWarning, match=r"label.nii.gz: looks like a label map \(values 0, 1, 2\), not a scan"):
        infer(BUNDLE, [tmp_path / "in" / "label.nii.gz"], tmp_path / "o1")
    assert (tmp_path / "o1" / "label.nii.gz").is_file()  # segmented anyway
    with warnings.catch_warnings():
        # noise is unlike the bundle's training data (its volumes), a warning tests/test_ood.py checks
        warnings.filterwarnings("error", message=".*looks like a label map", category=InputWarning)
        infer(BUNDLE, [scan], tmp_path / "o2")
