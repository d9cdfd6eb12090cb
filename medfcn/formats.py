"""Scan formats besides NIfTI and DICOM, masks written in them, and the scan's size from its header.

3D Slicer users have NRRD (``.nrrd``, or a ``.nhdr`` header beside its data file) and
MetaImage (``.mha``, or a ``.mhd`` header beside its ``.raw`` file); SimpleITK reads both with
their origin, spacing and direction (LPS; a NRRD in ``right-anterior-superior`` space is turned
into LPS by ITK). Masks are NIfTI unless the user asks for NRRD or MetaImage; those are written
with SimpleITK, copying the scan's own origin, spacing and direction.

Example::

    from medfcn.formats import scan_grid
    scan_grid("scan.nrrd")  # ScanGrid(shape=(512, 512, 300), spacing=(0.4, 0.4, 0.5), channels=1)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medfcn.data.checks import check_memory
from medfcn.data.dicom import gdcm_series_files, series_files
from medfcn.data.readers import quiet_itk, sitk_affine_ras
from medfcn.errors import InputWarning, UserError
from medfcn.io import DISK_FULL_FIX, NIFTI_SUFFIXES, atomic_path
from medfcn.outputs import plural

__all__ = [
    "ITK_SUFFIXES",
    "SCAN_SUFFIXES",
    "MASK_FORMATS",
    "ScanGrid",
    "check_mask_format",
    "check_itk_data",
    "check_metaimage_data",
    "check_nrrd_data",
    "itk_read_reason",
    "check_memory_from_header",
    "mask_suffix",
    "scan_grid",
    "stage_itk_mask",
]

# Headers only: a .mhd's .raw and a .nhdr's data file are read through their header, never alone.
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
MASK_FORMATS = ("nifti", "input", "nrrd", "mha")
# One self-contained file per mask (a detached .nhdr or .mhd would need two renames to be atomic).
_MASK_SUFFIX = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
_INPUT_FORMAT = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha"}
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS: the sign of the first two world axes
_NIFTI_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


# bytes per value of MetaImage's element types (MetaIO's own table; MET_LONG is 4 bytes there)
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4}
_MET_BYTES |= {"MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_CHUNK_BYTES = 1 << 20


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The ``Key = Value`` fields of a MetaImage header and the byte where its data starts
    (after the ``ElementDataFile`` line, the header's last)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as stream:
        for raw in iter(stream.readline, b""):
            key, _, value = raw.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
        return fields, stream.tell()


def _stream_bytes(path: Path, start: int, compressed: bool) -> int:
    """Bytes of the data from ``start`` in ``path``, decompressed (zlib, its checksum checked)
    when ``compressed``; counted in chunks, so memory stays flat."""
    inflate = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # zlib or gzip wrapping, as MetaIO reads
    size = 0
    with open(path, "rb") as stream:
        stream.seek(start)
        while chunk := stream.read(_CHUNK_BYTES):
            size += len(inflate.decompress(chunk)) if compressed else len(chunk)
    if compressed and not inflate.eof:
        raise EOFError("the compressed stream ends early: the file is truncated")
    return size


def check_itk_data(path: str | os.PathLike) -> None:
    """:func:`check_metaimage_data` or :func:`check_nrrd_data`, by the suffix of ``path``."""
    if Path(path).name.lower().endswith((".mha", ".mhd")):
        check_metaimage_data(path)
    else:
        check_nrrd_data(path)


def check_metaimage_data(path: str | os.PathLike) -> None:
    """Check a MetaImage file's voxel data against its header before SimpleITK reads it:
    SimpleITK reads a compressed stream with a flipped bit, and a ``DimSize`` smaller than the
    data, without complaint (a wrong mask, exit 0), and calls a truncated file "No such file".
    Headers this cannot follow (a list of data files, ``HeaderSize``, an unknown element type)
    are left to SimpleITK.

    Raises:
        UserError: corrupt compressed data, or data of another size than the header makes.
    """
    path = Path(path)
    fields, start = _metaimage_header(path)
    name, element = fields.get("ElementDataFile", ""), fields.get("ElementType", "")
    if not name or element not in _MET_BYTES or "HeaderSize" in fields or " " in name or "%" in name:
        return
    data, start = (path, start) if name == "LOCAL" else (path.parent / name, 0)
    if not data.is_file():
        raise UserError(f"{path}: its data file {data} is missing; put it beside the header, as ElementDataFile says.")
    shape = [int(v) for v in fields.get("DimSize", "0").split()]
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    need = int(np.prod(shape, dtype=np.int64)) * channels * _MET_BYTES[element]
    try:
        size = _stream_bytes(data, start, fields.get("CompressedData", "False").lower() == "true")
    except EOFError as err:
        raise UserError(f"{path}: is corrupt ({err}); re-copy or re-export it.") from err
    except zlib.error as err:
        raise UserError(
            f"{path}: is corrupt (zlib: {err}: the compressed data is damaged); re-copy or re-export it."
        ) from err
    if size != need:
        raise UserError(
            f"{path}: holds {size} bytes of voxel data, but its header (DimSize {fields['DimSize']}, {element}, "
            f"{plural(channels, 'channel')}) makes {need}: DimSize does not match the data (or the file is truncated); "
            "fix the header or re-export it."
        )


def _nrrd_type_bytes(name: str) -> int | None:
    """Bytes per value of an NRRD ``type`` (any of teem's spellings), None if unknown."""
    words = name.lower().replace("_t", "").split()
    base = words[-1] if words else ""
    if base in ("float", "double"):
        return {"float": 4, "double": 8}[base]
    sizes = {"char": 1, "int8": 1, "uchar": 1, "uint8": 1, "short": 2, "int16": 2, "ushort": 2, "uint16": 2}
    sizes |= {"int": 4, "int32": 4, "uint": 4, "uint32": 4, "int64": 8, "uint64": 8, "longlong": 8, "ulonglong": 8}
    if base == "int" and "long" in words or base == "long":  # "long long (int)"
        return 8
    if base == "int" and "short" in words:  # "short int", "unsigned short int"
        return 2
    return sizes.get(base)


def _nrrd_header(path: Path) -> tuple[dict[str, str], int]:
    """The ``field: value`` lines of an NRRD header and the byte where its data starts (after
    the blank line ending an attached header)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as stream:
        for raw in iter(stream.readline, b""):
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            key, sep, value = line.partition(":")
            if sep and not line.startswith("#") and not value.startswith("="):  # key:=value is metadata
                fields[key.strip().lower()] = value.strip()
        return fields, stream.tell()


def check_nrrd_data(path: str | os.PathLike) -> None:
    """Check a raw-encoded NRRD file's voxel data size against its ``sizes`` and ``type`` before
    SimpleITK reads it, which reads a larger data file silently (rows shifted: a wrong mask, exit
    0). Compressed encodings are checked by their decoder; a list of data files, ``line skip`` or
    ``byte skip`` are left to SimpleITK.

    Raises:
        UserError: data of another size than the header makes, or a missing data file.

    Warns (:class:`~medfcn.errors.InputWarning`): no ``space``, ``space dimension`` or ``space
    directions`` field: the orientation is unknown, and ITK assumes one.
    """
    path = Path(path)
    fields, start = _nrrd_header(path)
    if not {"space", "space dimension", "space directions"} & fields.keys():
        warnings.warn(
            InputWarning(
                f"{path}: has no space, space dimension or space directions field, so its orientation is unknown; "
                "assumed L, P, S along its voxel axes and origin 0 (as ITK reads it); the mask has the same geometry."
            ),
            stacklevel=2,
        )
    name = fields.get("data file", fields.get("datafile"))
    item = _nrrd_type_bytes(fields.get("type", ""))
    skipped = any(fields.get(k, "0") != "0" for k in ("line skip", "byte skip", "lineskip", "byteskip"))
    if fields.get("encoding") != "raw" or item is None or skipped or (name and (" " in name or "%" in name)):
        return
    data, start = (path, start) if not name else (path.parent / name, 0)
    if not data.is_file():
        raise UserError(f"{path}: its data file {data} is missing; put it beside the header, as 'data file' says.")
    sizes = fields.get("sizes", "0")
    need = int(np.prod([int(v) for v in sizes.split()], dtype=np.int64)) * item
    size = data.stat().st_size - start
    if size != need:
        raise UserError(
            f"{path}: holds {size} bytes of voxel data, but its header (sizes {sizes}, {fields['type']}) makes "
            f"{need}: sizes does not match the data (or the file is truncated); fix the header or re-export it."
        )


def itk_read_reason(path: str | os.PathLike) -> str | None:
    """Why SimpleITK cannot read the NRRD or MetaImage file ``path``, in one line (the ITK or
    NRRD library's own last words), or None when it reads it. MONAI's loader hides the reason
    behind "cannot find a suitable reader"; this reads the file again, only once it failed."""
    from medfcn.data.dicom import quiet_fds  # MetaIO prints its complaints straight to stderr

    try:
        with quiet_itk(), quiet_fds():
            sitk.ReadImage(str(path))
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        itk = [line.split("): ", 1)[-1] for line in lines if "ITK ERROR:" in line]
        nrrd = [line.split(": ", 1)[-1] for line in lines if line.startswith("[nrrd]")]
        return (nrrd[-1:] or itk[:1] or lines[-1:] or ["unreadable"])[0][:300]
    return None


def is_itk_file(path: str | os.PathLike) -> bool:
    """True for a file name ending in an NRRD or MetaImage suffix (any letter case)."""
    return Path(path).name.lower().endswith(ITK_SUFFIXES)


def check_mask_format(mask_format: str) -> None:
    """UserError for a ``--mask-format`` that is not one of :data:`MASK_FORMATS`."""
    if mask_format not in MASK_FORMATS:
        raise UserError(f"--mask-format {mask_format!r}: not a mask format; use {', '.join(MASK_FORMATS)}.")


def mask_suffix(scan: str | os.PathLike, mask_format: str = "nifti") -> str:
    """The mask's file suffix for ``scan``: ``.nii.gz``, ``.nrrd`` or ``.mha``.

    ``"input"`` keeps an NRRD or MetaImage scan's format (a ``.nhdr`` gives ``.nrrd``, a
    ``.mhd`` gives ``.mha``: one file each) and writes NIfTI for NIfTI scans and DICOM series.
    """
    check_mask_format(mask_format)
    if mask_format == "input":
        name = Path(scan).name.lower()
        mask_format = next((fmt for suffix, fmt in _INPUT_FORMAT.items() if name.endswith(suffix)), "nifti")
    return _MASK_SUFFIX[mask_format]


def _geometry_from_affine(affine: np.ndarray, scan: str | os.PathLike) -> tuple[tuple, tuple, tuple]:
    """``(origin, spacing, direction)`` in ITK's LPS terms from a RAS affine (mm).

    Raises:
        UserError: the voxel axes are not perpendicular (a sheared affine), which NRRD and
            MetaImage cannot store.
    """
    matrix = _LPS @ affine[:3, :3]
    spacing = np.sqrt((matrix**2).sum(axis=0))
    direction = matrix / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-5):
        raise UserError(
            f"{scan}: its voxel axes are not perpendicular (a sheared affine), which NRRD and MetaImage "
            "cannot store; use --mask-format nifti."
        )
    origin = _LPS @ affine[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def _read_information(path: str | os.PathLike) -> sitk.ImageFileReader:
    """An ImageFileReader that has read ``path``'s header only (no voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with quiet_itk():
        reader.ReadImageInformation()
    return reader


def _mask_geometry(scan: str | os.PathLike | None, affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """The mask's ``(origin, spacing, direction)``: an NRRD/MetaImage scan's own header values,
    copied bit for bit, else (NIfTI, DICOM, no scan given) those of the mask's RAS ``affine``.

    Raises:
        RuntimeError: the scan's header and the mask's affine disagree (a bug, not a user error).
    """
    if scan is None or not is_itk_file(scan):
        return _geometry_from_affine(affine, scan or "the mask")
    header = _read_information(scan)
    image = sitk.Image([1] * header.GetDimension(), sitk.sitkUInt8)
    image.SetOrigin(header.GetOrigin())
    image.SetSpacing(header.GetSpacing())
    image.SetDirection(header.GetDirection())
    if not np.allclose(sitk_affine_ras(image), affine, atol=1e-4):
        raise RuntimeError(f"{scan}: the mask's affine differs from the scan's header:\n{affine}")
    return header.GetOrigin(), header.GetSpacing(), header.GetDirection()


def stage_itk_mask(
    stack: contextlib.ExitStack, labels: np.ndarray, affine: np.ndarray, scan: str | os.PathLike | None, target: Path
) -> None:
    """Write ``labels`` ``(X, Y, Z)`` as a uint8 NRRD or MetaImage (by ``target``'s suffix,
    compressed) to a temporary file that ``stack`` renames onto ``target`` on success.

    Raises:
        UserError: the geometry cannot be stored in the format (a sheared affine); raised
            before anything is staged.
    """
    origin, spacing, direction = _mask_geometry(scan, affine)
    # SimpleITK arrays are indexed [z, y, x]; labels are [x, y, z] (ITK index order).
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint8).transpose(2, 1, 0)))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    tmp = stack.enter_context(atomic_path(target, suffix=target.suffix))
    try:
        sitk.WriteImage(image, str(tmp), True)
    except RuntimeError as err:  # ITK says a write failed without the system's errno
        if "space" not in str(err).lower() and shutil.disk_usage(tmp.parent).free > 2**20:
            raise
        raise UserError(f"{target}: cannot be written (No space left on device); {DISK_FULL_FIX}.") from err


