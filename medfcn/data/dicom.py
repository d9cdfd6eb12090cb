"""DICOM series as hospitals export them, checked before SimpleITK/GDCM reads a pixel.

A series folder becomes one 3D volume only when its slices form one even, untilted stack:
SimpleITK's ``ImageSeriesReader`` takes the first slice's orientation and one slice step for
the whole series, so uneven steps, a gantry tilt or a localizer in the series would put the
mask's slices millimetres away from the scan's. The headers are read with pydicom (no pixel
data), and every doubt is refused in one line, naming the folder and the fix:

- a transfer syntax the installed GDCM cannot decode (HTJ2K, JPEG XL, video): decompress first;
- an enhanced multi-frame file (a whole series in one file): convert it with dcm2niix;
- fewer than :data:`MIN_SLICES` slices;
- no PixelSpacing or one that is not two positive numbers, NaN/Inf in ImagePositionPatient or
  ImageOrientationPatient, row and column directions that are not perpendicular unit vectors,
  and native pixel data shorter than the image size needs (a truncated file, which GDCM fills up);
- duplicated or missing slices, uneven slice steps, a gantry tilt: nothing is resampled,
  dcm2niix writes an evenly spaced (``_Eq``) or tilt-corrected (``_Tilt``) NIfTI to segment.

Files of another orientation, image size or pixel spacing that share the series UID (a
localizer) are left out with an :class:`~medfcn.errors.InputWarning` naming them, as dcm2niix
converts them apart from the stack.

:func:`find_series` searches an export (``PATIENT/STUDY/SERIES/*.dcm``, maybe a ``DICOMDIR``)
for series folders, probing with GDCM only folders holding a file that starts like DICOM.

Geometry is DICOM's patient frame (LPS, mm) throughout: ``ImagePositionPatient`` is the
centre of a slice's first voxel, ``ImageOrientationPatient`` its row and column directions.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import UID

from medfcn.data.readers import quiet_itk
from medfcn.errors import InputWarning, UserError
from medfcn.outputs import plural

__all__ = [
    "DECODABLE_TRANSFER_SYNTAXES",
    "MIN_SLICES",
    "TOLERANCE_VOXELS",
    "series_files",
    "find_series",
    "looks_like_dicom",
]

# What GDCM 3.0 (inside SimpleITK 2.x) decodes: uncompressed, deflated, JPEG (baseline,
# extended, lossless), JPEG-LS, JPEG 2000 and RLE. Not High-Throughput JPEG 2000 (.4.201-203),
# JPEG XL (.4.110-112), MPEG/HEVC video or private syntaxes: on those GDCM prints hundreds of
# codec lines and fails, so they are refused before any pixel is read.
DECODABLE_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE Lossless
    }
)

# A series needs 3 slices to show that its steps are even, and to be a volume at all.
MIN_SLICES = 3

# How far (in voxels) a slice may lie from the evenly spaced, untilted grid the mask assumes.
# dcm2niix calls steps that differ by more than 0.2 mm uneven, dicom2nifti by 0.1 mm + 5 %;
# 0.1 voxel keeps every voxel within a tenth of a voxel of where the file puts it, and is far
# above the rounding of ImagePositionPatient's decimal strings (1e-5 mm and below in practice).
TOLERANCE_VOXELS = 0.1

_HEADER_TAGS = [
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SOPClassUID",
    "BitsAllocated",
    "SamplesPerPixel",
    "PixelData",  # deferred (DEFER_BYTES): its length is read, not its bytes
]
DEFER_BYTES = 1024
# transfer syntaxes whose pixel data is stored as is: Rows x Columns x samples x bits / 8 per frame
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


@dataclass(frozen=True)
class SliceHeader:
    """What one DICOM file says about its place in the series (LPS, mm)."""

    path: Path
    transfer_syntax: str
    frames: int
    sop_class: str
    position: tuple[float, ...] | None  # ImagePositionPatient: first voxel's centre, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row, column directions
    size: tuple[int, int] | None  # Rows, Columns
    pixel_spacing: tuple[float, ...] | None  # between rows, between columns, mm
    pixel_bytes: tuple[int, int] | None = None  # native pixel data: (bytes in the file, bytes needed)

    def stack_key(self) -> tuple:
        """Equal for files that can be stacked: orientation, image size and pixel spacing
        (rounded, so decimal-string noise does not split a stack)."""
        rounded = tuple(np.round(self.orientation, 3)) if self.orientation else None
        spacing = tuple(np.round(self.pixel_spacing, 3)) if self.pixel_spacing else None
        return rounded, self.size, spacing


def _floats(value) -> tuple[float, ...] | None:
    return tuple(float(v) for v in value) if value is not None else None


def read_header(path: str | os.PathLike) -> SliceHeader:
    """The geometry tags and transfer syntax of one DICOM file, read without its pixel data.

    Raises:
        UserError: the file cannot be read or is no DICOM file.
    """
    try:  # force: GDCM, which listed the file, also reads files without the 'DICM' preamble
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES, specific_tags=_HEADER_TAGS, force=True)
        return _slice_header(Path(path), ds)
    except Exception as err:  # a damaged file or tag raises whatever the parser met first
        raise UserError(
            f"{path}: not a readable DICOM file ({type(err).__name__}: {err}); remove it or export the series again."
        ) from err


def _slice_header(path: Path, ds: pydicom.Dataset) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    rows, columns = ds.get("Rows"), ds.get("Columns")
    return SliceHeader(
        path=path,
        transfer_syntax=str(getattr(meta, "TransferSyntaxUID", "1.2.840.10008.1.2")),
        frames=int(ds.get("NumberOfFrames") or 1),
        sop_class=str(ds.get("SOPClassUID", "")),
        position=_floats(ds.get("ImagePositionPatient")),
        orientation=_floats(ds.get("ImageOrientationPatient")),
        size=(int(rows), int(columns)) if rows is not None and columns is not None else None,
        pixel_spacing=_floats(ds.get("PixelSpacing")),
        pixel_bytes=_pixel_bytes(path, ds, str(getattr(meta, "TransferSyntaxUID", "1.2.840.10008.1.2"))),
    )


def _pixel_bytes(path: Path, ds: pydicom.Dataset, syntax: str) -> tuple[int, int] | None:
    """``(bytes of pixel data in the file, bytes Rows x Columns x SamplesPerPixel x
    BitsAllocated need)`` of a natively stored slice; None for compressed ones or missing tags."""
    element = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    if element is None or syntax not in _NATIVE_SYNTAXES or None in (ds.get("Rows"), ds.get("Columns")):
        return None
    length, start = getattr(element, "length", None), getattr(element, "value_tell", None)
    if length is None or start is None or length == 0xFFFFFFFF:
        return None
    stored = min(int(length), os.path.getsize(path) - int(start))  # a file cut short ends before its length
    need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * int(ds.get("BitsAllocated") or 16)
    return stored, need // 8


def _check_pixel_data(folder: Path, stack: Sequence[SliceHeader]) -> None:
    """Refuse slices whose pixel data is shorter than their image size needs (a truncated file):
    GDCM reads them without complaint, the missing part as zeros."""
    short = [h for h in stack if h.pixel_bytes is not None and h.pixel_bytes[0] < h.pixel_bytes[1]]
    if short:
        stored, need = short[0].pixel_bytes
        raise UserError(
            f"{folder}: {_names(short)}: pixel data holds {stored} of the {need} bytes its Rows x Columns x "
            "BitsAllocated need (a truncated or damaged file); export the series again."
        )


def _check_geometry_values(folder: Path, stack: Sequence[SliceHeader]) -> None:
    """Refuse geometry tags that place no voxel: no PixelSpacing (the voxel size would be
    guessed, and every volume with it), a spacing that is not two positive numbers, NaN/Inf in
    a position or orientation, or row and column directions that are not two perpendicular-enough
    unit vectors (parallel, or zero)."""
    first = stack[0]
    spacing = first.pixel_spacing
    if spacing is None or len(spacing) != 2 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        said = "has no PixelSpacing" if spacing is None else f"PixelSpacing {list(spacing)} is not two positive numbers"
        raise UserError(
            f"{folder}: {first.path.name}: {said} (0028,0030), so the voxel size in mm is unknown (volumes would be "
            "guessed); export the series with its PixelSpacing."
        )
    bad = [h for h in stack if not np.all(np.isfinite(h.position + h.orientation))]
    row, column = np.asarray(first.orientation).reshape(2, 3)
    if bad or not _orthonormal(row, column):
        h = bad[0] if bad else first
        raise UserError(
            f"{folder}: {h.path.name}: ImagePositionPatient {list(h.position)} / ImageOrientationPatient "
            f"{list(h.orientation)} do not place the slice (NaN/Inf, or row and column directions that are not two "
            "perpendicular unit vectors); export the series with its geometry tags."
        )


def _orthonormal(row: np.ndarray, column: np.ndarray, tolerance: float = 0.01) -> bool:
    """True for two unit vectors (within ``tolerance``) at a right angle (cosine within it)."""
    norms = np.linalg.norm(row), np.linalg.norm(column)
    return bool(np.allclose(norms, 1, atol=tolerance) and abs(row @ column) <= tolerance)


def _check_decodable(folder: Path, headers: Sequence[SliceHeader]) -> None:
    """Refuse transfer syntaxes GDCM cannot decode, before it prints its codec noise."""
    undecodable = [h for h in headers if h.transfer_syntax not in DECODABLE_TRANSFER_SYNTAXES]
    if undecodable:
        syntax = UID(undecodable[0].transfer_syntax)
        raise UserError(
            f"{folder}: {len(undecodable)} of {plural(len(headers), 'file')} "
            f"{'is' if len(undecodable) == 1 else 'are'} compressed as {syntax.name} ({syntax}), "
            "which medfcn's DICOM reader (GDCM) cannot decode; decompress the series first "
            "(e.g. `gdcmconv --raw` from GDCM 3.1+, or pydicom's Dataset.decompress() with pylibjpeg-openjpeg) "
            "or convert it to NIfTI with dcm2niix."
        )


def _check_single_frame(folder: Path, headers: Sequence[SliceHeader]) -> None:
    """Refuse enhanced multi-frame files: their geometry is per frame, not per file."""
    multi = next((h for h in headers if h.frames > 1), None)
    if multi is not None:
        kind = UID(multi.sop_class).name if multi.sop_class else "DICOM"
        raise UserError(
            f"{multi.path}: is a multi-frame {kind} file ({multi.frames} frames in one file, "
            "each with its own position); medfcn reads series of one file per slice: convert it to NIfTI "
            "with dcm2niix and segment that."
        )


def _names(headers: Sequence[SliceHeader], at_most: int = 5) -> str:
    names = [h.path.name for h in headers]
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def _select_stack(folder: Path, headers: Sequence[SliceHeader], warn: bool) -> list[SliceHeader]:
    """The files of the series' one stack: the largest group of equal orientation, image size
    and pixel spacing. Others (a localizer) are left out with a warning; a tie is refused."""
    groups = Counter(h.stack_key() for h in headers)
    (key, count), *others = groups.most_common()
    if others and others[0][1] == count:
        raise UserError(
            f"{folder}: holds slices of {len(groups)} orientations or image sizes in equal numbers ({count} each); "
            "put each stack in its own folder."
        )
    kept = [h for h in headers if h.stack_key() == key]
    left_out = [h for h in headers if h.stack_key() != key]
    if left_out and warn:
        warnings.warn(
            InputWarning(
                f"{folder}: left out {plural(len(left_out), 'file')} whose orientation, image size or pixel spacing "
                "differs "
                f"from the other {len(kept)} slices (a localizer?): {_names(left_out)}; segmenting the {len(kept)}."
            ),
            stacklevel=2,
        )
    return kept


def _slice_frame(folder: Path, stack: Sequence[SliceHeader]) -> tuple[np.ndarray, np.ndarray]:
    """``(positions (N, 3) mm, unit slice normal (3,))`` of a stack; UserError when a file
    lacks the tags that place it."""
    unplaced = [h for h in stack if h.position is None or h.orientation is None or len(h.orientation) != 6]
    if unplaced:
        raise UserError(
            f"{folder}: {_names(unplaced)}: no ImagePositionPatient or ImageOrientationPatient, so the slices "
            "cannot be placed; export the series with its geometry tags."
        )
    _check_geometry_values(folder, stack)
    row, column = np.asarray(stack[0].orientation).reshape(2, 3)
    normal = np.cross(row, column)
    return np.asarray([h.position for h in stack]), normal / np.linalg.norm(normal)


def _check_slice_count(folder: Path, count: int) -> None:
    if count < MIN_SLICES:
        raise UserError(
            f"{folder}: a DICOM series of {plural(count, 'slice')}; at least {MIN_SLICES} are needed to check the "
            "slice "
            "spacing and segment a volume; export the whole series."
        )


def _check_tilt(folder: Path, positions: np.ndarray, normal: np.ndarray, pixel_mm: float) -> None:
    """Slices must advance along the slice normal: a gantry tilt shears the stack, and a
    mask on an orthogonal grid would drift by ``tan(angle)`` mm per mm along the series.

    Args:
        positions: slice positions (N, 3), mm, sorted along ``normal``.
        normal: the unit slice normal from ImageOrientationPatient (3,).
        pixel_mm: the smaller in-plane pixel spacing, mm (the drift tolerance's unit).
    """
    span = positions[-1] - positions[0]  # positions are sorted along the normal
    across = span - (span @ normal) * normal  # in-plane drift from the first slice to the last, mm
    drift = float(np.linalg.norm(across))
    if drift > TOLERANCE_VOXELS * pixel_mm:
        angle = float(np.degrees(np.arctan2(drift, abs(span @ normal))))
        raise UserError(
            f"{folder}: slices advance at {angle:.1f} degrees to the slice normal (gantry tilt; {drift:.3g} mm of "
            "in-plane drift over the series); medfcn does not resample tilted series: convert it with dcm2niix, "
            "which writes a tilt-corrected NIfTI (_Tilt_1), and segment that."
        )


def _mm(values) -> str:
    return " and ".join(f"{v:.3g}" for v in values) + " mm"


def _check_even_steps(folder: Path, along: np.ndarray) -> None:
    """Slices must be evenly spaced along the normal: no duplicates, no gaps, no uneven steps.

    Args:
        along: slice positions along the normal, sorted, mm (N,).
    """
    steps = np.diff(along)
    step = float(np.median(steps))
    tolerance = TOLERANCE_VOXELS * step
    if steps.min() <= tolerance:
        at = along[1:][steps <= tolerance]
        raise UserError(
            f"{folder}: {plural(len(at), 'pair')} of slices "
            f"{'shares' if len(at) == 1 else 'share'} a position (e.g. {at[0]:.4g} mm along the normal): a slice "
            "is duplicated, or the series holds several volumes (echoes, time points); export one volume per series."
        )
    multiples = np.round(steps / step)
    if multiples.max() >= 2 and np.abs(steps - multiples * step).max() <= tolerance:
        gaps = steps[multiples >= 2]
        raise UserError(
            f"{folder}: slice positions are uneven (a step of {_mm(np.unique(gaps.round(3)))} where the others are "
            f"{step:.3g} mm): a slice is missing; export the complete series."
        )
    # A reader stacks the slices on the even grid from the first to the last: how far a slice
    # lies from it is how far its part of the mask would be misplaced.
    grid = np.linspace(along[0], along[-1], len(along))
    off = float(np.abs(along - grid).max())
    if off > TOLERANCE_VOXELS * (grid[1] - grid[0]):
        raise UserError(
            f"{folder}: slice steps are uneven ({_mm(np.unique(steps.round(2))[:6])}): on one even grid from the first "
            f"slice to the last, slices would lie up to {off:.3g} mm off (tolerance: a tenth of a step); medfcn does "
            "not resample uneven series: convert it with dcm2niix, which writes an evenly resampled NIfTI (_Eq_1), "
            "and segment that."
        )


def series_files(folder: str | os.PathLike, files: Sequence[str], warn: bool = False) -> list[str]:
    """The files of one DICOM series that form its volume, sorted along the slice normal.

    Args:
        folder: the series folder (named in messages).
        files: the series' files, as GDCM lists them for its series UID.
        warn: warn about left-out files (a localizer); readers pass ``False`` so that the
            warning is given once, when the inputs are listed.

    Raises:
        UserError: undecodable compression, multi-frame files, too few slices, missing or
            duplicated slices, uneven steps or a gantry tilt (each beyond
            :data:`TOLERANCE_VOXELS`).
    """
    folder = Path(folder)
    headers = [read_header(name) for name in files]
    _check_decodable(folder, headers)
    _check_single_frame(folder, headers)
    stack = _select_stack(folder, headers, warn)
    _check_slice_count(folder, len(stack))
    positions, normal = _slice_frame(folder, stack)
    _check_pixel_data(folder, stack)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    pixel_mm = min(stack[0].pixel_spacing or (1.0,))
    _check_tilt(folder, positions, normal, pixel_mm)
    _check_even_steps(folder, positions @ normal)
    return [str(stack[k].path) for k in order]


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Send what C++ code prints to file descriptors 1 and 2 inside the block to /dev/null.

    GDCM's codecs print straight to the process's stdout/stderr while a folder is scanned
    (e.g. "Invalid marker size" per file of a compressed series it cannot parse), bypassing
    Python and ITK's warning switch; medfcn reports what is wrong itself.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def gdcm_series_files(folder: str | os.PathLike) -> list[str] | None:
    """The files of the one DICOM series in ``folder``; ``None`` when it holds no series.

    Raises:
        UserError: the folder holds more than one series.
    """
    with quiet_itk(), quiet_fds():  # "No Series were found" for folders without DICOM, codec noise
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]) if series else ()
    if len(series) > 1:
        raise UserError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder.")
    return list(files) or None


def looks_like_dicom(folder: Path, probe: int = 8) -> bool:
    """True when one of the first ``probe`` files of ``folder`` is named ``*.dcm`` or starts
    like a DICOM file (``DICM`` after the 128-byte preamble); a cheap test before GDCM parses
    the folder."""
    tried = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file() or entry.name.upper() == "DICOMDIR":
                continue
            if entry.name.lower().endswith(".dcm"):  # also files written without the preamble
                return True
            try:
                with open(entry.path, "rb") as file:
                    if file.read(132)[128:] == b"DICM":
                        return True
            except OSError:  # unreadable: not ours to judge here; GDCM would skip it too
                pass
            tried += 1
            if tried >= probe:
                return False
    return False


def find_series(root: str | os.PathLike) -> list[Path]:
    """Folders under ``root`` (itself excluded) that hold DICOM files, sorted: the candidates
    for series folders, for :func:`gdcm_series_files` to probe.

    Hidden folders are skipped, links to folders are not followed, and only the first few
    files of a folder are opened (:func:`looks_like_dicom`), so a large tree costs little;
    GDCM, which parses every file it is shown, probes the candidates only.
    """
    found = []
    for parent, folders, _ in os.walk(root):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found.extend(Path(parent) / name for name in folders if looks_like_dicom(Path(parent) / name))
    return sorted(found)
