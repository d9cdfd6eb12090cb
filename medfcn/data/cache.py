"""Where a training run keeps its preprocessed cases: the ``cache`` setting.

- ``ram``: every case preprocessed once, before the first epoch, and held in memory (MONAI's
  ``CacheDataset``): the fastest, while the dataset fits in RAM.
- ``disk``: the deterministic part of the preprocessing (up to the first random transform) is
  written once per case under ``cache_dir`` (MONAI's ``PersistentDataset``) and read back each
  epoch, so memory does not grow with the number of cases. A file's name hashes the case's
  file paths and the preprocessing (``pickle_hashing`` of the transforms and their parameters):
  a resume, or a later run pointed at the same ``cache_dir``, reuses the files; a changed voxel
  size or normalisation writes new ones (a scan replaced in place under the same name does not:
  clear the folder). Files are written beside their final name and renamed, so a killed run
  leaves none half-written; one that cannot be read back is computed again.
- ``none``: each case is read and preprocessed every time it is drawn (MONAI's ``Dataset``);
  set ``num_workers`` so that worker processes do it beside the training.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.utils import convert_to_tensor

from medfcn.io import atomic_path

__all__ = ["CACHE_KINDS", "FileCache", "cached_dataset"]

CACHE_KINDS = ("ram", "disk", "none")


def cached_dataset(
    kind: str,
    data: Sequence[dict],
    transform: Callable,
    cache_dir: str | os.PathLike,
    num_workers: int = 0,
) -> Dataset:
    """The dataset of ``data`` (MONAI data dicts: ``{"image": path, "label": path}``) under
    ``transform``, cached as ``kind`` says (:data:`CACHE_KINDS`).

    Args:
        kind: ``ram``, ``disk`` or ``none`` (module docstring).
        data: the cases, in order.
        transform: preprocessing then augmentation (a MONAI ``Compose``).
        cache_dir: the folder of ``disk``'s files (made when missing); unused otherwise.
        num_workers: threads that fill the ``ram`` cache (0 or 1: one).

    Raises:
        ValueError: another ``kind`` (the settings' rule refuses it earlier, in one line).
    """
    if kind == "ram":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=num_workers, progress=False)
    if kind == "disk":
        # the transforms' hash in each file's name: a changed preprocessing never reads stale files
        return FileCache(data, transform, cache_dir=cache_dir, hash_transform=pickle_hashing)
    if kind == "none":
        return Dataset(data, transform)
    raise ValueError(f"cache {kind!r}: use one of {', '.join(CACHE_KINDS)}")


class FileCache(PersistentDataset):
    """MONAI's ``PersistentDataset`` that writes each file beside its final name and renames it
    (MONAI writes in the system's temporary folder, whose move onto another file system is a
    copy a kill can cut short), and computes again a file it cannot read back (a truncated file
    makes ``torch.load`` fail in ways MONAI re-raises)."""

    def _cachecheck(self, item_transformed):
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if hashfile.is_file():
            try:
                return torch.load(hashfile, weights_only=self.weights_only)
            except Exception as err:  # whatever broke the file (truncated, garbled), computing it again mends it
                warnings.warn(f"{hashfile}: unreadable cache file ({err}); computing it again.", stacklevel=2)
                hashfile.unlink(missing_ok=True)
        computed = self._pre_transform(deepcopy(item_transformed))  # the original stays as it was hashed
        with atomic_path(hashfile) as tmp:
            torch.save(convert_to_tensor(computed, convert_numeric=False, track_meta=self.track_meta), tmp)
        return computed
