"""The dataset fingerprint (medfcn.planning.fingerprint): geometry in RAS order, foreground
intensity statistics, label volumes, determinism, and every bad-dataset refusal.

Synthetic datasets are written with nibabel into tmp_path (a few small cases each); the real
cases (spleen CT, LeftAtrium) are linked into a small MSD dataset, skipped when absent.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfcn.errors import InputWarning, UserError
from medfcn.planning.fingerprint import SAMPLES_PER_CASE, fingerprint_dataset
from tests.conftest import DATA_ROOT, SPLEEN, need

LEFT_ATRIUM = DATA_ROOT / "LeftAtrium"

# voxel axes -> world: RAS keeps them, LPS flips the first two, and "SRA" stores S-I first, then
# R-L, then A-P (a permuted file: its shape and spacing come back reordered)
AXES = {"RAS": ((0, 1), (1, 1), (2, 1)), "LPS": ((0, -1), (1, -1), (2, 1)), "SRA": ((2, 1), (0, 1), (1, 1))}


def grid_affine(spacing=(1.0, 1.0, 1.0), orientation: str = "RAS", origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A 4x4 affine whose voxel axis ``k`` runs along world axis ``AXES[orientation][k]``."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, (world, sign) in enumerate(AXES[orientation]):
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = origin
    return affine


def synthetic_case(shape=(12, 10, 8), box=((3, 9), (2, 7), (2, 6)), mean=100.0, std=10.0, channels=1, seed=0):
    """``(image, label)``: label 1 in ``box`` (voxel ranges per file axis), the image drawn from
    N(mean + 50 c, std) there for channel c, from N(0, 1) elsewhere. Image ``(X, Y, Z)`` or,
    with several channels, ``(X, Y, Z, C)`` float32; label uint8 ``(X, Y, Z)``."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[tuple(slice(a, b) for a, b in box)] = 1
    image = rng.normal(0.0, 1.0, (*shape, channels)).astype(np.float32)
    for c in range(channels):
        image[..., c][label > 0] = rng.normal(mean + 50 * c, std, int(label.sum()))
    return (image[..., 0] if channels == 1 else image), label


