"""Data: readers, dataset lists and folds, preprocessing."""

from medfcn.data.datasets import data_root, fold_datalists, load_msd_datalist, make_folds
from medfcn.data.placement import data_loader, keeps_data_on_device, to_device
from medfcn.data.readers import SimpleITKReader
from medfcn.data.transforms import FileAffined, intensity_normalization

__all__ = [
    "FileAffined",
    "SimpleITKReader",
    "data_loader",
    "data_root",
    "fold_datalists",
    "intensity_normalization",
    "keeps_data_on_device",
    "load_msd_datalist",
    "make_folds",
    "to_device",
]
