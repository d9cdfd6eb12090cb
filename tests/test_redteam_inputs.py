"""Bad inputs found in an adversarial new-user pass (issue 22) that no test covered: damaged or
odd NIfTI headers and DICOM geometry tags, each refused in one line naming the file and the fix
(before, most were a traceback or exit 0 with a wrong mask), never segmented silently."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medfcn.data.nifti import check_gzip_integrity, check_nifti_geometry
from medfcn.errors import UserError
from medfcn.infer import expand_inputs

from .conftest import BUNDLE, DICOM, REPO, need
from .test_bad_inputs import assert_user_error, run

# byte offsets of NIfTI-1 header fields
DIM, VOX_OFFSET, XYZT_UNITS, QFORM_CODE, SFORM_CODE, QOFFSET_X = 40, 108, 123, 252, 254, 268


def _scan(tmp_path, name="scan.nii.gz", data=None, dtype=None):
    """A small NIfTI scan (qform and sform codes 1, mm) written by nibabel."""
    rng = np.random.default_rng(0)
    data = rng.random((20, 24, 18)).astype(np.float32) if data is None else data
    image = nib.Nifti1Image(data, np.eye(4), dtype=dtype)
    image.set_qform(np.eye(4), code=1)
    image.header.set_xyzt_units("mm")
    path = tmp_path / name
    nib.save(image, path)
    return path


def _patch(path, edits, name=None):
    """A copy of the NIfTI file ``path`` with ``edits`` ({offset: (struct format, value)})
    applied to its header, compressed as its new name says."""
    raw = bytearray(gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes())
    for offset, (fmt, value) in edits.items():
        struct.pack_into(fmt, raw, offset, value)
    out = path.with_name(name or path.name)
    out.write_bytes(gzip.compress(bytes(raw)) if out.name.endswith(".gz") else bytes(raw))
    return out


def _refused(path, *fragments):
    """The one-line UserError the header checks of ``medfcn infer`` give ``path``."""
    with pytest.raises(UserError) as err:
        check_nifti_geometry(path, check_gzip_integrity(path))
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    return str(err.value)


@pytest.mark.parametrize("width", [16, 24])
def test_dim_fields_not_matching_the_data_are_refused(tmp_path, width):
    """dim[1] 16 instead of 20: nibabel read the first 16 x 24 x 18 values, every row shifted,
    and infer exited 0 with a wrong mask (24: nibabel's own OSError, now said the same way)."""
    path = _patch(_scan(tmp_path), {DIM + 2: ("<h", width)}, f"dim{width}.nii.gz")
    _refused(path, f"dim {width} x 24 x 18", "do not match the voxel data; fix the header")


def test_data_offset_past_the_end_is_refused(tmp_path):
    path = _patch(_scan(tmp_path, "scan.nii"), {VOX_OFFSET: ("<f", 1e6)}, "far.nii")
    _refused(path, "data at byte 1000000", "do not match the voxel data")


def test_nan_in_a_qform_offset_is_refused(tmp_path):
    """A NaN qoffset (sform code 0) passed the singular-matrix check: a traceback from Invertd."""
    path = _patch(_scan(tmp_path), {QOFFSET_X: ("<f", float("nan")), SFORM_CODE: ("<h", 0)}, "nan.nii.gz")
    _refused(path, "its qform holds NaN or Inf")


def test_dim0_zero_is_refused(tmp_path):
    """dim[0] = 0: a traceback (cannot reshape array) before."""
    path = _patch(_scan(tmp_path), {DIM: ("<h", 0)}, "dim0.nii.gz")
    _refused(path, "its dim[0] is 0, not a number of dimensions")


def test_undefined_spatial_unit_code_is_refused(tmp_path):
    """xyzt_units 7: nibabel's KeyError as a traceback before."""
    path = _patch(_scan(tmp_path), {XYZT_UNITS: ("<B", 7)}, "units.nii.gz")
    _refused(path, "its spatial unit code 7 (xyzt_units) is none of NIfTI's")


def test_complex_voxels_are_refused(tmp_path):
    """complex64 voxels: the imaginary part was dropped with a ComplexWarning, exit 0."""
    data = np.random.default_rng(0).random((20, 24, 18)).astype(np.complex64)
    _refused(_scan(tmp_path, data=data, dtype=np.complex64), "its voxels are complex64", "not real numbers")


def test_rgb_voxels_are_refused(tmp_path):
    rgb = np.zeros((20, 24, 18), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _refused(_scan(tmp_path, data=rgb), "its voxels are RGB/RGBA (NIfTI datatype 128)")


def test_uncompressed_file_named_gz_is_refused_as_misnamed(tmp_path):
    """Was called corrupt ("the compressed data is damaged"): it is a good .nii, misnamed."""
    plain = _scan(tmp_path, "scan.nii")
    misnamed = tmp_path / "scan2.nii.gz"
    shutil.copy(plain, misnamed)
    _refused(misnamed, "is not gzip-compressed although named .gz", "rename it .nii")


def test_gzipped_file_named_nii_is_refused_as_misnamed(tmp_path):
    misnamed = tmp_path / "scan2.nii"
    shutil.copy(_scan(tmp_path), misnamed)
    _refused(misnamed, "is gzip-compressed although named .nii; add .gz")


def test_good_files_pass_the_new_checks(tmp_path):
    """A .nii, a .nii.gz, a NIfTI-2 file and one with a header extension are not refused."""
    for path in (_scan(tmp_path, "a.nii"), _scan(tmp_path, "b.nii.gz")):
        check_nifti_geometry(path, check_gzip_integrity(path))
    data = np.ones((20, 24, 18), np.float32)
    nib.save(nib.Nifti2Image(data, np.eye(4)), tmp_path / "c.nii.gz")
    extended = nib.Nifti1Image(data, np.eye(4))
    extended.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"x" * 5000))
    nib.save(extended, tmp_path / "d.nii")
    for name in ("c.nii.gz", "d.nii"):
        check_nifti_geometry(tmp_path / name, check_gzip_integrity(tmp_path / name))