@dataclass(frozen=True)
class ScanGrid:
    """A scan's voxel grid as its header states it: ``shape`` (voxels per spatial axis),
    ``spacing`` (mm per voxel along each) and ``channels`` (values per voxel)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int = 1


def _nifti_grid(path: Path) -> ScanGrid:
    image = nib.load(path)  # the header only; the voxels stay on disk
    spatial = min(len(image.shape), 3)
    scale = _NIFTI_UNIT_MM.get(image.header.get_xyzt_units()[0], 1.0)
    spacing = np.sqrt((image.affine[:3, :spatial] ** 2).sum(axis=0)) * scale
    channels = int(np.prod(image.shape[3:], dtype=int))
    return ScanGrid(tuple(image.shape[:spatial]), tuple(spacing.tolist()), channels)


def _itk_grid(path: Path) -> ScanGrid:
    header = _read_information(path)
    return ScanGrid(tuple(header.GetSize()), tuple(header.GetSpacing()), header.GetNumberOfComponents())


def _dicom_grid(folder: Path) -> ScanGrid | None:
    """The grid of the series in ``folder`` from the headers of its two end slices: those of
    the checked stack, sorted along the normal (a left-out localizer does not count)."""
    files = gdcm_series_files(folder)
    if not files:
        return None
    files = series_files(folder, files)
    first, last = _read_information(files[0]), _read_information(files[-1])
    size, spacing = list(first.GetSize()), list(first.GetSpacing())
    if len(files) > 1:  # one file per slice: the slice step is the distance between the ends
        distance = np.linalg.norm(np.subtract(last.GetOrigin(), first.GetOrigin()))
        size[2], spacing[2] = len(files) * size[2], float(distance) / (len(files) - 1) or spacing[2]
    return ScanGrid(tuple(size), tuple(spacing), first.GetNumberOfComponents())


def scan_grid(path: str | os.PathLike) -> ScanGrid | None:
    """The voxel grid of a NIfTI, NRRD or MetaImage file or a DICOM series folder, from its
    header(s) alone, so a scan too large for memory can be refused before it is read.

    Returns None when the header cannot be read; loading the scan then says why.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return _dicom_grid(path)
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            return _nifti_grid(path)
        return _itk_grid(path)
    except Exception:  # a damaged header: the reader's own message is the better one
        return None


def check_memory_from_header(
    path: str | os.PathLike, in_channels: int, target_spacing: Sequence[float] | None, num_classes: int
) -> None:
    """:func:`~medfcn.data.checks.check_memory` on the grid ``path``'s header states, before any
    voxel is read (nothing when the header cannot be read: loading the scan then says why).

    Raises:
        UserError: the scan would need more memory than :func:`~medfcn.data.checks.memory_budget`.
    """
    grid = scan_grid(path)
    if grid is not None and len(grid.shape) == 3 and min(grid.shape) > 0:
        check_memory(path, grid.shape, grid.spacing, in_channels, target_spacing, num_classes)
