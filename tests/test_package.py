"""medfcn.package: a training run becomes a bundle that medfcn infer runs with the run's settings."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import pytest
import torch
from monai.bundle import ConfigParser

from medfcn.bundle import MODEL_KEYS, RUN_FILE
from medfcn.errors import UserError
from medfcn.infer import infer
from medfcn.package import package_run, trained_flip_axes
from medfcn.training import train

from .conftest import BUNDLE, BUNDLE_2D, REPO

# a run whose model differs from the bundle's in every way inference must know about
RUN = {
    "network_def#features": [8, 16, 32],
    "network_def#deep_supervision": 1,
    "class_names": ["dim", "bright"],
    "pixdim": [2.0, 2.0, 2.0],
    "batch_size": 2,
    "val_interval": 1,
    "bf16": False,
}


@pytest.fixture
def run_dir(spheres_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    overrides = {**RUN, "folds_file": str(spheres_dataset / "folds.json"), "patch_size": [16, 16, 12]}
    return train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=out, overrides=overrides)


def _configs(bundle):
    """Parsers of the bundle's training and inference configs, each merged onto common.json."""
    parsers = {}
    for name in ("train", "inference"):
        parsers[name] = ConfigParser()
        parsers[name].read_config([str(bundle / "configs" / f) for f in ("common.json", f"{name}.json")])
        parsers[name]["bundle_root"] = str(bundle)
    return parsers["train"], parsers["inference"]


def test_packaged_bundle_carries_the_runs_model(run_dir, spheres_dataset, tmp_path):
    out = package_run(run_dir, tmp_path / "bundles" / "spheres_fcn")
    train_cfg, inference = _configs(out)
    for key in MODEL_KEYS:  # inference uses what the run trained with: common.json states it once
        assert train_cfg.get(key) == inference.get(key), key
        for name in ("train.json", "inference.json", "evaluate.json"):
            assert key not in json.loads((out / "configs" / name).read_text()), (name, key)
    assert inference["network_def"]["features"] == [8, 16, 32]
    assert inference["class_names"] == ["dim", "bright"] and inference["pixdim"] == [2.0, 2.0, 2.0]
    assert inference["patch_size"] == [16, 16, 12]
    assert inference["trained_flip_axes"] == trained_flip_axes(train_cfg) == [0]
    # train.json retrains the same recipe on the same data and split
    assert train_cfg["dataset_dir"] == str(spheres_dataset.resolve())
    # the given split travels in the bundle: retraining elsewhere holds out the same cases
    assert train_cfg.get_parsed_content("folds_file") == str(out / "configs" / "folds.json")
    assert (out / "configs" / "folds.json").read_bytes() == (spheres_dataset / "folds.json").read_bytes()
    assert train_cfg["batch_size"] == 2
    shipped = torch.load(out / "models" / "model.pt", weights_only=True)
    best = torch.load(run_dir / "best_model.pt", weights_only=True)
    assert shipped.keys() == best.keys() and all(torch.equal(shipped[k], best[k]) for k in best)
    # retraining does not collide with the source's runs
    assert "spheres_fcn" in train_cfg.get_parsed_content("output_dir")
    # inference's default data is the run's, not the source bundle's Task04 folder
    assert inference.get_parsed_content("dataset_dir") == str(spheres_dataset.resolve())
    assert "Task04" not in json.dumps([train_cfg.get(), inference.get()])
    assert "trained by the user" in (out / "LICENSE").read_text()
    # entries the run did not change are written as the source bundle writes them (`@train#dataset`,
    # not MONAI's parser's `@train::dataset`; no empty `_meta_`): the configs differ in the run's options
    for name, unchanged in (
        ("train.json", ("train", "validate", "run")),
        ("common.json", ("imports", "patch_sampler")),
    ):
        source = json.loads((BUNDLE / "configs" / name).read_text())
        text = (out / "configs" / name).read_text()
        packaged = json.loads(text)
        assert text.endswith("}\n") and "_meta_" not in packaged and "::" not in text, name
        assert all(packaged[key] == source[key] for key in unchanged), name
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["name"] == "spheres_fcn"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "dim",
        "2": "bright",
    }
    assert meta["performance"]["best_validation_epoch"] == 1
    readme = (out / "docs" / "README.md").read_text()
    assert "spheres_fcn" in readme.splitlines()[0]
    assert "held out from training" in readme and "fold -1" not in readme

    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    rows = infer(out, [scan], tmp_path / "masks")
    assert {"dim_mm3", "bright_mm3"} <= set(rows[0])
    mask = nib.load(tmp_path / "masks" / "case_000.nii.gz")
    assert mask.shape == nib.load(scan).shape


def test_last_weights_and_refusals(run_dir, tmp_path):
    out = package_run(run_dir, tmp_path / "b", weights="last")
    average = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["weight_average"]["network"]
    shipped = torch.load(out / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(shipped[k], average[k]) for k in average)
    # the best score is still recorded, read from the same last.pt
    assert json.loads((out / "configs" / "metadata.json").read_text())["performance"]["best_validation_epoch"] == 1
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        package_run(run_dir, out)
    package_run(run_dir, out, overwrite=True)
    assert (out / "models" / "model.pt").is_file()
    with pytest.raises(UserError, match="--weights 'final': use best or last"):
        package_run(run_dir, tmp_path / "c", weights="final")
    with pytest.raises(UserError, match=f"{RUN_FILE}: missing; package a run of `medfcn train`"):
        package_run(tmp_path, tmp_path / "d")


def test_a_recorded_device_is_not_packaged(run_dir, tmp_path):
    """Runs before `medfcn train --device` could record a `--set device=...`: the bundle keeps
    the source bundle's choice (CUDA when present), not the machine the run trained on."""
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert "device" not in record["settings"]
    record["settings"]["device"] = "$torch.device('cuda:3')"
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    out = package_run(run_dir, tmp_path / "b")
    assert _configs(out)[0]["device"] == _configs(BUNDLE)[0]["device"]  # train.json


def test_weights_that_do_not_load_leave_nothing(run_dir, tmp_path):
    """Packaged against another bundle (the 2D one) the weights cannot load: one line, and no
    bundle folder or hidden temporary folder is left."""
    target = tmp_path / "out" / "wrong"
    with pytest.raises(UserError, match="the packaged bundle does not load its weights"):
        package_run(run_dir, target, bundle=BUNDLE_2D)
    assert not target.parent.exists() or not any(target.parent.iterdir())


@pytest.mark.parametrize(
    ("augmentation", "axes"),
    [
        ({"spatial_augmentation#1#_disabled_": True}, []),
        ({"spatial_augmentation#1#spatial_axis": [0, 1]}, []),  # a joint flip: no single axis to flip at test time
        ({"spatial_augmentation#1#spatial_axis": [2]}, [2]),
        ({"train#augmentation": f"%{REPO / 'bench' / 'recipes' / 'nnunet_augmentation.json'}#augmentation"}, [0, 1, 2]),
    ],
    ids=["disabled", "joint", "one-element-list", "macro"],
)
def test_trained_flip_axes_follow_the_augmentation(augmentation, axes):
    train_cfg = _configs(BUNDLE)[0]
    train_cfg.update(augmentation)
    assert trained_flip_axes(train_cfg) == axes


def test_a_run_on_all_cases_ships_its_last_weights(spheres_dataset, tmp_path):
    """--fold -1 validates on cases it trained on, so its best epoch was chosen on training data:
    the default is then the last epoch's moving average."""
    overrides = {**RUN, "folds_file": str(spheres_dataset / "folds.json"), "patch_size": [16, 16, 12]}
    run = train(BUNDLE, spheres_dataset, fold=-1, epochs=1, output_dir=tmp_path / "all", overrides=overrides)
    out = package_run(run, tmp_path / "b")
    average = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["weight_average"]["network"]
    shipped = torch.load(out / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(shipped[k], average[k]) for k in average)
    assert "last epoch" in json.loads((out / "configs" / "metadata.json").read_text())["changelog"]["0.1.0"]
    assert "not a held-out score" in (out / "docs" / "README.md").read_text()


def _bundle_without_common_json(tmp_path):
    """The 3D bundle as bundles were before configs/common.json: every stage's config states the
    model itself."""
    legacy = shutil.copytree(BUNDLE, tmp_path / "legacy", ignore=shutil.ignore_patterns("*.ts"))
    common = json.loads((legacy / "configs" / "common.json").read_text())
    for name in ("train.json", "inference.json"):
        path = legacy / "configs" / name
        path.write_text(json.dumps({**common, **json.loads(path.read_text())}, indent=4))
    (legacy / "configs" / "common.json").unlink()
    return legacy


def test_a_bundle_without_common_json_is_packaged_with_one(run_dir, spheres_dataset, tmp_path):
    """Bundles without common.json still run; packaging a run of one states the model once, in
    a new common.json, and takes it out of the other configs."""
    legacy = _bundle_without_common_json(tmp_path)
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    assert len(infer(legacy, [scan], tmp_path / "legacy_masks")) == 1
    out = package_run(run_dir, tmp_path / "b", bundle=legacy)
    common = json.loads((out / "configs" / "common.json").read_text())
    assert common["network_def"]["features"] == [8, 16, 32] and common["class_names"] == ["dim", "bright"]
    for name in ("train.json", "inference.json"):
        assert not set(MODEL_KEYS) & set(json.loads((out / "configs" / name).read_text())), name
    rows = infer(out, [scan], tmp_path / "masks")
    assert {"dim_mm3", "bright_mm3"} <= set(rows[0])
