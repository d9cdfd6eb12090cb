"""medfcn.data.readers: the SimpleITK reader gives MONAI's geometry conventions."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage

from medfcn.data.readers import SimpleITKReader, read_dicom_series, sitk_affine_ras

from .conftest import DICOM, HIPPO, need


def _oblique_affine() -> np.ndarray:
    """A non-RAS, non-identity affine: axes permuted and flipped, rotated, anisotropic."""
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    perm = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = rot @ perm @ np.diag([0.8, 1.2, 3.0])
    affine[:3, 3] = [12.5, -40.0, 7.25]
    return affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_matches_nibabel_on_oblique_volume(tmp_path, suffix):
    data = np.random.default_rng(0).random((7, 9, 5)).astype(np.float32)
    affine = _oblique_affine()
    nii = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), nii)
    path = nii
    if suffix == ".mha":  # same image through another format SimpleITK owns
        path = tmp_path / "vol.mha"
        sitk.WriteImage(sitk.ReadImage(str(nii)), str(path))
    img = LoadImage(reader=SimpleITKReader(), image_only=True)(path)
    np.testing.assert_allclose(np.asarray(img), data)
    np.testing.assert_allclose(np.asarray(img.affine), affine, atol=1e-5)
    assert img.meta["space"] == "RAS"
    assert tuple(img.meta["spatial_shape"]) == data.shape


def test_affine_ras_is_lps_with_first_two_axes_negated():
    image = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    image.SetSpacing((0.5, 2.0, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    affine = sitk_affine_ras(image)
    voxel = np.array([1, 2, 3])
    lps = np.array(image.TransformIndexToPhysicalPoint(voxel.tolist()))
    np.testing.assert_allclose((affine @ np.append(voxel, 1))[:3], lps * [-1, -1, 1])


def test_verify_suffix_accepts_folders_and_itk_files(tmp_path):
    reader = SimpleITKReader()
    assert reader.verify_suffix(tmp_path)
    assert reader.verify_suffix("a.nii.gz") and reader.verify_suffix("b.mha")
    assert not reader.verify_suffix("notes.txt")
    strict = SimpleITKReader(nifti=False)
    assert strict.verify_suffix(tmp_path) and not strict.verify_suffix("a.nii.gz")
    with pytest.raises(ValueError, match="nifti=False"):
        strict.read("a.nii.gz")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no DICOM image series"):
        read_dicom_series(tmp_path)


def test_dicom_series_geometry_equals_simpleitk():
    folder = need(DICOM) / "PGBM-002_HippoCrop"
    img = LoadImage(reader=SimpleITKReader(), image_only=True)(folder)
    assert img.shape == (35, 51, 32)  # the folder's README: 35 x 51 x 32 at 1 mm
    ref = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    assert ref.GetSize() == (35, 51, 32)
    np.testing.assert_allclose(ref.GetSpacing(), (1.0, 1.0, 1.0))
    np.testing.assert_allclose(np.asarray(img.affine), sitk_affine_ras(ref))
    np.testing.assert_allclose(np.asarray(img), np.transpose(sitk.GetArrayFromImage(ref), (2, 1, 0)))
    # every voxel maps to the world point SimpleITK gives for it (LPS -> RAS)
    ijk = np.array([34, 50, 31])
    lps = np.array(ref.TransformIndexToPhysicalPoint(ijk.tolist()))
    np.testing.assert_allclose((np.asarray(img.affine) @ np.append(ijk, 1))[:3], lps * [-1, -1, 1], atol=1e-6)


def test_real_nifti_same_as_nibabel_reader():
    path = sorted((need(HIPPO) / "imagesTr").glob("*.nii.gz"))[0]
    a = LoadImage(reader=SimpleITKReader(), image_only=True)(path)
    b = LoadImage(reader="NibabelReader", image_only=True)(path)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-5)


def test_folder_without_dicom_raises_without_itk_output(tmp_path, capfd):
    """GDCM's own "No Series were found" warning (printed by C++ on stderr) stays silent; the
    ValueError says it instead."""
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="no DICOM image series"):
        read_dicom_series(tmp_path)
    assert capfd.readouterr().err == ""
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # restored for everyone else
