"""The planner's decisions: from a dataset's fingerprint (:mod:`medfcn.planning.fingerprint`)
and the time budget to a :class:`Plan`, each decision with the reason it was taken.

The data decide the target spacing (median; nnU-Net's 10th percentile on the coarse axis of
anisotropic data), the normalisation (CT: clip to the foreground's 0.5-99.5 percentiles, z-score
with its statistics; otherwise z-score per volume), 2D or 3D, and the flips. The budget decides
resolution, patch and network together: every candidate of a ladder of spacing factors x widths
gets its patch (the median case, rounded up to a multiple of 8, capped), its pooling per axis
(nnU-Net's rules: stop pooling an axis that is short or already coarse) and its features; the
probe (:mod:`medfcn.planning.probe`) measures its training step on this machine; the plan takes
the finest spacing, then the widest network, that still trains ``MIN_EPOCHS`` epochs within the
budget, and at most ``MAX_EPOCHS`` (a larger budget ends early). The search times spacings
from coarse to fine (narrowest network) and stops at the first that fails, then widens the
network at the finest that passed, so only cheap candidates and at most one too slow per ladder
are timed; a candidate near ``MIN_EPOCHS`` is timed twice and keeps the faster timing.

The decisions are pure functions of the fingerprint and the probe's answers: tests pass a fake
probe.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medfcn.data.classes import modality_kind
from medfcn.data.datasets import DEFAULT_FOLDS
from medfcn.errors import InputWarning, UserError
from medfcn.outputs import plural
from medfcn.planning.probe import NetworkSpec, TimedProbe, resolve_device

__all__ = ["Plan", "make_plan", "MAX_EPOCHS", "MIN_EPOCHS", "SPACING_FACTORS", "WIDTHS"]

# --- the data's decisions -------------------------------------------------------------------
ANISOTROPY_RATIO = 3.0  # coarse / fine median spacing above which data count as anisotropic
COARSE_AXIS_PERCENTILE = 10  # nnU-Net: the coarse axis of anisotropic data takes this percentile
FEW_SLICES_FOR_2D = 20  # anisotropic data with fewer slices than this (median) train in 2D
PATCH_MULTIPLE = 8  # patch sides are rounded up to this many voxels
# memory guard (not the time budget, which the search handles): 128^3 voxels in 3D, as the
# largest of nnU-Net's usual 3D patches; 320^2 pixels per slice in 2D
MAX_PATCH_VOXELS = {3: 128**3, 2: 320**2}
MIN_POOL_SIZE = 5  # pool an axis only while it has this many voxels (coarsest map >= 3)
MAX_POOL_SPACING_RATIO = 2.0  # ... and while its spacing is <= this x the finest axis' (nnU-Net)
MAX_SCALES = 6
MAX_FEATURES = 192  # docs/experiments.md rows 27-28: wider costs CPU time and gained nothing
# --- the budget's search (module constants, so cross-validation can choose them) ------------
SPACING_FACTORS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # x the target spacing, finest first
WIDTHS = (8, 16, 32)  # w0: channels of the finest scale
MAX_PREFERRED_WIDTH = 16  # the hippocampus recipe's; wider only where nothing narrower fits
# The fewest epochs a candidate must train within the budget: the MONAI recipe reached Dice
# 0.911 on LeftAtrium with 68 epochs; the hippocampus recipe plateaus at ~40-50 (rows 3, 8).
MIN_EPOCHS = 50
# The most epochs a plan trains: beyond ~100 more epochs stopped paying on both datasets, so a
# budget that affords more ends early. Task04 fold 0: 136 epochs ended at 0.8868 against 0.8913
# at 100 (docs/experiments.md row 3), 125 planned epochs at 0.8878 against the recipe's 0.8934
# (row 75); folds 1-4: 94 epochs level with 48-52 (rows 6, 8); LeftAtrium at 1.25 mm: 0.9057 at
# epoch 26, 0.901-0.905 up to epoch 55 (row 72).
MAX_EPOCHS = 100
# A candidate whose epochs fall within this factor of MIN_EPOCHS is timed once more and keeps the
# faster timing: other work can only slow a step down, and near the threshold one slowed timing
# decides the plan (row 73: 2.64 s and 1.95 s for the same step, two minutes apart).
BORDERLINE_FACTOR = 1.5
# the probe's threads getting less than this share of their cores: the machine is busy, the plan says so
BUSY_CPU_SHARE = 0.75
BATCH_SIZE = {3: 2, 2: 8}  # 3D: the recipe's (row 20); 2D: the 2D bundle's, 4 slices per case
SLICES_PER_VOLUME_2D = 4
VALIDATION_SHARE = 0.10  # validations may take this share of the budget
MAX_VAL_INTERVAL = 10
OVERLAP = 0.5  # the bundles' sliding-window overlap


@dataclass
class Plan:
    """What ``medfcn plan`` decided; every entry becomes an entry of the bundle's common.json.

    Attributes:
        dims: 2 or 3 (the network's spatial dimensions).
        slice_axis: for ``dims == 2``, the RAS axis the 2D network slices along (0, 1 or 2);
            None for 3D.
        pixdim: target voxel size in mm along R-L, A-P, S-I (``Spacingd``'s ``pixdim``).
        modality: ``"MRI"`` or ``"CT"`` (what :func:`medfcn.data.intensity_normalization` takes).
        hu_window: CT: ``[low, high]`` in HU (foreground percentiles 0.5 and 99.5); MRI: None
            (z-scored per volume, no window).
        intensity_stats: CT: ``[mean, std]`` of the foreground in HU; MRI: None.
        in_channels: image channels (modalities).
        num_classes: background + labels.
        class_names: one per foreground label, from dataset.json.
        patch_size: training patch and sliding window, voxels, one per spatial axis.
        features: channels per encoder scale, finest first (``medfcn.FCN``'s ``features``).
        strides: per scale past the first (``len(features) - 1`` entries), the pooling factor
            per spatial axis (1 or 2): ``medfcn.FCN``'s ``strides``.
        encoder_blocks: two-convolution blocks per encoder scale (``medfcn.FCN``).
        deep_supervision: supervised coarser decoder scales (``medfcn.FCN``).
        batch_size: patches per training step.
        epochs: training epochs (one patch per training case per epoch).
        val_interval: epochs between validations.
        flip_axes: spatial axes the training flips along (and test-time augmentation uses), in
            the network's axes (2D: the in-plane axes in RAS order, the slice axis left out).
        slices_per_volume: 2D: slices sampled per case per step (the 2D recipe's 4); 3D: 1.
        ema_decay: the weight average's decay (None: off).
        learning_rate: AdamW's initial learning rate.
        seconds_per_step: measured by the probe: one training step (batch_size patches,
            augmentation, forward, backward, update, in MONAI's trainer with the weight
            average) on the planned device, seconds.
        seconds_per_validation: measured or estimated: one validation pass over the held-out
            cases of a fold, seconds.
        seconds_setup: estimated: loading and preprocessing every case once (the cache), s.
        budget_minutes: the budget asked for.
        planned_minutes: the training time the plan expects, minutes.
        device: where the probe ran (``"cpu"``, ``"cuda"``).
        reasons: decision name (``"pixdim"``, ``"patch_size"``, ...) -> why, one sentence each.
    """

    dims: int
    pixdim: list[float]
    modality: str
    in_channels: int
    num_classes: int
    class_names: list[str]
    patch_size: list[int]
    features: list[int]
    strides: list[list[int]]
    encoder_blocks: list[int]
    deep_supervision: int
    batch_size: int
    epochs: int
    val_interval: int
    flip_axes: list[int]
    budget_minutes: float
    device: str
    slice_axis: int | None = None
    slices_per_volume: int = 1
    hu_window: list[float] | None = None
    intensity_stats: list[float] | None = None
    ema_decay: float | None = 0.999
    learning_rate: float = 0.002
    seconds_per_step: float = 0.0
    seconds_per_validation: float = 0.0
    seconds_setup: float = 0.0
    planned_minutes: float = 0.0
    cpu_share: float | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON (written into ``configs/plan.json`` of the bundle)."""
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    """The data-driven part of a plan that every candidate shares.

    Attributes:
        dims: 2 or 3.
        slice_axis: 2D: the RAS axis sliced along; None in 3D.
        target: the target spacing, mm per RAS axis (before the budget's factor).
        coarse_axis: the coarse RAS axis of anisotropic data; None when isotropic enough.
    """

    dims: int
    slice_axis: int | None
    target: tuple[float, ...]
    coarse_axis: int | None

    @property
    def axes(self) -> list[int]:
        """The network's spatial axes, as RAS axis indices."""
        return [a for a in range(3) if a != self.slice_axis]


@dataclass(frozen=True)
class Candidate:
    """One point of the budget search: spacing (``factor`` x the target) and width ``w0``."""

    factor: float
    w0: int
    pixdim: tuple[float, ...]  # mm per RAS axis
    volume: tuple[int, ...]  # median case shape at pixdim, voxels per network axis
    patch: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]
    patch_capped: bool


@dataclass
class Outcome:
    """A candidate with what the probe measured and what the budget makes of it."""

    candidate: Candidate
    step_seconds: float
    validation_seconds: float | None  # None: not measured (the candidate failed on steps alone)
    epochs: int
    val_interval: int
    planned_seconds: float


def _case_array(fingerprint: dict, key: str) -> np.ndarray:
    """``(cases, 3)`` of a per-case entry (``"shape"``, ``"spacing_mm"``); the summary's median
    when the fingerprint lists no cases."""
    cases = fingerprint.get("cases") or []
    if cases:
        return np.array([c[key] for c in cases], dtype=float)
    summary_key = {"shape": "median_shape", "spacing_mm": "median_spacing_mm"}[key]
    return np.array([fingerprint["summary"][summary_key]], dtype=float)


def target_spacing(fingerprint: dict) -> tuple[list[float], int | None, str]:
    """Target spacing (mm per RAS axis), the coarse axis (anisotropic data) or None, and why."""
    spacings = _case_array(fingerprint, "spacing_mm")
    median = np.median(spacings, axis=0)
    ratio = float(median.max() / median.min())
    if ratio <= ANISOTROPY_RATIO:
        why = f"median spacing {_mm(median)} (coarse/fine {ratio:.2f} <= {ANISOTROPY_RATIO:g}: isotropic enough)."
        return [float(v) for v in median], None, why
    coarse = int(np.argmax(median))
    target = median.copy()
    target[coarse] = np.percentile(spacings[:, coarse], COARSE_AXIS_PERCENTILE)
    why = (
        f"median spacing {_mm(median)} is anisotropic (coarse/fine {ratio:.2f} > {ANISOTROPY_RATIO:g}): the coarse "
        f"axis {coarse} takes the {COARSE_AXIS_PERCENTILE}th percentile of its spacings ({target[coarse]:.3g} mm, "
        "nnU-Net's rule), the others their median."
    )
    return [float(v) for v in target], coarse, why


def _mm(values) -> str:
    return "x".join(f"{float(v):.3g}" for v in values) + " mm"


def normalisation(fingerprint: dict) -> tuple[str, list[float] | None, list[float] | None, str]:
    """``(modality, hu_window, intensity_stats, why)`` from dataset.json's modality and the
    foreground intensity statistics of channel 0."""
    modality = fingerprint["dataset"].get("modality", {})
    if modality_kind(modality) != "CT":  # as `medfcn train` reads dataset.json's modality
        names = ", ".join(sorted(str(m) for m in modality.values())) or "none"
        why = f"modality {names} (not CT): z-score per volume, since MR intensities have no absolute scale."
        return "MRI", None, None, why
    stats = fingerprint["intensity"]["0"]
    window = [float(stats["percentile_00_5"]), float(stats["percentile_99_5"])]
    mean_std = [float(stats["mean"]), float(stats["std"])]
    if not (window[0] < window[1] and mean_std[1] > 0):  # training would refuse such a window
        raise UserError(
            f"{fingerprint['dataset']['dir']}: the labelled CT voxels all have about one value "
            f"({window[0]:g}-{window[1]:g} HU, std {mean_std[1]:g}), so no intensity window can be planned from "
            "them; check the labels (are they on the images?), or plan with a dataset.json modality other than CT."
        )
    why = (
        f"CT: clip to the foreground's 0.5-99.5 percentiles [{window[0]:.1f}, {window[1]:.1f}] HU, then z-score "
        f"with its mean {mean_std[0]:.1f} HU and std {mean_std[1]:.1f} HU (nnU-Net's CT normalisation)."
    )
    return "CT", window, mean_std, why


def choose_layout(fingerprint: dict, dims: int | None) -> tuple[Layout, str]:
    """2D or 3D and the slice axis, with the reason. ``dims`` (2 or 3) forces it."""
    target, coarse, _ = target_spacing(fingerprint)
    shape = np.median(_case_array(fingerprint, "shape") * _case_array(fingerprint, "spacing_mm"), axis=0)
    slice_axis = int(np.argmax(target)) if coarse is None else coarse
    slices = float(shape[slice_axis] / target[slice_axis])
    if dims is not None:
        if dims not in (2, 3):
            raise UserError(f"--dims must be 2 or 3, got {dims}: leave it out to let the data decide.")
        why = f"{dims}D, as asked (--dims {dims})" + (f"; slices along axis {slice_axis}." if dims == 2 else ".")
    elif coarse is not None and slices < FEW_SLICES_FOR_2D:
        dims = 2
        why = (
            f"2D along the coarse axis {coarse}: anisotropic data with {slices:.0f} slices (median), fewer than "
            f"{FEW_SLICES_FOR_2D}, too few for a 3D network to pool along them."
        )
    else:
        dims = 3
        if coarse is None:
            why = "3D: the data are isotropic enough (no coarse axis); 2D is kept for anisotropic data with few slices."
        else:
            why = f"3D: {slices:.0f} slices (median) along the coarse axis {coarse} (>= {FEW_SLICES_FOR_2D})."
    return Layout(dims, slice_axis if dims == 2 else None, tuple(target), coarse), why


LEFT_RIGHT = re.compile(r"\b(left|right)\b|^(l|r)[ _-]|[ _-](l|r)$", re.IGNORECASE)


def flip_axes(fingerprint: dict, layout: Layout) -> tuple[list[int], str]:
    """Flips: along R-L (RAS axis 0, the body's mirror plane) unless a label names a side."""
    names = [str(n) for k, n in fingerprint["dataset"]["labels"].items() if str(k) != "0"]
    sided = [n for n in names if LEFT_RIGHT.search(n)]
    if sided:
        return [], (
            f"no flip: {'label' if len(sided) == 1 else 'labels'} {', '.join(repr(n) for n in sided)} "
            f"{'names' if len(sided) == 1 else 'name'} a side: a left-right flip would show it "
            "on the other side under the same name; never along A-P or S-I, where anatomy is not mirrored."
        )
    if layout.slice_axis == 0:
        return [], "no flip: the 2D slices are sagittal (axis 0 is the slice axis), so R-L is not in plane."
    return [0], (
        f"flip along R-L (axis 0, the body's mirror plane): no label names a side ({', '.join(names)}); never along "
        "A-P or S-I, where anatomy is not mirrored (names like anterior/posterior would be swapped)."
    )


def factor_ladder(layout: Layout) -> list[float]:
    """The spacing factors to try, finest first. The coarse axis of anisotropic data and the
    slice axis of a 2D plan keep their target spacing; on anisotropic data a factor is tried
    only while the fine axes stay finer than the coarse one."""
    if layout.coarse_axis is None:
        return list(SPACING_FACTORS)
    fine = max(layout.target[a] for a in range(3) if a != layout.coarse_axis)
    return [f for f in SPACING_FACTORS if fine * f < layout.target[layout.coarse_axis]] or [SPACING_FACTORS[0]]


def scaled_spacing(layout: Layout, factor: float) -> tuple[float, ...]:
    """``factor`` x the target spacing, mm per RAS axis (see :func:`factor_ladder`)."""
    kept = {layout.coarse_axis, layout.slice_axis} - {None}
    return tuple(float(s) if a in kept else float(s) * factor for a, s in enumerate(layout.target))


def median_volume(fingerprint: dict, pixdim, axes: list[int]) -> tuple[int, ...]:
    """The median case shape (voxels) at ``pixdim`` (mm), along ``axes``."""
    extent = np.median(_case_array(fingerprint, "shape") * _case_array(fingerprint, "spacing_mm"), axis=0)
    return tuple(max(1, round(float(extent[a] / pixdim[a]))) for a in axes)


def patch_size(volume, spacing, dims: int) -> tuple[tuple[int, ...], bool]:
    """The median case ``volume`` (voxels) rounded up to a multiple of ``PATCH_MULTIPLE``, then,
    above ``MAX_PATCH_VOXELS``, shrunk on the axis of longest extent in mm (a memory guard).
    Returns the patch and whether it was capped."""
    patch = [PATCH_MULTIPLE * math.ceil(v / PATCH_MULTIPLE) for v in volume]
    capped = False
    while math.prod(patch) > MAX_PATCH_VOXELS[dims]:
        longest = max((a for a in range(len(patch)) if patch[a] > PATCH_MULTIPLE), key=lambda a: patch[a] * spacing[a])
        patch[longest] -= PATCH_MULTIPLE
        capped = True
    return tuple(patch), capped


def pooling(patch, spacing) -> tuple[tuple[int, ...], ...]:
    """Per scale past the first, the pooling factor (1 or 2) per axis: an axis pools while it has
    ``MIN_POOL_SIZE`` voxels at that scale and its spacing there is at most
    ``MAX_POOL_SPACING_RATIO`` x the finest of the axes still long enough (nnU-Net: do not pool an
    already-coarse axis); at most ``MAX_SCALES`` scales; at least one pooling (a network has two scales)."""
    size, current = list(patch), [float(s) for s in spacing]
    strides: list[tuple[int, ...]] = []
    while len(strides) < MAX_SCALES - 1:
        long_enough = [a for a in range(len(size)) if size[a] >= MIN_POOL_SIZE]
        if not long_enough:
            break
        # the finest of the axes that can still pool (nnU-Net), so a short axis blocks no other
        finest = min(current[a] for a in long_enough)
        step = tuple(
            2 if a in long_enough and current[a] <= MAX_POOL_SPACING_RATIO * finest else 1 for a in range(len(size))
        )
        strides.append(step)
        size = [math.ceil(n / s) for n, s in zip(size, step, strict=True)]
        current = [c * s for c, s in zip(current, step, strict=True)]
    return tuple(strides) or (tuple(2 for _ in patch),)


def features_for(w0: int, scales: int) -> tuple[int, ...]:
    """``w0 * 2**k`` channels at scale k, capped at ``MAX_FEATURES``."""
    return tuple(min(w0 * 2**k, MAX_FEATURES) for k in range(scales))


def make_candidate(fingerprint: dict, layout: Layout, factor: float, w0: int) -> Candidate:
    pixdim = scaled_spacing(layout, factor)
    volume = median_volume(fingerprint, pixdim, layout.axes)
    spacing = [pixdim[a] for a in layout.axes]
    patch, capped = patch_size(volume, spacing, layout.dims)
    strides = pooling(patch, spacing)
    return Candidate(factor, w0, pixdim, volume, patch, strides, features_for(w0, len(strides) + 1), capped)


def deep_supervision_for(features) -> int:
    """Supervised coarser scales: the recipe's 2, fewer on a shallow network."""
    return max(0, min(2, len(features) - 2))


@dataclass(frozen=True)
class Budget:
    """The time a plan must fit: ``seconds`` in all, ``setup`` of which caching the cases; an
    epoch is ``steps_per_epoch`` steps; a validation covers ``val_cases`` cases."""

    seconds: float
    setup: float
    steps_per_epoch: int
    val_cases: int


def _validations(epochs: int, interval: int) -> int:
    """Validations of a run: every ``interval`` epochs and after the last (ValidateEvery)."""
    return epochs // interval + (1 if epochs % interval else 0)


def _max_epochs(budget: Budget, epoch_s: float, val_s: float, interval: int) -> int:
    """The most epochs (at least 1) whose training and validations fit after the setup."""
    left = budget.seconds - budget.setup
    if not math.isfinite(epoch_s) or epoch_s <= 0:
        return 1
    epochs = max(1, int(left // (epoch_s + val_s / interval)))
    while epochs > 1 and epochs * epoch_s + _validations(epochs, interval) * val_s > left:
        epochs -= 1
    while (epochs + 1) * epoch_s + _validations(epochs + 1, interval) * val_s <= left:
        epochs += 1
    return epochs


def fit_epochs(budget: Budget, epoch_s: float, val_s: float) -> tuple[int, int, float]:
    """``(epochs, val_interval, planned seconds)``: the smallest validation interval (1 to
    ``MAX_VAL_INTERVAL``) whose validations take at most ``VALIDATION_SHARE`` of the budget, and
    the most epochs that then fit, at most ``MAX_EPOCHS``."""
    for interval in range(1, MAX_VAL_INTERVAL + 1):
        epochs = min(MAX_EPOCHS, _max_epochs(budget, epoch_s, val_s, interval))
        validations = _validations(epochs, interval) * val_s
        if validations <= VALIDATION_SHARE * budget.seconds:
            break
    return epochs, interval, budget.setup + epochs * epoch_s + validations


def windows_per_case(volume, patch, slices: int = 1) -> int:
    """Sliding windows (``OVERLAP``) covering a ``volume``-sized case; x ``slices`` in 2D."""
    count = slices
    for v, p in zip(volume, patch, strict=True):
        interval = max(1, int(p * (1 - OVERLAP)))
        count *= 1 if v <= p else math.ceil((v - p) / interval) + 1
    return count


def mean_windows(fingerprint: dict, pixdim, layout: Layout, patch) -> float:
    """Sliding windows per validation case, the mean over the fingerprint's cases at ``pixdim``
    (mm): not the median case's count, since cases larger than the patch take several windows
    each (LeftAtrium at 0.94 mm, patch 128 x 96 x 64: 1 window for the median case, 2.0 on average)."""
    extents = _case_array(fingerprint, "shape") * _case_array(fingerprint, "spacing_mm")  # (cases, 3) mm
    counts = []
    for extent in extents:
        shape = [max(1, round(float(extent[a] / pixdim[a]))) for a in range(len(extent))]
        slices = shape[layout.slice_axis] if layout.slice_axis is not None else 1
        counts.append(windows_per_case([shape[a] for a in layout.axes], patch, slices))
    return float(np.mean(counts))


@dataclass
class Search:
    """The budget search over candidates (see the module docstring)."""

    fingerprint: dict
    layout: Layout
    budget: Budget
    probe: Any
    in_channels: int
    num_classes: int
    samples: int  # patches per step

    def spec(self, candidate: Candidate) -> NetworkSpec:
        return NetworkSpec(
            self.layout.dims,
            self.in_channels,
            self.num_classes,
            candidate.patch,
            candidate.features,
            candidate.strides,
            deep_supervision_for(candidate.features),
            self.samples,
            candidate.volume,
        )

    def step_limit(self) -> float:
        """Seconds per step above which a candidate cannot train ``MIN_EPOCHS`` epochs."""
        return (self.budget.seconds - self.budget.setup) / (MIN_EPOCHS * self.budget.steps_per_epoch)

    def evaluate(self, candidate: Candidate) -> Outcome:
        """Time the candidate's step (twice, keeping the faster, when its epochs are near
        ``MIN_EPOCHS``); time its validation only if the steps alone leave room for
        ``MIN_EPOCHS`` epochs."""
        spec, limit = self.spec(candidate), self.step_limit()
        step = self.probe.train_step_seconds(spec, limit)
        epochs, _, _ = fit_epochs(self.budget, self.budget.steps_per_epoch * step, 0.0)
        if MIN_EPOCHS / BORDERLINE_FACTOR <= epochs < MIN_EPOCHS * BORDERLINE_FACTOR:
            step = min(step, self.probe.train_step_seconds(spec, limit, again=True))
        epochs, interval, planned = fit_epochs(self.budget, self.budget.steps_per_epoch * step, 0.0)
        outcome = Outcome(candidate, step, None, epochs, interval, planned)
        return self.complete(outcome) if epochs >= MIN_EPOCHS else outcome

    def complete(self, outcome: Outcome) -> Outcome:
        """The outcome with its validation timed and the epochs refitted."""
        if outcome.validation_seconds is not None:
            return outcome
        candidate = outcome.candidate
        windows = mean_windows(self.fingerprint, candidate.pixdim, self.layout, candidate.patch)
        val_s = self.probe.window_seconds(self.spec(candidate)) * windows * self.budget.val_cases
        epochs, interval, planned = fit_epochs(self.budget, self.budget.steps_per_epoch * outcome.step_seconds, val_s)
        return Outcome(candidate, outcome.step_seconds, val_s, epochs, interval, planned)

    def run(self) -> tuple[Outcome, list[Outcome]]:
        """The chosen outcome and every one timed. The finest spacing whose narrowest network
        reaches ``MIN_EPOCHS``, then the widest network (up to ``MAX_PREFERRED_WIDTH``) that
        still does there; none does: the coarsest, narrowest candidate (the most epochs).

        Spacings are timed from coarse to fine and the search stops at the first that fails:
        a finer spacing has more voxels per patch, so it would fail too. The cheap candidates
        are timed and at most one too slow (whose timing stops after its warm-up step); those
        near ``MIN_EPOCHS`` twice."""
        widths = [w for w in WIDTHS if w <= MAX_PREFERRED_WIDTH]
        tried: list[Outcome] = []
        best = None
        for factor in reversed(factor_ladder(self.layout)):
            outcome = self.evaluate(make_candidate(self.fingerprint, self.layout, factor, widths[0]))
            tried.append(outcome)
            if outcome.epochs < MIN_EPOCHS:
                break
            best = outcome
        if best is None:  # nothing reaches MIN_EPOCHS: the coarsest, timed in full (not just its warm-up)
            coarsest = tried[0]
            step = self.probe.train_step_seconds(self.spec(coarsest.candidate))
            if not math.isfinite(step):
                raise UserError(
                    f"{self.fingerprint['dataset']['dir']}: even the smallest candidate network (patch "
                    f"{list(coarsest.candidate.patch)}) does not fit in the memory of this device; "
                    "plan for another --device."
                )
            return self.complete(Outcome(coarsest.candidate, step, None, 0, 1, math.inf)), tried
        for w0 in widths[1:]:
            outcome = self.evaluate(make_candidate(self.fingerprint, self.layout, best.candidate.factor, w0))
            tried.append(outcome)
            if outcome.epochs < MIN_EPOCHS:
                break  # a wider network is slower still
            best = outcome
        return best, tried


def make_plan(
    fingerprint: dict,
    budget_minutes: float = 60.0,
    device: str | None = None,
    dims: int | None = None,
    probe: Any = None,
) -> Plan:
    """The plan for a dataset's ``fingerprint`` and a training budget of ``budget_minutes`` on
    ``device`` (``"cpu"``, ``"cuda"``; None: CUDA when present); ``dims`` (2 or 3) forces 2D or 3D.

    ``probe`` answers what a candidate costs (see :mod:`medfcn.planning.probe`; default: a
    :class:`~medfcn.planning.probe.TimedProbe` that measures it on ``device``).
    """
    probe = TimedProbe(device) if probe is None else probe
    layout, dims_why = choose_layout(fingerprint, dims)
    _, _, spacing_why = target_spacing(fingerprint)
    modality, hu_window, stats, modality_why = normalisation(fingerprint)
    flips, flip_why = flip_axes(fingerprint, layout)
    labels = sorted(((int(k), str(v)) for k, v in fingerprint["dataset"]["labels"].items()))
    in_channels = int(fingerprint.get("summary", {}).get("channels") or len(fingerprint["dataset"]["modality"]))
    budget, setup_why = _budget(fingerprint, layout, budget_minutes, probe, (modality, hu_window, stats))
    samples = BATCH_SIZE[layout.dims] * (SLICES_PER_VOLUME_2D if layout.dims == 2 else 1)
    search = Search(fingerprint, layout, budget, probe, in_channels, len(labels), samples)
    chosen, tried = search.run()
    data = {
        "modality": modality,
        "hu_window": hu_window,
        "intensity_stats": stats,
        "in_channels": in_channels,
        "num_classes": len(labels),
        "class_names": [name for k, name in labels if k != 0],
        "flip_axes": flips,
        "budget_minutes": float(budget_minutes),
        "device": str(getattr(probe, "device", None) or resolve_device(device)),
    }
    plan = _plan(layout, chosen, budget, data)
    plan.reasons.update({"dims": dims_why, "modality": modality_why, "flip_axes": flip_why, "seconds_setup": setup_why})
    plan.reasons.update(_network_reasons(plan, chosen, spacing_why, layout))
    plan.reasons.update(_budget_reasons(plan, chosen, tried, budget, probe))
    _note_busy_machine(plan, getattr(probe, "cpu_share", None))
    return plan


def _note_busy_machine(plan: Plan, cpu_share: float | None) -> None:
    """Record how much of its cores the probe got (CPU only), and warn when other work took a
    good part of them: the steps were timed slower than a quiet machine runs them, so the plan
    is for a machine as busy as this one was."""
    if cpu_share is None:
        return
    plan.cpu_share = round(float(cpu_share), 3)
    if cpu_share < BUSY_CPU_SHARE:
        note = (
            f"the machine was busy while training steps were timed (the probe's threads got {cpu_share:.0%} of "
            "their cores): the plan fits the budget on a machine as busy as this one; plan again on a quiet "
            "machine for a quiet training run"
        )
        plan.reasons["busy_machine"] = note + "."
        warnings.warn(note, InputWarning, stacklevel=3)


def _plan(layout: Layout, chosen: Outcome, budget: Budget, data: dict) -> Plan:
    """The :class:`Plan` of the chosen candidate; ``data`` holds the data's decisions."""
    c = chosen.candidate
    return Plan(
        dims=layout.dims,
        slice_axis=layout.slice_axis,
        slices_per_volume=SLICES_PER_VOLUME_2D if layout.dims == 2 else 1,
        pixdim=[round(v, 4) for v in c.pixdim],
        patch_size=list(c.patch),
        features=list(c.features),
        strides=[list(s) for s in c.strides],
        encoder_blocks=[1] * len(c.features),
        deep_supervision=deep_supervision_for(c.features),
        batch_size=BATCH_SIZE[layout.dims],
        epochs=chosen.epochs,
        val_interval=chosen.val_interval,
        seconds_per_step=round(chosen.step_seconds, 4),
        seconds_per_validation=round(chosen.validation_seconds or 0.0, 3),
        seconds_setup=round(budget.setup, 2),
        planned_minutes=round(chosen.planned_seconds / 60, 2),
        **data,
    )


def _budget(fingerprint: dict, layout: Layout, budget_minutes: float, probe, norm) -> tuple[Budget, str]:
    """The budget in seconds with the cache's setup time estimated from 1-2 real cases."""
    n = int(fingerprint["dataset"].get("num_cases") or len(fingerprint.get("cases") or []))
    val_cases = math.ceil(n / min(DEFAULT_FOLDS, n))  # the default split: n - ceil(n / 5) train
    train_cases = max(1, n - val_cases)
    batch = BATCH_SIZE[layout.dims]
    per_case = probe.setup_seconds_per_case(fingerprint["dataset"], list(layout.target), *norm)
    if per_case is None:
        setup, why = 0.0, "not estimated: no case of the dataset could be read here; the cache's time is left out."
    else:
        setup = per_case * n
        why = (
            f"{setup:.0f} s to load and preprocess the {plural(n, 'case')} once (the cache), from "
            f"{per_case:.2f} s per case measured on real cases at the target spacing."
        )
    steps = math.ceil(train_cases / batch)
    return Budget(float(budget_minutes) * 60.0, setup, steps, val_cases), why


def _network_reasons(plan: Plan, chosen: Outcome, spacing_why: str, layout: Layout) -> dict[str, str]:
    c = chosen.candidate
    capped = f", capped at {MAX_PATCH_VOXELS[layout.dims]} voxels (memory)" if c.patch_capped else ""
    pooled = [f"scale {k + 1}: {s}" for k, s in enumerate(plan.strides)]
    return {
        "pixdim": f"target {spacing_why[0].lower()}{spacing_why[1:]} The budget search chose {c.factor:g}x it: "
        f"{_mm(plan.pixdim)}.",
        "patch_size": f"the median case at {_mm(plan.pixdim)} is {list(c.volume)} voxels; rounded up to multiples "
        f"of {PATCH_MULTIPLE}{capped}: {plan.patch_size}.",
        "strides": f"{len(plan.strides)} poolings ({'; '.join(pooled)}): an axis pools while it has >= "
        f"{MIN_POOL_SIZE} voxels and a spacing <= {MAX_POOL_SPACING_RATIO:g}x the finest axis' (nnU-Net), at most "
        f"{MAX_SCALES} scales.",
        "features": f"w0 = {c.w0} (the budget search), doubling per scale, capped at {MAX_FEATURES} (wider cost CPU "
        "time and gained nothing: docs/experiments.md rows 27-28).",
        "encoder_blocks": "one block per scale, as the recipe (row 29: more blocks cost 1.3x for no gain).",
        "deep_supervision": f"{plan.deep_supervision} coarser scales supervised, as the recipe (row 20: +0.004-0.005 "
        "Dice early), fewer on a shallow network.",
        "batch_size": f"{plan.batch_size}"
        + (
            " patches per step, the recipe's (row 20: 4x the updates per epoch of batch 8 at about the same vol/s)."
            if layout.dims == 3
            else f" cases x {plan.slices_per_volume} slices per step, the 2D recipe's."
        ),
        "ema_decay": "weight average of decay 0.999, as the recipe (row 5: ahead at 53 of 54 validations).",
        "learning_rate": "AdamW 0.002 with polynomial decay, as the recipe (rows 15, 22).",
    }


def _budget_reasons(plan: Plan, chosen: Outcome, tried: list[Outcome], budget: Budget, probe) -> dict[str, str]:
    measured = getattr(probe, "description", type(probe).__name__)
    trials = "; ".join(
        f"{o.candidate.factor:g}x/w{o.candidate.w0} patch {list(o.candidate.patch)}: {o.step_seconds:.2f} s/step"
        f", {plural(o.epochs, 'epoch')}"
        for o in tried
    )
    epoch_s = budget.steps_per_epoch * chosen.step_seconds
    if chosen.epochs >= MIN_EPOCHS:
        verdict = f"the finest spacing, then the widest network, reaching the {MIN_EPOCHS} epochs required"
    else:
        verdict = f"none reached the {MIN_EPOCHS} epochs required; the one with the most epochs"
    return {
        "search": f"training steps measured on {measured} (MONAI's trainer with the weight average: forward, backward, "
        f"AdamW, plus the recipe's augmentation of each sample): {trials}. Chosen: {verdict}.",
        "epochs": _epochs_reason(plan, budget, epoch_s, capped=_capped(budget, epoch_s, chosen, plan.val_interval)),
        "val_interval": f"every {plural(plan.val_interval, 'epoch')}: a validation of "
        f"{plural(budget.val_cases, 'case')} takes "
        f"{plan.seconds_per_validation:.1f} s (sliding-window forward passes timed on this machine), so the "
        f"validations stay within {VALIDATION_SHARE:.0%} of the budget.",
    }


def _capped(budget: Budget, epoch_s: float, chosen: Outcome, interval: int) -> bool:
    """Whether the budget affords more than ``MAX_EPOCHS`` epochs of the chosen candidate."""
    return _max_epochs(budget, epoch_s, chosen.validation_seconds or 0.0, interval) > MAX_EPOCHS


def _epochs_reason(plan: Plan, budget: Budget, epoch_s: float, capped: bool) -> str:
    """Why ``plan.epochs``: they fill the budget, or the ``MAX_EPOCHS`` cap ends the run early."""
    epochs = (
        f"{plural(plan.epochs, 'epoch')} of {plural(budget.steps_per_epoch, 'step')} ({epoch_s:.1f} s each at "
        f"{plan.seconds_per_step:.3f} s per step)"
    )
    if not capped:
        return (
            f"{epochs} fill the {plan.budget_minutes:g} min budget after {budget.setup:.0f} s of setup and the "
            f"validations: {plan.planned_minutes:g} min planned."
        )
    return (
        f"{epochs}: the cap, since more epochs stopped paying on both datasets measured (docs/experiments.md rows 3, "
        f"6, 8, 72, 75); with the setup and the validations {plan.planned_minutes:g} min planned, the rest of the "
        f"{plan.budget_minutes:g} min budget is left unused."
    )