def test_2d_image_with_qform_and_sform_gets_the_2d_message(tmp_path):
    """A 2D NIfTI with both codes set: a traceback (cannot reshape) in the qform/sform comparison."""
    path = _scan(tmp_path, "flat.nii.gz", data=np.random.default_rng(0).random((30, 34)).astype(np.float32))
    assert_user_error(run("infer", BUNDLE, path, "--out", tmp_path / "o"), "is a 2D image (30, 34)")


def test_nibabel_header_fix_lines_are_not_printed(tmp_path):
    """Negative pixdim: nibabel logged "pixdim[1,2,3] should be positive ..." on every load (4
    lines); only medfcn's own one-line warnings are left."""
    path = _patch(_scan(tmp_path), {80: ("<f", -1.0), QFORM_CODE: ("<h", 0), SFORM_CODE: ("<h", 0)}, "neg.nii.gz")
    result = subprocess.run(
        [sys.executable, "-m", "medfcn", "infer", str(BUNDLE), str(path), "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "should be positive" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("medfcn: warning: ") for line in lines), result.stderr
    assert "has no qform and no sform" in lines[0], result.stderr


# --- DICOM geometry and pixel data tags (series written with pydicom from a shared one) ---


def _series(tmp_path, edit):
    """A copy of PGBM-002_HippoCrop with ``edit(ds, k)`` applied to each slice (k: its index)."""
    folder = tmp_path / "series"
    shutil.copytree(need(DICOM) / "PGBM-002_HippoCrop", folder)
    for k, path in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        edit(ds, k)
        ds.save_as(path)
    return folder


def _series_refused(folder, *fragments):
    with pytest.raises(UserError) as err:
        expand_inputs([folder])
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def _drop_spacing(ds, k):
    del ds.PixelSpacing


def _zero_spacing(ds, k):
    ds.PixelSpacing = [0, 0]


def _negative_spacing(ds, k):
    ds.PixelSpacing = [-1, 1]


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_drop_spacing, "has no PixelSpacing (0028,0030)"),  # was read as 1 mm, exit 0
        (_zero_spacing, "PixelSpacing [0.0, 0.0] is not two positive numbers"),  # was read as 1 mm, exit 0
        (_negative_spacing, "PixelSpacing [-1.0, 1.0] is not two positive numbers"),  # was called a gantry tilt
    ],
)
def test_missing_or_non_positive_pixel_spacing_is_refused(tmp_path, edit, fragment):
    _series_refused(_series(tmp_path, edit), fragment, "export the series with its PixelSpacing")


def test_parallel_row_and_column_directions_are_refused(tmp_path):
    """ImageOrientationPatient 1\\0\\0\\1\\0\\0: a zero slice normal, segmented (exit 0) with
    RuntimeWarnings."""

    def edit(ds, k):
        ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]

    _series_refused(_series(tmp_path, edit), "do not place the slice", "perpendicular unit vectors")


def test_nan_slice_position_is_refused(tmp_path):
    """ImagePositionPatient NaN\\0\\z: segmented, exit 0, the mask's origin unknown."""

    def edit(ds, k):
        ds.ImagePositionPatient = ["nan", 0, k + 1]

    with pytest.warns(UserWarning):  # pydicom: "Invalid value for VR DS: 'nan'"
        folder = _series(tmp_path, edit)
    _series_refused(folder, "ImagePositionPatient [nan, 0.0,", "do not place the slice")


