"""A SimpleITK reader for MONAI's ``LoadImage``: DICOM series folders and ITK file formats.

MONAI ships readers for nibabel, ITK (the ``itk`` package), pydicom and PIL, but none for
SimpleITK. This reader fills that gap so that ``LoadImage(reader=SimpleITKReader())`` reads
a DICOM series folder (one file per slice) or any file SimpleITK understands, with the same
metadata MONAI's own readers produce: ``affine`` (RAS, mm), ``original_affine``,
``spatial_shape`` and ``space``.

Axis order follows MONAI's nibabel and ITK readers: the array is indexed ``[x, y, z]``
(ITK index order), so ``affine @ [i, j, k, 1]`` is the world position of voxel ``(i, j, k)``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = ["SimpleITKReader", "sitk_affine_ras", "read_dicom_series", "quiet_itk"]

_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")


def sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel-to-world matrix of a SimpleITK image, in RAS millimetres.

    SimpleITK's geometry is LPS (DICOM's patient frame): world = origin + D @ (spacing * index).
    RAS flips the sign of the first two world axes.
    """
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(dim + 1)
    affine[:dim, :dim] = direction * spacing[None, :]
    affine[:dim, dim] = image.GetOrigin()
    flip = np.diag([-1.0, -1.0] + [1.0] * (dim - 1)) if dim >= 2 else np.eye(dim + 1)
    return flip @ affine


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings inside the block, restoring the previous setting after it.

    GDCM prints "WARNING: ... No Series were found" (and a blank line) straight to stderr,
    outside Python, whenever a folder without DICOM is probed; medfcn reports that itself.
    """
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def read_dicom_series(folder: str | os.PathLike) -> sitk.Image:
    """Read the one DICOM series in ``folder`` as a 3D image, slices sorted by position.

    Only the files of its one stack are read (:func:`medfcn.data.dicom.series_files`: a
    localizer sharing the series UID is left out), after the checks that keep SimpleITK from
    misplacing slices or printing codec noise.

    Raises:
        ValueError: the folder holds no DICOM series.
        UserError: more than one series, or one that cannot be read as an even 3D stack.
    """
    from medfcn.data.dicom import gdcm_series_files, series_files  # it imports quiet_itk from here

    files = gdcm_series_files(folder)
    if not files:
        raise ValueError(f"{folder}: no DICOM image series found in this folder.")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series_files(folder, files))
    return reader.Execute()


class SimpleITKReader(ImageReader):
    """Load DICOM series folders or ITK-readable files with SimpleITK.

    Args:
        channel_dim: the channel axis of the returned array if the file has vector pixels;
            ``None`` means "no channel" for scalar images and last axis for vector images.
        nifti: also read NIfTI files. Pipelines set ``False`` and leave NIfTI to nibabel,
            which raises on a truncated file where SimpleITK silently fills zeros.
        kwargs: unused, accepted for ``LoadImage`` compatibility.

    Example::

        from monai.transforms import LoadImage
        img = LoadImage(reader=SimpleITKReader(), image_only=True)("dicom/PGBM-002_HippoCrop")
        img.shape  # (35, 51, 32), x y z
        img.affine  # RAS, mm
    """

    def __init__(self, channel_dim: int | None = None, nifti: bool = True, **kwargs: Any):
        super().__init__()
        self.channel_dim = channel_dim
        self.nifti = nifti

    def _accepts(self, path: Path) -> bool:
        name = str(path).lower()
        if name.endswith((".nii", ".nii.gz")):
            return self.nifti
        return path.is_dir() or name.endswith(_SUFFIXES)

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """Folders (DICOM series) and the file types SimpleITK reads."""
        return all(self._accepts(Path(name)) for name in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> Sequence[sitk.Image] | sitk.Image:
        images = []
        for name in ensure_tuple(data):
            path = Path(name)
            if not self._accepts(path):
                raise ValueError(f"{path}: not read by SimpleITKReader(nifti={self.nifti}).")
            images.append(read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path)))
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Array indexed ``[x, y, z(, c)]`` and MONAI metadata for one image or a list to stack."""
        arrays = []
        meta: dict = {}
        for image in img if isinstance(img, (list, tuple)) else [img]:
            header = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
            spatial_dims = image.GetDimension()
            # SimpleITK returns [z, y, x(, c)]; reverse the spatial axes to ITK index order.
            array = sitk.GetArrayFromImage(image)
            spatial_axes = tuple(reversed(range(spatial_dims)))
            extra = tuple(range(spatial_dims, array.ndim))
            array = np.transpose(array, spatial_axes + extra)
            header[MetaKeys.ORIGINAL_AFFINE] = sitk_affine_ras(image)
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPATIAL_SHAPE] = np.asarray(image.GetSize())
            header[MetaKeys.SPACE] = SpaceKeys.RAS
            header["spacing"] = np.asarray(image.GetSpacing())
            if self.channel_dim is None:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if array.ndim == spatial_dims else -1
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            arrays.append(array)
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta
