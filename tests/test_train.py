"""medfcn.training: bundle training on synthetic and real data, checkpoints, TensorBoard, resume."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medfcn import FCN
from medfcn.bundle import RUN_FILE, bundle_files, check_override_keys
from medfcn.cli import TRAIN_OPTION_NAMES
from medfcn.errors import UserError
from medfcn.training import train

from .conftest import BUNDLE, BUNDLE_2D, HIPPO, REPO, need, write_msd_dataset

# a small, fast variant of the shipped recipe: the bundle's pipeline with a narrow network
SMALL = {
    "network_def#features": [8, 16, 32],
    "network_def#deep_supervision": 1,
    "batch_size": 4,
    "val_interval": 100,
    "bf16": False,
}


def _events(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _best(run_dir) -> dict:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["best"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bundle", "sampling"),
    [(BUNDLE, {"patch_size": [24, 24, 24]}), (BUNDLE_2D, {"patch_size": [24, 24], "slice_axis": 2})],
    ids=["3d", "2d"],
)
def test_synthetic_training_dice_rises(spheres_dataset, tmp_path, bundle, sampling):
    """Spheres of two intensities: Dice after 1 epoch is low; after 60 epochs (~10 s) both
    classes are found (measured on this seed: mean 0.94 in 3D; 0.89 for the 2D bundle, trained
    on and validated slice by slice along the volumes' shortest axis, whose 28 x 32 slices give
    it the most context: 0.74-0.75 along their first axis, 32 x 24)."""
    overrides = {
        **SMALL,
        "folds_file": str(spheres_dataset / "folds.json"),
        **sampling,
        "learning_rate": 0.01,
        "batch_size": 2,
    }
    first = train(bundle, spheres_dataset, fold=0, epochs=1, output_dir=tmp_path / "e1", overrides=overrides)
    out = train(bundle, spheres_dataset, fold=0, epochs=60, output_dir=tmp_path / "e60", overrides=overrides)
    dice_1, dice_60 = _best(first)["best_metric"], _best(out)["best_metric"]
    assert dice_60 > 0.8, dice_60
    assert dice_60 > dice_1 + 0.3, (dice_1, dice_60)
    acc = _events(out)
    per_class = {k: acc.Scalars(f"val/dice_{k}")[-1].value for k in ("anterior", "posterior")}
    assert min(per_class.values()) > 0.7, per_class


def test_tensorboard_shows_the_rate_each_epoch_trained_with(tmp_path):
    """Epoch k's step holds epoch k's learning rate: the configured one first (PolynomialLR,
    power 0.9, over the run's 3 epochs), not the next epoch's."""
    data = write_msd_dataset(tmp_path / "data", n_cases=4, shape=(20, 24, 16))
    overrides = {**SMALL, "learning_rate": 0.01, "folds_file": str(data / "folds.json")}
    train(BUNDLE, data, fold=0, epochs=3, output_dir=tmp_path / "run", overrides=overrides)
    rates = [(e.step, e.value) for e in _events(tmp_path / "run").Scalars("train/learning_rate")]
    expected = [(k, 0.01 * (1 - (k - 1) / 3) ** 0.9) for k in (1, 2, 3)]
    assert [step for step, _ in rates] == [1, 2, 3]
    assert [value for _, value in rates] == pytest.approx([value for _, value in expected], rel=1e-6)
    # curves.csv: the same rates, each epoch's mean loss, its minutes, the Dice of each validation
    with open(tmp_path / "run" / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx([value for _, value in expected], rel=1e-6)
    minutes = [float(r["minutes"]) for r in rows]
    assert 0 < minutes[0] <= minutes[1] <= minutes[2] < 5 and minutes[0] < minutes[2]
    losses = [e.value for e in _events(tmp_path / "run").Scalars("train/loss")]
    per_epoch = len(losses) // 3
    assert float(rows[0]["loss"]) == pytest.approx(np.mean(losses[:per_epoch]), rel=1e-4)
    dice = {e.step: e.value for e in _events(tmp_path / "run").Scalars("val/mean_dice")}
    assert {int(r["epoch"]): float(r["val_mean_dice"]) for r in rows if r["val_mean_dice"]} == pytest.approx(
        dice, rel=1e-5
    )
    assert {"val_dice_anterior", "val_dice_posterior"} <= set(rows[0])
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert not [f for f in (tmp_path / "run").iterdir() if ".tmp" in f.name]  # written atomically


@pytest.mark.slow
def test_real_hippocampus_two_epochs_checkpoints_tensorboard_resume(tmp_path):
    data = need(HIPPO)
    out = tmp_path / "run"
    overrides = {**SMALL, "max_cases": 6}
    train(BUNDLE, data, fold=0, epochs=2, output_dir=out, overrides=overrides)
    assert (out / "last.pt").is_file() and (out / "best_model.pt").is_file()
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"network", "optimizer", "lr_scheduler", "trainer", "best", "weight_average", "budget"}
    assert ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"]
    assert ckpt["best"]["best_metric_epoch"] == 2  # validation ran after the last epoch
    weights = torch.load(out / "best_model.pt", weights_only=True)  # no map_location: written from CPU copies
    assert "head.weight" in weights and all(t.device.type == "cpu" for t in weights.values())
    # the validated (and shipped) weights are the moving average, not the last iterate
    average = ckpt["weight_average"]["network"]
    assert ckpt["weight_average"]["updates"] == ckpt["trainer"]["iteration"]
    assert all(torch.equal(weights[k], average[k]) for k in weights)
    assert not all(torch.equal(weights[k], ckpt["network"][k]) for k in weights)

    acc = _events(out)
    scalars = set(acc.Tags()["scalars"])
    tags = {"train/loss", "train/learning_rate", "val/mean_dice", "val/dice_anterior", "val/dice_posterior"}
    assert tags <= scalars and not [t for t in scalars if "/" not in t]  # every tag in a group
    assert len(acc.Scalars("train/loss")) == 2 * ckpt["trainer"]["epoch_length"]
    assert 0.0 <= acc.Scalars("val/mean_dice")[-1].value <= 1.0
    overlay = acc.Images("val/overlay")[-1]
    assert (overlay.width, overlay.height) == (1200, 480)  # large enough to read

    # resume: two more epochs continue from epoch 2 with the saved optimizer state
    with pytest.raises(UserError, match="already holds a run"):
        train(BUNDLE, data, fold=0, epochs=4, output_dir=out, overrides=overrides)
    with pytest.raises(UserError, match="finished 2 epochs"):
        train(BUNDLE, data, fold=0, epochs=2, output_dir=out, resume=True, overrides=overrides)
    train(BUNDLE, data, fold=0, epochs=4, output_dir=out, resume=True, overrides=overrides)
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert resumed["trainer"]["iteration"] == 4 * ckpt["trainer"]["epoch_length"]
    assert resumed["lr_scheduler"]["last_epoch"] == 4
    assert resumed["lr_scheduler"]["total_iters"] == 4
    assert len(_events(out).Scalars("train/learning_rate")) == 4
    with open(out / "curves.csv", newline="") as f:  # the first run's rows kept, the resumed epochs after
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[2]["minutes"]) > float(rows[1]["minutes"])
    step = {k: v["step"] for k, v in resumed["optimizer"]["state"].items()}
    assert all(s == 4 * ckpt["trainer"]["epoch_length"] for s in step.values())


@pytest.mark.parametrize(
    ("fold", "resume", "message"), [(0, True, "no checkpoint to resume"), (5, False, "unknown fold 5")]
)
def test_missing_checkpoint_and_unknown_fold_are_user_errors(spheres_dataset, tmp_path, fold, resume, message):
    folds = {"folds_file": str(spheres_dataset / "folds.json")}
    with pytest.raises(UserError, match=message):
        train(BUNDLE, spheres_dataset, fold=fold, epochs=1, output_dir=tmp_path / "x", resume=resume, overrides=folds)


def test_resume_needs_the_same_weight_averaging(spheres_dataset, tmp_path):
    overrides = {**SMALL, "folds_file": str(spheres_dataset / "folds.json")}
    plain = overrides | {"ema_decay": None}
    runs = {name: tmp_path / name for name in ("averaged", "plain", "old")}
    train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=runs["averaged"], overrides=overrides)
    train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=runs["plain"], overrides=plain)
    state = torch.load(runs["averaged"] / "last.pt", map_location="cpu", weights_only=True)
    del state["weight_average"]  # as written before weight averaging was part of the recipe
    runs["old"].mkdir()
    torch.save(state, runs["old"] / "last.pt")

    def resume(name, settings):
        train(BUNDLE, spheres_dataset, fold=0, epochs=2, output_dir=runs[name], resume=True, overrides=settings)

    with pytest.raises(UserError, match="has no weight_average"):
        resume("old", overrides)
    # a run folder that records its settings refuses another ema_decay before the checkpoint is read
    with pytest.raises(UserError, match="started with --set ema_decay 0.999 \\(the bundle's default\\), not null"):
        resume("averaged", plain)
    (runs["plain"] / RUN_FILE).rename(tmp_path / RUN_FILE)  # as a run of MONAI's own runner: nothing recorded
    with pytest.raises(UserError, match="averaging off; add --set ema_decay=null"):
        resume("plain", overrides)
    (tmp_path / RUN_FILE).rename(runs["plain"] / RUN_FILE)
    resume("plain", overrides)  # ema_decay=null is taken from the run's settings
    state = torch.load(runs["plain"] / "last.pt", map_location="cpu", weights_only=True)
    assert state["weight_average"] == {} and state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]


def test_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no dataset.json"):
        train(BUNDLE, tmp_path, fold=0, epochs=1, output_dir=tmp_path / "x")


def test_impossible_network_override_is_a_user_error(spheres_dataset, tmp_path):
    # three scales allow one deep-supervision head; the bundle asks for two
    overrides = {**SMALL, "folds_file": str(spheres_dataset / "folds.json"), "network_def#deep_supervision": 2}
    with pytest.raises(UserError, match="network_def cannot be built.*deep_supervision"):
        train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=tmp_path / "x", overrides=overrides)
    assert not (tmp_path / "x").exists()


def test_transfer_learning_trains_only_the_decoder(spheres_dataset, tmp_path):
    """--encoder/--freeze-encoder (bundle entries pretrained_encoder/freeze_encoder): the run's
    encoder stays bit-identical to the source checkpoint's while its decoder changes."""
    overrides = {**SMALL, "folds_file": str(spheres_dataset / "folds.json"), "val_interval": 1}
    source = train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=tmp_path / "source", overrides=overrides)
    donor = torch.load(source / "best_model.pt", weights_only=True)
    transfer = {**overrides, "pretrained_encoder": str(source / "best_model.pt"), "freeze_encoder": True, "seed": 1}
    out = train(BUNDLE, spheres_dataset, fold=0, epochs=2, output_dir=tmp_path / "transfer", overrides=transfer)
    trained = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["network"]
    encoder = [k for k in donor if k.startswith("encoder.") and donor[k].is_floating_point()]
    decoder = [k for k in donor if k.startswith("decoder.") and k.endswith("weight")]
    assert encoder and decoder
    assert all(torch.equal(trained[k], donor[k]) for k in encoder)
    assert not all(torch.equal(trained[k], donor[k]) for k in decoder)

    # resuming does not need the encoder's file any more (last.pt's weights replace it); the encoder stays frozen
    (source / "best_model.pt").rename(tmp_path / "moved.pt")
    train(BUNDLE, output_dir=out, resume=True, epochs=3)
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["network"]
    assert all(torch.equal(resumed[k], donor[k]) for k in encoder)

    bad = {**overrides, "pretrained_encoder": str(tmp_path / "missing.pt")}
    with pytest.raises(UserError, match="encoder checkpoint not found"):
        train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=tmp_path / "bad", overrides=bad)
    torch.save(FCN(3, 1, 3, features=(4, 8, 16)).state_dict(), tmp_path / "narrow.pt")
    bad["pretrained_encoder"] = str(tmp_path / "narrow.pt")
    with pytest.raises(UserError, match="does not fit this bundle's encoder"):
        train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=tmp_path / "bad", overrides=bad)