def test_slice_with_truncated_pixel_data_is_refused(tmp_path):
    """One slice's pixel data cut to 1000 bytes: GDCM filled it up, exit 0 with a wrong mask."""

    def edit(ds, k):
        if k == 10:
            ds.PixelData = ds.PixelData[:1000]

    _series_refused(_series(tmp_path, edit), "pixel data holds 1000 of the 3570 bytes", "export the series again")


def test_negative_label_to_score_is_refused(tmp_path):
    """``evaluate --labels -1``: exit 0 with a table of NaN (no mask may hold -1)."""
    label = np.zeros((12, 12, 12), np.uint8)
    label[3:8, 3:8, 3:8] = 1
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / folder / "case.nii.gz")
    result = run("evaluate", tmp_path / "pred", tmp_path / "ref", "--labels", "-1", "--out", tmp_path / "o")
    assert_user_error(result, "--labels -1: label values are 0 (background) and positive whole numbers")
    assert not (tmp_path / "o").exists()


# --- MetaImage data checked against its header (SimpleITK reads damage silently) ---


def _metaimage(tmp_path, name, compressed):
    """A 20 x 24 x 18 float32 MetaImage written by SimpleITK."""
    import SimpleITK as sitk

    data = np.random.default_rng(0).random((18, 24, 20)).astype(np.float32)  # [z, y, x]
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path), compressed)
    return path


def _metaimage_refused(path, *fragments):
    from medfcn.formats import check_metaimage_data

    with pytest.raises(UserError) as err:
        check_metaimage_data(path)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_flipped_bit_in_a_compressed_metaimage_is_refused(tmp_path):
    """One flipped bit in a compressed .mha: SimpleITK read it without complaint and the scan
    was segmented with volumes off by half (exit 0)."""
    path = _metaimage(tmp_path, "scan.mha", compressed=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    assert_user_error(
        run("infer", BUNDLE, path, "--out", tmp_path / "o"), "scan.mha: is corrupt (zlib: ", "re-copy or re-export"
    )
    assert not (tmp_path / "o" / "scan.nii.gz").exists()


def test_truncated_compressed_metaimage_is_refused(tmp_path):
    path = _metaimage(tmp_path, "scan.mha", compressed=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    _metaimage_refused(path, "is corrupt (the compressed stream ends early: the file is truncated)")


def test_metaimage_dimsize_not_matching_its_data_is_refused(tmp_path):
    """DimSize 16 24 18 over a 20 x 24 x 18 .raw: read silently with every row shifted, exit 0
    (a larger DimSize, or a truncated .raw, was SimpleITK's "No such file or directory")."""
    header = _metaimage(tmp_path, "scan.mhd", compressed=False)
    header.write_text(header.read_text().replace("DimSize = 20 24 18", "DimSize = 16 24 18"))
    _metaimage_refused(header, "holds 34560 bytes of voxel data", "(DimSize 16 24 18, MET_FLOAT, 1 channel) makes")


def test_metaimage_with_missing_data_file_is_refused(tmp_path):
    header = _metaimage(tmp_path, "scan.mhd", compressed=False)
    (tmp_path / "scan.raw").unlink()
    _metaimage_refused(header, "its data file", "scan.raw is missing")


@pytest.mark.parametrize(("name", "compressed"), [("a.mha", True), ("b.mha", False), ("c.mhd", True), ("d.mhd", False)])
def test_good_metaimages_pass_the_data_check(tmp_path, name, compressed):
    from medfcn.formats import check_metaimage_data

    check_metaimage_data(_metaimage(tmp_path, name, compressed))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (("ElementSpacing = 1 1 1", "ElementSpacing = 0 1 1"), "Zero-valued spacing is not supported"),
        (("TransformMatrix = 1 0 0 0 1 0 0 0 1", "TransformMatrix = 0 0 0 0 0 0 0 0 0"), "determinant is 0"),
    ],
)
def test_unreadable_metaimage_header_names_the_readers_reason(tmp_path, edit, reason):
    """SimpleITK refuses the header; the line said only MONAI's "LoadImage cannot find a suitable
    reader for file", never why."""
    header = _metaimage(tmp_path, "scan.mhd", compressed=False)
    header.write_text(header.read_text().replace(*edit))
    line = assert_user_error(
        run("infer", BUNDLE, header, "--out", tmp_path / "o"), "scan.mhd: cannot be read as an image ("
    )
    assert reason in line and "suitable reader" not in line, line


# --- raw NRRD data checked against its header; an NRRD without a space warns ---


def _nrrd(tmp_path, name, compressed=False):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((18, 24, 20)).astype(np.float32))
    path = tmp_path / name
    sitk.WriteImage(image, str(path), compressed)
    return path


