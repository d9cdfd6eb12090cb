"""`medfcn train` on a dataset the bundle was not made for: the automatic split (deterministic,
recorded, reused on resume) and the classes and modality taken from dataset.json."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfcn import FCN
from medfcn.bundle import RUN_FILE, bundle_files
from medfcn.cli import app
from medfcn.data.datasets import make_folds, write_folds
from medfcn.errors import UserError
from medfcn.package import package_run
from medfcn.training import train
from medfcn.training.labels import dataset_labels
from medfcn.training.settings import resolve_settings
from medfcn.training.split import automatic_split

from .conftest import BUNDLE, REPO, write_msd_dataset

# the bundle's pipeline on a narrow network and small patches: an epoch takes seconds
TINY = {
    "network_def#features": [8, 16, 32],
    "network_def#deep_supervision": 1,
    "patch_size": [16, 16, 16],
    "batch_size": 2,
    "val_interval": 100,
    "bf16": False,
}
SHAPE = (20, 24, 16)


def _settings(data, out, overrides=None, resume=False):
    """The run's resolved settings, as `train` resolves them (nothing read but the configs)."""
    files = bundle_files(BUNDLE, "train.json")
    options = {"dataset_dir": data, "output_dir": out}
    return resolve_settings(files, options, {**TINY, **(overrides or {})}, "cpu", resume)


def _relabel(data, labels: dict, modality: dict | None = None):
    """``data``'s dataset.json with other ``labels`` (and ``modality``)."""
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = labels
    if modality is not None:
        meta["modality"] = modality
    (data / "dataset.json").write_text(json.dumps(meta))
    return data