def test_resume_reuses_the_runs_settings_and_refuses_others(spheres_dataset, tmp_path):
    """--resume alone continues the run on its own data, split, overrides and length; an option
    given again with another value is refused, before any work."""
    other = write_msd_dataset(tmp_path / "Other", n_cases=4, seed=1)
    overrides = {**SMALL, "folds_file": str(spheres_dataset / "folds.json"), "network_def#fusion": "concat"}
    out = tmp_path / "run"
    train(BUNDLE, spheres_dataset, fold=1, epochs=1, output_dir=out, overrides=overrides, device="cpu")
    saved = json.loads((out / RUN_FILE).read_text())["settings"]
    assert saved["dataset_dir"] == str(spheres_dataset.resolve()) and saved["fold"] == 1 and saved["epochs"] == 1
    assert "device" not in saved  # where it computed: the resume's own choice, on this machine or another
    length = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["trainer"]["epoch_length"]
    for given, message in (
        ({"dataset_dir": other}, "started with --data"),
        ({"fold": 0}, "started with --fold 1, not 0"),
        ({"overrides": {"network_def#fusion": "sum"}}, 'started with --set network_def#fusion "concat", not "sum"'),
        ({"overrides": {"batch_size": 3}}, "started with --set batch_size 4, not 3"),
    ):
        with pytest.raises(UserError, match=message):  # spelt as the CLI spells its options
            train(BUNDLE, output_dir=out, resume=True, epochs=2, option_names=TRAIN_OPTION_NAMES, **given)
    with pytest.raises(UserError, match="started with --set fold 1, not 0"):  # Python callers: config keys
        train(BUNDLE, output_dir=out, resume=True, epochs=2, fold=0)
    copy = tmp_path / "bundles" / "copy_fcn"  # another bundle, even one of the same network: its recipe
    shutil.copytree(BUNDLE, copy)
    with pytest.raises(UserError, match=f"this run trained the bundle {BUNDLE.resolve()}, not {copy.resolve()}"):
        train(copy, output_dir=out, resume=True, epochs=2)
    # nothing but the folder and the new length: the run's dataset (not $MEDFCN_DATA) and fold, and its
    # concat fusion (with the bundle's sum fusion, last.pt would not fit the network and fail to load);
    # a value equal to the bundle's default and a setting that does not change what is learnt are fine
    # a device recorded by older runs (through --set) is not reused: cuda:3 exists on no test machine
    record = json.loads((out / RUN_FILE).read_text())
    (out / RUN_FILE).write_text(json.dumps({**record, "settings": {**saved, "device": "$torch.device('cuda:3')"}}))
    train(BUNDLE, output_dir=out, resume=True, epochs=2, overrides={"learning_rate": 0.002, "num_workers": 0})
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 2 * length
    assert json.loads((out / RUN_FILE).read_text())["settings"]["epochs"] == 2  # the extension is recorded
    with pytest.raises(UserError, match="finished 2 epochs"):  # so a later --resume keeps the new length
        train(BUNDLE, output_dir=out, resume=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batchsize": 4}, "--set batchsize: no 'batchsize' in .*train.json; did you mean 'batch_size'"),
        (
            {"network_def#fusoin#x": 1},
            "--set network_def#fusoin#x: no 'fusoin' in 'network_def'; did you mean 'fusion'",
        ),
        ({"train#batch_size": 4}, "--set train#batch_size: no 'batch_size' in 'train'"),
        (
            {"loss#loss#lamda_ce": 0.5},
            "--set loss#loss#lamda_ce: no 'lamda_ce' in 'loss#loss'; did you mean 'lambda_ce'",
        ),
        ({"patch_size": [4, 4, 4]}, "cannot train on patch_size \\[4, 4, 4\\]"),
        ({"patch_size": [24, 24]}, "--set 'patch_size=\\[24,24\\]': must be a list of 3 whole numbers"),
        ({"num_classes": 2}, "num_classes 2 .* class_names has 2 name"),
        ({"modality": "PET"}, "--set modality=PET: must be MRI, MR or CT"),
        ({"network_def#in_channels": 2}, r"case_\d+.nii.gz: has 1 channel.* network takes 2"),
    ],
    ids=[
        "misspelt",
        "nested",
        "not-a-component",
        "argument",
        "small-patch",
        "2d-patch",
        "classes",
        "modality",
        "channels",
    ],
)
def test_config_mistakes_fail_before_training(spheres_dataset, tmp_path, overrides, message):
    """A misspelt key, a patch the network cannot take, a class list that does not match
    num_classes, an unknown modality or a channel count the images do not have: one line each,
    before any data is loaded or any output folder is made."""
    settings = {**SMALL, "folds_file": str(spheres_dataset / "folds.json"), **overrides}
    with pytest.raises(UserError, match=message):
        train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=tmp_path / "x", overrides=settings)
    assert not (tmp_path / "x").exists()


