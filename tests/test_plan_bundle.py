"""The bundle ``medfcn plan`` writes (medfcn.planning.writer, medfcn.planning.run, the CLI): every
file, the stage configs the template's, and a planned bundle that trains, is packaged, infers
(also through MONAI's runner) and evaluates like the shipped ones. The plan and fingerprint are
made by hand here: the rules and the fingerprint have their own tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medfcn.planning
from medfcn.bundle import read_config
from medfcn.cli import app
from medfcn.errors import UserError
from medfcn.planning import run as planning_run
from medfcn.planning.rules import Plan
from medfcn.planning.writer import STAGE_FILES, template_text, write_bundle

from .conftest import NO_CUDA_DEVICE, REPO, write_msd_dataset

BUNDLE_FILES = [
    "LICENSE",
    "configs/common.json",
    "configs/evaluate.json",
    "configs/fingerprint.json",
    "configs/inference.json",
    "configs/logging.conf",
    "configs/metadata.json",
    "configs/multi_gpu_train.json",
    "configs/plan.json",
    "configs/train.json",
    "docs/README.md",
]


def tiny_plan(dims: int = 3, **changes) -> Plan:
    """A plan for the spheres dataset small enough to train in seconds on a CPU."""
    plan = Plan(
        dims=dims,
        pixdim=[1.0, 1.0, 1.0],
        modality="MRI",
        in_channels=1,
        num_classes=3,
        class_names=["Anterior", "Posterior"],
        patch_size=[16, 16, 16] if dims == 3 else [16, 16],
        features=[4, 8, 16],
        strides=[[2] * dims, [2] * dims],
        encoder_blocks=[1, 1, 1],
        deep_supervision=1,
        batch_size=1,
        epochs=2,
        val_interval=1,
        flip_axes=[0],
        budget_minutes=1.0,
        device="cpu",
        slice_axis=None if dims == 3 else 2,
        seconds_per_step=0.05,
        seconds_per_validation=1.0,
        seconds_setup=2.0,
        planned_minutes=0.3,
        reasons={
            "pixdim": "the median spacing (isotropic data)",
            "patch_size": "covers the median shape",
            "epochs": "what fits the budget at the probe's speed",
            "normalisation": "MRI: z-score per volume",
            "search": "tried |a| and\nb",
        },
    )
    for key, value in changes.items():
        setattr(plan, key, value)
    return plan


def tiny_fingerprint(dataset: Path) -> dict:
    """A fingerprint of the schema in medfcn.planning's docstring, for ``dataset``."""
    meta = json.loads((dataset / "dataset.json").read_text())
    cases = [Path(item["image"]).name.split(".")[0] for item in meta["training"]]
    volumes = {"min": 300.0, "median": 500.0, "max": 800.0}
    return {
        "medfcn_fingerprint": 1,
        "dataset": {
            "name": meta["name"],
            "dir": str(dataset.resolve()),
            "modality": meta["modality"],
            "labels": meta["labels"],
            "num_cases": len(cases),
        },
        "cases": [
            {
                "case": case,
                "shape": [28, 32, 24],
                "spacing_mm": [1.0, 1.0, 1.0],
                "orientation": "RAS",
                "channels": 1,
                "label_voxels": {"1": 500, "2": 500},
                "label_centroids_vox": {"1": [14, 16, 12], "2": [14, 16, 12]},
            }
            for case in cases
        ],
        "intensity": {"0": {"name": "MRI", "mean": 0.7, "std": 0.3, "min": -0.5, "max": 1.6}},
        "labels": {
            k: {"name": n, "cases_present": len(cases), "voxels": volumes, "volume_mm3": volumes}
            for k, n in meta["labels"].items()
            if k != "0"
        },
        "summary": {
            "median_shape": [28, 32, 24],
            "median_spacing_mm": [1.0, 1.0, 1.0],
            "min_spacing_mm": [1.0, 1.0, 1.0],
            "max_spacing_mm": [1.0, 1.0, 1.0],
            "channels": 1,
        },
    }


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_write_bundle_writes_every_file_and_the_templates_stage_configs(tmp_path, spheres_dataset):
    plan, fingerprint = tiny_plan(), tiny_fingerprint(spheres_dataset)
    out = write_bundle(plan, fingerprint, tmp_path / "spheres_fcn")
    assert _files(out) == BUNDLE_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Spheres", "spheres_fcn"]  # no temporary folder left
    for name in STAGE_FILES:
        assert (out / "configs" / name).read_bytes() == (REPO / "medfcn" / "planning" / "template" / name).read_bytes()
    # each stage merged as MONAI's runner merges it (evaluate.json onto the training config)
    for stages in (["train.json"], ["inference.json"], ["train.json", "evaluate.json"]):
        parser = read_config([out / "configs" / name for name in ("common.json", *stages)])
        assert parser.get_parsed_content("patch_size") == [16, 16, 16]
        assert parser.get_parsed_content("network_def#features") == [4, 8, 16]
    common = json.loads((out / "configs" / "common.json").read_text())
    shipped = json.loads((REPO / "bundles" / "hippocampus_fcn" / "configs" / "common.json").read_text())
    assert list(common) == list(shipped)  # the shipped 3D bundle's keys, in its order
    assert common["bundle_name"] == "spheres_fcn" and common["folds_file"] is None
    assert common["modality"] == "MRI" and common["hu_window"] is None  # a CT setting: stated, but null
    assert common["dataset_dir"] == str(spheres_dataset.resolve())
    assert common["network_def"] == {
        "_target_": "medfcn.FCN",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": "@num_classes",
        "features": [4, 8, 16],
        "fusion": "sum",
        "deep_supervision": 1,
    }  # no encoder_blocks (all 1), no strides (all 2)
    assert common["trained_flip_axes"] == [0] and common["spatial_augmentation"][1]["spatial_axis"] == 0
    assert json.loads((out / "configs" / "fingerprint.json").read_text()) == fingerprint
    assert json.loads((out / "configs" / "plan.json").read_text()) == plan.to_json()


