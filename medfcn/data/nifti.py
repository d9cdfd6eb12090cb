"""NIfTI integrity and geometry: corrupt ``.nii.gz`` files, units, qform/sform, and masks
that carry their scan's header.

nibabel never checks a ``.nii.gz``'s gzip CRC32 and length, so one flipped bit in the
compressed data is read without complaint (:func:`check_gzip_integrity` checks them). nibabel
reads the voxel-to-world affine in the file's own spatial units and ignores ``xyzt_units``
(:func:`mm_per_unit`); it uses the sform where ``sform_code > 0``, else the qform, else a guess
from ``pixdim`` (:func:`check_nifti_geometry` says when that matters). ITK-based viewers (3D
Slicer, ITK-SNAP) choose between qform and sform by other rules, so a mask is only overlaid
where its scan is, in every viewer, when it carries the scan's own qform, sform, codes, pixdim
and units (:func:`mask_like_scan`).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from medfcn.errors import InputWarning, UserError, root_message
from medfcn.io import NIFTI_SUFFIXES

__all__ = [
    "check_gzip_integrity",
    "check_nifti_data_size",
    "check_nifti_geometry",
    "is_nifti",
    "image_like_scan",
    "mask_like_scan",
    "mm_per_unit",
    "refuse_non_mm",
    "scan_affine_mm",
    "use_file_affine",
]

GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 20  # decompressed bytes per read: memory stays flat whatever the file size
# mm per spatial unit of ``xyzt_units``; "unknown" (0) is read as mm by nibabel, ITK, Slicer and
# ITK-SNAP alike, and is what many converters write (the MSD spleen files), so it is no warning
MM_PER_UNIT = {"unknown": 1.0, "mm": 1.0, "meter": 1000.0, "micron": 0.001}
SPATIAL_UNIT_CODES = (0, 1, 2, 3)  # unknown, metre, mm, micron
# qform and sform placing a voxel further apart than this (mm) are called disagreeing; a qform is
# stored as a float32 quaternion, which alone moves positions by about 1e-5 mm
DISAGREE_MM = 0.01
_GEOMETRY_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
_GEOMETRY_FIELDS += ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z")


def is_nifti(path: str | os.PathLike) -> bool:
    """True for a ``.nii`` or ``.nii.gz`` file name (any letter case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def check_gzip_integrity(path: str | os.PathLike) -> int:
    """Decompress the whole gzip stream of ``path`` (every member), checking each member's
    CRC32 and length; files not named ``.gz`` are only checked not to be gzip data
    (:func:`_refuse_misnamed`). Returns the number of (decompressed) bytes of the file.

    Streams in chunks of :data:`CHUNK_BYTES`, so memory stays flat; about 20 ms per MB of
    ``.nii.gz`` (1 ms for a hippocampus case, 43 ms for a 2 MB LeftAtrium image, on one core).

    Raises:
        UserError: ``<file>: is corrupt (<what the check found>); re-copy or re-export it.``, or
            the file cannot be opened (``<file>: cannot be read (<system's reason>) ...``).
    """
    _refuse_misnamed(path)
    if not str(path).lower().endswith(".gz"):
        return os.path.getsize(path)
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(CHUNK_BYTES):
                size += len(chunk)
    except EOFError as err:
        raise UserError(
            f"{path}: is corrupt (the gzip stream ends early: the file is truncated); re-copy or re-export it."
        ) from err
    except (gzip.BadGzipFile, zlib.error) as err:
        text = str(err)
        checks = {"CRC": "gzip CRC check failed", "Incorrect length": "gzip length check failed"}
        reason = next((said for found, said in checks.items() if found in text), f"gzip: {text}")
        raise UserError(
            f"{path}: is corrupt ({reason}: the compressed data is damaged); re-copy or re-export it."
        ) from err
    except OSError as err:  # not the data: the file itself (permissions, a folder named .gz)
        raise UserError(f"{path}: cannot be read ({err.strerror or err}); check the file and its permissions.") from err
    return size


def _refuse_misnamed(path: str | os.PathLike) -> None:
    """UserError for a ``.gz`` file that is not gzip data, or a ``.nii`` that is (a renamed
    file): nibabel picks the decompressor by the name, and would call either unreadable."""
    try:
        with open(path, "rb") as stream:
            gzipped = stream.read(2) == GZIP_MAGIC
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err}); check the file and its permissions.") from err
    named = str(path).lower().endswith(".gz")
    if named and not gzipped and is_nifti(path):
        raise UserError(f"{path}: is not gzip-compressed although named .gz (an uncompressed NIfTI?); rename it .nii.")
    if gzipped and not named:
        raise UserError(f"{path}: is gzip-compressed although named {Path(path).suffix}; add .gz to its name.")


