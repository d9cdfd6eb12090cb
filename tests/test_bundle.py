"""The hippocampus bundles (3D and slice-wise 2D) through MONAI's own runner: inference.json,
evaluate.json, verify_net_in_out, metadata, and the Dice metadata.json records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import RandFlipd

from medfcn.bundle import COMMON_FILE, MODEL_KEYS, bundle_files
from medfcn.training.handlers import BudgetKeeper, WeightAverage

from .conftest import BUNDLE, BUNDLE_2D, BUNDLES, HIPPO, REPO, need


def configs(bundle, *names: str) -> list[str]:
    """The files MONAI's runner merges for a stage: common.json, then ``names``."""
    return [str(bundle / "configs" / name) for name in (COMMON_FILE, *names)]


def monai_bundle(*args: str, bundle=BUNDLE) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        *args,
        "--meta_file",
        str(bundle / "configs" / "metadata.json"),
        "--bundle_root",
        str(bundle),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_monai_runs_inference_config(tmp_path, bundle):
    case = sorted((need(HIPPO) / "imagesTr").glob("*.nii.gz"))[0]
    (tmp_path / "imagesTs").mkdir()
    shutil.copy(case, tmp_path / "imagesTs" / case.name)
    result = monai_bundle(
        "run",
        "--config_file",
        json.dumps(configs(bundle, "inference.json")),
        "--dataset_dir",
        str(tmp_path),
        "--output_dir",
        str(tmp_path / "out"),
        bundle=bundle,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [case.name]  # the name medfcn infer gives it
    mask = nib.load(str(tmp_path / "out" / case.name))
    image = nib.load(str(case))
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1, 2}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out(bundle):
    config = json.dumps(configs(bundle, "inference.json"))
    result = monai_bundle("verify_net_in_out", "network_def", "--config_file", config, bundle=bundle)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_and_weights(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in (
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ):
        assert key in meta, key
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "anterior",
        "2": "posterior",
    }
    assert (bundle / "models" / "model.pt").stat().st_size < 20 * 2**20
    parser = ConfigParser()
    parser.read_config(configs(bundle, "inference.json"))
    patch = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert patch == parser["patch_size"] and len(patch) == parser["network_def"]["spatial_dims"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluate_reproduces_metadata_dice(tmp_path, bundle):
    """medfcn infer + medfcn evaluate on the held-out fold give the Dice metadata.json records."""
    from medfcn.evaluate import evaluate_folders
    from medfcn.infer import infer

    hippo = need(HIPPO)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())["performance"]
    fold0 = json.loads((REPO / "datasets" / "Task04_Hippocampus" / "folds.json").read_text())["folds"][0]
    infer(bundle, [hippo / "imagesTr" / f"{c}.nii.gz" for c in fold0], tmp_path)
    _, summary = evaluate_folders(tmp_path, hippo / "labelsTr", labels=[1, 2])
    assert abs(summary["dice_1"]["mean"] - meta["fold0_dice_anterior"]) < 2e-3
    assert abs(summary["dice_2"]["mean"] - meta["fold0_dice_posterior"]) < 2e-3
    assert abs(summary["dice_mean"]["mean"] - meta["fold0_dice_mean"]) < 2e-3