def test_nrrd_sizes_not_matching_its_raw_data_are_refused(tmp_path):
    """sizes 16 24 18 over a 20 x 24 x 18 raw file: read silently, rows shifted, exit 0."""
    from medfcn.formats import check_nrrd_data

    header = _nrrd(tmp_path, "scan.nhdr")
    header.write_text(header.read_text().replace("sizes: 20 24 18", "sizes: 16 24 18"))
    with pytest.raises(UserError, match=r"holds 34560 bytes of voxel data, but its header \(sizes 16 24 18, float\)"):
        check_nrrd_data(header)


@pytest.mark.parametrize(("name", "compressed"), [("a.nrrd", False), ("b.nrrd", True), ("c.nhdr", False)])
def test_good_nrrds_pass_the_data_check(tmp_path, name, compressed):
    from medfcn.formats import check_nrrd_data

    check_nrrd_data(_nrrd(tmp_path, name, compressed))


def test_nrrd_without_space_warns_that_its_orientation_is_assumed(tmp_path):
    """No space / space directions / space origin: segmented on ITK's identity axes, silently."""
    header = _nrrd(tmp_path, "scan.nhdr")
    lines = [line for line in header.read_text().splitlines() if not line.startswith("space")]
    header.write_text("\n".join(lines) + "\n")
    result = run("infer", BUNDLE, header, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "medfcn: warning: " in result.output and "has no space, space dimension or space directions" in result.output
    assert "so its orientation is unknown" in (tmp_path / "o" / "volumes.csv").read_text()


def test_negative_dim_is_refused(tmp_path):
    """dim[2] = -24: nibabel's "OverflowError: memory mapped length must be positive"."""
    path = _patch(_scan(tmp_path, "scan.nii"), {DIM + 4: ("<h", -24)}, "neg.nii")
    _refused(path, "its dim fields [20, -24, 18] hold a negative size")


def test_folder_with_a_dicom_series_and_a_nifti_file_is_refused(tmp_path):
    """The series was segmented and the NIfTI file beside it skipped without a word (exit 0)."""
    folder = tmp_path / "series"
    shutil.copytree(need(DICOM) / "PGBM-002_HippoCrop", folder)
    _scan(folder, "extra.nii.gz")
    _series_refused(folder, "holds a DICOM series and NIfTI, NRRD or MetaImage files (extra.nii.gz)")


def test_dataset_entry_naming_a_folder_is_refused(tmp_path):
    """An image path that is a folder passed the 'missing files' check: `medfcn folds` wrote a
    split (exit 0) and train failed later, on reading it."""
    from .conftest import write_msd_dataset

    data = write_msd_dataset(tmp_path / "ds", n_cases=4, shape=(12, 12, 12))
    image = data / "imagesTr" / "case_001.nii.gz"
    image.unlink()
    image.mkdir()
    result = run("folds", data, "--out", tmp_path / "folds.json", "--n-folds", "2")
    assert_user_error(result, "entry 1 of 'training' names the folder", "as its image; point it at a NIfTI file")
    assert not (tmp_path / "folds.json").exists()


def test_blank_scan_is_refused(tmp_path):
    """An all-zero crop: the hippocampus bundle drew 2076 mm^3 "anterior" on it, exit 0 (a
    warning named only the posterior volume)."""
    path = _scan(tmp_path, "blank.nii.gz", data=np.zeros((20, 24, 18), np.float32))
    result = run("infer", BUNDLE, path, "--out", tmp_path / "o")
    assert_user_error(result, "blank.nii.gz: every voxel is 0 (a blank image), so there is nothing to segment")
    assert not (tmp_path / "o" / "blank.nii.gz").exists()


def test_overflowing_scale_is_one_line_without_numpy_noise(tmp_path):
    """int16 voxels with scl_slope 1e36 overflow float32: the NaN/Inf refusal alone, not
    numpy's two lines of "overflow encountered in cast" before it."""
    image = nib.Nifti1Image(np.arange(30 * 34 * 28, dtype=np.int16).reshape(30, 34, 28) % 500, np.eye(4))
    image.header.set_slope_inter(1e36, 0)
    path = tmp_path / "in" / "scaled.nii.gz"
    path.parent.mkdir()
    nib.save(image, path)
    # a subprocess: pytest would record the numpy warnings instead of letting them print
    command = [sys.executable, "-m", "medfcn", "infer", str(BUNDLE), str(path), "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "scaled.nii.gz: has" in lines[0] and "NaN/Inf voxels" in lines[0], proc.stderr


def test_folds_on_a_file_says_it_is_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a dataset")
    assert_user_error(run("folds", notes, "--out", tmp_path / "f.json"), "notes.txt: is a file, not a dataset folder")