def test_split_of_another_dataset_says_how_to_make_one(spheres_dataset, tmp_path):
    """A split given for another dataset (the bundle's own, of Task04 case names, given as --folds;
    without --folds the run makes a split of its own: tests/test_train_split.py), and a missing
    split file, both point to `medfcn folds` and --folds; --folds then trains."""
    task04 = REPO / "datasets" / "Task04_Hippocampus" / "folds.json"
    with pytest.raises(UserError, match="split is for another dataset: make one with `medfcn folds .* --folds FILE"):
        train(
            BUNDLE,
            spheres_dataset,
            fold=0,
            epochs=1,
            output_dir=tmp_path / "x",
            folds_file=task04,
            overrides=SMALL,
            option_names=TRAIN_OPTION_NAMES,
        )
    with pytest.raises(UserError, match="pass --set folds_file FILE"):  # Python callers: the config key
        train(BUNDLE, spheres_dataset, fold=0, epochs=1, output_dir=tmp_path / "x", folds_file=task04, overrides=SMALL)
    with pytest.raises(UserError, match="missing.json: fold split not found; make one with `medfcn folds"):
        train(BUNDLE, spheres_dataset, epochs=1, output_dir=tmp_path / "x", folds_file=tmp_path / "missing.json")
    out = train(
        BUNDLE,
        spheres_dataset,
        epochs=1,
        output_dir=tmp_path / "x",
        folds_file=spheres_dataset / "folds.json",
        overrides=SMALL,
    )
    assert (out / "last.pt").is_file()


@pytest.mark.parametrize(
    "overrides",
    [
        {"network_def#encoder_blocks": [1, 3, 3, 1, 1]},  # an argument of medfcn.FCN the config does not set
        {"network_def::encoder_blocks": [1, 3, 3, 1, 1]},  # MONAI's own separator
        {"loss#loss#include_background": False},
        {"spatial_augmentation#1#_disabled_": True},
        {  # a macro, then an entry that exists only in what it brings in
            "train#augmentation": f"%{REPO / 'bench' / 'recipes' / 'nnunet_augmentation.json'}#augmentation",
            "train#augmentation#10#prob": 0.3,
        },
    ],
    ids=["argument", "separator", "nested-argument", "reserved", "macro"],
)
def test_overrides_of_existing_entries_and_arguments_are_accepted(overrides):
    check_override_keys(bundle_files(BUNDLE, "train.json")["config_files"], overrides)
