"""The training data kept on the GPU: the ``data_on_device`` setting.

On a GPU the 2-core CPU, not the GPU, sets the pace of the hippocampus recipe (an H100 epoch
took 6 s, about 4x the CPU's): the random crops, affine warps and intensity changes of every
patch run on the CPU between steps. With ``data_on_device`` on, as in MONAI's fast-training
recipe, the preprocessed cases are cached in GPU memory (``ToDeviced`` ends the deterministic
part the ``ram`` cache keeps), the random augmentation then runs on GPU tensors, and the batches
are made in the training process (worker processes cannot share CUDA tensors). Every case then
sits in the memory of every GPU that trains: for a dataset that does not fit beside the network,
set it false.

``auto`` (the default) turns it on where the run computes on CUDA with the ``ram`` cache and no
worker processes; ``true`` asks for it (refused with another cache or with workers), ``false``
keeps the data on the CPU. On the CPU it changes nothing, and a run trains to the same weights
either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import DataLoader
from monai.transforms import ToDeviced

__all__ = ["data_loader", "data_on_device_conflict", "keeps_data_on_device", "to_device"]


def keeps_data_on_device(setting: str | bool, device: torch.device | str, cache: str, num_workers: int) -> bool:
    """Whether the run keeps its cases on ``device`` (module docstring): ``setting`` ``auto``
    where ``device`` is CUDA, ``cache`` is ``ram`` and ``num_workers`` is 0; ``setting`` itself
    otherwise.

    Raises:
        ValueError: ``setting`` true with another cache or with worker processes (the pre-flight
            checks say it in one line first)."""
    if setting == "auto":
        return torch.device(device).type == "cuda" and cache == "ram" and int(num_workers) == 0
    if setting and (cache != "ram" or int(num_workers) > 0):
        raise ValueError(f"data_on_device true {data_on_device_conflict(cache, int(num_workers))}")
    return bool(setting)


def data_on_device_conflict(cache: str, num_workers: int) -> str:
    """Why ``data_on_device`` true cannot work with ``cache`` and ``num_workers`` (a phrase that
    follows "data_on_device true"); empty if it can."""
    if cache != "ram":
        return f"keeps the cached cases in GPU memory: it needs cache ram, not {cache}"
    if num_workers > 0:
        return f"hands batches over in the training process: it needs num_workers 0, not {num_workers}"
    return ""


def to_device(keys: Sequence[str], device: torch.device | str, on: bool) -> list:
    """The transforms to append to the cached preprocessing: ``ToDeviced`` to ``device`` when
    ``on``, none otherwise."""
    return [ToDeviced(keys=list(keys), device=device)] if on else []


def data_loader(dataset, batch_size: int, on_device: bool, num_workers: int = 0, **kwargs: Any) -> DataLoader:
    """The run's loader of ``dataset`` (MONAI's ``DataLoader``; ``kwargs``: ``sampler``,
    ``shuffle``): in the training process itself when the data is on the device, else with
    ``num_workers`` worker processes. (Not MONAI's ``ThreadDataLoader``: its thread ends the
    epoch quietly when a transform fails, e.g. out of GPU memory, instead of failing the run.)"""
    return DataLoader(dataset, batch_size=batch_size, num_workers=0 if on_device else num_workers, **kwargs)
