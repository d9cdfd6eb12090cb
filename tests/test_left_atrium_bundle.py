"""The shipped LeftAtrium bundle (``bundles/left_atrium_fcn``, planned by ``medfcn plan`` and
trained on fold 0): weights that load, metadata that states what it was trained on and how it
scored, a licence that states the data's research-use terms, data paths that do not depend on
the bundle's location, and the Dice it records reproduced on held-out cases."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medfcn.bundle import COMMON_FILE

from .conftest import DATA_ROOT, REPO, need

BUNDLE = REPO / "bundles" / "left_atrium_fcn"
LEFT_ATRIUM = DATA_ROOT / "LeftAtrium"
FOLDS = REPO / "datasets" / "LeftAtrium" / "folds.json"


def parser(*names: str) -> ConfigParser:
    config = ConfigParser()
    config.read_config([str(BUNDLE / "configs" / n) for n in (COMMON_FILE, *names)])
    config.read_meta(str(BUNDLE / "configs" / "metadata.json"))
    config["bundle_root"] = str(BUNDLE)
    return config


def metadata() -> dict:
    return json.loads((BUNDLE / "configs" / "metadata.json").read_text())


def test_weights_fit_the_network_and_stay_small():
    config = parser("inference.json")
    network = config.get_parsed_content("network_def")
    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    assert (BUNDLE / "models" / "model.pt").stat().st_size < 20 * 2**20
    patch = config["patch_size"]
    out = network.eval()(torch.zeros(1, 1, *patch))
    assert out.shape == (1, 2, *patch)


def test_metadata_states_labels_split_command_and_dice():
    meta = metadata()
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "left atrium"}
    performance = meta["performance"]
    assert performance["split"] == "fold 0 of datasets/LeftAtrium/folds.json (64 training, 16 held-out cases)"
    assert set(performance["fold0_dice_per_case"]) == set(json.loads(FOLDS.read_text())["folds"][0])
    mean = np.mean(list(performance["fold0_dice_per_case"].values()))
    assert performance["fold0_dice_mean"] == pytest.approx(mean, abs=1e-4)
    assert "medfcn plan" in meta["training_command"] and "medfcn train" in meta["training_command"]


def test_licence_states_the_research_use_terms():
    text = (BUNDLE / "LICENSE").read_text()
    assert "research use" in text.lower() and "Xiong" in text and "Apache" in text


def test_data_paths_do_not_depend_on_where_the_bundle_is(tmp_path, monkeypatch):
    """The split resolves from the bundle's own location, the data from the data root."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDFCN_DATA", str(tmp_path / "data"))
    config = parser("train.json")
    assert config.get_parsed_content("folds_file") == str(FOLDS)
    assert config.get_parsed_content("dataset_dir") == str(tmp_path / "data" / "LeftAtrium")


def test_monai_verifies_the_network():
    configs = json.dumps([str(BUNDLE / "configs" / n) for n in (COMMON_FILE, "inference.json")])
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--config_file", configs]
    cmd += ["--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--bundle_root", str(BUNDLE)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_held_out_cases_score_what_metadata_records(tmp_path):
    """``medfcn infer`` on 2 held-out fold-0 cases: masks on the scans' grids, Dice as recorded."""
    from medfcn.evaluate import evaluate_folders
    from medfcn.infer import infer

    data = need(LEFT_ATRIUM)
    recorded = metadata()["performance"]["fold0_dice_per_case"]
    cases = sorted(recorded)[:2]
    infer(BUNDLE, [data / "imagesTr" / f"{c}.nii.gz" for c in cases], tmp_path / "masks")
    for case in cases:
        mask = nib.load(tmp_path / "masks" / f"{case}.nii.gz")
        image = nib.load(data / "imagesTr" / f"{case}.nii.gz")
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    rows, _ = evaluate_folders(tmp_path / "masks", data / "labelsTr", labels=[1])
    for row in rows:
        assert row["dice_1"] == pytest.approx(recorded[row["case"]], abs=2e-3), row["case"]