@pytest.mark.parametrize("bundle", BUNDLES)
def test_monai_runs_evaluate_config(tmp_path, bundle):
    """train.json + evaluate.json through MONAI's runner: per-case Dice and HD95 CSVs."""
    need(HIPPO)
    result = monai_bundle(
        "run",
        "--config_file",
        json.dumps(configs(bundle, "train.json", "evaluate.json")),
        "--max_cases",
        "3",
        "--output_dir",
        str(tmp_path / "eval"),
        bundle=bundle,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (tmp_path / "eval" / "val_mean_dice_raw.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3, rows  # header + one row per validation case
    dice = [float(line.split(",")[-1]) for line in rows[1:]]  # filename, class 1, class 2, mean
    assert min(dice) > 0.75, dice  # the shipped model on held-out fold-0 cases
    assert (tmp_path / "eval" / "val_hd95_raw.csv").is_file()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_config_passes_monai_property_check(bundle, spheres_dataset, tmp_path):
    """MONAI's ``check_properties`` (run by bundle tooling) reads ``_target_`` of every entry
    of ``train#handlers``: each must be a component, not a bare reference."""
    workflow = ConfigWorkflow(
        config_file=configs(bundle, "train.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(bundle),
        dataset_dir=str(spheres_dataset),  # a synthetic dataset: no real data needed
        folds_file=str(spheres_dataset / "folds.json"),
        output_dir=str(tmp_path),  # the TensorBoard handlers' event files, not runs/ of the checkout
    )
    workflow.initialize()
    workflow.check_properties()  # raised TypeError on a string handler
    assert all(isinstance(h, dict) and "_target_" in h for h in workflow.parser["train#handlers"])
    assert isinstance(workflow.parser.get_parsed_content("weight_average"), WeightAverage)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_amp_follows_the_configured_device(monkeypatch, bundle):
    """float16 AMP only where the bundle trains on CUDA: a run set to the CPU on a GPU machine
    (the exact-resume tests do that) keeps the CPU's precision and no gradient scaling.
    inference.json's evaluator computes as ``medfcn infer`` does, in float32 on CUDA too (the two
    inference paths write the same masks: tests/test_inference_paths.py)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    amp_keys = {"train.json": ["train#trainer#amp", "validate#evaluator#amp"], "inference.json": ["evaluator#amp"]}
    for name, keys in amp_keys.items():
        for device, on_cuda in (("cpu", False), ("cuda", True)):
            expected = on_cuda and name == "train.json"
            parser = ConfigParser()
            parser.read_config(configs(bundle, name))
            parser["device"] = f"$torch.device({device!r})"
            assert [parser.get_parsed_content(k) for k in keys] == [expected] * len(keys), (name, device)


def test_2d_bundle_segments_each_sagittal_slice_on_its_own():
    """The 2D bundle's inferer runs its network on slices along ``slice_axis`` (0, sagittal, the
    axis the 3D bundle flips along): changing one slice of the input changes that slice's
    logits and no other's, and the output keeps the volume's shape."""
    parser = ConfigParser()
    parser.read_config(configs(BUNDLE_2D, "inference.json"))
    parser.update({"bundle_root": str(BUNDLE_2D), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    assert parser.get_parsed_content("slice_axis") == 0
    x = torch.randn(1, 1, 9, 61, 37, generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, :, 4] += 1.0
    with torch.no_grad():
        before, after = inferer(x, network), inferer(changed, network)
    assert before.shape == (1, 3, 9, 61, 37)
    differs = (before - after).abs().amax(dim=(0, 1, 3, 4))
    assert differs[4] > 1e-3 and torch.all(differs[torch.arange(9) != 4] == 0), differs


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_config_matches_training(bundle):
    """What describes the model is stated once, in common.json, which train.json, inference.json
    and evaluate.json are merged onto: a model retrained with another slice axis, patch or
    network would load into a stale copy without any error (the weights keep their shapes). The
    axes ``--tta`` flips must be those the training augmentation flipped."""
    for name in ("train.json", "inference.json", "evaluate.json"):
        stated = json.loads((bundle / "configs" / name).read_text())
        assert not set(MODEL_KEYS) & set(stated), name
        assert bundle_files(bundle, name)["config_files"] == [bundle / "configs" / n for n in (COMMON_FILE, name)]
    train, inference = ConfigParser(), ConfigParser()
    train.read_config(configs(bundle, "train.json"))
    inference.read_config(configs(bundle, "inference.json"))
    for key in MODEL_KEYS:
        assert train.get(key) == inference.get(key), key
    augmentation = train.get_parsed_content("train#augmentation")
    flips = [t.flipper.spatial_axis for t in augmentation if isinstance(t, RandFlipd)]
    assert inference["trained_flip_axes"] == flips


def test_the_2d_bundle_states_only_what_differs():
    """train.json, inference.json and evaluate.json are the same file in both bundles; what makes
    one slice-wise 2D (network, patch, sampler, augmentation axes, inferer, epochs) is in
    common.json, the only config that differs."""
    names = sorted(p.name for p in (BUNDLE / "configs").glob("*.json"))
    assert names == sorted(p.name for p in (BUNDLE_2D / "configs").glob("*.json"))
    differ = [n for n in names if (BUNDLE / "configs" / n).read_bytes() != (BUNDLE_2D / "configs" / n).read_bytes()]
    assert differ == [COMMON_FILE, "metadata.json"]
    assert len((BUNDLE_2D / "configs" / COMMON_FILE).read_text().splitlines()) < 150


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_weight_average_is_found_by_name(bundle, spheres_dataset, tmp_path):
    """train.json reaches the moving average by its name, ``@weight_average``, from the handler
    list, the checkpoint and the evaluator: the handler list can be reordered."""
    stated = json.loads((bundle / "configs" / "train.json").read_text())
    assert "#handlers#" not in json.dumps(stated)
    parser = ConfigParser()
    parser.read_config(configs(bundle, "train.json"))
    overrides = {"bundle_root": str(bundle), "device": "$torch.device('cpu')", "datalists": "$[[], []]"}
    parser.update({**overrides, "output_dir": str(tmp_path)})  # the TensorBoard handlers' event files
    average = parser.get_parsed_content("weight_average")
    assert isinstance(average, WeightAverage)
    assert [h for h in parser.get_parsed_content("train#handlers") if isinstance(h, WeightAverage)] == [average]
    assert parser.get_parsed_content("checkpoint_objects")["weight_average"] is average
    keeper = parser.get_parsed_content("budget_keeper")  # the same for the budget keeper
    assert [h for h in parser.get_parsed_content("train#handlers") if isinstance(h, BudgetKeeper)] == [keeper]
    assert parser.get_parsed_content("checkpoint_objects")["budget"] is keeper


RECIPE = {  # the training pipelines as they were before the configs were split (issue 23)
    "3d": ["SpatialPadd", "RandCropByPosNegLabeld", "RandAffined", "RandFlipd"],
    "2d": ["SpatialPadd", "RandCropByPosNegLabeld", "SqueezeDimd", "RandAffined"],
}


@pytest.mark.parametrize(("bundle", "dims"), [(BUNDLE, "3d"), (BUNDLE_2D, "2d")], ids=["3d", "2d"])
def test_the_split_configs_build_the_recipe_they_always_built(bundle, dims, tmp_path):
    """common.json + train.json build, in the same order, the transforms, handlers and inferers
    the single train.json did: reordered transforms would draw other random numbers."""
    parser = ConfigParser()
    parser.read_config(configs(bundle, "train.json"))
    # output_dir: the TensorBoard handlers open their event files there
    overrides = {"bundle_root": str(bundle), "device": "$torch.device('cpu')", "datalists": "$[[], []]"}
    parser.update({**overrides, "output_dir": str(tmp_path)})
    loading = ["LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd", "NormalizeIntensityd", "EnsureTyped"]
    intensity = ["RandScaleIntensityd", "RandShiftIntensityd", "RandAdjustContrastd", "RandGaussianNoised"]
    transforms = [type(t).__name__ for t in parser.get_parsed_content("train#transforms").transforms]
    assert transforms == loading + RECIPE[dims] + intensity
    handlers = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    assert handlers == [
        *("BudgetKeeper", "ReseedEachEpoch", "WeightAverage", "LrScheduleHandler", "ValidateEvery"),
        "CheckpointWriter",
        *("EpochProgress", "CurveWriter", "TensorBoardStatsHandler", "LearningRateWriter"),
    ]  # Resume is disabled unless resuming
    window = parser.get_parsed_content("validate#inferer").inferer
    assert type(window).__name__ == {"3d": "SlidingWindowInferer", "2d": "SliceInferer"}[dims]
    assert (window.sw_batch_size, window.overlap) == ({"3d": 4, "2d": 64}[dims], 0.5)
    expected = {"3d": (100, 2, [40, 56, 40]), "2d": (40, 8, [56, 40])}[dims]
    assert tuple(parser.get_parsed_content(k) for k in ("epochs", "batch_size", "patch_size")) == expected