def write_dataset(root: Path, cases: list[dict], labels=None, modality=None, name="Synthetic") -> Path:
    """Write an MSD dataset of ``cases`` (dicts of ``synthetic_case`` arguments plus optional
    ``spacing``, ``orientation``, ``label_affine``, ``image``/``label`` arrays, ``name``)."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for number, spec in enumerate(cases):
        spec = dict(spec)
        affine = grid_affine(spec.pop("spacing", (1.0, 1.0, 1.0)), spec.pop("orientation", "RAS"))
        label_affine = spec.pop("label_affine", affine)
        case = spec.pop("name", f"case_{number:03d}")
        image, label = spec.pop("image", None), spec.pop("label", None)
        made_image, made_label = synthetic_case(seed=number, **spec)
        image = made_image if image is None else image
        label = made_label if label is None else label
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, label_affine), root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {
        "name": name,
        "modality": modality or {"0": "MRI"},
        "labels": labels or {"0": "background", "1": "organ"},
        "numTraining": len(cases),
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


# --- geometry, intensities, labels ------------------------------------------------------------


def test_shapes_and_spacings_come_back_in_ras_order(tmp_path):
    cases = [
        {"shape": (12, 10, 8), "spacing": (1.0, 1.5, 2.0), "orientation": "RAS"},
        {"shape": (12, 10, 8), "spacing": (1.0, 1.5, 2.0), "orientation": "LPS"},
        # stored S-I first at 3 mm, then R-L and A-P at 0.8 mm: RAS 10 x 8 x 12 at 0.8 x 0.8 x 3
        {"shape": (12, 10, 8), "spacing": (3.0, 0.8, 0.8), "orientation": "SRA"},
    ]
    fingerprint = fingerprint_dataset(write_dataset(tmp_path / "ds", cases))
    got = {c["case"]: (c["shape"], c["spacing_mm"], c["orientation"]) for c in fingerprint["cases"]}
    assert got["case_000"] == ([12, 10, 8], pytest.approx([1.0, 1.5, 2.0]), "RAS")
    assert got["case_001"] == ([12, 10, 8], pytest.approx([1.0, 1.5, 2.0]), "LPS")
    assert got["case_002"] == ([10, 8, 12], pytest.approx([0.8, 0.8, 3.0]), "SRA")
    summary = fingerprint["summary"]
    assert summary["median_shape"] == [12, 10, 8]
    assert summary["min_shape"] == [10, 8, 8] and summary["max_shape"] == [12, 10, 12]
    assert summary["median_spacing_mm"] == pytest.approx([1.0, 1.5, 2.0])
    assert summary["min_spacing_mm"] == pytest.approx([0.8, 0.8, 2.0])
    assert summary["max_spacing_mm"] == pytest.approx([1.0, 1.5, 3.0])
    assert summary["channels"] == 1
    assert fingerprint["dataset"]["num_cases"] == 3 and fingerprint["dataset"]["dir"] == str(tmp_path / "ds")


def test_centroids_are_ras_voxel_indices(tmp_path):
    box = ((2, 4), (6, 8), (1, 3))  # centre (2.5, 6.5, 1.5) in file voxels of a 12 x 10 x 8 grid
    cases = [{"box": box, "orientation": "RAS"}, {"box": box, "orientation": "LPS"}]
    cases.append({"box": box, "orientation": "SRA"})
    fingerprint = fingerprint_dataset(write_dataset(tmp_path, cases))
    got = {case["case"]: case["label_centroids_vox"]["1"] for case in fingerprint["cases"]}
    assert got["case_000"] == pytest.approx([2.5, 6.5, 1.5])
    assert got["case_001"] == pytest.approx([12 - 1 - 2.5, 10 - 1 - 6.5, 1.5])  # L and P flipped to R and A
    assert got["case_002"] == pytest.approx([6.5, 1.5, 2.5])  # file axes (S, R, A) -> (R, A, S)


def test_foreground_intensity_statistics_match_what_was_written(tmp_path):
    cases = [{"shape": (40, 40, 20), "box": ((5, 35), (5, 35), (2, 18))} for _ in range(3)]  # 14400 fg voxels
    fingerprint = fingerprint_dataset(write_dataset(tmp_path, cases))
    stats = fingerprint["intensity"]["0"]
    assert stats["name"] == "MRI"
    assert stats["foreground_voxels_sampled"] == 3 * SAMPLES_PER_CASE  # capped per case
    assert stats["mean"] == pytest.approx(100.0, abs=1.0) and stats["std"] == pytest.approx(10.0, abs=1.0)
    assert stats["percentile_50_0"] == pytest.approx(100.0, abs=1.0)
    # N(100, 10): the 0.5 and 99.5 percentiles are 100 -+ 2.576 sd; the background (N(0, 1)) is not sampled
    assert stats["percentile_00_5"] == pytest.approx(74.2, abs=2.0)
    assert stats["percentile_99_5"] == pytest.approx(125.8, abs=2.0)
    assert 40 < stats["min"] <= stats["percentile_00_5"] and stats["max"] >= stats["percentile_99_5"]


QUANTILE_KEYS = ["1", "5", "25", "50", "75", "95", "99"]


def test_label_volumes_are_exact_mm3(tmp_path):
    labels = {"0": "background", "1": "small", "2": "large", "3": "never"}
    big, small = np.zeros((12, 10, 8), np.uint8), np.zeros((12, 10, 8), np.uint8)
    big[1:5, 1:5, 1:5], big[6:8, 6:8, 6:8] = 2, 1  # 64 voxels of 2, 8 of 1
    small[1:3, 1:3, 1:2] = 2  # 4 voxels of 2, no 1
    cases = [
        {"label": big, "spacing": (0.5, 0.5, 2.0)},  # 0.5 mm^3 voxels
        {"label": small, "spacing": (1.0, 1.0, 3.0), "orientation": "LPS"},  # 3 mm^3
    ]
    with pytest.warns(InputWarning, match=r"label 3 \('never'\) is in no case"):
        fingerprint = fingerprint_dataset(write_dataset(tmp_path, cases, labels=labels))
    first, second = fingerprint["cases"]
    assert first["label_voxels"] == {"1": 8, "2": 64, "3": 0}
    assert first["label_volume_mm3"] == {"1": 4.0, "2": 32.0, "3": 0.0}
    assert second["label_voxels"] == {"1": 0, "2": 4, "3": 0} and second["label_centroids_vox"]["1"] is None
    per_label = fingerprint["labels"]
    assert per_label["1"] == {
        "name": "small",
        "cases_present": 1,
        "voxels": {"min": 8, "median": 8, "max": 8},
        "volume_mm3": {"min": 4.0, "median": 4.0, "max": 4.0, "quantiles": dict.fromkeys(QUANTILE_KEYS, 4.0)},
    }
    assert per_label["2"]["cases_present"] == 2
    assert per_label["2"]["voxels"] == {"min": 4, "median": 34, "max": 64}
    spread = {"min": 12.0, "median": 22.0, "max": 32.0}  # and percentiles, interpolated between 12 and 32
    quantiles = dict(zip(QUANTILE_KEYS, [12.2, 13.0, 17.0, 22.0, 27.0, 31.0, 31.8], strict=True))
    assert per_label["2"]["volume_mm3"] == {**spread, "quantiles": pytest.approx(quantiles)}
    assert per_label["3"]["cases_present"] == 0 and per_label["3"]["volume_mm3"]["median"] is None
    assert fingerprint["dataset"]["labels"] == labels


def test_ct_like_volumes_give_hu_statistics_of_the_foreground(tmp_path):
    """Synthetic CT: air (-1000 HU) around an organ of N(60, 20) HU, 5 mm slices, stored as
    uint16 with scl_inter -1024 as scanners write it (the statistics are in HU, not raw)."""
    dataset = write_dataset(tmp_path, [], modality={"0": "CT"})
    training = []
    for number in range(2):
        rng = np.random.default_rng(number)
        hu = np.full((40, 40, 8), -1000.0)
        label = np.zeros(hu.shape, np.uint8)
        label[8:32, 8:32, 2:6] = 1
        hu[label > 0] = rng.normal(60.0, 20.0, int(label.sum()))
        image = nib.Nifti1Image(np.round(hu + 1024).astype(np.uint16), grid_affine((0.8, 0.8, 5.0)))
        image.header.set_slope_inter(1.0, -1024.0)
        nib.save(image, dataset / "imagesTr" / f"ct_{number}.nii.gz")
        nib.save(nib.Nifti1Image(label, grid_affine((0.8, 0.8, 5.0))), dataset / "labelsTr" / f"ct_{number}.nii.gz")
        training.append({"image": f"./imagesTr/ct_{number}.nii.gz", "label": f"./labelsTr/ct_{number}.nii.gz"})
    meta = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    fingerprint = fingerprint_dataset(dataset)
    stats = fingerprint["intensity"]["0"]
    assert stats["name"] == "CT" and stats["foreground_voxels_sampled"] == 2 * 24 * 24 * 4  # all of it
    assert stats["mean"] == pytest.approx(60.0, abs=1.5) and stats["std"] == pytest.approx(20.0, abs=1.5)
    assert stats["percentile_00_5"] == pytest.approx(60 - 2.576 * 20, abs=6)  # air is not foreground
    assert stats["percentile_99_5"] == pytest.approx(60 + 2.576 * 20, abs=6)
    assert fingerprint["summary"]["median_spacing_mm"] == pytest.approx([0.8, 0.8, 5.0])
    assert fingerprint["labels"]["1"]["volume_mm3"]["median"] == pytest.approx(24 * 24 * 4 * 0.8 * 0.8 * 5.0)


def test_two_channel_images_give_two_intensity_entries(tmp_path):
    cases = [{"channels": 2, "shape": (16, 16, 8), "box": ((2, 14), (2, 14), (1, 7))} for _ in range(2)]
    fingerprint = fingerprint_dataset(write_dataset(tmp_path, cases, modality={"0": "FLAIR", "1": "T1w"}))
    assert fingerprint["summary"]["channels"] == 2 and {c["channels"] for c in fingerprint["cases"]} == {2}
    assert fingerprint["cases"][0]["shape"] == [16, 16, 8]
    intensity = fingerprint["intensity"]
    assert sorted(intensity) == ["0", "1"]
    assert intensity["0"]["name"] == "FLAIR" and intensity["1"]["name"] == "T1w"
    assert intensity["0"]["mean"] == pytest.approx(100.0, abs=1.5)
    assert intensity["1"]["mean"] == pytest.approx(150.0, abs=1.5)  # channel 1 is written 50 higher


def test_the_fingerprint_is_deterministic_and_plain_json(tmp_path):
    cases = [{"shape": (40, 40, 20), "box": ((5, 35), (5, 35), (2, 18))} for _ in range(2)]
    dataset = write_dataset(tmp_path, cases)
    calls = []
    first = fingerprint_dataset(dataset, progress=lambda done, total: calls.append((done, total)))
    assert fingerprint_dataset(dataset) == first
    assert json.loads(json.dumps(first)) == first
    assert calls == [(1, 2), (2, 2)]
    assert first["medfcn_fingerprint"] == 1 and first["dataset"]["name"] == "Synthetic"


def test_cases_are_sorted_by_case_id(tmp_path):
    cases = [{"name": "zeta"}, {"name": "alpha"}, {"name": "mid"}]
    assert [c["case"] for c in fingerprint_dataset(write_dataset(tmp_path, cases))["cases"]] == ["alpha", "mid", "zeta"]


# --- refusals: one line, naming the file and the fix, before anything is read twice ----------------


def refused(dataset, pattern: str) -> str:
    """The UserError's message for fingerprinting ``dataset``, checked to be one line matching ``pattern``."""
    with pytest.raises(UserError, match=pattern) as caught:
        fingerprint_dataset(dataset)
    message = str(caught.value)
    assert "\n" not in message
    return message


