"""DICOM series as hospitals export them: uneven or tilted stacks, too few slices, codecs GDCM
cannot decode, enhanced multi-frame files and localizers are refused in one line (or, for a
localizer, left out with a warning), never segmented onto the wrong grid; an export of series in
subfolders is searched. Each series is written with pydicom from a copy of a real one."""

from __future__ import annotations

import math
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from medfcn.data.dicom import find_series
from medfcn.data.readers import read_dicom_series
from medfcn.errors import UserError
from medfcn.infer import expand_inputs, infer

from .conftest import BUNDLE, DICOM, need
from .test_bad_inputs import assert_user_error, run

HTJ2K = "1.2.840.10008.1.2.4.201"  # High-Throughput JPEG 2000 (Lossless Only)
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _series(tmp_path, name="series", source="PGBM-002_HippoCrop"):
    """A copy of a shared series (1 mm slices at z = 1..N mm, one file per slice)."""
    folder = tmp_path / name
    shutil.copytree(need(DICOM) / source, folder)
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def _edit_slices(folder, edit):
    """Apply ``edit(ds, z)`` to every slice, ``z`` its original position along z (mm)."""
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        edit(ds, float(ds.ImagePositionPatient[2]))
        ds.save_as(path)


def _move(position):
    """An edit that sets ImagePositionPatient to ``position(z)``."""

    def edit(ds, z):
        ds.ImagePositionPatient = [round(float(v), 6) for v in position(z)]

    return edit


def test_uneven_slice_steps_are_refused_naming_the_steps(tmp_path):
    """1 mm steps, then 1.4 mm: averaged into one step, the slices were up to 3 mm off."""
    folder = _series(tmp_path)
    _edit_slices(folder, _move(lambda z: (0, 0, z if z <= 16 else 16 + 1.4 * (z - 16))))
    line = assert_user_error(
        run("infer", BUNDLE, folder, "--out", tmp_path / "o"), "series: slice steps are uneven (1 and 1.4 mm)"
    )
    assert "does not resample" in line and "dcm2niix" in line
    assert not (tmp_path / "o").exists()


def test_rounding_noise_in_slice_positions_is_accepted(tmp_path):
    """Positions off by up to 0.005 mm (decimal strings rounded to 2 places) are an even stack;
    so are the four shared series (one oblique, 6.5 mm steps)."""
    folder = _series(tmp_path)
    noise = dict(zip(range(1, 33), np.random.default_rng(0).uniform(-0.005, 0.005, 32), strict=True))
    _edit_slices(folder, _move(lambda z: (noise[int(z)], -noise[int(z)], z + noise[int(z)])))
    assert expand_inputs([folder]) == [folder]
    shared = sorted(p for p in need(DICOM).iterdir() if p.is_dir())
    assert len(shared) == 4 and expand_inputs(shared) == shared


def test_duplicated_slice_is_refused(tmp_path):
    folder = _series(tmp_path)
    copy = pydicom.dcmread(folder / "16.dcm")
    copy.SOPInstanceUID = generate_uid()
    copy.save_as(folder / "16b.dcm")
    assert_user_error(run("infer", BUNDLE, folder, "--out", tmp_path / "o"), "shares a position", "duplicated")


def test_gantry_tilt_is_refused_with_its_angle(tmp_path):
    """Slices advancing at 20 degrees to the normal of their orientation (a CT gantry tilt):
    an orthogonal grid put the last slice 11 mm away from where the file says it is."""
    folder = _series(tmp_path)
    shift = math.tan(math.radians(20))
    _edit_slices(folder, _move(lambda z: (0, shift * z, z)))
    line = assert_user_error(
        run("infer", BUNDLE, folder, "--out", tmp_path / "o"), "series: slices advance at 20.0 degrees", "gantry tilt"
    )
    assert "dcm2niix" in line


def test_two_slice_series_is_refused(tmp_path):
    folder = _series(tmp_path)
    for path in folder.glob("*.dcm"):
        if path.name not in ("1.dcm", "2.dcm"):
            path.unlink()
    assert_user_error(run("infer", BUNDLE, folder, "--out", tmp_path / "o"), "series: a DICOM series of 2 slices")


def test_htj2k_series_is_refused_without_codec_noise(tmp_path, capfd):
    """GDCM cannot decode High-Throughput JPEG 2000: the transfer syntax is read from the file
    meta and refused before GDCM touches the pixels (it printed ~200 lines from C++ before)."""
    folder = _series(tmp_path)

    def htj2k(ds, z):
        ds.file_meta.TransferSyntaxUID = HTJ2K
        # an encapsulated frame that is no valid codestream: GDCM must never be asked to decode it
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
        ds["PixelData"].VR = "OB"

    _edit_slices(folder, htj2k)
    capfd.readouterr()
    result = run("infer", BUNDLE, folder, "--out", tmp_path / "o")
    captured = capfd.readouterr()
    assert_user_error(result, "series: 32 of 32 files are compressed as High-Throughput JPEG 2000", HTJ2K)
    assert captured.out.strip() == "" and captured.err.strip() == "", captured  # nothing from GDCM/ITK at fd level
    assert "gdcmconv --raw" in result.output


