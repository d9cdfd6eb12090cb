"""Writing a segmentation as a mask file: its name, its labels and its geometry, in one place.

``medfcn infer`` and ``python -m monai.bundle run --config_file "['configs/common.json',
'configs/inference.json']"`` write masks through the same code: inference.json's ``writer``
(:class:`SaveMaskd`) writes each mask as MONAI's evaluator produces it, and ``medfcn infer``
stages it with :meth:`SaveMaskd.stage` (all masks of a batch renamed into place together).
A NIfTI scan's NIfTI mask carries the scan's own header geometry (:func:`mask_like_scan`), other
masks the affine of the prediction (mm); NRRD and MetaImage by the target's suffix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import MapTransform

from medfcn.data.datasets import case_id
from medfcn.data.nifti import image_like_scan, is_nifti, mask_like_scan
from medfcn.formats import check_mask_format, is_itk_file, mask_suffix, stage_itk_mask
from medfcn.io import atomic_path

__all__ = [
    "LABEL_COLOURS",
    "MAP_KINDS",
    "SaveMaskd",
    "companion_path",
    "label_colour",
    "mask_labels",
    "mask_name",
    "stage_map",
    "stage_mask",
    "without_maps",
]

# The colour medfcn draws each foreground label in (label 1 first; cycled beyond the eighth), the
# same in the training overlays and the QC report
LABEL_COLOURS = ("#e63c3c", "#3c78e6", "#3cc85a", "#e6c828", "#b43cc8", "#28c8c8", "#e68228", "#8c8c8c")


def label_colour(value: int) -> str:
    """The colour of foreground label ``value`` (1, 2, ...) as ``#rrggbb``."""
    return LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)]


def mask_name(scan: Path, suffix: str = ".nii.gz") -> str:
    """Output file name for ``scan``: its case name + ``suffix`` (``.nii.gz``, ``.nrrd``, ``.mha``),
    reduced to a plain file name so that no input name (``..``, separators, leading dots) can
    place it outside the folder."""
    stem = case_id(scan).replace(os.sep, "_").replace("/", "_").lstrip(".") or "scan"
    return f"{stem}{suffix}"


def mask_labels(pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, affine)`` of a postprocessed prediction ``(1, X, Y, Z)`` (a MetaTensor of class
    indices on the scan's grid): uint8 labels ``(X, Y, Z)`` and its RAS affine in mm (float64)."""
    labels = np.asarray(pred[0].cpu().numpy()).round().astype(np.uint8)
    return labels, np.asarray(pred.affine, dtype=np.float64)


def stage_mask(
    stack: contextlib.ExitStack, labels: np.ndarray, affine: np.ndarray, target: Path, scan: Path | None = None
) -> None:
    """Write the mask to a temporary file that ``stack`` renames onto ``target`` on success
    (NRRD or MetaImage by ``target``'s suffix, else NIfTI).

    A NIfTI scan's NIfTI mask carries the scan's own header geometry (qform, sform, codes,
    units); other masks get ``affine`` (mm)."""
    if is_itk_file(target):
        return stage_itk_mask(stack, labels, affine, scan, target)
    if scan is not None and is_nifti(scan):
        image = mask_like_scan(labels, nib.load(str(scan)))
    else:
        image = _nifti_in_mm(labels, affine, np.uint8)
    nib.save(image, stack.enter_context(atomic_path(target, suffix=".nii.gz")))


def _nifti_in_mm(data: np.ndarray, affine: np.ndarray, dtype: type) -> nib.Nifti1Image:
    """``data`` as ``dtype`` with ``affine`` (mm) as its qform and sform, units mm."""
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")  # the affine is in mm; 0 ("unknown") makes some viewers guess
    return image


def stage_map(
    stack: contextlib.ExitStack,
    values: np.ndarray,
    affine: np.ndarray,
    target: Path,
    scan: Path | None = None,
    description: str = "",
) -> None:
    """Write float32 ``values`` ``(X, Y, Z)``, or ``(X, Y, Z, K)`` channel last, as the NIfTI
    ``target`` (renamed into place by ``stack`` on success) on the mask's grid: a NIfTI scan's
    own header geometry, else ``affine`` (mm), as :func:`stage_mask` writes the mask.
    ``description`` (at most 79 characters kept) goes to the header's ``descrip``."""
    if scan is not None and is_nifti(scan):
        image = image_like_scan(values, nib.load(str(scan)), np.float32)
    else:
        image = _nifti_in_mm(values, affine, np.float32)
    image.header["descrip"] = description[:79].encode("ascii", "replace")
    nib.save(image, stack.enter_context(atomic_path(target, suffix=".nii.gz")))


# The maps medfcn infer can write beside a mask (--uncertainty, --probabilities)
MAP_KINDS = ("uncertainty", "probabilities")


def companion_path(mask: Path, kind: str) -> Path:
    """The NIfTI written beside ``mask`` (``<case>.nii.gz``, ``.nrrd``, ``.mha``) for ``kind``
    (one of :data:`MAP_KINDS`): ``<case>_<kind>.nii.gz``."""
    return mask.with_name(f"{case_id(mask)}_{kind}.nii.gz")


def without_maps(files: Sequence[Path]) -> list[Path]:
    """``files`` less the maps written beside any of them (:func:`companion_path`): the masks of
    a ``medfcn infer`` output folder."""
    maps = {companion_path(f, kind) for f in files for kind in MAP_KINDS}
    return [f for f in files if f not in maps]


class SaveMaskd(MapTransform):
    """Write ``data[key]`` (a postprocessed prediction, see :func:`mask_labels`) as the mask of
    the scan it was read from, ``output_dir/<case>.nii.gz`` (:func:`mask_name`), atomically.

    Args:
        keys: the prediction's key (one).
        output_dir: the folder the masks go to (created when missing).
        mask_format: ``"nifti"``, ``"nrrd"``, ``"mha"`` or ``"input"`` (see
            :func:`medfcn.formats.mask_suffix`).
        image_key: the key whose ``meta["filename_or_obj"]`` is the scan's path.
        name_key: the datalist key that, where an item has it, names the mask instead of the
            scan (``{"image": "export/PAT/STUDY/SERIES", "name": "PAT_STUDY_SERIES"}``: the name
            ``medfcn infer export`` gives the mask of a DICOM series below the folder it was given).
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        output_dir: str | os.PathLike,
        mask_format: str = "nifti",
        image_key: str = "image",
        name_key: str = "name",
    ) -> None:
        super().__init__(keys)
        check_mask_format(mask_format)
        self.output_dir = Path(output_dir)
        self.mask_format = mask_format
        self.image_key = image_key
        self.name_key = name_key

    stage = staticmethod(stage_mask)

    def __call__(self, data: Mapping) -> dict:
        scan = Path(str(data[self.image_key].meta["filename_or_obj"]))
        named = Path(str(data[self.name_key])) if data.get(self.name_key) else scan
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for key in self.key_iterator(dict(data)):
            labels, affine = mask_labels(data[key])
            target = self.output_dir / mask_name(named, mask_suffix(scan, self.mask_format))
            with contextlib.ExitStack() as stack:
                self.stage(stack, labels, affine, target, scan)
        return dict(data)