def two_cases(**first) -> list[dict]:
    return [dict(first), {}]


def test_refuses_a_missing_folder_and_a_missing_or_broken_dataset_json(tmp_path):
    refused(tmp_path / "nowhere", r"nowhere: dataset folder not found; pass the folder that holds an MSD")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"dataset.json: not found")
    dataset = write_dataset(tmp_path / "ds", two_cases())
    (dataset / "dataset.json").write_text("{not json")
    refused(dataset, r"dataset.json: not valid JSON .*; fix the file")


def test_refuses_fewer_than_two_cases(tmp_path):
    dataset = write_dataset(tmp_path, [{}])
    refused(dataset, r"dataset.json: lists 1 labelled case; a plan needs at least 2 labelled cases")


def test_refuses_a_missing_case_file(tmp_path):
    dataset = write_dataset(tmp_path, two_cases())
    (dataset / "labelsTr" / "case_001.nii.gz").unlink()
    refused(dataset, r"names 1 missing file: .*labelsTr/case_001.nii.gz")


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not nifti", "not gzip"])
def test_refuses_a_case_that_cannot_be_read(tmp_path, damage):
    dataset = write_dataset(tmp_path, two_cases(shape=(30, 30, 20)))
    path = dataset / "imagesTr" / "case_001.nii.gz"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
        pattern = r"case_001.nii.gz: is corrupt \(the gzip stream ends early"
    elif damage == "flipped byte":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
        pattern = r"case_001.nii.gz: is corrupt"
    elif damage == "not nifti":
        path.write_bytes(gzip.compress(b"hello, not an image" * 50))
        pattern = r"case_001.nii.gz: cannot be read as an image"
    else:
        path.write_bytes(b"plain text, no gzip")
        pattern = r"case_001.nii.gz: is not gzip-compressed although named .gz"
    refused(dataset, pattern)