def test_metadata_readme_and_licence_say_what_was_planned(tmp_path, spheres_dataset):
    plan = tiny_plan()
    out = write_bundle(plan, tiny_fingerprint(spheres_dataset), tmp_path / "spheres_fcn")
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.1.0" and meta["label_classes"] == "0 background, 1 Anterior, 2 Posterior"
    assert meta["label_volumes_mm3"]["Posterior"] == {"min": 300.0, "median": 500.0, "max": 800.0, "cases_present": 12}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16, 16]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    assert "licence: unknown" in meta["data_source"] and "medfcn_training_data" not in meta
    readme = (out / "docs" / "README.md").read_text()
    for decision, reason in plan.reasons.items():
        assert f"`{decision}`" in readme and reason.replace("|", "\\|").replace("\n", " ") in readme
    assert "| `search` |  | tried \\|a\\| and b |" in readme  # one row of the table
    assert "planned training time 0.3 minutes" in readme and "python -m monai.bundle run" in readme
    assert f"medfcn train BUNDLE --data {spheres_dataset.resolve()}" in readme
    assert "state them here before sharing" in (out / "LICENSE").read_text()


def test_network_def_states_blocks_and_pooling_only_where_not_the_default(tmp_path, spheres_dataset):
    plan = tiny_plan(encoder_blocks=[1, 2, 2], strides=[[2, 2, 1], [2, 2, 2]])
    out = write_bundle(plan, tiny_fingerprint(spheres_dataset), tmp_path / "b")
    network = json.loads((out / "configs" / "common.json").read_text())["network_def"]
    assert network["encoder_blocks"] == [1, 2, 2] and network["strides"] == [[2, 2, 1], [2, 2, 2]]


