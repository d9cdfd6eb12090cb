"""The bench harness's own arithmetic: the figures of bench/README.md come from these functions.

Benchmarks are not tests, so nothing here times anything; it checks that the harness measures
what it says: the baseline is the network and recipe the issue pastes, the time-to-Dice
readings, the FLOP count, the head/body error decomposition of bench/errors.py, and
bench/left_atrium.py end to end on a tiny dataset (seconds of training per arm).
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import SpatialPadd

from .conftest import BUNDLE, REPO

BENCH = REPO / "bench"


def _bench_module(name: str):
    """Import ``bench/<name>.py`` as ``bench_<name>`` (the scripts import each other by bare name,
    as they run from bench/)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accuracy():
    return _bench_module("accuracy")


@pytest.fixture(scope="module")
def errors():
    return _bench_module("errors")


def _curve(*points):
    return [{"minutes": m, "mean": d} for m, d in points]


def test_time_to_dice_first_crossing_and_settling(accuracy):
    curve = _curve((0.5, 0.83), (1.0, 0.845), (1.5, 0.835), (2.0, 0.86), (2.5, 0.87))
    assert accuracy.first_time(curve, 0.84) == 1.0
    assert accuracy.settled_time(curve, 0.84) == 2.0  # the dip at 1.5 min makes 1.0 a lucky crossing
    assert accuracy.first_time(curve, 0.86) == 2.0
    assert accuracy.first_time(curve, 0.9) is None
    assert accuracy.settled_time(curve, 0.9) is None
    assert accuracy.settled_time(curve, 0.8) == 0.5
    assert accuracy.settled_time(_curve((1.0, 0.9), (2.0, 0.8)), 0.85) is None  # ends below