def test_refuses_image_and_label_of_different_shapes(tmp_path):
    dataset = write_dataset(tmp_path, two_cases(label=np.zeros((12, 10, 9), np.uint8)))
    refused(dataset, r"labelsTr/case_000.nii.gz: shape \(12, 10, 9\) differs from its image's \(12, 10, 8\) .*resample")


@pytest.mark.parametrize(
    ("label_affine", "said"),
    [
        (grid_affine((1.0, 1.0, 2.0)), r"voxel size 1 x 1 x 2 mm vs 1 x 1 x 1 mm"),
        (grid_affine(origin=(0.0, 0.0, 5.0)), r"origin 5 mm apart"),
        (grid_affine(orientation="LPS"), r"orientation LPS vs RAS"),
    ],
)
def test_refuses_image_and_label_on_different_grids(tmp_path, label_affine, said):
    dataset = write_dataset(tmp_path, two_cases(label_affine=label_affine))
    refused(dataset, r"labelsTr/case_000.nii.gz: affine differs from its image's \(.*" + said + r".*resample the label")


def test_accepts_a_label_affine_within_the_tolerance(tmp_path):
    affine = grid_affine()
    affine[:3, 3] += 1e-5  # float32 round-off between tools
    assert fingerprint_dataset(write_dataset(tmp_path, two_cases(label_affine=affine)))["dataset"]["num_cases"] == 2


