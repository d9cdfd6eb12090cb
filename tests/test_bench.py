"""The bench harness's own arithmetic: the figures of bench/README.md come from these functions.

Benchmarks are not tests, so nothing here times or trains anything; it checks that the
harness measures what it says: the baseline is the network and recipe the issue pastes, the
time-to-Dice readings, the FLOP count, and the head/body error decomposition of bench/errors.py.
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
                assert "common.json" in line, f"{script.name}:{number}: {line.strip()}"
