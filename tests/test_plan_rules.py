"""The planner's decisions (medfcn.planning.rules.make_plan) for isotropic, anisotropic and
CT-like fingerprints, with a fake probe (seconds as a function of voxels x width), and the real
timed probe (medfcn.planning.probe) on a tiny network."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest

from medfcn.errors import InputWarning, UserError
from medfcn.planning import rules
from medfcn.planning.probe import NetworkSpec, TimedProbe
from medfcn.planning.rules import make_plan
from tests.conftest import write_msd_dataset

SECONDS_PER_VOXEL_CHANNEL = 1e-7  # ~ this CPU: the recipe's 2 x 40x56x40 step at w0 16 ~ 0.29 s


class FakeProbe:
    """Seconds proportional to samples x voxels x finest width; records what it was asked."""

    device = "cpu"
    description = "a fake probe"

    def __init__(self, setup_per_case: float | None = 0.05):
        self.setup_per_case = setup_per_case
        self.steps: list[NetworkSpec] = []
        self.again: list[bool] = []  # train_step_seconds' ``again`` per call
        self.windows: list[NetworkSpec] = []

    def train_step_seconds(self, spec: NetworkSpec, limit=None, again=False) -> float:
        self.steps.append(spec)
        self.again.append(again)
        return SECONDS_PER_VOXEL_CHANNEL * spec.samples * math.prod(spec.patch) * spec.features[0]

    def window_seconds(self, spec: NetworkSpec) -> float:
        self.windows.append(spec)
        return 0.3 * SECONDS_PER_VOXEL_CHANNEL * math.prod(spec.patch) * spec.features[0]

    def setup_seconds_per_case(self, dataset, pixdim, modality, hu_window, intensity_stats):
        return self.setup_per_case


def fingerprint(shape, spacing, labels, modality="MRI", n=208, spacings=None, intensity=None) -> dict:
    """A fingerprint dict (medfcn.planning's schema) of ``n`` cases of one ``shape``; per-case
    ``spacings`` (n x 3) or ``spacing`` for all."""
    spacings = [list(spacing)] * n if spacings is None else [list(s) for s in spacings]
    names = {"0": "background", **{str(k + 1): name for k, name in enumerate(labels)}}
    stats = intensity or {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}
    return {
        "medfcn_fingerprint": 1,
        "dataset": {"name": "T", "dir": "/nonexistent", "modality": {"0": modality}, "labels": names, "num_cases": n},
        "cases": [
            {"case": f"c{i:03d}", "shape": list(shape), "spacing_mm": s, "orientation": "RAS", "channels": 1}
            for i, s in enumerate(spacings)
        ],
        "intensity": {"0": {"name": modality, **stats}},
        "summary": {
            "median_shape": list(shape),
            "median_spacing_mm": np.median(np.array(spacings), axis=0).tolist(),
            "channels": 1,
        },
    }


HIPPOCAMPUS = fingerprint((36, 50, 35), (1.0, 1.0, 1.0), ["Anterior", "Posterior"])
LEFT_ATRIUM = fingerprint((190, 140, 88), (0.625, 0.625, 0.625), ["left atrium"], n=80)
CT_Z = [3.0] * 5 + [5.0] * 25  # slice thickness per case: the 10th percentile is below the median
CT_STATS = {"mean": 99.0, "std": 40.0, "percentile_00_5": -50.0, "percentile_99_5": 230.0}
CT_LIKE = fingerprint(
    (512, 512, 60), None, ["spleen"], "ct", n=30, spacings=[(0.8, 0.8, z) for z in CT_Z], intensity=CT_STATS
)


def test_hippocampus_like_rediscovers_the_recipe():
    plan = make_plan(HIPPOCAMPUS, 60.0, probe=FakeProbe())
    assert plan.dims == 3 and plan.slice_axis is None
    assert plan.pixdim == [1.0, 1.0, 1.0]
    assert plan.patch_size == [40, 56, 40]
    assert plan.strides == [[2, 2, 2]] * 4
    assert plan.features == [16, 32, 64, 128, 192]
    assert plan.encoder_blocks == [1] * 5
    assert plan.flip_axes == [0]
    assert plan.deep_supervision == 2 and plan.batch_size == 2
    assert plan.modality == "MRI" and plan.intensity_stats is None and plan.hu_window is None
    assert plan.class_names == ["Anterior", "Posterior"] and plan.num_classes == 3
    assert plan.ema_decay == 0.999 and plan.learning_rate == 0.002
    assert plan.epochs >= rules.MIN_EPOCHS and 1 <= plan.val_interval <= 10
    for decision in ("pixdim", "modality", "dims", "patch_size", "strides", "features", "epochs", "flip_axes"):
        assert plan.reasons[decision], decision
    assert "anterior" in plan.reasons["flip_axes"].lower() or "Anterior" in plan.reasons["flip_axes"]


def test_anisotropic_ct_like():
    plan = make_plan(CT_LIKE, 60.0, probe=FakeProbe())
    assert plan.dims == 3
    assert plan.pixdim[2] == pytest.approx(np.percentile(CT_Z, 10), abs=1e-3)  # nnU-Net's coarse-axis rule
    assert plan.pixdim[2] < 5.0 and plan.pixdim[0] == plan.pixdim[1] < plan.pixdim[2]
    assert plan.strides[0][2] == 1 and plan.strides[0][:2] == [2, 2]  # the coarse axis waits
    assert all(len(s) == 3 and set(s) <= {1, 2} for s in plan.strides)
    assert len(plan.features) == len(plan.strides) + 1 <= rules.MAX_SCALES
    assert plan.modality == "CT"
    assert plan.hu_window == [-50.0, 230.0] and plan.intensity_stats == [99.0, 40.0]
    assert "percentile" in plan.reasons["pixdim"]


def test_a_ct_foreground_of_one_value_is_refused():
    flat = {"mean": 40.0, "std": 0.0, "percentile_00_5": 40.0, "percentile_99_5": 40.0}
    one_value = fingerprint((64, 64, 30), (1.0, 1.0, 2.0), ["spleen"], "CT", n=4, intensity=flat)
    with pytest.raises(UserError, match="all have about one value"):
        make_plan(one_value, 20.0, probe=FakeProbe())


def test_pooling_stops_on_short_and_coarse_axes():
    # 40 voxels pool 4 times (40, 20, 10, 5 -> 3), 6 voxels once, 4 never
    assert rules.pooling((40, 6, 4), (1.0, 1.0, 1.0)) == ((2, 2, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1))
    # 0.8 x 0.8 x 5 mm: the 5 mm axis pools once the others reach 3.2 mm (5 <= 2 x 3.2)
    strides = rules.pooling((128, 128, 64), (0.8, 0.8, 5.0))
    assert [s[2] for s in strides] == [1, 1, 2, 2, 2]
    assert len(strides) == rules.MAX_SCALES - 1


def test_side_named_labels_are_not_flipped():
    kidneys = fingerprint((100, 100, 80), (1.0, 1.0, 1.0), ["left kidney", "right kidney"], n=20)
    plan = make_plan(kidneys, 30.0, probe=FakeProbe())
    assert plan.flip_axes == []
    assert "left kidney" in plan.reasons["flip_axes"]


def test_more_budget_never_gives_a_coarser_spacing_and_fills_the_budget():
    previous = None
    for budget in (5, 10, 20, 40, 60, 120, 240):
        plan = make_plan(LEFT_ATRIUM, float(budget), probe=FakeProbe())
        if previous is not None:
            assert all(a <= b + 1e-9 for a, b in zip(plan.pixdim, previous, strict=True)), budget
        previous = plan.pixdim
        if 1 < plan.epochs < rules.MAX_EPOCHS:  # the cap ends a larger budget early
            assert abs(plan.planned_minutes - budget) <= 0.1 * budget, (budget, plan.planned_minutes)
        assert plan.planned_minutes <= budget or plan.epochs == 1


def test_left_atrium_like_plan():
    plan = make_plan(LEFT_ATRIUM, 60.0, probe=FakeProbe())
    assert plan.flip_axes == []  # 'left atrium' names a side
    assert plan.pixdim[0] > 0.625  # full resolution does not fit an hour at this cost
    assert all(p % 8 == 0 for p in plan.patch_size)
    assert plan.epochs >= rules.MIN_EPOCHS


def test_search_times_coarse_to_fine_and_stops_at_the_first_too_slow():
    probe = FakeProbe()
    plan = make_plan(HIPPOCAMPUS, 60.0, probe=probe)
    # every spacing passes with w0 8, coarse to fine; then w0 16 at the finest
    timed = [(s.patch, s.features[0]) for s in probe.steps]
    assert timed[-2:] == [((40, 56, 40), 8), ((40, 56, 40), 16)]
    assert [w for _, w in timed[:-1]] == [8] * len(rules.SPACING_FACTORS)
    assert plan.seconds_per_step == pytest.approx(0.2867, abs=1e-3)
    probe = FakeProbe()
    plan = make_plan(LEFT_ATRIUM, 20.0, probe=probe)
    timed = [s.patch for s in probe.steps]
    assert (160, 144, 88) not in timed  # finer than the first too slow spacing: never timed
    chosen = timed.index(tuple(plan.patch_size))
    assert plan.epochs >= rules.MIN_EPOCHS and "Chosen: the finest spacing" in plan.reasons["search"]
    too_slow = [p for p in timed[chosen:] if p != tuple(plan.patch_size)]
    assert len(set(too_slow)) == 1 and len(too_slow) <= 2  # one too slow, timed twice at most


def test_a_budget_that_affords_more_than_the_cap_trains_the_cap_and_ends_early(monkeypatch):
    plan = make_plan(HIPPOCAMPUS, 600.0, probe=FakeProbe())
    assert plan.epochs == rules.MAX_EPOCHS
    with monkeypatch.context() as patch:
        patch.setattr(rules, "MAX_EPOCHS", 10**6)
        uncapped = make_plan(HIPPOCAMPUS, 600.0, probe=FakeProbe())
    assert uncapped.epochs > rules.MAX_EPOCHS
    for decision in ("pixdim", "patch_size", "features", "strides", "batch_size"):  # the cap changes no other
        assert getattr(plan, decision) == getattr(uncapped, decision), decision
    assert plan.planned_minutes < 0.5 * 600
    assert "the cap" in plan.reasons["epochs"] and "left unused" in plan.reasons["epochs"]
    short = make_plan(LEFT_ATRIUM, 20.0, probe=FakeProbe())
    assert short.epochs < rules.MAX_EPOCHS and "fill the 20 min budget" in short.reasons["epochs"]


class SlowFirstProbe(FakeProbe):
    """The fake probe's step times, but each candidate's first timing 1.4x slower (a machine
    busy at that moment)."""

    def train_step_seconds(self, spec: NetworkSpec, limit=None, again=False) -> float:
        seconds = super().train_step_seconds(spec, limit, again)
        return seconds if again else 1.4 * seconds


@pytest.mark.parametrize("budget", [20.0, 60.0])
def test_one_slowed_timing_near_the_threshold_does_not_decide_the_plan(budget, monkeypatch):
    expected = make_plan(LEFT_ATRIUM, budget, probe=FakeProbe())
    noisy = SlowFirstProbe()
    plan = make_plan(LEFT_ATRIUM, budget, probe=noisy)
    assert (plan.pixdim, plan.features) == (expected.pixdim, expected.features)
    assert any(noisy.again), "no candidate was near the threshold: the test proves nothing"
    monkeypatch.setattr(rules, "BORDERLINE_FACTOR", 1.0)  # no second timing: the slowed one decides
    unchecked = make_plan(LEFT_ATRIUM, budget, probe=SlowFirstProbe())
    assert (unchecked.pixdim, unchecked.features) != (expected.pixdim, expected.features)


def test_nothing_fits_takes_the_most_epochs():
    plan = make_plan(LEFT_ATRIUM, 1.0, probe=FakeProbe())
    assert plan.epochs < rules.MIN_EPOCHS
    assert plan.features[0] == min(rules.WIDTHS)
    assert plan.pixdim[0] == pytest.approx(0.625 * max(rules.SPACING_FACTORS))


def test_forced_2d():
    plan = make_plan(HIPPOCAMPUS, 20.0, dims=2, probe=FakeProbe())
    assert plan.dims == 2 and plan.slice_axis == 0
    assert len(plan.patch_size) == 2 and plan.patch_size == [56, 40]
    assert all(len(s) == 2 for s in plan.strides)
    assert plan.flip_axes == []  # sagittal slices: R-L is the slice axis
    assert plan.slices_per_volume == 4


def test_dims_other_than_2_or_3_are_refused():
    with pytest.raises(UserError, match="--dims"):
        make_plan(HIPPOCAMPUS, 20.0, dims=4, probe=FakeProbe())


def test_few_thick_slices_plan_2d():
    thick = fingerprint((256, 256, 12), (1.0, 1.0, 6.0), ["lesion"], n=20)
    plan = make_plan(thick, 20.0, probe=FakeProbe())
    assert plan.dims == 2 and plan.slice_axis == 2
    assert plan.flip_axes == [0]
    assert len(plan.patch_size) == 2


def test_val_interval_keeps_validation_within_a_tenth():
    plan = make_plan(LEFT_ATRIUM, 60.0, probe=FakeProbe())
    validations = plan.epochs // plan.val_interval + (1 if plan.epochs % plan.val_interval else 0)
    assert validations * plan.seconds_per_validation <= 0.1 * 3600 + 1e-6 or plan.val_interval == 10


def test_timed_probe_measures_a_tiny_network(tmp_path):
    probe = TimedProbe("cpu", steps=1, min_seconds=0.0)
    spec = NetworkSpec(3, 1, 3, (16, 16, 16), (4, 8), ((2, 2, 2),), 0, 2, (20, 20, 20))
    warm = probe.train_step_seconds(spec, limit=1e-9)  # far too slow: cut short after the warm-up
    assert warm > 0 and probe._cache[("train", spec)][1]
    step = probe.train_step_seconds(spec)  # no limit: timed in full
    assert 0 < step < 30 and math.isfinite(step) and not probe._cache[("train", spec)][1]
    assert probe.train_step_seconds(spec) == step  # cached: timed once
    window = probe.window_seconds(spec)  # not compared with the step: one of each, a busy machine reorders them
    assert 0 < window < 30 and math.isfinite(window)
    root = write_msd_dataset(tmp_path / "Spheres", n_cases=2, shape=(20, 22, 18))
    per_case = probe.setup_seconds_per_case({"dir": str(root)}, [1.0, 1.0, 1.0], "MRI", [-160, 240], None)
    assert per_case is not None and per_case > 0
    assert probe.setup_seconds_per_case({"dir": str(tmp_path / "none")}, [1.0] * 3, "MRI", [0, 1], None) is None


def test_the_timed_probe_times_the_trainers_iterations_with_the_weight_average(monkeypatch):
    """The steps are timed in MONAI's SupervisedTrainer with the weight average attached (its
    update is in every timed iteration), and ``again`` times them anew instead of the cache."""
    from medfcn.handlers import WeightAverage

    updates = []
    update = WeightAverage.__call__
    monkeypatch.setattr(WeightAverage, "__call__", lambda self, engine=None: updates.append(1) or update(self, engine))
    probe = TimedProbe("cpu", steps=3, min_seconds=0.0)
    spec = NetworkSpec(3, 1, 2, (8, 8, 8), (4, 8), ((2, 2, 2),), 0, 1, (8, 8, 8))
    first = probe.train_step_seconds(spec)
    assert len(updates) == 1 + 3  # the warm-up iteration, then the 3 timed
    assert probe.train_step_seconds(spec) == first and len(updates) == 4  # cached
    probe.train_step_seconds(spec, again=True)
    assert len(updates) == 8


def test_timing_again_keeps_the_faster_timing(monkeypatch):
    probe = TimedProbe("cpu", steps=1, min_seconds=0.0)
    spec = NetworkSpec(3, 1, 2, (8, 8, 8), (4, 8), ((2, 2, 2),), 0, 1, (8, 8, 8))
    monkeypatch.setattr(probe, "_augmentation_seconds", lambda spec: 0.0)
    timings = iter([(2.0, False), (3.0, False), (1.0, False)])
    monkeypatch.setattr(probe, "_time_training", lambda spec, limit: next(timings))
    assert probe.train_step_seconds(spec) == 2.0
    assert probe.train_step_seconds(spec, again=True) == 2.0  # 3.0 now: the earlier was faster
    assert probe.train_step_seconds(spec) == 2.0
    assert probe.train_step_seconds(spec, again=True) == 1.0
    assert probe.train_step_seconds(spec) == 1.0


def test_a_candidate_out_of_memory_is_a_verdict_not_a_logged_error(monkeypatch, caplog):
    """Out of memory inside the trainer: inf (the candidate cannot train here), and none of
    Ignite's ERROR lines about the exception ending the run."""
    from medfcn.networks.fcn import FCN

    def out_of_memory(self, x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    monkeypatch.setattr(FCN, "forward", out_of_memory)
    probe = TimedProbe("cpu", steps=1, min_seconds=0.0)
    spec = NetworkSpec(3, 1, 2, (8, 8, 8), (4, 8), ((2, 2, 2),), 0, 1, (8, 8, 8))
    with caplog.at_level(logging.DEBUG):
        assert probe.train_step_seconds(spec) == math.inf
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_make_plan_with_the_real_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(rules, "SPACING_FACTORS", (1.0, 2.0))  # two candidates keep the test short
    monkeypatch.setattr(rules, "MAX_PREFERRED_WIDTH", 8)
    root = write_msd_dataset(tmp_path / "Spheres", n_cases=4, shape=(14, 14, 12))
    tiny = fingerprint((14, 14, 12), (1.0, 1.0, 1.0), ["dim", "bright"], n=4)
    tiny["dataset"]["dir"] = str(root)
    plan = make_plan(tiny, 10.0, probe=TimedProbe("cpu", steps=1, min_seconds=0.0))
    assert plan.device == "cpu" and plan.seconds_per_step > 0 and plan.seconds_setup > 0
    assert all(p in (8, 16) for p in plan.patch_size)  # 16 unless this machine is very busy
    assert "cpu" in plan.reasons["search"]


@pytest.mark.parametrize("share, busy", [(0.4, True), (0.95, False)])
def test_a_busy_machine_is_said(share, busy):
    """The probe's threads got ``share`` of their cores: below BUSY_CPU_SHARE the plan warns
    that its timings are a busy machine's, and records the share either way."""
    probe = FakeProbe()
    probe.cpu_share = share
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = make_plan(HIPPOCAMPUS, 40.0, probe=probe)
    said = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
    assert plan.cpu_share == share
    assert ("busy_machine" in plan.reasons) is busy
    assert len(said) == (1 if busy else 0), said
    if busy:
        assert f"{share:.0%} of their cores" in said[0]


def test_the_timed_probe_measures_its_share_of_the_cores():
    probe = TimedProbe("cpu", steps=2, min_seconds=0.0)
    spec = NetworkSpec(
        dims=3,
        in_channels=1,
        num_classes=2,
        patch=(8, 8, 8),
        features=(4, 8),
        strides=((2, 2, 2),),
        deep_supervision=0,
        samples=1,
        volume=(8, 8, 8),
    )
    probe.train_step_seconds(spec)
    assert probe.cpu_share is not None and 0.0 < probe.cpu_share <= 1.0


def test_validation_counts_the_windows_of_every_case_not_the_median_ones():
    """Half the cases fit one 32^3 window, half are 64 x 64 x 32: 3 x 3 x 1 windows at overlap
    0.5; the mean is 5, where the median case (the smaller, on a tie) would say 1 or 9."""
    shapes = fingerprint((32, 32, 32), (1.0, 1.0, 1.0), ["x"], n=4)
    for case in shapes["cases"][2:]:
        case["shape"] = [64, 64, 32]
    layout = rules.Layout(3, None, (1.0, 1.0, 1.0), None)
    assert rules.mean_windows(shapes, (1.0, 1.0, 1.0), layout, (32, 32, 32)) == pytest.approx(5.0)
    sliced = rules.Layout(2, 2, (1.0, 1.0, 1.0), None)  # 2D: windows x slices per case
    assert rules.mean_windows(shapes, (1.0, 1.0, 1.0), sliced, (32, 32)) == pytest.approx((32 + 9 * 32) / 2)


def test_reasons_count_in_the_singular_where_the_count_is_one():
    """2 cases: 1 held out for validation, 1 training step per epoch."""
    plan = make_plan(fingerprint((36, 50, 35), (1.0, 1.0, 1.0), ["lesion"], n=2), 20.0, probe=FakeProbe())
    assert "a validation of 1 case takes" in plan.reasons["val_interval"], plan.reasons["val_interval"]
    assert f"{plan.epochs} epochs of 1 step (" in plan.reasons["epochs"], plan.reasons["epochs"]
    assert "the 2 cases once" in plan.reasons["seconds_setup"], plan.reasons["seconds_setup"]