def test_refuses_label_values_not_in_dataset_json(tmp_path):
    label = np.zeros((12, 10, 8), np.uint8)
    label[1:3, 1:3, 1:3], label[5:7, 5:7, 5:7] = 1, 4
    message = refused(
        write_dataset(tmp_path, two_cases(label=label)),
        r"labelsTr/case_000.nii.gz: label values 4 are not in dataset.json's labels \(0, 1\); add them",
    )
    assert "case_001" not in message


def test_refuses_labels_listed_with_a_gap(tmp_path):
    """0, 1 and 3 listed: training takes labels 0..N only, so the plan refuses it before any case
    is read (the cases here are fine)."""
    label = np.zeros((12, 10, 8), np.uint8)
    label[1:3, 1:3, 1:3], label[5:7, 5:7, 5:7] = 1, 3
    labels = {"0": "background", "1": "one", "3": "three"}
    refused(write_dataset(tmp_path / "gap", two_cases(label=label), labels=labels), r"labels 0, 1, 3 are not 0..N")


def test_refuses_labels_without_a_background_entry(tmp_path):
    label = np.zeros((12, 10, 8), np.uint8)
    label[1:3, 1:3, 1:3] = 1
    refused(write_dataset(tmp_path, two_cases(label=label), labels={"1": "organ"}), r"labels 1 are not 0..N")


def test_refuses_negative_label_values(tmp_path):
    label = np.zeros((12, 10, 8), np.int16)
    label[1:3, 1:3, 1:3] = -1
    refused(write_dataset(tmp_path, two_cases(label=label)), r"label values -1 are not in dataset.json's labels")


def test_refuses_labels_that_are_not_whole_numbers(tmp_path):
    label = np.zeros((12, 10, 8), np.float32)
    label[1:3, 1:3, 1:3], label[4, 4, 4] = 1.0, 0.5
    refused(write_dataset(tmp_path, two_cases(label=label)), r"case_000.nii.gz: label values 0.5 are not whole numbers")
    # whole numbers stored as floats are labels
    label[4, 4, 4] = 1.0
    fingerprint = fingerprint_dataset(write_dataset(tmp_path / "ok", two_cases(label=label)))
    assert fingerprint["labels"]["1"]["cases_present"] == 2


def test_refuses_infinite_labels_and_labels_with_channels(tmp_path):
    label = np.zeros((12, 10, 8), np.float32)
    label[1:3, 1:3, 1:3], label[4, 4, 4] = 1.0, np.inf
    refused(write_dataset(tmp_path / "inf", two_cases(label=label)), r"label values inf are not whole numbers")
    two = np.zeros((12, 10, 8, 2), np.uint8)
    refused(
        write_dataset(tmp_path / "two", two_cases(label=two)),
        r"labelsTr/case_000.nii.gz: has shape \(12, 10, 8, 2\), a label map has one channel",
    )


def test_refuses_a_2d_case(tmp_path):
    flat_image, flat_label = np.zeros((12, 10), np.float32), np.zeros((12, 10), np.uint8)
    dataset = write_dataset(tmp_path, two_cases(image=flat_image, label=flat_label))
    refused(dataset, r"imagesTr/case_000.nii.gz: has shape \(12, 10\); save the case as a volume")


def test_refuses_mixed_channel_counts(tmp_path):
    dataset = write_dataset(tmp_path, [{"channels": 2}, {"channels": 1}], modality={"0": "T1", "1": "T2"})
    refused(
        dataset,
        r"imagesTr/case_001.nii.gz: has 1 channel, but .*imagesTr/case_000.nii.gz has 2; every case needs "
        r"the same modalities",
    )