def _one_label(root):
    """The spheres with both sphere labels merged into one, named in dataset.json."""
    data = write_msd_dataset(root, n_cases=5, shape=SHAPE)
    for path in (data / "labelsTr").iterdir():
        image = nib.load(path)
        nib.save(nib.Nifti1Image((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine), path)
    return _relabel(data, {"0": "background", "1": "sphere"})


def _add_case(data):
    """One more case in ``data`` (a copy of its first under a new name)."""
    for folder in ("imagesTr", "labelsTr"):
        shutil.copy(data / folder / "case_000.nii.gz", data / folder / "case_100.nii.gz")
    meta = json.loads((data / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/case_100.nii.gz", "label": "./labelsTr/case_100.nii.gz"})
    (data / "dataset.json").write_text(json.dumps(meta))


def test_automatic_split_is_written_recorded_said_and_reused_on_resume(tmp_path):
    """The bundle's split names Task04's cases: `medfcn train` writes the split `medfcn folds DIR`
    would into the run folder, says so, records it; a resume reuses that very file, and refuses
    a dataset that gained or lost a case since (it would train on other cases)."""
    data = write_msd_dataset(tmp_path / "Spheres", n_cases=6, shape=SHAPE)
    out = tmp_path / "run"
    sets = [a for key, value in TINY.items() for a in ("--set", f"{key}={json.dumps(value)}")]
    args = ["train", str(BUNDLE), "--data", str(data), "--epochs", "1", "--output", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, *sets])
    assert result.exit_code == 0, result.output
    split = out / "folds.json"
    line = (
        f"split: 5 folds of 6 cases of {data} written to {split} (the bundle's split names other cases); "
        "training fold 0"
    )
    assert line in result.output.splitlines()
    ids = [f"case_{i:03d}" for i in range(6)]
    assert json.loads(split.read_text()) == {"n_folds": 5, "seed": 0, "folds": make_folds(ids, 5, 0)}
    write_folds(data, tmp_path / "by_folds_command.json")
    assert split.read_text() == (tmp_path / "by_folds_command.json").read_text()  # as `medfcn folds DIR` writes it
    assert json.loads((out / RUN_FILE).read_text())["settings"]["folds_file"] == str(split.resolve())
    assert json.loads((out / RUN_FILE).read_text())["split_made_by_run"] is True

    written, stamp = split.read_text(), split.stat().st_mtime_ns
    listed = (data / "dataset.json").read_text()
    _add_case(data)
    refused = CliRunner().invoke(app, ["train", str(BUNDLE), "--output", str(out), "--resume", "--epochs", "2"])
    assert refused.exit_code == 2, refused.output
    assert refused.output.strip().endswith(
        f"{data}: 1 case added since the run split it ({split.resolve()}); resumed, it would train on other cases: "
        "start a new run with another --output."
    ), refused.output
    meta = json.loads(listed)
    meta["training"] = meta["training"][1:]
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r": 1 case removed since the run split it"):
        train(BUNDLE, output_dir=out, resume=True, epochs=2)
    (data / "dataset.json").write_text(listed)
    notices = []
    train(BUNDLE, output_dir=out, resume=True, epochs=2, notify=notices.append)
    assert _without_precision(notices) == []  # no split made
    assert split.read_text() == written and split.stat().st_mtime_ns == stamp
    assert json.loads((out / RUN_FILE).read_text())["split_made_by_run"] is True  # still, after the resume
    assert json.loads((out / RUN_FILE).read_text())["settings"]["folds_file"] == str(split.resolve())
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["trainer"]
    assert state["iteration"] == 2 * state["epoch_length"]


def test_a_split_the_user_wrote_into_the_run_folder_is_not_taken_for_the_runs_own(tmp_path):
    """--folds RUN/folds.json given by the user (it may leave cases out on purpose): the record
    says the run did not make it, so a resume does not refuse a dataset that gained a case."""
    data = write_msd_dataset(tmp_path / "Spheres", n_cases=6, shape=SHAPE)
    out = tmp_path / "run"
    out.mkdir()
    write_folds(data, out / "folds.json")
    train(BUNDLE, data, epochs=1, output_dir=out, folds_file=out / "folds.json", overrides=TINY)
    assert json.loads((out / RUN_FILE).read_text())["split_made_by_run"] is False
    _add_case(data)
    train(BUNDLE, output_dir=out, resume=True, epochs=2)  # not refused
    assert json.loads((out / RUN_FILE).read_text())["split_made_by_run"] is False


def test_a_record_of_an_older_medfcn_takes_the_run_folders_split_for_the_runs_own(tmp_path):
    """A record without ``split_made_by_run`` (medfcn before 2026-12-03): the run folder's
    folds.json counts as the split the run made, so a dataset that gained a case is refused."""
    data = write_msd_dataset(tmp_path / "Spheres", n_cases=6, shape=SHAPE)
    out = tmp_path / "run"
    train(BUNDLE, data, epochs=1, output_dir=out, overrides=TINY, notify=lambda line: None)
    record = json.loads((out / RUN_FILE).read_text())
    del record["split_made_by_run"]
    (out / RUN_FILE).write_text(json.dumps(record))
    _add_case(data)
    with pytest.raises(UserError, match=r": 1 case added since the run split it"):
        train(BUNDLE, output_dir=out, resume=True, epochs=2)


def test_an_unknown_fold_of_the_automatic_split_names_the_split_and_its_folds(tmp_path):
    data = write_msd_dataset(tmp_path / "Spheres", n_cases=6, shape=SHAPE)
    out = tmp_path / "run"
    args = ["train", str(BUNDLE), "--data", str(data), "--fold", "7", "--output", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"medfcn: error: --fold 7: the automatic 5-fold split of {data} has folds 0..4; choose one of them, "
        "or -1 to train on all cases.\n"
    )  # not the run folder's folds.json, which is not written
    assert not out.exists()


def test_a_given_split_of_other_cases_or_missing_is_refused(tmp_path):
    """--folds (or --set folds_file) is used as given: the bundle's own Task04 split given
    explicitly, or a missing file, is refused as before, and nothing is written."""
    data = write_msd_dataset(tmp_path / "Spheres", n_cases=6, shape=SHAPE)
    task04 = REPO / "datasets" / "Task04_Hippocampus" / "folds.json"
    out = tmp_path / "run"
    with pytest.raises(UserError, match="split is for another dataset: make one with `medfcn folds"):
        train(BUNDLE, data, epochs=1, output_dir=out, folds_file=task04, overrides=TINY)
    with pytest.raises(UserError, match="split is for another dataset"):
        train(BUNDLE, data, epochs=1, output_dir=out, overrides={**TINY, "folds_file": str(task04)})
    with pytest.raises(UserError, match="missing.json: fold split not found"):
        train(BUNDLE, data, epochs=1, output_dir=out, folds_file=tmp_path / "missing.json", overrides=TINY)
    assert not out.exists()


def test_automatic_split_of_few_cases_and_of_a_null_folds_file(tmp_path):
    """3 cases: 3 folds; folds_file null: a split too; the bundle's split where it fits: used;
    a single case: refused in one line."""
    three = write_msd_dataset(tmp_path / "Three", n_cases=3, shape=SHAPE)
    made = automatic_split(_settings(three, tmp_path / "a"))
    assert made.record == {"n_folds": 3, "seed": 0, "folds": make_folds(["case_000", "case_001", "case_002"], 3, 0)}
    assert made.path == tmp_path / "a" / "folds.json" and not made.path.exists()  # written once the checks pass
    made = automatic_split(_settings(three, tmp_path / "a", {"folds_file": None}))
    assert made is not None and made.reason == "folds_file null"
    assert automatic_split(_settings(three, tmp_path / "a", {"folds_file": str(three / "folds.json")})) is None
    one = write_msd_dataset(tmp_path / "One", n_cases=1, shape=SHAPE)
    with pytest.raises(UserError, match="lists 1 case, cannot make a fold split"):
        train(BUNDLE, one, epochs=1, output_dir=tmp_path / "b", overrides=TINY)
    assert not (tmp_path / "b").exists()


def test_labels_from_dataset_json_with_a_pretrained_encoder(tmp_path):
    """One label in dataset.json, two in the bundle: the run trains 2 classes named as the dataset
    names them, says so, records them; an encoder of a 3-class FCN still loads (frozen: unchanged)."""
    data = _one_label(tmp_path / "OneLabel")
    donor = FCN(3, 1, 3, features=(8, 16, 32), deep_supervision=1).state_dict()
    torch.save(donor, tmp_path / "donor.pt")
    notices, out = [], tmp_path / "run"
    encoder = {"pretrained_encoder": str(tmp_path / "donor.pt"), "freeze_encoder": True}
    train(BUNDLE, data, epochs=1, output_dir=out, overrides={**TINY, **encoder}, notify=notices.append)
    notices = _without_precision(notices)
    assert notices[0] == (
        f"labels: {data / 'dataset.json'} names 1 label ['sphere'], the bundle 2 ['anterior', 'posterior']: "
        "training num_classes=2, class_names=['sphere']"
    )
    assert notices[1].startswith("split: 5 folds of 5 cases")
    settings = json.loads((out / RUN_FILE).read_text())["settings"]
    assert settings["num_classes"] == 2 and settings["class_names"] == ["sphere"]
    trained = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["network"]
    assert trained["head.weight"].shape[0] == 2  # out_channels follows num_classes
    encoder_keys = [k for k in donor if k.startswith("encoder.") and donor[k].is_floating_point()]
    assert encoder_keys and all(torch.equal(trained[k], donor[k]) for k in encoder_keys)
    # the packaged bundle states the run's classes and split
    bundle = package_run(out, tmp_path / "bundle")
    common = json.loads((bundle / "configs" / "common.json").read_text())
    assert common["num_classes"] == 2 and common["class_names"] == ["sphere"]
    # the split the run made, in its folder, travels with the bundle
    assert common["folds_file"] == "$os.path.join(@bundle_root, 'configs', 'folds.json')"
    assert (bundle / "configs" / "folds.json").read_text() == (out / "folds.json").read_text()


def test_labels_set_by_the_user_win_and_same_labels_change_nothing(tmp_path):
    data = _one_label(tmp_path / "OneLabel")
    run = _settings(data, tmp_path / "a", {"class_names": ["atrium"]})
    notice = dataset_labels(run)
    assert run.get("class_names") == ["atrium"] and run.get("num_classes") == 2
    assert notice.endswith("training num_classes=2, class_names=['atrium'] (class_names as given)")
    assert run.recorded["num_classes"] == 2
    # the spheres' dataset.json spells the bundle's classes as Task04 does ("Anterior"): the bundle's kept
    same = write_msd_dataset(tmp_path / "Spheres", n_cases=2, shape=SHAPE)
    run = _settings(same, tmp_path / "b")
    assert dataset_labels(run) is None and run.get("class_names") == ["anterior", "posterior"]
    assert "class_names" not in run.recorded
    # other names of as many labels: the names taken, num_classes as it was
    _relabel(same, {"0": "background", "1": "dim", "2": "bright"})
    run = _settings(same, tmp_path / "c")
    assert dataset_labels(run).endswith("training num_classes=3, class_names=['dim', 'bright']")
    assert run.recorded["class_names"] == ["dim", "bright"] and "num_classes" not in run.recorded


@pytest.mark.parametrize(
    ("modality", "expected"),
    [({"0": "CT"}, "CT"), ({"0": "T2"}, "MRI"), ({"0": "CT", "1": "PET"}, "MRI"), ({"0": "PET"}, "MRI")],
    ids=["ct", "mr-sequence", "multichannel-kept", "unknown-kept"],
)
def test_modality_from_a_single_channel_dataset_json(tmp_path, modality, expected):
    labels = {"0": "background", "1": "Anterior", "2": "Posterior"}
    data = _relabel(write_msd_dataset(tmp_path / "D", n_cases=2, shape=SHAPE), labels, modality)
    run = _settings(data, tmp_path / "a")
    notice = dataset_labels(run)
    assert run.get("modality") == expected
    said = f"modality: {data / 'dataset.json'} names CT, the bundle MRI: training modality=CT"
    assert (notice == said) == (expected == "CT")
    assert (run.recorded.get("modality") == "CT") == (expected == "CT")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"0": "background", "2": "tumour"}, "labels 0, 2 are not 0..N contiguous"),
        ({"0": "liver", "1": "tumour"}, "label 0 is 'liver', not the background"),
        ({"0": "background", "1": "a", "2": "a"}, "must be distinct"),
    ],
    ids=["gap", "no-background", "duplicate"],
)
def test_bad_labels_in_dataset_json_are_refused_with_the_fix(tmp_path, labels, message):
    data = _relabel(write_msd_dataset(tmp_path / "D", n_cases=2, shape=SHAPE), labels)
    with pytest.raises(UserError, match=f"dataset.json: .*{message}.*--set num_classes=N --set 'class_names="):
        train(BUNDLE, data, epochs=1, output_dir=tmp_path / "x", overrides=TINY)
    assert not (tmp_path / "x").exists()
    given = {**TINY, "num_classes": 2, "class_names": ["tumour"]}  # the fix: classes given, labels not read
    assert dataset_labels(_settings(data, tmp_path / "x", given)) is None


def test_class_mismatch_names_the_file_that_states_the_classes(tmp_path):
    """num_classes lives in configs/common.json now: the message names that file, not train.json."""
    data = write_msd_dataset(tmp_path / "Spheres", n_cases=2, shape=SHAPE)
    common = BUNDLE / "configs" / "common.json"
    given = "from --set num_classes or the dataset.json"
    said = f"^{common}: num_classes 2 \\(background \\+ 1, {given}\\) but class_names has 2"
    with pytest.raises(UserError, match=said):
        train(BUNDLE, data, epochs=1, output_dir=tmp_path / "x", overrides={**TINY, "num_classes": 2})
    assert not (tmp_path / "x").exists()


def _without_precision(notices: list[str]) -> list[str]:
    """``notices`` less the ``precision:`` line a CPU without native bfloat16 adds
    (``medfcn.training.run.precision_notice``, tested in test_training_stages)."""
    return [line for line in notices if not line.startswith("precision:")]