def test_enhanced_multiframe_file_is_refused(tmp_path):
    """One Enhanced MR file holding the whole series (NumberOfFrames 32), as scanners export."""
    source = _series(tmp_path, "slices")
    slices = sorted((pydicom.dcmread(p) for p in source.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    ds = slices[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(slices)
    ds.PixelData = b"".join(d.PixelData for d in slices)
    folder = tmp_path / "enhanced"
    folder.mkdir()
    ds.save_as(folder / "IM0001")
    line = assert_user_error(
        run("infer", BUNDLE, folder, "--out", tmp_path / "o"),
        "IM0001: is a multi-frame Enhanced MR Image Storage file (32 frames in one file",
    )
    assert "dcm2niix" in line and "4D" not in line


def test_localizer_sharing_the_series_uid_is_left_out_with_a_warning(tmp_path):
    """A sagittal localizer of another image size inside the axial series: left out (named in
    one warning line); the mask has the geometry of the 32 axial slices alone."""
    folder = _series(tmp_path)
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    localizer = pydicom.dcmread(folder / "1.dcm")
    localizer.SOPInstanceUID = localizer.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    localizer.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    localizer.ImagePositionPatient = [17, 0, 40]
    localizer.Rows, localizer.Columns = 40, 51
    localizer.PixelData = np.zeros((40, 51), np.int16).tobytes()
    localizer.InstanceNumber = 33
    localizer.save_as(folder / "localizer.dcm")
    result = run("infer", BUNDLE, folder, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warned) == 1 and "left out 1 file " in warned[0] and "localizer.dcm" in warned[0], result.output
    mask = nib.load(tmp_path / "o" / "series.nii.gz")
    assert mask.shape == reference.GetSize() == (35, 51, 32)
    ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(mask.affine[:3, 3], ras @ reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.affine[:3, :3], ras @ direction * reference.GetSpacing(), atol=1e-4)


def test_two_stacks_of_equal_size_are_refused(tmp_path):
    folder = _series(tmp_path)
    for k, path in enumerate(sorted(folder.glob("*.dcm"))):
        if k % 2:
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            ds.save_as(path)
    with pytest.raises(UserError, match="2 orientations or image sizes in equal numbers"):
        expand_inputs([folder])


def _export(root, series):
    """A PACS/CD export: ``root/PATIENT/STUDY/SERIES/`` per shared series, a DICOMDIR, a
    hidden folder and a folder of other files."""
    for rel, source in series.items():
        shutil.copytree(need(DICOM) / source, root / rel)
    (root / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(64))
    shutil.copytree(need(DICOM) / "PGBM-006_HippoCrop", root / ".cache" / "copy")
    (root / "PAT1" / "notes").mkdir()
    (root / "PAT1" / "notes" / "report.txt").write_text("scanner notes")
    return root


def test_export_with_series_in_subfolders_is_searched(tmp_path):
    export = _export(
        tmp_path / "export", {"PAT1/STUDY1/SER1": "PGBM-002_HippoCrop", "PAT1/STUDY1/SER2": "PGBM-006_HippoCrop"}
    )
    # GDCM (slow: it parses every file) probes only folders whose first files look like DICOM
    assert find_series(export) == [export / "PAT1" / "STUDY1" / "SER1", export / "PAT1" / "STUDY1" / "SER2"]
    out = tmp_path / "o"
    result = run("infer", BUNDLE, export, "--out", out)
    assert result.exit_code == 0, result.output
    masks = sorted(p.name for p in out.glob("*.nii.gz"))
    assert masks == ["PAT1_STUDY1_SER1.nii.gz", "PAT1_STUDY1_SER2.nii.gz"]  # hidden .cache skipped
    assert nib.load(out / "PAT1_STUDY1_SER2.nii.gz").shape == (36, 48, 35)


def test_two_exports_of_one_layout_are_refused_as_namesakes(tmp_path):
    """Mask names come from the path below the given folder, so the duplicate-name refusal holds."""
    a = _export(tmp_path / "a", {"PAT1/SER1": "PGBM-002_HippoCrop"})
    b = _export(tmp_path / "b", {"PAT1/SER1": "PGBM-006_HippoCrop"})
    with pytest.raises(UserError, match="same case name, so both masks would be PAT1_SER1.nii.gz"):
        infer(BUNDLE, [a, b], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_series_in_an_export_is_refused_naming_it(tmp_path):
    export = _export(tmp_path / "export", {"PAT1/SER1": "PGBM-002_HippoCrop", "PAT1/SER2": "PGBM-006_HippoCrop"})
    (export / "PAT1" / "SER2" / "16.dcm").unlink()
    with pytest.raises(UserError, match=r"SER2: slice positions are uneven .*a slice is missing"):
        expand_inputs([export])


def test_slice_without_position_is_refused(tmp_path):
    folder = _series(tmp_path)
    ds = pydicom.dcmread(folder / "5.dcm")
    del ds.ImagePositionPatient
    ds.save_as(folder / "5.dcm")
    with pytest.raises(UserError, match="series: 5.dcm: no ImagePositionPatient or ImageOrientationPatient"):
        expand_inputs([folder])


def test_reader_refuses_what_infer_refuses(tmp_path):
    """SimpleITKReader (the bundles' LoadImage reader) runs the same checks on a series folder."""
    folder = _series(tmp_path)
    _edit_slices(folder, _move(lambda z: (0, 0, z if z <= 16 else 16 + 1.4 * (z - 16))))
    with pytest.raises(UserError, match="slice steps are uneven"):
        read_dicom_series(folder)


def test_compressed_series_that_gdcm_decodes_is_read(tmp_path):
    """RLE Lossless is on the decodable list: read, with the same voxels as uncompressed."""
    folder = _series(tmp_path)

    def rle(ds, z):
        ds.compress(pydicom.uid.RLELossless)

    _edit_slices(folder, rle)
    assert pydicom.dcmread(folder / "1.dcm").file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    original = sitk.GetArrayFromImage(read_dicom_series(need(DICOM) / "PGBM-002_HippoCrop"))
    assert expand_inputs([folder]) == [folder]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_dicom_series(folder)), original)