def test_refuses_modalities_that_do_not_match_the_channels(tmp_path):
    dataset = write_dataset(tmp_path, [{"channels": 2}, {"channels": 2}])
    refused(dataset, r"dataset.json: 'modality' lists 1 modality \(MRI\), but the images have 2 channels")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"labels": None}, r"has no 'labels' mapping"),
        ({"labels": {"background": 0, "organ": 1}}, r"'labels' keys \['background', 'organ'\] are not label values"),
        ({"labels": {"0": "background"}}, r"'labels' has no foreground label"),
        ({"modality": None}, r"has no 'modality' mapping"),
        ({"modality": {"1": "MRI"}}, r"'modality' keys \['1'\] are not 0, 1, ..."),
    ],
)
def test_refuses_labels_and_modality_that_are_not_msd(tmp_path, change, pattern):
    dataset = write_dataset(tmp_path, two_cases())
    meta = json.loads((dataset / "dataset.json").read_text())
    meta.update(change)
    (dataset / "dataset.json").write_text(json.dumps(meta))
    refused(dataset, r"dataset.json: " + pattern)


def test_refuses_nan_images_and_empty_foregrounds(tmp_path):
    image, _ = synthetic_case()
    image[0, 0, 0] = np.nan
    refused(write_dataset(tmp_path / "nan", two_cases(image=image)), r"case_000.nii.gz: has NaN/Inf voxels")
    empty = np.zeros((12, 10, 8), np.uint8)
    cases = [{"label": empty}, {"label": empty}]
    refused(write_dataset(tmp_path / "empty", cases), r"dataset.json: every label file is empty")


def test_refuses_spatial_units_other_than_mm(tmp_path):
    dataset = write_dataset(tmp_path, two_cases())
    path = dataset / "imagesTr" / "case_000.nii.gz"
    image = nib.load(path)
    image.header.set_xyzt_units("meter")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header), path)
    refused(dataset, r"case_000.nii.gz: spatial units are meters")


# --- real data ----------------------------------------------------------------------------------


def linked_dataset(root: Path, pairs: list[tuple[str, Path, Path]], meta: dict) -> Path:
    """An MSD dataset in ``root`` whose cases (name, image, label) are symbolic links to real files."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    training = []
    for name, image, label in pairs:
        os.symlink(image, root / "imagesTr" / f"{name}.nii.gz")
        os.symlink(label, root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return root


def test_spleen_ct_case_gives_ct_statistics_and_its_anisotropic_spacing(tmp_path):
    spleen = need(SPLEEN)  # one case (README): linked twice under two names, a 2-case dataset
    image, label = spleen / "imagesTr" / "spleen_2.nii.gz", spleen / "labelsTr" / "spleen_2.nii.gz"
    meta = {"name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}}
    dataset = linked_dataset(tmp_path / "spleen", [("spleen_a", image, label), ("spleen_b", image, label)], meta)
    fingerprint = fingerprint_dataset(dataset)
    assert [c["case"] for c in fingerprint["cases"]] == ["spleen_a", "spleen_b"]
    summary = fingerprint["summary"]
    assert summary["median_shape"] == [164, 166, 26]
    assert summary["median_spacing_mm"] == pytest.approx([0.795, 0.795, 5.0], abs=1e-3)
    stats = fingerprint["intensity"]["0"]
    assert stats["name"] == "CT"
    assert 50 < stats["mean"] < 150 and 5 < stats["std"] < 80  # spleen: soft tissue, about 100 HU
    assert -200 < stats["percentile_00_5"] < stats["percentile_50_0"] < stats["percentile_99_5"] < 400
    volume = fingerprint["labels"]["1"]["volume_mm3"]
    assert volume["min"] == volume["max"] > 0 and fingerprint["labels"]["1"]["cases_present"] == 2


def test_left_atrium_cases_give_0625_mm(tmp_path):
    root = need(LEFT_ATRIUM)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = [
        {key: str(root / path) for key, path in item.items()} for item in meta["training"][:3]
    ]  # absolute paths to the real files
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    fingerprint = fingerprint_dataset(tmp_path)
    assert fingerprint["dataset"]["num_cases"] == 3
    assert fingerprint["summary"]["median_spacing_mm"] == pytest.approx([0.625] * 3)
    assert fingerprint["summary"]["median_shape"][2] == 88
    assert fingerprint["labels"]["1"]["name"] == "left atrium" and fingerprint["labels"]["1"]["cases_present"] == 3
    assert all(re.fullmatch(r"la_\w+", c["case"]) for c in fingerprint["cases"])
