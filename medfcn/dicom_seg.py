"""A mask as a DICOM Segmentation object (highdicom) that references the series it segments.

``medfcn infer --dicom-seg`` writes ``<case>_seg.dcm`` beside the NIfTI mask of every DICOM
series input, for PACS and DICOM viewers: one segment per label (its class name, "automatic",
medfcn and the bundle as the algorithm), frames on the source slices' positions and orientation
(oblique series too), and the source series and instances referenced.

Each source slice is matched to the mask by geometry, not by order: its Image Position (Patient)
must fall on a slice of the mask's grid (within 1 % of a voxel) and its Image Orientation on the
grid's axes; anything else is refused in one line instead of a SEG that would lie on other slices.

Needs the ``dicom`` extra (highdicom, pydicom): ``pip install -e '.[dicom]'`` in a clone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from medfcn.data.datasets import case_id
from medfcn.data.dicom import gdcm_series_files, series_files
from medfcn.errors import UserError
from medfcn.io import atomic_path

__all__ = ["SEG_SUFFIX", "check_dicom_seg_available", "segmentation", "seg_path", "stage_dicom_seg"]

SEG_SUFFIX = "_seg.dcm"
_INSTALL = "pip install 'highdicom>=0.23' 'pydicom>=3' (medfcn's dicom extra: pip install -e '.[dicom]' in a clone)"
# how far (voxels) a source slice's position or orientation may lie off the mask's grid
_TOLERANCE_VOXELS = 0.01
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (DICOM's patient coordinates)


def check_dicom_seg_available() -> None:
    """UserError naming the install command when highdicom is missing."""
    try:
        import highdicom  # noqa: F401
    except ImportError as err:
        raise UserError(f"--dicom-seg needs highdicom, which is not installed: {_INSTALL}") from err


def seg_path(mask: Path) -> Path:
    """``<case>_seg.dcm`` beside ``mask`` (``<case>.nii.gz``, ``.nrrd``, ``.mha``)."""
    return mask.with_name(case_id(mask) + SEG_SUFFIX)


# Type 2 attributes (present, possibly empty) of the Patient and Study modules that highdicom
# copies from the source into the SEG; de-identified series often drop them altogether.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _source_slices(folder: Path) -> list[pydicom.Dataset]:
    """The series' slices that form its volume (a localizer left out), read into memory; a
    Patient or Study attribute the SEG copies and a de-identified file dropped is set empty
    there (the files are not touched)."""
    sources = [pydicom.dcmread(name) for name in series_files(folder, gdcm_series_files(folder) or [])]
    for source in sources:
        for keyword in _TYPE2:
            if keyword not in source:
                setattr(source, keyword, "")
    return sources


def _frames(labels: np.ndarray, affine_ras: np.ndarray, sources: Sequence[pydicom.Dataset], folder: Path) -> np.ndarray:
    """The mask's slice under each source slice: ``(len(sources), rows, columns)`` uint8.

    ``labels``: ``(X, Y, Z)`` on the series' grid, X along a source row (columns), Y down its
    columns (rows); ``affine_ras``: its voxel-to-RAS affine (mm).

    Raises:
        UserError: a source slice that is not a slice of the mask's grid.
    """
    to_voxel = np.linalg.inv(_LPS @ affine_ras)
    axes = (_LPS @ affine_ras)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    frames = []
    for source in sources:
        orientation = np.asarray(source.ImageOrientationPatient, dtype=float).reshape(2, 3)
        position = np.asarray(source.ImagePositionPatient, dtype=float)
        index = to_voxel @ np.append(position, 1.0)
        k = int(round(index[2]))
        on_grid = np.allclose(index[:2], 0, atol=_TOLERANCE_VOXELS) and abs(index[2] - k) < _TOLERANCE_VOXELS
        aligned = np.allclose(orientation, axes[:, :2].T, atol=1e-3)
        same_size = (int(source.Rows), int(source.Columns)) == (labels.shape[1], labels.shape[0])
        if not (on_grid and aligned and same_size and 0 <= k < labels.shape[2]):
            raise UserError(
                f"{folder}: slice {source.get('InstanceNumber', '?')} is not on the mask's grid (position "
                f"{position.round(3).tolist()} mm); the mask cannot be written as DICOM SEG of this series. "
                "Segment the series again."
            )
        frames.append(labels[:, :, k].T)
    return np.ascontiguousarray(np.stack(frames), dtype=np.uint8)


def segmentation(
    folder: str | os.PathLike,
    labels: np.ndarray,
    affine_ras: np.ndarray,
    class_names: Sequence[str],
    model: tuple[str, str] = ("medfcn", ""),
) -> pydicom.Dataset:
    """The DICOM Segmentation of ``labels`` (``(X, Y, Z)`` uint8, the series' grid, RAS affine
    in mm) for the DICOM series in ``folder``: segment k is label k, named ``class_names[k - 1]``;
    ``model``: the bundle's name and version, the algorithm that made it.

    Raises:
        UserError: highdicom missing, a source slice off the mask's grid, or a series highdicom
            cannot reference (an attribute missing or malformed).
    """
    check_dicom_seg_available()
    folder = Path(folder)
    try:
        sources = _source_slices(folder)
        frames = _frames(labels, affine_ras, sources, folder)
        return _segmentation(sources, frames, class_names, model)
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # pydicom's and highdicom's
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{folder}: its DICOM SEG cannot be made ({reason}); run without --dicom-seg for this series."
        ) from err


def _segmentation(
    sources: list[pydicom.Dataset], frames: np.ndarray, class_names: Sequence[str], model: tuple[str, str]
) -> pydicom.Dataset:
    """highdicom's Segmentation of ``frames`` (one per source slice, label values) over ``sources``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medfcn import __version__

    name, version = model
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medfcn {name}"[:64], version=(version or __version__)[:64], family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            # no standard code is known for a bundle's class names: a local (99) coding scheme
            segmented_property_type=hd.sr.CodedConcept(
                value=f"MEDFCN{k}", scheme_designator="99MEDFCN", meaning=label[:64]
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k, label in enumerate(class_names, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfcn",
        manufacturer_model_name=f"{name} {version}".strip()[:64] or "medfcn",
        software_versions=f"medfcn {__version__}",
        device_serial_number="none",
        series_description=f"medfcn {name}"[:64],
        omit_empty_frames=False,  # every source slice has its frames: viewers show the mask on every slice
    )


def stage_dicom_seg(
    stack: contextlib.ExitStack,
    folder: Path,
    labels: np.ndarray,
    affine_ras: np.ndarray,
    class_names: Sequence[str],
    target: Path,
    model: tuple[str, str] = ("medfcn", ""),
) -> None:
    """Write :func:`segmentation` to a temporary file that ``stack`` renames onto ``target``."""
    dataset = segmentation(folder, labels, affine_ras, class_names, model)
    dataset.save_as(str(stack.enter_context(atomic_path(target, suffix=".dcm"))), enforce_file_format=True)