def test_a_ct_plan_states_its_window_and_foreground_statistics(tmp_path, spheres_dataset):
    plan = tiny_plan(modality="CT", hu_window=[-57.0, 164.0], intensity_stats=[99.5, 39.4], pixdim=[0.8, 0.8, 5.0])
    out = write_bundle(plan, tiny_fingerprint(spheres_dataset), tmp_path / "ct")
    common = json.loads((out / "configs" / "common.json").read_text())
    assert (common["modality"], common["hu_window"], common["intensity_stats"]) == ("CT", [-57.0, 164.0], [99.5, 39.4])
    assert common["pixdim"] == [0.8, 0.8, 5.0]
    image = json.loads((out / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    assert (image["modality"], image["format"]) == ("CT", "hounsfield")
    said = "clipped to [-57.0, 164.0] HU, then z-score with mean 99.5, std 39.4 HU"
    assert said in (out / "docs" / "README.md").read_text()


def test_a_plan_the_shared_train_json_cannot_state_is_refused(tmp_path, spheres_dataset):
    with pytest.raises(ValueError, match="learning_rate"):
        write_bundle(tiny_plan(learning_rate=0.01), tiny_fingerprint(spheres_dataset), tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("modality, window", [("MRI", [-160.0, 240.0]), ("CT", None)])
def test_a_window_is_planned_for_ct_and_only_ct(tmp_path, spheres_dataset, modality, window):
    with pytest.raises(ValueError, match="hu_window"):
        write_bundle(tiny_plan(modality=modality, hu_window=window), tiny_fingerprint(spheres_dataset), tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """4 spheres cases of 24 x 24 x 20 voxels: a split of 3 training cases and 1 held out."""
    return write_msd_dataset(tmp_path / "Small", n_cases=4, shape=(24, 24, 20))


def _split(dataset: Path, tmp_path: Path) -> Path:
    from medfcn.data.datasets import write_folds

    write_folds(dataset, tmp_path / "split.json", n_folds=4)
    return tmp_path / "split.json"


@pytest.mark.slow
def test_a_planned_bundle_trains_packages_infers_and_evaluates(tmp_path, small_dataset):
    """As a user runs it: no split given (the run makes and records one, a resume reuses it),
    pooling per axis, then package (the plan kept), infer, evaluate, and MONAI's runner."""
    from medfcn.training import train

    plan = tiny_plan(strides=[[2, 2, 1], [2, 2, 2]])
    bundle = write_bundle(plan, tiny_fingerprint(small_dataset), tmp_path / "spheres_fcn")
    assert json.loads((bundle / "configs" / "common.json").read_text())["network_def"]["strides"] == plan.strides
    cli, scan = CliRunner(), small_dataset / "imagesTr" / "case_000.nii.gz"
    missing = cli.invoke(app, ["infer", str(bundle), str(scan), "--out", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "medfcn package" in missing.output, missing.output
    run = train(bundle, dataset_dir=small_dataset, output_dir=tmp_path / "run", epochs=1, overrides={"max_cases": 2})
    split = (run / "folds.json").read_text()
    assert json.loads(split)["n_folds"] == 4  # the default split of 4 cases
    assert json.loads((run / "medfcn_run.json").read_text())["settings"]["folds_file"] == str(run / "folds.json")
    train(bundle, output_dir=run, epochs=2, resume=True)
    assert (run / "folds.json").read_text() == split
    assert (run / "last.pt").is_file() and (run / "best_model.pt").is_file()
    packaged = tmp_path / "trained"
    result = cli.invoke(app, ["package", str(run), "--out", str(packaged)])
    assert result.exit_code == 0, result.output
    assert (packaged / "configs" / "plan.json").read_text() == (bundle / "configs" / "plan.json").read_text()
    assert (packaged / "configs" / "fingerprint.json").is_file()
    readme = (packaged / "docs" / "README.md").read_text()
    assert "How `medfcn plan` configured the bundle" in readme and "Decisions" in readme
    assert "no weights" not in readme and "TRAINED_BUNDLE" not in readme, readme  # the untrained bundle's steps
    # the run's split travels with the bundle; a smoke run's max_cases does not
    assert (packaged / "configs" / "folds.json").read_text() == split
    shipped = read_config([packaged / "configs" / name for name in ("common.json", "train.json")])
    shipped["bundle_root"] = str(packaged)
    assert shipped.get_parsed_content("folds_file") == str(packaged / "configs" / "folds.json")
    assert shipped.get_parsed_content("max_cases") is None
    assert "folds.json" in json.loads((packaged / "configs" / "metadata.json").read_text())["performance"]["validation"]
    result = cli.invoke(app, ["infer", str(packaged), str(scan), "--out", str(tmp_path / "masks"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    mask = nib.load(tmp_path / "masks" / "case_000.nii.gz")
    assert mask.shape == nib.load(scan).shape and np.asarray(mask.dataobj).dtype == np.uint8
    result = cli.invoke(app, ["evaluate", str(tmp_path / "masks"), str(small_dataset / "labelsTr")])
    assert result.exit_code == 0 and "dice" in result.output, result.output
    runner = _monai_run(packaged, scan, tmp_path / "monai")
    assert runner.returncode == 0, runner.stderr[-3000:]
    theirs = nib.load(tmp_path / "monai" / "case_000.nii.gz")
    assert np.array_equal(np.asarray(theirs.dataobj), np.asarray(mask.dataobj))


@pytest.mark.parametrize("planned", ["cuda:0", "cpu"])
def test_a_run_on_another_kind_of_device_than_planned_says_so(tmp_path, small_dataset, planned):
    from medfcn.training import train

    bundle = write_bundle(tiny_plan(device=planned), tiny_fingerprint(small_dataset), tmp_path / "spheres_fcn")
    notices: list[str] = []
    train(bundle, small_dataset, output_dir=tmp_path / "run", epochs=1, device="cpu", notify=notices.append)
    line = (
        f"device: the bundle's epochs were planned for cuda ({bundle / 'configs' / 'plan.json'}); this run trains "
        "on cpu, so its duration will differ from the plan's"
    )
    assert (line in notices) is (planned == "cuda:0"), notices
    assert not [n for n in notices if n.startswith("device:")] or planned != "cpu"


@pytest.mark.slow
def test_monai_runner_trains_a_planned_bundle_without_a_split(tmp_path, small_dataset):
    """``folds_file`` null: MONAI's runner trains on the default split too (in memory)."""
    bundle = write_bundle(tiny_plan(epochs=1), tiny_fingerprint(small_dataset), tmp_path / "spheres_fcn")
    configs = json.dumps([str(bundle / "configs" / n) for n in ("common.json", "train.json")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle)]
    cmd += ["--meta_file", str(bundle / "configs" / "metadata.json"), "--output_dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "last.pt").is_file()


def _monai_run(bundle: Path, scan: Path, out: Path) -> subprocess.CompletedProcess:
    configs = json.dumps([str(bundle / "configs" / n) for n in ("common.json", "inference.json")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs]
    cmd += ["--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)]
    cmd += ["--datalist", json.dumps([{"image": str(scan)}]), "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.slow
def test_a_2d_plan_writes_a_bundle_that_trains_and_flips_the_volume_as_it_trained(tmp_path, small_dataset):
    """A 2D plan's flip axes are the network's (the slice's): --tta of the packaged bundle flips
    the volume along the same ones, past slice_axis."""
    from medfcn.package import trained_flip_axes
    from medfcn.training import train

    plan = tiny_plan(dims=2, epochs=1, slice_axis=0, flip_axes=[1])  # the slice's axis 1: the volume's 2
    bundle = write_bundle(plan, tiny_fingerprint(small_dataset), tmp_path / "spheres_2d")
    common = json.loads((bundle / "configs" / "common.json").read_text())
    shipped = json.loads((REPO / "bundles" / "hippocampus_fcn_2d" / "configs" / "common.json").read_text())
    assert list(common) == list(shipped) and common["slice_axis"] == 0
    assert [t["spatial_axis"] for t in common["spatial_augmentation"][1:]] == [1]  # the slice's axis 1
    assert common["trained_flip_axes"] == [2]
    assert trained_flip_axes(read_config([bundle / "configs" / n for n in ("common.json", "train.json")])) == [2]
    run = train(
        bundle, dataset_dir=small_dataset, folds_file=_split(small_dataset, tmp_path), output_dir=tmp_path / "run"
    )
    cli, scan = CliRunner(), small_dataset / "imagesTr" / "case_000.nii.gz"
    result = cli.invoke(app, ["package", str(run), "--out", str(tmp_path / "trained")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "trained" / "configs" / "common.json").read_text())["trained_flip_axes"] == [2]
    result = cli.invoke(app, ["infer", str(tmp_path / "trained"), str(scan), "--out", str(tmp_path / "m"), "--tta"])
    assert result.exit_code == 0, result.output
    assert nib.load(tmp_path / "m" / "case_000.nii.gz").shape == nib.load(scan).shape


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget_minutes": 0}, "--budget-minutes 0: must be a positive number"),
        ({"dims": 4}, "--dims 4: must be 2 or 3"),
        ({"device": "gpu"}, "--device 'gpu': not a device name; use cpu, cuda, cuda:N or mps"),
        pytest.param(
            {"device": "cuda:7"},
            "--device cuda:7: " + NO_CUDA_DEVICE,
            marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a GPU cuda:7"),
        ),
    ],
)
def test_bad_options_are_refused_before_reading_the_data(tmp_path, spheres_dataset, monkeypatch, options, message):
    monkeypatch.setitem(vars(medfcn.planning), "fingerprint_dataset", _never)
    with pytest.raises(UserError, match=re.escape(message)):
        planning_run.plan_bundle(spheres_dataset, tmp_path / "b", **options)
    assert not (tmp_path / "b").exists()


def _never(*args, **kwargs):
    raise AssertionError("the data was read before the options were checked")


def test_an_out_inside_or_over_the_dataset_or_existing_is_refused(tmp_path, spheres_dataset):
    before = _files(spheres_dataset)
    with pytest.raises(UserError, match="inside the dataset"):
        planning_run.check_options(spheres_dataset, spheres_dataset / "bundle", 60, None, None, False)
    with pytest.raises(UserError, match="holds the dataset"):
        planning_run.check_options(spheres_dataset, tmp_path, 60, None, None, True)
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        planning_run.check_options(spheres_dataset, tmp_path / "b", 60, None, None, False)
    with pytest.raises(UserError, match="already exists"):
        write_bundle(tiny_plan(), tiny_fingerprint(spheres_dataset), tmp_path / "b")
    assert _files(spheres_dataset) == before and not any((tmp_path / "b").iterdir())
    write_bundle(tiny_plan(), tiny_fingerprint(spheres_dataset), tmp_path / "b", overwrite=True)
    assert _files(tmp_path / "b") == BUNDLE_FILES


def _fake_planning(monkeypatch, calls: list):
    """fingerprint_dataset and make_plan replaced by the hand-made ones (recording their calls)."""

    def fingerprint(dataset_dir, progress=None):
        calls.append(("fingerprint", Path(dataset_dir)))
        for done in range(1, 13):
            progress(done, 12)
        return tiny_fingerprint(Path(dataset_dir))

    def make_plan(fingerprint, budget_minutes=60.0, device=None, dims=None):
        calls.append(("plan", budget_minutes, device, dims))
        return tiny_plan(budget_minutes=budget_minutes)

    monkeypatch.setitem(vars(medfcn.planning), "fingerprint_dataset", fingerprint)
    monkeypatch.setitem(vars(medfcn.planning), "make_plan", make_plan)


def test_medfcn_plan_writes_the_bundle_and_says_what_it_decided(tmp_path, spheres_dataset, monkeypatch):
    calls = []
    _fake_planning(monkeypatch, calls)
    out = tmp_path / "spheres_fcn"
    args = ["plan", str(spheres_dataset), "--out", str(out), "--budget-minutes", "20", "--dims", "3"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert calls == [("fingerprint", spheres_dataset), ("plan", 20.0, "cpu", 3)]
    assert _files(out) == BUNDLE_FILES
    assert result.output.count("cases read") == 12 and "12/12 cases read" in result.output
    assert "patch [16, 16, 16] voxels" in result.output and "budget of 20 on cpu" in result.output
    assert f"next: medfcn train {out} --data {spheres_dataset}" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    assert len(again.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--budget-minutes", "0"], "--budget-minutes 0: must be"), (["--dims", "4"], "--dims 4: must be 2 or 3")],
)
def test_medfcn_plan_refuses_bad_values_in_one_line(tmp_path, spheres_dataset, monkeypatch, option, message):
    monkeypatch.setitem(vars(medfcn.planning), "fingerprint_dataset", _never)
    result = CliRunner().invoke(app, ["plan", str(spheres_dataset), "--out", str(tmp_path / "b"), *option])
    assert result.exit_code == 2 and result.output.startswith(f"medfcn: error: {message}"), result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_medfcn_plan_help_names_its_options():
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run(
        [sys.executable, "-m", "medfcn", "plan", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for option in ("--out", "--budget-minutes", "--device", "--dims", "--overwrite"):
        assert option in result.stdout
    assert "Usage: medfcn plan [OPTIONS] DATASET" in result.stdout


def test_the_template_text_is_the_package_data():
    assert template_text("train.json") == (REPO / "medfcn" / "planning" / "template" / "train.json").read_text()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_overwrite_replaces_a_bundle_only(tmp_path, spheres_dataset, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("notes")
    with pytest.raises(UserError, match="--overwrite replaces a bundle only"):
        planning_run.check_options(spheres_dataset, out, 60, None, None, True)
    assert out.exists() and (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) == "notes"
    bundle = write_bundle(tiny_plan(), tiny_fingerprint(spheres_dataset), tmp_path / "bundle")
    planning_run.check_options(spheres_dataset, bundle, 60, None, None, True)  # a bundle may be replaced