def test_baseline_is_the_pasted_monai_unet(accuracy):
    """The issue's baseline: UNet(3, 1, 3, channels 16-128, strides 2, 2 residual units), DiceCE,
    Adam 1e-3, batch 8, whole volumes padded, no augmentation, float32, plain weights."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in ("common.json", "train.json")])
    parser.update(accuracy.BASELINE)
    net = parser.get_parsed_content("network_def")
    reference = UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    assert type(net) is UNet
    assert [p.shape for p in net.parameters()] == [p.shape for p in reference.parameters()]
    assert isinstance(parser.get_parsed_content("loss"), DiceCELoss)
    optimizer = parser.get_parsed_content("optimizer")
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 1e-3
    assert optimizer.defaults["weight_decay"] == 0
    assert parser.get_parsed_content("batch_size") == 8
    scheduler = parser.get_parsed_content("lr_scheduler")
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [1e-3]  # constant: power 0
    augmentation = parser.get_parsed_content("train#augmentation")
    assert len(augmentation) == 1 and isinstance(augmentation[0], SpatialPadd)
    assert list(parser.get_parsed_content("patch_size")) == [48, 64, 48]
    assert parser.get_parsed_content("bf16") is False
    assert parser.get_parsed_content("ema_decay") is None


def test_forward_flops_counts_a_convolution():
    speed = _bench_module("speed")
    conv = torch.nn.Conv3d(2, 4, kernel_size=3, padding=1, bias=False)
    # one multiply and one add per weight per output voxel
    assert speed.forward_flops(conv, (1, 2, 4, 5, 6)) == 2 * (2 * 27) * 4 * (4 * 5 * 6)


def test_split_plane_maximises_anterior_evidence(errors):
    # slices >= s anterior: sums over s.. are 1, 2, 4, 1, 0 for s = 0..4
    assert errors.split_plane(np.array([-1.0, -2.0, 3.0, 1.0])) == 2
    assert errors.split_plane(np.array([-1.0, -1.0])) == 2  # no anterior slice at all
    assert errors.split_plane(np.array([1.0, 1.0])) == 0


def test_split_at_labels_posterior_below_the_plane(errors):
    fg = np.zeros((2, 5, 2), bool)
    fg[:, 1:4] = True
    labels = errors.split_at(fg, 2)
    assert (labels[:, 0] == 0).all() and (labels[:, 4] == 0).all()
    assert (labels[:, 1] == errors.POSTERIOR).all()
    assert (labels[:, 2:4] == errors.ANTERIOR).all()


def test_case_errors_parts_a_plane_one_slice_off(errors):
    """A prediction with the reference's exact outline and its plane one slice anterior: the
    whole hippocampus scores 1, the split at the reference's plane 1, the plane offset +1, and
    the swapped slice counts as split errors only."""
    fg = np.zeros((4, 8, 4), bool)
    fg[1:3, 1:7, 1:3] = True  # 6 slices along the anterior axis, 4 voxels each
    reference = errors.split_at(fg, 4)  # posterior slices 1-3, anterior 4-6
    predicted = errors.split_at(fg, 5)
    probability = np.stack([predicted == c for c in (0, 1, 2)]).astype(float)
    result = errors.case_errors(probability, reference)
    assert result["plane_offset"] == 1
    assert result["whole_dice"] == 1.0
    assert result["reference_split_dice"] == [1.0, 1.0]
    assert result["planar_dice"] == pytest.approx(result["dice"])
    assert result["dice"] == pytest.approx([2 * 8 / (12 + 8), 2 * 12 / (12 + 16)])
    assert result["voxels"]["outer_errors"] == 0
    assert result["voxels"]["split_errors"] == 4


def _run(accuracy, name, points, volumes_per_s):
    curve = [{"minutes": m, "mean": d, "anterior": d + 0.01, "posterior": d - 0.01} for m, d in points]
    seconds = points[-1][0] * 60
    return accuracy.run_summary(name, curve, len(curve), seconds, round(volumes_per_s * seconds))


def test_markdown_table_compares_the_runs(accuracy):
    medfcn = _run(accuracy, "medfcn", [(0.5, 0.845), (1.0, 0.86), (2.0, 0.89), (4.0, 0.88)], 6.0)
    baseline = _run(accuracy, "baseline", [(1.0, 0.80), (2.0, 0.842), (4.0, 0.851)], 12.0)
    rows = accuracy.markdown_table([medfcn, baseline])
    assert len(rows) == 5
    assert rows[2] == "| medfcn | 4 | 4.0 | 0.8900 (0.9000/0.8800) | 0.8800 (0.8900/0.8700) | 0.5 | 1.0 | 6.0 |"
    assert rows[3].endswith("| 2.0 | 4.0 | 12.0 |")
    cells = [c.strip() for c in rows[4].split("|")[1:-1]]
    assert cells[3:] == ["+0.0390", "+0.0290", "0.25", "0.25", "0.50"]
    alone = accuracy.markdown_table([_run(accuracy, "medfcn", [(1.0, 0.83)], 6.0)])
    assert len(alone) == 3 and "| - | - |" in alone[2]  # never reached 0.84: no time, no ratio row


def test_bench_scripts_read_a_stage_config_with_common_json():
    """A bundle's network and classes are in configs/common.json since issue 23: a bench script
    that parses train/inference/evaluate.json alone fails (``@device`` or ``network_def`` undefined)."""
    for script in sorted([*BENCH.glob("*.py"), *BENCH.glob("*.sh")]):
        for number, line in enumerate(script.read_text().splitlines(), 1):
            reads = "read_config(" in line or "config_file=" in line
            if reads and any(stage in line for stage in ("inference.json", "train.json", "evaluate.json")):
                # bundle_files(...)["config_files"] lists common.json first where the bundle has one
                assert "common.json" in line or "bundle_files(" in line, f"{script.name}:{number}: {line.strip()}"


# bench/left_atrium.py: the MONAI recipe vs medfcn on one fold, run on a tiny dataset


def _ball_dataset(root):
    """4 cases of 24^3 voxels at 1 mm, one ball of label 1 each, image = label + faint noise (a
    threshold segments it), and a 2-fold split (``root/folds.json``)."""
    import json

    import nibabel as nib

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"), axis=-1)
    training = []
    for i in range(4):
        label = (np.linalg.norm(grid - rng.uniform(9, 15, 3), axis=-1) < rng.uniform(5, 7)).astype(np.uint8)
        name = f"ball_{i}.nii.gz"
        image = (label + rng.normal(0, 0.05, label.shape)).astype(np.float32)
        for folder, volume in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), root / folder / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", "1": "ball"}
    (root / "dataset.json").write_text(json.dumps({"name": "Ball", "labels": labels, "training": training}))
    folds = {"n_folds": 2, "seed": 0, "folds": [["ball_0", "ball_2"], ["ball_1", "ball_3"]]}
    (root / "folds.json").write_text(json.dumps(folds))
    return root


def _tiny_bundle(root):
    """The hippocampus bundle's configs with a narrow network, one class, 16^3 patches and 2 epochs."""
    import json
    import shutil

    for part in ("configs", "docs"):
        shutil.copytree(BUNDLE / part, root / part)
    shutil.copy(BUNDLE / "LICENSE", root)
    common = json.loads((root / "configs" / "common.json").read_text())
    common |= {"bundle_name": "tiny", "num_classes": 2, "class_names": ["ball"], "patch_size": [16, 16, 16]}
    common |= {"epochs": 2, "val_interval": 1, "bf16": False}
    common["network_def"] |= {"features": [8, 16, 32], "deep_supervision": 1}
    (root / "configs" / "common.json").write_text(json.dumps(common, indent=1))
    return root


