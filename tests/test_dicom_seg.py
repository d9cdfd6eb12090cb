"""medfcn infer --dicom-seg: DICOM Segmentation objects (highdicom) of DICOM series inputs, read
back voxel for voxel against the NIfTI mask, referencing the source series and instances."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medfcn.errors import UserError
from medfcn.infer import Extras, infer

from .conftest import BUNDLE, DICOM, need, need_module

hd = need_module("highdicom", "pip install -e '.[dicom]'; .ci/run does")
SEG = Extras(dicom_seg=True)


def _series(folder):
    """The series' files in SimpleITK's (GDCM's) order and their SOP instance UIDs."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    return files, [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]


@pytest.mark.parametrize("name", ["PGBM-002_HippoCrop", "PGBM-003_T1post"])  # a crop; the oblique whole head
def test_segments_equal_the_nifti_mask_on_every_source_slice(tmp_path, name):
    folder = need(DICOM) / name
    infer(BUNDLE, [folder], tmp_path, extras=SEG)
    files, uids = _series(folder)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}.nii.gz")))  # (slice, row, column)
    assert mask.shape[0] == len(files) and mask.any()
    seg = hd.seg.segread(str(tmp_path / f"{name}_seg.dcm"))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, mask)  # by each slice's SOP instance UID: voxel for voxel
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(uids)


def test_pydicom_reads_the_segments_with_their_class_names(tmp_path):
    folder = need(DICOM) / "PGBM-006_HippoCrop"
    infer(BUNDLE, [folder], tmp_path, extras=SEG)
    dataset = pydicom.dcmread(tmp_path / "PGBM-006_HippoCrop_seg.dcm")
    source = pydicom.dcmread(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))[0], stop_before_pixels=True)
    assert dataset.Modality == "SEG" and dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert [s.SegmentLabel for s in dataset.SegmentSequence] == ["anterior", "posterior"]
    assert (
        dataset.StudyInstanceUID == source.StudyInstanceUID
        and dataset.FrameOfReferenceUID == source.FrameOfReferenceUID
    )
    assert dataset.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert "hippocampus_fcn" in dataset.SegmentSequence[0].SegmentAlgorithmName


def test_a_nifti_input_is_refused_in_one_line_before_anything_is_written(tmp_path, spheres_dataset):
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    with pytest.raises(UserError, match=r"case_000.nii.gz: not a DICOM series; --dicom-seg writes DICOM SEG"):
        infer(BUNDLE, [scan], tmp_path / "out", extras=SEG)
    assert not (tmp_path / "out").exists()


def test_without_highdicom_the_message_names_the_install(tmp_path, monkeypatch):
    folder = need(DICOM) / "PGBM-002_HippoCrop"
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import fails as when it is not installed
    with pytest.raises(UserError, match=r"--dicom-seg needs highdicom.*pip install 'highdicom>=0.23' 'pydicom>=3'"):
        infer(BUNDLE, [folder], tmp_path / "out", extras=SEG)
    assert not (tmp_path / "out").exists()


def test_the_nifti_mask_is_unchanged_by_the_seg(tmp_path):
    folder = need(DICOM) / "PGBM-002_HippoCrop"
    infer(BUNDLE, [folder], tmp_path / "plain")
    infer(BUNDLE, [folder], tmp_path / "seg", extras=SEG)
    a, b = (nib.load(tmp_path / k / "PGBM-002_HippoCrop.nii.gz") for k in ("plain", "seg"))
    assert a.header.binaryblock == b.header.binaryblock and np.array_equal(a.dataobj, b.dataobj)


def test_a_scan_whose_seg_fails_leaves_none_of_its_files(tmp_path, monkeypatch):
    """--continue-on-error: the failed scan's mask and maps, staged before its SEG failed, are not
    renamed into --out with the batch's."""
    import medfcn.infer

    folders = [need(DICOM) / name for name in ("PGBM-002_HippoCrop", "PGBM-006_HippoCrop")]
    real = medfcn.infer.stage_dicom_seg

    def failing(stack, folder, *args, **kwargs):
        if folder.name == "PGBM-006_HippoCrop":
            raise UserError(f"{folder}: its DICOM SEG cannot be made (test)")
        return real(stack, folder, *args, **kwargs)

    monkeypatch.setattr(medfcn.infer, "stage_dicom_seg", failing)
    extras = Extras(uncertainty=True, dicom_seg=True)
    rows = infer(BUNDLE, folders, tmp_path, extras=extras, continue_on_error=True)
    assert [r["input"] for r in rows] == [str(folders[0])] and len(rows.failures) == 1
    written = sorted(p.name for p in tmp_path.iterdir())
    assert not [name for name in written if name.startswith("PGBM-006")], written
    assert {"PGBM-002_HippoCrop.nii.gz", "PGBM-002_HippoCrop_uncertainty.nii.gz", "PGBM-002_HippoCrop_seg.dcm"} <= set(
        written
    )