def mm_per_unit(header: nib.Nifti1Header, path: str | os.PathLike = "the file") -> float:
    """Millimetres per spatial unit of ``header`` (``xyzt_units``: 1000 for metres).

    Raises:
        UserError: a spatial unit code that NIfTI does not define (nibabel raises KeyError).
    """
    code = int(header["xyzt_units"]) & 0x07
    if code not in SPATIAL_UNIT_CODES:
        raise UserError(
            f"{path}: its spatial unit code {code} (xyzt_units) is none of NIfTI's (0 unknown, 1 metre, 2 mm, "
            "3 micron); fix the header, e.g. set the units to mm, or re-export the scan."
        )
    return MM_PER_UNIT[header.get_xyzt_units()[0]]


def scan_affine_mm(image: nib.Nifti1Image, path: str | os.PathLike = "the file") -> np.ndarray:
    """nibabel's affine of ``image`` (sform, else qform, else from pixdim), scaled to mm."""
    return np.diag([mm_per_unit(image.header, path)] * 3 + [1.0]) @ image.affine


def use_file_affine(loaded, scan: nib.Nifti1Image) -> None:
    """Set the affine of ``loaded`` (a MONAI MetaTensor just read from ``scan``) to nibabel's
    affine of ``scan`` in mm (:func:`scan_affine_mm`), in place.

    Two reasons: resampling to the bundle's voxel size (mm) and the volumes (mm^3) must be right
    for a scan stored in metres or microns; and MONAI's NIfTI loader silently replaces a sform
    whose column lengths differ from ``pixdim`` (a sheared sform) by the qform, so the model and
    the volumes would use another geometry than the one the mask and nibabel carry.
    """
    loaded.affine = scan_affine_mm(scan)