@pytest.fixture(scope="module")
def left_atrium():
    return _bench_module("left_atrium")


def test_left_atrium_recipe_is_the_issues(left_atrium):
    """UNet(3, 1, 2, channels 32-256, strides 2, 2 residual units, instance norm); the
    augmentation pads, crops 2:1 around the label, flips 3 axes, rotates/scales, shifts intensity."""
    reference = UNet(3, 1, 2, channels=(32, 64, 128, 256), strides=(2, 2, 2), num_res_units=2, norm="INSTANCE")
    net = left_atrium.monai_unet(2)
    assert [p.shape for p in net.parameters()] == [p.shape for p in reference.parameters()]
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    names = [type(t).__name__ for t in left_atrium.monai_augmentation((96, 96, 64))]
    assert names[:2] == ["SpatialPadd", "RandCropByPosNegLabeld"] and names.count("RandFlipd") == 3
    crop = left_atrium.monai_augmentation((96, 96, 64))[1]
    assert list(crop.cropper.spatial_size) == [96, 96, 64] and crop.cropper.pos_ratio == pytest.approx(2 / 3)
    spacing = left_atrium.monai_preprocessing(["image", "label"], 1.25)[3]
    assert list(spacing.spacing_transform.pixdim) == [1.25] * 3
    args = left_atrium.parse_args(["--work", "unused"])
    assert (args.spacing, args.patch, args.minutes, args.fold) == (1.25, (96, 96, 64), 20.0, 0)


def test_left_atrium_medfcn_variants_fit_the_budget(left_atrium):
    args = left_atrium.parse_args(["--work", "unused", "--minutes", "20", "--set", "network_def#features=[8, 16]"])
    assert left_atrium.medfcn_overrides(args) == {"network_def#features": [8, 16]}
    args = left_atrium.parse_args(["--work", "unused", "--minutes", "20", "--fit-budget", "--max-cases", "4"])
    assert left_atrium.medfcn_overrides(args) == {"max_cases": 4, "epochs": 100, "budget_minutes": 20.0}
    with pytest.raises(SystemExit, match="--set takes KEY=VALUE"):
        left_atrium.medfcn_overrides(left_atrium.parse_args(["--work", "unused", "--set", "epochs"]))


