"""The ``cache`` setting (``medfcn train --cache ram|disk|none``): the same cases each way, the
disk cache written under the run folder, reused by a resume, renewed when the preprocessing
changes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Spacingd
from typer.testing import CliRunner

from medfcn.bundle import read_config
from medfcn.cli import app
from medfcn.data.cache import CACHE_KINDS, cached_dataset
from medfcn.errors import UserError
from medfcn.package import package_run
from medfcn.settings import RULES
from medfcn.training import train
from medfcn.training.run import cache_notice

from .conftest import BUNDLE, write_msd_dataset
from .test_train_split import SHAPE, TINY


def _cases(root, n=3):
    data = write_msd_dataset(root, n_cases=n, shape=SHAPE)
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    return [{"image": str(p), "label": str(data / "labelsTr" / p.name)} for p in images]


def _preprocessing(pixdim):
    keys = ["image", "label"]
    return Compose(
        [LoadImaged(keys), EnsureChannelFirstd(keys), Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest"))]
    )


def _files(folder):
    """name -> modification time of the cache's files."""
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")}


def test_each_kind_gives_the_same_cases(tmp_path):
    cases = _cases(tmp_path / "data")
    made = {kind: cached_dataset(kind, cases, _preprocessing((1.5, 1.5, 1.5)), tmp_path / "c") for kind in CACHE_KINDS}
    assert isinstance(made["ram"], CacheDataset) and isinstance(made["disk"], PersistentDataset)
    assert type(made["none"]) is Dataset
    for i in range(len(cases)):
        ram = made["ram"][i]["image"]
        for kind in ("disk", "none", "disk"):  # disk twice: computed, then read back from its file
            assert torch.equal(torch.as_tensor(made[kind][i]["image"]), torch.as_tensor(ram)), kind
    assert len(_files(tmp_path / "c")) == len(cases)  # disk: one file per case
    with pytest.raises(ValueError, match="cache 'ssd': use one of ram, disk, none"):
        cached_dataset("ssd", cases, _preprocessing((1, 1, 1)), tmp_path / "c")
    assert all(RULES["cache"].accepts(kind, 3) for kind in CACHE_KINDS) and not RULES["cache"].accepts("ssd", 3)


def test_the_disk_cache_is_reused_and_renewed_when_the_preprocessing_changes(tmp_path):
    cases, cache = _cases(tmp_path / "data"), tmp_path / "cache"
    first = cached_dataset("disk", cases, _preprocessing((1.5, 1.5, 1.5)), cache)
    [first[i] for i in range(len(cases))]
    written = _files(cache)
    again = cached_dataset("disk", cases, _preprocessing((1.5, 1.5, 1.5)), cache)  # a resume, a later run
    [again[i] for i in range(len(cases))]
    assert _files(cache) == written
    coarser = cached_dataset("disk", cases, _preprocessing((2.0, 2.0, 2.0)), cache)  # another voxel size
    assert tuple(coarser[0]["image"].shape[1:]) != tuple(first[0]["image"].shape[1:])
    assert len(_files(cache)) == len(written) + 1 and set(written) <= set(_files(cache))


def test_a_run_with_the_disk_cache_keeps_it_in_the_run_folder_and_a_resume_reuses_it(tmp_path):
    data = write_msd_dataset(tmp_path / "data", n_cases=5, shape=SHAPE)
    out = tmp_path / "run"
    train(BUNDLE, data, epochs=1, output_dir=out, overrides={**TINY, "cache": "disk"}, notify=lambda line: None)
    written = _files(out / "cache")
    assert len(written) == 5  # 4 training + 1 validation case of fold 0, preprocessed once each
    gone, cut = sorted(written)[:2]
    (out / "cache" / gone).unlink()  # a resume must write this one again, under the same name
    (out / "cache" / cut).write_bytes((out / "cache" / cut).read_bytes()[:100])  # as a killed copy leaves it
    # another process, as a real resume: the files' names (hashes) must not depend on the process
    resumed = subprocess.run(
        [sys.executable, "-m", "medfcn", "train", str(BUNDLE), "--output", str(out), "--resume", "--epochs", "2"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    after = _files(out / "cache")
    assert set(after) == set(written)
    assert {name for name in written if after[name] != written[name]} == {gone, cut}  # only those two rewritten
    trainer = torch.load(out / "last.pt", weights_only=True)["trainer"]
    assert trainer["iteration"] == 2 * trainer["epoch_length"]  # the second epoch ran
    packaged = package_run(out, tmp_path / "bundle")  # how the run was fed is not the bundle's
    assert read_config([packaged / "configs" / "train.json"])["cache"] == "ram"


def test_cache_on_a_bundle_without_the_setting_is_refused(tmp_path):
    older = tmp_path / "older"
    shutil.copytree(BUNDLE, older)
    config = json.loads((older / "configs" / "train.json").read_text())
    del config["cache"], config["cache_dir"]
    for part in ("train", "validate"):
        config[part]["dataset"] = {"_target_": "CacheDataset", "data": "$[]", "transform": "$None"}
    (older / "configs" / "train.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"^--cache disk: .*train.json has no 'cache' entry"):
        train(older, tmp_path / "data", output_dir=tmp_path / "run", cache="disk", option_names={"cache": "--cache"})
    assert not (tmp_path / "run").exists()


def test_a_run_builds_its_datasets_as_cache_says(tmp_path, monkeypatch):
    import medfcn.data.cache

    built = []

    def spy(kind, *args, **kwargs):
        dataset = cached_dataset(kind, *args, **kwargs)
        built.append(type(dataset).__name__)
        return dataset

    monkeypatch.setattr(medfcn.data.cache, "cached_dataset", spy)  # what the config's _target_ names
    data = write_msd_dataset(tmp_path / "data", n_cases=5, shape=SHAPE)
    train(BUNDLE, data, epochs=1, output_dir=tmp_path / "a", overrides=TINY, notify=lambda line: None)
    assert built == ["CacheDataset", "CacheDataset"]  # the bundle's default: training and validation in RAM
    built.clear()
    notices = []
    train(BUNDLE, data, epochs=1, output_dir=tmp_path / "b", overrides=TINY, cache="none", notify=notices.append)
    assert built == ["Dataset", "Dataset"]
    assert [line for line in notices if line.startswith("cache:")] == [cache_notice("none", 0)]
    assert cache_notice("none", 2) == "" and cache_notice("ram", 0) == "" and cache_notice("disk", 0) == ""
    assert (tmp_path / "b" / "last.pt").is_file() and not (tmp_path / "b" / "cache").exists()


def test_a_cache_of_another_kind_is_refused_in_one_line(tmp_path):
    data = write_msd_dataset(tmp_path / "data", n_cases=5, shape=SHAPE)
    result = CliRunner().invoke(
        app, ["train", str(BUNDLE), "--data", str(data), "--output", str(tmp_path / "r")] + ["--cache", "ssd"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("medfcn: error: --cache ssd: must be ram (preprocessed cases in memory)")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_disk_cache_on_a_file_is_refused_before_training(tmp_path):
    data = write_msd_dataset(tmp_path / "data", n_cases=5, shape=SHAPE)
    (tmp_path / "taken").write_text("not a folder")
    settings = {**TINY, "cache": "disk", "cache_dir": str(tmp_path / "taken")}
    with pytest.raises(UserError, match=r"^--set cache_dir .*taken: is a file, not a folder"):
        train(BUNDLE, data, epochs=1, output_dir=tmp_path / "run", overrides=settings, notify=lambda line: None)
    assert not (tmp_path / "run").exists()  # refused before anything is written
