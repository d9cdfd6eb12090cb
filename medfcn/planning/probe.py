"""The planner's timed probe: what a training step, a validation window and the cache cost on
this machine, measured (not read from a table).

:func:`medfcn.planning.rules.make_plan` asks a probe three questions, so that its decisions can
be tested with a fake one (any object with the same three methods):

- ``train_step_seconds(spec, limit, again)``: one training step of ``spec.samples`` patches
  (augmentation of each sample, forward, deep-supervision Dice+CE loss, backward, AdamW update,
  in MONAI's trainer with the weight average, as training runs it); ``again``: timed anew;
- ``window_seconds(spec)``: one forward pass of one sliding window (validation);
- ``setup_seconds_per_case(dataset, pixdim, modality, hu_window, intensity_stats)``: loading and
  preprocessing one case as the bundles' cache does, or None when no case can be read.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["NetworkSpec", "TimedProbe"]

TIMED_STEPS = 3  # training steps timed after the warm-up one
MIN_TIMED_SECONDS = 1.0  # small patches: repeat steps until this long, for a stable mean
MAX_TIMED_STEPS = 20
SW_BATCH = {3: 4, 2: 64}  # windows per forward pass: the bundles' sw_batch_size (3D, 2D)
SETUP_CASES = 2  # real cases whose preprocessing is timed
# the recipe's augmentation (bundles/hippocampus_fcn/configs): transform -> probability
AUGMENTATION_PROBABILITY = {
    "RandAffined": 0.3,
    "RandFlipd": 0.5,
    "RandScaleIntensityd": 0.3,
    "RandShiftIntensityd": 0.3,
    "RandAdjustContrastd": 0.15,
    "RandGaussianNoised": 0.15,
}


@dataclass(frozen=True)
class NetworkSpec:
    """One candidate network and its input, as the probe times it.

    Attributes:
        dims: 2 or 3.
        in_channels, num_classes: the network's input channels and classes (background included).
        patch: the patch (voxels per spatial axis, ``dims`` entries).
        features: channels per scale, finest first.
        strides: ``len(features) - 1`` per-axis pooling factors (1 or 2).
        deep_supervision: supervised coarser decoder scales.
        samples: patches per training step (batch size x samples per case).
        volume: the median case shape at the target spacing (voxels, ``dims`` entries): what the
            patch sampler crops from and the sliding window covers.
    """

    dims: int
    in_channels: int
    num_classes: int
    patch: tuple[int, ...]
    features: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    deep_supervision: int
    samples: int
    volume: tuple[int, ...]


def resolve_device(device: str | None) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (the device the probe times); None: CUDA when present."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch.device(device))


class TimedProbe:
    """Times the candidate networks on ``device`` (None: CUDA when present), as training runs:
    bf16 autocast on a CPU that supports it (``medfcn.inferers.use_cpu_bf16``), autocast on CUDA.

    Results are cached per spec, so a candidate is timed once, unless asked to time it again
    (``train_step_seconds(..., again=True)``), when the cache keeps the faster timing.
    """

    def __init__(self, device: str | None = None, steps: int = TIMED_STEPS, min_seconds: float = MIN_TIMED_SECONDS):
        self.device = resolve_device(device)
        self.steps = int(steps)
        self.min_seconds = float(min_seconds)
        self._cache: dict = {}
        # CPU seconds this process got per wall second and thread over the timed training steps
        # (1.0: its threads had their cores; 0.5: other work took half of them), CPU only
        self.cpu_share: float | None = None

    @property
    def _cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def description(self) -> str:
        from medfcn.inferers import use_cpu_bf16

        precision = "bf16 autocast" if use_cpu_bf16(self.device, True) else "float32"
        if self._cuda:
            precision = "float16 autocast"
        threads = torch.get_num_threads()
        return f"{self.device} ({precision}, {threads} threads)"

    def _autocast(self):
        from medfcn.inferers import use_cpu_bf16

        if self._cuda:
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_cpu_bf16(self.device, True))

    def _sync(self) -> None:
        # GPU work is queued: wait for it, or the clock times the queueing
        if self._cuda:
            torch.cuda.synchronize(self.device)
        elif torch.device(self.device).type == "mps":
            torch.mps.synchronize()

    def _network(self, spec: NetworkSpec, deep_supervision: int):
        from medfcn import FCN

        kwargs = {}
        per_axis = any(s != 2 for scale in spec.strides for s in scale)
        if per_axis and "strides" in inspect.signature(FCN).parameters:
            kwargs["strides"] = [list(scale) for scale in spec.strides]  # FCN with per-axis pooling
        # (an FCN without per-axis pooling, before that change: timed pooling every axis)
        net = FCN(
            spec.dims,
            spec.in_channels,
            spec.num_classes,
            list(spec.features),
            deep_supervision=deep_supervision,
            **kwargs,
        )
        return net.to(self.device)

    def train_step_seconds(self, spec: NetworkSpec, limit: float | None = None, again: bool = False) -> float:
        """Seconds of one training step of ``spec`` (median of the timed steps after a warm-up),
        plus the augmentation of ``spec.samples`` patches. When the first step after the warm-up took more
        than twice ``limit`` seconds, the first step after the warm-up one is returned (the candidate is out anyway).
        ``inf`` when the step does not fit in memory. ``again``: time it anew and keep the faster of
        the two timings (other work on the machine can only slow a step down)."""
        key = ("train", spec)
        cached = self._cache.get(key)
        cut_short_then = cached is not None and cached[1] and (limit is None or cached[0] <= 2 * limit)
        if cached is None or cut_short_then or again:
            try:
                seconds, cut_short = self._time_training(spec, limit)
                seconds += spec.samples * self._augmentation_seconds(spec)
            except (RuntimeError, MemoryError) as err:
                if not _out_of_memory(err):  # a failure of another kind is a bug, not a verdict
                    raise
                seconds, cut_short = math.inf, False  # the candidate cannot train here
            if again and cached is not None and not cached[1] and cached[0] < seconds:
                seconds, cut_short = cached  # the earlier timing was the faster
            self._cache[key] = cached = (seconds, cut_short)
        return cached[0]

    def _time_training(self, spec: NetworkSpec, limit: float | None) -> tuple[float, bool]:
        """``(seconds per step, whether the timing stopped after the warm-up step)``.

        The steps run in MONAI's ``SupervisedTrainer`` with the weight average attached, as
        training runs them, so the engine's own cost per iteration (metadata of the batch's
        MetaTensors, decollating the output, Ignite's events, the average's update) is timed
        too: at 0.2 s steps it is 15-20 % of a step (docs/experiments.md row 75). Each step
        collates ``spec.samples`` patches into its batch, as the training loader does."""
        from monai.engines import SupervisedTrainer
        from monai.inferers import SimpleInferer
        from monai.losses import DiceCELoss

        from medfcn.handlers import WeightAverage
        from medfcn.inferers import Autocast, use_cpu_bf16
        from medfcn.losses import DeepSupervisionLoss
        from medfcn.notices import engine_exception_echo_dropped, quiet_library_notices

        net = self._network(spec, spec.deep_supervision).train()
        trainer = SupervisedTrainer(
            device=torch.device(self.device),
            max_epochs=1,
            epoch_length=1 + max(self.steps, MAX_TIMED_STEPS),  # the clock stops it sooner
            train_data_loader=_Batches(spec),
            network=net,
            optimizer=torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4),
            loss_function=DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True, batch=True)),
            inferer=Autocast(SimpleInferer(), enabled=use_cpu_bf16(self.device, True)),
            amp=self._cuda,
        )
        WeightAverage(net, decay=0.999).attach(trainer)
        clock = _StepClock(self, limit)
        clock.attach(trainer)
        # out of memory is a verdict on the candidate (train_step_seconds), not an error to log
        with engine_exception_echo_dropped([f"ignite.engine.engine.{type(trainer).__name__}"]):
            with quiet_library_notices():  # e.g. the deprecation of the AMP scaler MONAI's trainer makes
                trainer.run()
        if not clock.cut_short:  # one far too slow step (memory-bound?) says little of other work
            self._record_cpu_share(clock.cpu_and_wall)
        return clock.result()

    def _record_cpu_share(self, cpu_and_wall: list[tuple[float, float]]) -> None:
        """Keep the lowest CPU share of a timing so far: on a machine busy with other work the
        steps run slower than they will on a quiet one, and the plan says so."""
        wall = sum(w for _, w in cpu_and_wall)
        if self.device != "cpu" or wall <= 0:
            return
        share = min(1.0, sum(c for c, _ in cpu_and_wall) / (wall * torch.get_num_threads()))
        self.cpu_share = share if self.cpu_share is None else min(self.cpu_share, share)

    def window_seconds(self, spec: NetworkSpec) -> float:
        """Seconds per window of a sliding-window validation: forward passes (eval mode, no
        gradient) of ``SW_BATCH[dims]`` windows of ``spec.patch`` at once, as the bundles'
        inferers batch them, divided by that batch."""
        key = ("window", spec)
        if key not in self._cache:
            net = self._network(spec, 0).eval()
            batch = SW_BATCH[spec.dims]
            x = torch.randn(batch, spec.in_channels, *spec.patch, device=self.device)
            with torch.no_grad(), self._autocast():
                net(x)
                self._sync()
                times: list[float] = []
                while len(times) < self.steps or (sum(times) < self.min_seconds / 2 and len(times) < MAX_TIMED_STEPS):
                    start = time.perf_counter()
                    net(x)
                    self._sync()
                    times.append(time.perf_counter() - start)
            self._cache[key] = float(np.median(times)) / batch
        return self._cache[key]

    def _augmentation_seconds(self, spec: NetworkSpec) -> float:
        """Expected seconds to sample and augment one patch with the recipe's transforms: each
        transform timed at probability 1 on a patch-sized array, weighted by its probability;
        plus the positive/negative crop from a volume of the median shape."""
        key = ("augment", spec.dims, spec.in_channels, spec.patch, spec.volume)
        if key not in self._cache:
            self._cache[key] = _time_augmentation(spec)
        return self._cache[key]

    def setup_seconds_per_case(self, dataset: dict, pixdim, modality: str, hu_window, intensity_stats) -> float | None:
        """Mean seconds to load and preprocess one real case as the bundles' cache does
        (load, channel first, RAS, resample to ``pixdim``, normalise), over up to
        ``SETUP_CASES`` cases of ``dataset`` (the fingerprint's ``"dataset"`` entry); None when
        no case can be read."""
        images = _dataset_pairs(dataset)[:SETUP_CASES]
        if not images:
            return None
        transform = _preprocessing(pixdim, modality, hu_window, intensity_stats)
        times = []
        for pair in images:
            start = time.perf_counter()
            try:
                transform(dict(pair))
            except Exception:  # an unreadable case: the fingerprint refuses those; no estimate here
                return None
            times.append(time.perf_counter() - start)
        return float(np.mean(times))


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says that memory ran out (CUDA's OutOfMemoryError, the CPU allocator's
    RuntimeError, Python's MemoryError)."""
    if isinstance(err, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _dataset_pairs(dataset: dict) -> list[dict]:
    """``{"image", "label"}`` paths of the dataset's first training cases (from dataset.json)."""
    root = Path(str(dataset.get("dir") or ""))
    try:
        training = json.loads((root / "dataset.json").read_text())["training"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    pairs = []
    for entry in training[:SETUP_CASES]:
        try:
            pairs.append({k: str(root / entry[k]) for k in ("image", "label")})
        except (KeyError, TypeError):
            return []
    return pairs


def _preprocessing(pixdim, modality: str, hu_window, intensity_stats):
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd, Spacingd

    from medfcn.data import intensity_normalization

    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS", labels=None),
            Spacingd(keys, pixdim=list(pixdim), mode=["bilinear", "nearest"]),
            intensity_normalization("image", modality, hu_window, intensity_stats),
            EnsureTyped(keys, dtype=[torch.float32, torch.uint8]),
        ]
    )


def _augmentations(dims: int) -> dict:
    """The recipe's augmentation transforms at probability 1, by name."""
    from monai.transforms import (
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    return {
        "RandAffined": RandAffined(
            keys,
            prob=1.0,
            rotate_range=[0.26] * (3 if dims == 3 else 1),
            scale_range=[0.15] * dims,
            mode=["bilinear", "nearest"],
            padding_mode="zeros",
        ),
        "RandFlipd": RandFlipd(keys, spatial_axis=0, prob=1.0),
        "RandScaleIntensityd": RandScaleIntensityd("image", factors=0.15, prob=1.0),
        "RandShiftIntensityd": RandShiftIntensityd("image", offsets=0.1, prob=1.0),
        "RandAdjustContrastd": RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=1.0),
        "RandGaussianNoised": RandGaussianNoised("image", std=0.1, prob=1.0),
    }


def _time_augmentation(spec: NetworkSpec) -> float:
    from monai.transforms import RandCropByPosNegLabeld, SpatialPadd

    volume = tuple(max(v, 1) for v in spec.volume)
    label = torch.zeros(1, *volume, dtype=torch.uint8)
    centre = tuple(slice(v // 4, max(v // 4 + 1, 3 * v // 4)) for v in volume)
    label[(slice(None), *centre)] = 1  # a foreground block for the positive samples
    case = {"image": torch.randn(spec.in_channels, *volume), "label": label}
    sampler = [
        SpatialPadd(["image", "label"], spatial_size=list(spec.patch)),
        RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=list(spec.patch), pos=2, neg=1, num_samples=1),
    ]
    start = time.perf_counter()
    for t in sampler:
        case = t(case)
    case = case[0] if isinstance(case, list) else case
    seconds = time.perf_counter() - start
    for name, transform in _augmentations(spec.dims).items():
        start = time.perf_counter()
        transform(dict(case))
        seconds += AUGMENTATION_PROBABILITY[name] * (time.perf_counter() - start)
    return seconds


class _Batches:
    """An endless loader of batches of ``spec.samples`` random patches (MetaTensors), collated
    per step as the training loader collates its samples; the probe times steps, not loading."""

    def __init__(self, spec: NetworkSpec):
        from monai.data import MetaTensor
        from monai.utils import CommonKeys

        self.samples = [
            {
                CommonKeys.IMAGE: MetaTensor(torch.randn(spec.in_channels, *spec.patch)),
                CommonKeys.LABEL: MetaTensor(torch.randint(0, spec.num_classes, (1, *spec.patch))),
            }
            for _ in range(spec.samples)
        ]

    def __iter__(self):
        from monai.data import list_data_collate

        while True:
            yield list_data_collate(self.samples)


class _StepClock:
    """Times a trainer's iterations (from the end of one to the end of the next, so the engine's
    events and the weight average's update are in it) and stops the trainer when enough are
    timed: at least ``probe.steps`` after a warm-up one, until ``probe.min_seconds`` in all (at
    most ``MAX_TIMED_STEPS``); after one timed step when it took more than twice ``limit``."""

    def __init__(self, probe: TimedProbe, limit: float | None):
        self.probe, self.limit = probe, limit
        self.times: list[float] = []
        self.cpu_and_wall: list[tuple[float, float]] = []
        self.cut_short = False
        self._last: tuple[float, float] | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED(once=1), self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._lap)

    def _start(self, engine) -> None:
        self._last = (time.perf_counter(), time.process_time())

    def _lap(self, engine) -> None:
        self.probe._sync()
        now = (time.perf_counter(), time.process_time())
        wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        if engine.state.iteration == 1:  # the warm-up: one-off costs (allocations, kernel choice)
            return
        self.times.append(wall)
        self.cpu_and_wall.append((cpu, wall))
        if self.limit is not None and len(self.times) == 1 and wall > 2 * self.limit:
            self.cut_short = True  # out even at a steady step's speed: stop here
        timed = len(self.times)
        enough = timed >= self.probe.steps and (sum(self.times) >= self.probe.min_seconds or timed >= MAX_TIMED_STEPS)
        if self.cut_short or enough:
            engine.terminate()

    def result(self) -> tuple[float, bool]:
        """``(seconds per step, cut short)``: the median of the timed steps (a busy machine's
        spikes move it least), or the one step timed when cut short."""
        return float(np.median(self.times)), self.cut_short
