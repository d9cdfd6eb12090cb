"""medfcn.data.datasets: dataset.json, data root, deterministic folds."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from medfcn.data.datasets import case_id, data_root, fold_datalists, load_msd_datalist, make_folds, write_folds
from medfcn.errors import UserError

from .conftest import HIPPO, REPO, need


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDFCN_DATA", raising=False)
    assert str(data_root()) == "../shared/datasets"
    monkeypatch.setenv("MEDFCN_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert str(data_root("/x")) == "/x"


def test_case_id():
    assert case_id("/a/hippocampus_004.nii.gz") == "hippocampus_004"
    assert case_id("b.nii") == "b"
    assert case_id("/dicom/PGBM-002_HippoCrop") == "PGBM-002_HippoCrop"


def test_load_msd_datalist(spheres_dataset):
    items = load_msd_datalist(spheres_dataset)
    assert len(items) == 12
    assert set(items[0]) == {"image", "label"}
    assert items[0]["image"].startswith(os.path.abspath(spheres_dataset))


def test_symlinked_cases_keep_their_own_names(spheres_dataset, tmp_path):
    # A dataset of links (e.g. into a shared store) is named by its links, not their targets.
    linked = tmp_path / "Linked"
    for sub in ("imagesTr", "labelsTr"):
        (linked / sub).mkdir(parents=True)
        for n in range(3):
            (linked / sub / f"case_{n}.nii.gz").symlink_to(spheres_dataset / sub / "case_000.nii.gz")
    entries = [{"image": f"./imagesTr/case_{n}.nii.gz", "label": f"./labelsTr/case_{n}.nii.gz"} for n in range(3)]
    (linked / "dataset.json").write_text(json.dumps({"training": entries}))
    assert [case_id(d["image"]) for d in load_msd_datalist(linked)] == ["case_0", "case_1", "case_2"]
    split = write_folds(linked, tmp_path / "folds.json", n_folds=3)
    assert sorted(c for f in split["folds"] for c in f) == ["case_0", "case_1", "case_2"]
    train, val = fold_datalists(linked, tmp_path / "folds.json", 0)
    assert len(train) == 2 and len(val) == 1


def test_a_case_name_listed_twice_is_refused(spheres_dataset, tmp_path):
    """Cases are keyed by file name: a namesake in another folder would merge into one case,
    and the same file listed twice could sit in two folds (validated on what it trained on)."""
    index = spheres_dataset / "dataset.json"
    meta = json.loads(index.read_text())
    (spheres_dataset / "extra").mkdir()
    for sub in ("image", "label"):
        shutil.copy(spheres_dataset / meta["training"][0][sub], spheres_dataset / "extra" / f"{sub}_case_000.nii.gz")
    namesake = {"image": "./extra/case_000.nii.gz", "label": "./extra/label_case_000.nii.gz"}
    (spheres_dataset / "extra" / "image_case_000.nii.gz").rename(spheres_dataset / "extra" / "case_000.nii.gz")
    for extra in (meta["training"][0], namesake):
        index.write_text(json.dumps({**meta, "training": [*meta["training"], extra]}))
        with pytest.raises(ValueError, match="lists the case name 'case_000' twice"):
            load_msd_datalist(spheres_dataset)
        with pytest.raises(UserError, match="case_000"):
            write_folds(spheres_dataset, tmp_path / "folds.json")


def test_missing_files_and_missing_index(spheres_dataset, tmp_path):
    (spheres_dataset / "labelsTr" / "case_003.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_003"):
        load_msd_datalist(spheres_dataset)
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_msd_datalist(tmp_path)


def test_make_folds_is_deterministic_disjoint_and_complete():
    ids = [f"c{i}" for i in range(23)]
    folds = make_folds(ids, 5, seed=3)
    assert folds == make_folds(list(reversed(ids)), 5, seed=3)  # order of input is irrelevant
    assert folds != make_folds(ids, 5, seed=4)
    flat = [c for f in folds for c in f]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    assert {len(f) for f in folds} <= {4, 5}
    with pytest.raises(ValueError):
        make_folds(ids, 1)


def test_write_folds(spheres_dataset, tmp_path):
    out = tmp_path / "split" / "folds.json"
    split = write_folds(spheres_dataset, out, n_folds=3, seed=1)
    assert json.loads(out.read_text()) == split
    ids = [case_id(d["image"]) for d in load_msd_datalist(spheres_dataset)]
    assert split["folds"] == make_folds(ids, 3, 1)
    with pytest.raises(UserError, match="already exists"):
        write_folds(spheres_dataset, out, n_folds=4)
    assert write_folds(spheres_dataset, out, n_folds=4, overwrite=True)["n_folds"] == 4
    assert json.loads(out.read_text())["n_folds"] == 4
    assert [p.name for p in out.parent.iterdir()] == ["folds.json"]


@pytest.mark.parametrize("n_folds", [1, 13])
def test_write_folds_refuses_impossible_fold_counts(spheres_dataset, tmp_path, n_folds):
    with pytest.raises(UserError, match=f"lists 12 cases, cannot make {n_folds} folds?;"):
        write_folds(spheres_dataset, tmp_path / "folds.json", n_folds=n_folds)
    assert not (tmp_path / "folds.json").exists()


def test_write_folds_without_a_dataset(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found"):
        write_folds(tmp_path / "nope", tmp_path / "folds.json")
    with pytest.raises(UserError, match="dataset.json: not found"):
        write_folds(tmp_path, tmp_path / "folds.json")
    (tmp_path / "dataset.json").write_text('{"training": []}')
    with pytest.raises(UserError, match="no 'training' list"):
        write_folds(tmp_path, tmp_path / "folds.json")


def test_fold_datalists(spheres_dataset):
    folds = spheres_dataset / "folds.json"
    train, val = fold_datalists(spheres_dataset, folds, 0)
    assert len(train) == 6 and len(val) == 6
    assert not {d["image"] for d in train} & {d["image"] for d in val}
    everything, _ = fold_datalists(spheres_dataset, folds, -1)
    assert len(everything) == 12
    with pytest.raises(ValueError, match="unknown fold 2"):
        fold_datalists(spheres_dataset, folds, 2)


def test_committed_hippocampus_folds_match_the_data():
    dataset = need(HIPPO)
    split = json.loads((REPO / "datasets" / "Task04_Hippocampus" / "folds.json").read_text())
    ids = [case_id(d["image"]) for d in load_msd_datalist(dataset)]
    assert split["folds"] == make_folds(ids, split["n_folds"], split["seed"])
    assert [len(f) for f in split["folds"]] == [42, 42, 42, 41, 41]
