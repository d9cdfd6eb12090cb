"""The ``data_on_device`` setting (medfcn.data.placement): cached cases on the GPU, augmented
there, batches made in the training process. Built and run on the CPU here, where it must train to the same weights
as without it; the GPU figures come from bench/cuda_check.sh on a machine with one."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader
from monai.transforms import ToDeviced

from medfcn.bundle import bundle_files
from medfcn.data import data_loader, keeps_data_on_device, to_device
from medfcn.errors import UserError
from medfcn.settings import RULES
from medfcn.training import train
from medfcn.training.settings import resolve_settings

from .conftest import BUNDLE, write_msd_dataset
from .test_train_split import SHAPE, TINY


def test_auto_keeps_the_data_on_cuda_with_the_ram_cache_and_no_workers():
    assert keeps_data_on_device("auto", "cuda:0", "ram", 0)
    assert not keeps_data_on_device("auto", "cpu", "ram", 0)
    assert not keeps_data_on_device("auto", torch.device("cuda", 1), "disk", 0)  # files on disk: on the CPU
    assert not keeps_data_on_device("auto", "cuda", "ram", 2)  # worker processes cannot hand over CUDA tensors
    assert keeps_data_on_device(True, "cpu", "ram", 0) and not keeps_data_on_device(False, "cuda", "ram", 0)
    with pytest.raises(ValueError, match="needs cache ram, not disk"):
        keeps_data_on_device(True, "cuda", "disk", 0)
    with pytest.raises(ValueError, match="needs num_workers 0, not 2"):
        keeps_data_on_device(True, "cuda", "ram", 2)
    assert all(RULES["data_on_device"].accepts(v, 3) for v in ("auto", True, False))
    assert not RULES["data_on_device"].accepts("yes", 3) and not RULES["data_on_device"].accepts(1, 3)


def test_the_transfer_and_the_loader_follow_the_setting():
    (moved,) = to_device(["image", "label"], "cpu", True)
    assert isinstance(moved, ToDeviced) and to_device(["image"], "cpu", False) == []
    data = [{"x": torch.zeros(1)} for _ in range(3)]
    on = data_loader(data, 2, on_device=True, num_workers=2)  # CUDA tensors stay in the training process
    assert type(on) is DataLoader and on.num_workers == 0
    plain = data_loader(data, 2, on_device=False, num_workers=1, shuffle=False)
    assert type(plain) is DataLoader and plain.num_workers == 1


def _settings(data, out, overrides):
    files = bundle_files(BUNDLE, "train.json")
    return resolve_settings(files, {"dataset_dir": data, "output_dir": out}, {**TINY, **overrides}, "cpu", False)


def test_a_run_with_the_data_on_the_device_trains_to_the_same_weights(tmp_path):
    data = write_msd_dataset(tmp_path / "data", n_cases=5, shape=SHAPE)
    on = _settings(data, tmp_path / "x", {"data_on_device": True})
    assert on.get("on_device") and not _settings(data, tmp_path / "y", {}).get("on_device")  # auto, on the CPU
    assert isinstance(on.get("train#transforms").transforms[len(on.get("preprocessing"))], ToDeviced)
    weights = {}
    for setting in (True, False):
        out = tmp_path / f"run_{setting}"
        overrides = {**TINY, "data_on_device": setting, "folds_file": str(data / "folds.json")}
        train(BUNDLE, data, epochs=1, output_dir=out, overrides=overrides, notify=lambda line: None)
        weights[setting] = torch.load(out / "last.pt", weights_only=True)["network"]
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


def test_data_on_device_true_with_the_disk_cache_is_refused_before_training(tmp_path):
    data = write_msd_dataset(tmp_path / "data", n_cases=5, shape=SHAPE)
    overrides = {**TINY, "data_on_device": True, "cache": "disk"}
    with pytest.raises(UserError, match=r"^--set data_on_device true: keeps the cached cases in GPU memory"):
        train(BUNDLE, data, epochs=1, output_dir=tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()
