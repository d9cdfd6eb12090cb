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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medfcn.data.checks import check_memory
from medfcn.data.dicom import gdcm_series_files, series_files
from medfcn.data.readers import quiet_itk, sitk_affine_ras
from medfcn.errors import UserError
from medfcn.io import DISK_FULL_FIX, NIFTI_SUFFIXES, atomic_path

__all__ = [
    "ITK_SUFFIXES",
    "SCAN_SUFFIXES",
    "MASK_FORMATS",
    "ScanGrid",
    "check_mask_format",
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