def refuse_non_mm(image: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """UserError for a training file whose spatial units are not mm: the training pipeline reads
    voxel sizes in mm (nibabel ignores ``xyzt_units``), so a scan in metres would be resampled
    to a few voxels."""
    if mm_per_unit(image.header, path) != 1.0:
        unit = image.header.get_xyzt_units()[0]
        raise UserError(
            f"{path}: spatial units are {unit}s (xyzt_units), but training reads voxel sizes in mm; "
            "save the image and its label in mm."
        )


def _coded_affines(header: nib.Nifti1Header) -> dict[str, np.ndarray]:
    """The affines readers may use: the qform and sform whose codes are set, or, with both
    codes 0, the one nibabel falls back to (from pixdim)."""
    affines = {}
    if int(header["qform_code"]) > 0:
        affines["qform"] = header.get_qform()
    if int(header["sform_code"]) > 0:
        affines["sform"] = header.get_sform()
    return affines or {"pixdim": header.get_best_affine()}


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes ``(3,)`` of a ``(4, 4)`` affine: the lengths of its first three columns (mm
    for a RAS affine in mm)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _refuse_singular(path: str | os.PathLike, name: str, affine: np.ndarray) -> None:
    """UserError when the 3x3 of ``affine`` is singular (a zero voxel size, collinear axes)."""
    matrix = affine[:3, :3]
    sizes = voxel_spacing(affine)
    # |det| relative to the product of the column lengths: 1 for orthogonal axes, 0 when singular
    if sizes.min() > 0 and abs(np.linalg.det(matrix)) > 1e-6 * sizes.prod():
        return
    dims = " x ".join(f"{s:.3g}" for s in sizes)
    raise UserError(
        f"{path}: its {name} is singular (voxel size {dims}: a zero size or collinear axes), "
        "so its voxels have no positions; fix the header (pixdim, qform/sform) or re-export the scan."
    )


def _refuse_non_finite(path: str | os.PathLike, name: str, affine: np.ndarray) -> None:
    """UserError when ``affine`` holds NaN or Inf (a voxel size, a rotation or an offset)."""
    if not np.all(np.isfinite(affine)):
        raise UserError(
            f"{path}: its {name} holds NaN or Inf (voxel size, orientation or offset), so its voxels have no "
            "positions; fix the header (pixdim, qform/sform) or re-export the scan."
        )


def _refuse_odd_data(path: str | os.PathLike, header: nib.Nifti1Header) -> None:
    """UserError for a header whose ``dim[0]`` is no dimension count (1 to 7), whose sizes
    (``dim[1:]``) are negative, or whose datatype is no real number (complex, RGB)."""
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        raise UserError(f"{path}: its dim[0] is {ndim}, not a number of dimensions (1 to 7); fix the header.")
    sizes = [int(n) for n in header["dim"][1 : ndim + 1]]
    if min(sizes) < 0:  # nibabel: "memory mapped length must be positive", or a negative reshape
        raise UserError(f"{path}: its dim fields {sizes} hold a negative size; fix the header or re-export the scan.")
    dtype = header.get_data_dtype()
    if dtype.kind not in "buif":
        raise UserError(
            f"{path}: its voxels are {dtype.name if dtype.fields is None else 'RGB/RGBA'} (NIfTI datatype "
            f"{int(header['datatype'])}), not real numbers; save the scan as grey values (e.g. float32 magnitude)."
        )


def check_nifti_data_size(path: str | os.PathLike, image: nib.Nifti1Image, data_bytes: int) -> None:
    """UserError when the ``dim`` fields (and ``vox_offset``) of ``image``, loaded from ``path``,
    do not match its voxel data's size: nibabel reads an excess silently, with every row shifted.

    Args:
        data_bytes: the bytes of the file, decompressed (:func:`check_gzip_integrity` returns it).
            The voxels start where nibabel reads them (``vox_offset``, or 352 where a single file
            says 0).
    """
    header = image.header
    dtype = header.get_data_dtype()
    shape = tuple(int(n) for n in header["dim"][1 : int(header["dim"][0]) + 1])
    offset = int(image.dataobj.offset)
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_bytes != need and min(shape, default=0) > 0:
        dims = " x ".join(map(str, shape))
        raise UserError(
            f"{path}: holds {data_bytes} bytes, but its header (dim {dims}, {dtype.name}, data at byte {offset}) "
            f"makes {need}: its dim (or vox_offset) fields do not match the voxel data; "
            "fix the header or re-export the scan."
        )


def _max_distance_mm(a: np.ndarray, b: np.ndarray, shape, scale: float) -> float:
    """Largest distance in mm between where ``a`` and ``b`` place a corner voxel of ``shape``."""
    shape = (tuple(shape[:3]) + (1, 1, 1))[:3]  # a 2D image: its corners lie in the slice z = 0
    corners = np.array(np.meshgrid(*[[0, max(int(n) - 1, 0)] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(scale * np.linalg.norm((a - b) @ corners, axis=0).max())


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-fix log lines inside the block (nibabel's own
    ``LoggingOutputSuppressor`` loses its handler on exit)."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_header(path: str | os.PathLike) -> tuple[nib.Nifti1Image, nib.Nifti1Header]:
    """``path`` loaded lazily by nibabel, and its header with the voxel sizes as stored.

    nibabel's loader "fixes" a zero voxel size in ``pixdim`` to 1 (with a log line on stderr),
    which would hide a singular qform from the check and from the user; its other fixes (qfac 0
    read as 1, negative sizes as positive) are kept, as the NIfTI reference library reads them.

    Raises:
        UserError: nibabel cannot read the file (``<file>: cannot be read as an image (...)``).
    """
    try:
        with _quiet_nibabel():
            image = nib.load(str(path))
            header = image.header.copy()
        with nib.openers.ImageOpener(str(path)) as stream:
            stored = type(image.header).from_fileobj(stream, check=False)
    except Exception as err:
        raise UserError(f"{path}: cannot be read as an image ({root_message(err)}).") from err
    header["pixdim"][1:4] = np.where(stored["pixdim"][1:4] == 0, 0, header["pixdim"][1:4])
    return image, header


def check_nifti_geometry(path: str | os.PathLike, data_bytes: int | None = None) -> nib.Nifti1Image:
    """Check a NIfTI scan's header before it is segmented; return the (lazily) loaded image.

    ``data_bytes``: the file's size, decompressed (:func:`check_gzip_integrity` returns it), to
    check against the header's ``dim`` fields (:func:`check_nifti_data_size`); not checked when
    None (``medfcn infer`` checks it after the memory guard, which needs the header alone).

    Raises:
        UserError: the file is no NIfTI image; a qform, sform or pixdim affine that a reader may
            use is singular or holds NaN/Inf; spatial units NIfTI does not define; voxels that are
            no real numbers (complex, RGB), or ``dim`` fields that do not match the data's size.

    Warns (:class:`~medfcn.errors.InputWarning`): qform and sform (both coded) that disagree by
    more than :data:`DISAGREE_MM` mm somewhere in the volume; no qform and no sform (both codes 0),
    naming the axes and voxel size assumed.
    """
    image, stored = _load_header(path)
    _refuse_odd_data(path, stored)
    if data_bytes is not None:
        check_nifti_data_size(path, image, data_bytes)
    affines = _coded_affines(stored)
    for name, affine in affines.items():
        _refuse_non_finite(path, name, affine)
        _refuse_singular(path, name, affine)
    scale = mm_per_unit(stored, path)
    if len(affines) == 2:
        apart = _max_distance_mm(affines["qform"], affines["sform"], image.shape, scale)
        if apart > DISAGREE_MM:
            warnings.warn(
                InputWarning(
                    f"{path}: its qform and sform disagree (up to {apart:.3g} mm apart), so viewers may place it "
                    "differently; segmented on the sform (as nibabel reads it), and the mask keeps both, as the scan."
                ),
                stacklevel=2,
            )
    if "pixdim" in affines:
        axes = "".join(nib.aff2axcodes(affines["pixdim"]))
        sizes = " x ".join(f"{s:.4g}" for s in scale * np.asarray(stored.get_zooms()[:3]))
        warnings.warn(
            InputWarning(
                f"{path}: has no qform and no sform (both codes 0), so its orientation is unknown; "
                f"assumed {axes} axes and {sizes} mm voxels (as nibabel reads it); the mask has the same header."
            ),
            stacklevel=2,
        )
    return image


def mask_like_scan(labels: np.ndarray, scan: nib.Nifti1Image) -> nib.Nifti1Image:
    """A uint8 mask ``(X, Y, Z)`` on ``scan``'s voxel grid with its geometry copied field by
    field: qform (quaternion, offsets, qfac in ``pixdim[0]``), sform, both codes, voxel sizes
    (``pixdim[1:4]``) and spatial units ("unknown" written as mm), so every reader maps mask
    voxel (i, j, k) where it maps scan voxel (i, j, k). Copying the raw fields (rather than an
    affine) keeps them bit for bit.
    """
    return image_like_scan(labels, scan, np.uint8)


def image_like_scan(data: np.ndarray, scan: nib.Nifti1Image, dtype: type = np.float32) -> nib.Nifti1Image:
    """``data`` as ``dtype`` on ``scan``'s voxel grid, with its geometry copied field by field as
    :func:`mask_like_scan` copies it: ``(X, Y, Z)``, or ``(X, Y, Z, K)`` for K values per voxel
    (channel last: the 4th dimension, whose ``pixdim[4]`` is written 1)."""
    klass = nib.Nifti2Image if isinstance(scan, nib.Nifti2Image) else nib.Nifti1Image
    header = klass.header_class()
    header.set_data_shape(data.shape)
    header.set_data_dtype(dtype)
    source = scan.header
    for field in _GEOMETRY_FIELDS:
        header[field] = source[field]
    header["pixdim"][:4] = source["pixdim"][:4]
    # "unknown" is read as mm by every reader and was segmented as mm: the output says so
    unit = source.get_xyzt_units()[0]
    header.set_xyzt_units("mm" if unit == "unknown" else unit)
    return klass(data.astype(dtype), None, header=header)