def test_left_atrium_cosine_follows_the_budget(left_atrium):
    assert left_atrium.cosine_lr(2e-3, 0, 60) == pytest.approx(2e-3)
    assert left_atrium.cosine_lr(2e-3, 30, 60) == pytest.approx(1e-3)
    assert left_atrium.cosine_lr(2e-3, 60, 60) == pytest.approx(0)
    assert left_atrium.cosine_lr(2e-3, 90, 60) == pytest.approx(0)  # past the budget: stays 0


def test_left_atrium_monai_masks_land_on_the_original_grid(left_atrium, tmp_path):
    """A 'network' thresholding the z-scored image at 1.5 mm: its masks, resampled back to the
    1 mm grid by Invertd, score high Dice against the labels (medfcn evaluate refuses masks of
    another shape or affine), so the inversion puts them where the labels are."""
    data = _ball_dataset(tmp_path / "Ball")
    args = left_atrium.parse_args(["--data", str(data), "--spacing", "1.5", "--patch", "16", "16", "16"])
    _, val = left_atrium.fold_datalists(data, data / "folds.json", 0)

    def threshold(x):  # one 16^3 window holds the whole resampled volume: no padding
        t = (x.amax() + x.amin()) / 2
        return torch.cat([t - x, x - t], dim=1) * 10

    seconds = left_atrium.predict_monai(threshold, val, tmp_path / "masks", args, torch.device("cpu"))
    assert len(seconds) == 2
    dice = [c["dice"] for c in left_atrium.score(tmp_path / "masks", val, [1])]
    assert min(dice) > 0.9, dice


@pytest.mark.slow
def test_left_atrium_both_arms_same_fold(left_atrium, tmp_path):
    """Both arms on a tiny dataset: the MONAI recipe for 3 s of budget (16^3 patches at 1.5 mm)
    and medfcn with a given tiny bundle (2 epochs); the JSON holds both, with finite Dice in
    [0, 1], and the MONAI training ran to its budget and stopped within a step after it."""
    import json

    data = _ball_dataset(tmp_path / "Ball")
    bundle = _tiny_bundle(tmp_path / "tiny")
    out = tmp_path / "result.json"
    options = ["--data", str(data), "--folds", str(data / "folds.json"), "--minutes", "0.05", "--device", "cpu"]
    options += ["--spacing", "1.5", "--patch", "16", "16", "16", "--work", str(tmp_path / "work"), "--out", str(out)]
    left_atrium.main([*options, "--medfcn-bundle", str(bundle)])
    result = json.loads(out.read_text())
    arms = {arm["arm"]: arm for arm in result["arms"]}
    assert set(arms) == {"monai", "medfcn"}
    assert result["held_out_cases"] == 2 and result["machine"]["cpu_count"] >= 1
    for arm in arms.values():
        assert [c["case"] for c in arm["cases"]] == ["ball_0", "ball_2"]
        assert all(0 <= c["dice"] <= 1 for c in arm["cases"]), arm["cases"]
        assert 0 <= arm["min_dice"] <= arm["mean_dice"] <= 1 and arm["seconds_per_case"] > 0
    monai_arm = arms["monai"]
    assert monai_arm["steps"] >= 1
    assert 0.05 <= monai_arm["training_minutes"] <= 0.05 + 10 / 60, monai_arm["training_minutes"]
    assert arms["medfcn"]["epochs"] == 2 and arms["medfcn"]["planning_seconds"] is None


# bench/transfer.py: scratch vs a transferred encoder, frozen and fine-tuned, on few labels


@pytest.fixture(scope="module")
def transfer():
    return _bench_module("transfer")


def _source_bundle(root):
    """A 'trained' source bundle: the tiny bundle's configs with random weights of its network
    (features 8-16-32) as ``models/model.pt``, 3 output classes (its head cannot transfer)."""
    from medfcn import FCN

    bundle = _tiny_bundle(root)
    (bundle / "models").mkdir()
    network = FCN(spatial_dims=3, in_channels=1, out_channels=3, features=(8, 16, 32), deep_supervision=1)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def _encoder(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("network", state)
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


@pytest.mark.slow
def test_transfer_arms_share_the_network_and_only_frozen_keeps_the_source(transfer, tmp_path):
    """Three arms on a tiny dataset, 1 labelled case: the few-label folder holds only the
    labelled and held-out cases; the network takes the source's features; the frozen arm's
    encoder ends equal to the source's, the fine-tuned and scratch arms' do not."""
    import json

    data = _ball_dataset(tmp_path / "Ball")
    source = _source_bundle(tmp_path / "source")
    planned = _tiny_bundle(tmp_path / "planned")
    common = json.loads((planned / "configs" / "common.json").read_text())
    common["network_def"] |= {"features": [4, 8, 16, 32]}  # another width: the source's must win
    (planned / "configs" / "common.json").write_text(json.dumps(common))
    out, work = tmp_path / "transfer.json", tmp_path / "work"
    options = ["--data", str(data), "--folds", str(data / "folds.json"), "--labelled", "1", "--epochs", "2"]
    options += ["--val-interval", "1", "--source", str(source), "--bundle", str(planned), "--device", "cpu"]
    transfer.main([*options, "--work", str(work), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [a["arm"] for a in result["arms"]] == ["scratch", "frozen", "fine-tuned"]
    assert result["network_def"]["features"] == [8, 16, 32] and len(result["network_def"]["strides"]) == 2
    assert len(result["labelled_cases"]) == 1 and result["labelled_cases"][0] in {"ball_1", "ball_3"}
    listed = json.loads((work / "data" / "dataset.json").read_text())["training"]
    assert sorted(e["image"] for e in listed) == sorted(
        f"./imagesTr/{c}.nii.gz" for c in ["ball_0", "ball_2", *result["labelled_cases"]]
    )
    source_encoder = _encoder(source / "models" / "model.pt")
    for arm in result["arms"]:
        assert arm["epochs"] == 2 and 0 <= arm["min_dice"] <= arm["mean_dice"] <= 1
        encoder = _encoder(work / f"run_{arm['arm']}" / "last.pt")
        same = all(torch.equal(encoder[k], v) for k, v in source_encoder.items())
        assert same == (arm["arm"] == "frozen"), arm["arm"]


# bench/cache_memory.py: peak RSS of a training process by `--cache`


@pytest.mark.slow
def test_cache_memory_measures_each_kind_and_count(tmp_path):
    """Two runs of a tiny network on 5 spheres (an automatic split: fold 0 has 4 training cases
    and 1 validation case): ``disk``'s files are the cases it trained and validated on."""
    import json

    from .conftest import write_msd_dataset

    cache_memory = _bench_module("cache_memory")
    data = write_msd_dataset(tmp_path / "data", n_cases=5, shape=(20, 24, 16))
    tiny = ["network_def#features=[8, 16, 32]", "network_def#deep_supervision=1", "patch_size=[16, 16, 16]"]
    options = ["--data", str(data), "--cases", "3", "--kinds", "ram", "disk", "--device", "cpu"]
    options += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "m.json")]
    result = cache_memory.main([*options, *[f"--set={item}" for item in [*tiny, "bf16=false"]]])
    assert json.loads((tmp_path / "m.json").read_text()) == result
    rows = {row["cache"]: row for row in result["rows"]}
    assert set(rows) == {"ram", "disk"} and all(row["cases"] == 3 for row in rows.values())
    assert rows["disk"]["cache_files"] == 3 + 1 and rows["disk"]["cache_mib"] > 0
    assert rows["ram"]["cache_files"] == 0 and not (tmp_path / "work" / "ram_3" / "cache").exists()
    assert all(row["peak_rss_mib"] > 100 and row["wall_s"] > 0 for row in rows.values())  # torch alone is more


# bench/ddp_throughput.py: training throughput of 1 and 2 processes
def test_ddp_throughput_times_steady_epochs_of_each_process_count(tmp_path):
    import json

    from .conftest import write_msd_dataset

    ddp = _bench_module("ddp_throughput")
    data = write_msd_dataset(tmp_path / "data", n_cases=6, shape=(20, 24, 16))
    tiny = ["network_def#features=[8, 16, 32]", "network_def#deep_supervision=1", "patch_size=[16, 16, 16]"]
    options = ["--data", str(data), "--epochs", "3", "--work", str(tmp_path / "work")]
    options += ["--out", str(tmp_path / "t.json")]
    sets = [f"--set={item}" for item in [*tiny, "bf16=false", f"folds_file={json.dumps(str(data / 'folds.json'))}"]]
    result = ddp.main([*options, *sets])
    assert json.loads((tmp_path / "t.json").read_text()) == result
    rows = {row["processes"]: row for row in result["rows"]}
    assert set(rows) == {1, 2}
    assert all(row["training_cases"] == 3 and row["steady_epochs"] == 1 for row in rows.values())  # fold 0 of 2
    assert all(0 < row["s_per_epoch"] < row["wall_s"] for row in rows.values())
    assert rows[2]["threads_per_process"] == max(1, rows[1]["threads_per_process"] // 2)
    assert (tmp_path / "work" / "p2" / "last.pt").is_file()


# bench/infer_processes.py: batch inference in 1 and 2 processes
def test_infer_processes_times_each_count_and_compares_the_masks(tmp_path):
    import json

    from .conftest import write_msd_dataset

    bench = _bench_module("infer_processes")
    scans = write_msd_dataset(tmp_path / "data", n_cases=3, shape=(20, 24, 16)) / "imagesTr"
    options = ["--inputs", str(scans), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "i.json")]
    result = bench.main(options)
    assert json.loads((tmp_path / "i.json").read_text()) == result
    rows = {row["processes"]: row for row in result["rows"]}
    assert set(rows) == {1, 2} and all(row["scans"] == 3 and row["masks_as_p1"] for row in rows.values())
    assert all(0 < row["scans_per_s"] and row["wall_s"] > 0 for row in rows.values())
    (tmp_path / "work" / "p2" / "case_001.nii.gz").unlink()
    assert not bench.same_masks(tmp_path / "work" / "p1", tmp_path / "work" / "p2")  # the comparison can fail


HELD_OUT = [("hippocampus_fcn", "Task04_Hippocampus", 42), ("left_atrium_fcn", "LeftAtrium", 16)]


@pytest.mark.parametrize(("bundle", "dataset", "cases"), HELD_OUT)
def test_inference_bench_scores_each_bundle_on_its_own_held_out_fold(bundle, dataset, cases, monkeypatch):
    import json

    from .conftest import DATA_ROOT, need

    need(DATA_ROOT / dataset)
    monkeypatch.setenv("MEDFCN_DATA", str(DATA_ROOT))
    images, labels, name = _bench_module("inference").held_out_scans(REPO / "bundles" / bundle, 0)
    held_out = json.loads((REPO / "datasets" / dataset / "folds.json").read_text())["folds"][0]
    assert name == dataset and len(images) == cases
    assert sorted(p.name.removesuffix(".nii.gz") for p in images) == sorted(held_out)  # fold 0, not training cases
    assert all((labels / p.name).is_file() for p in images)


def test_plots_draw_the_speed_of_each_bundle(tmp_path):
    plots = _bench_module("plots")
    result = {"machine": "2 threads, test CPU", "precision": "float32", "date": "2026-12-04", "cases": 3}
    results = [
        {**result, "bundle": f"b{k}", "dataset": "D", "model_compute_s_median": s, "infer_process_s_median": 4 * s}
        for k, s in enumerate((0.04, 1.5))
    ]
    plots.plot_inference_speed(results, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
