"""Inference settings of the shipped network against the baseline's, like for like in bfloat16.

Three questions from issue 5's list of ways in, measured on the inference path only:

- memory layout and compilation: model compute per hippocampus volume (hippocampus_004, each
  model's sliding window: one window covers the crop) for each model in bfloat16 autocast,
  eager in the default layout, eager in ``channels_last_3d``, and ``torch.compile`` (inductor;
  its first call timed apart, with an empty inductor cache (the compilation) and again with the
  cache filled, as a later process on the machine finds it), with the share of voxels whose
  argmax label matches eager's; all variants of both models are timed in turns, one call of
  each per round;
- threads: the same eager compute with one intra-op thread instead of the process's (2 here);
- sliding window on the whole-head series (PGBM-003_T1post at 1 mm, 193 x 220 x 137 voxels):
  medfcn's compute for overlap 0.25 / 0.5 (the bundle's) and sliding-window batch 1 / 4 (the
  bundle's) / 8.

Medians over repeats. Run it alone on the machine. Writes bench/results/inference_options.json.

    python bench/inference_options.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from speed import load_models  # bench/ is sys.path[0] when this file runs as a script

from medfcn.data.datasets import data_root
from medfcn.inferers import cpu_bf16_supported

OUT = Path(__file__).resolve().parent / "results" / "inference_options.json"


def interleaved(calls: dict[tuple[str, str], Callable[[], object]], repeats: int) -> dict[tuple[str, str], float]:
    """Median seconds of each call, timed in turns (one of each per round), so that this host's
    drift over the minutes of a run (20 % and more) falls on every variant alike."""
    for fn in calls.values():
        fn()  # warm-up
    times: dict[tuple[str, str], list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with one intra-op thread instead of the process's count."""

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def compile_first_calls(net, inferer, volume: torch.Tensor) -> tuple[Callable[[], object], dict]:
    """``torch.compile(net)``: its first call with an empty inductor cache (the compilation), its
    first call once more after ``torch._dynamo.reset()`` with the cache filled (what a later
    process on this machine pays), and the share of voxels whose argmax label matches eager's.

    Returns a call of the compiled network on ``volume`` and those figures.
    """
    row = {}
    for cache in ("empty", "filled"):
        torch._dynamo.reset()
        compiled = torch.compile(net)
        start = time.perf_counter()
        labels = inferer(volume, compiled).argmax(1)
        row[f"compile_first_call_{cache}_cache_s"] = time.perf_counter() - start
    row["compiled_argmax_agreement"] = (labels == inferer(volume, net).argmax(1)).float().mean().item()
    return (lambda: inferer(volume, compiled)), row


def variant_calls(net, inferer, volume: torch.Tensor, compiled: Callable[[], object]) -> dict:
    """One model's calls on ``volume`` (1, 1, D, H, W), bf16 autocast: eager, eager in
    channels_last_3d (a copy of the network), compiled, eager with one thread."""
    last_net = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
    last_volume = volume.to(memory_format=torch.channels_last_3d)
    return {
        "eager": lambda: inferer(volume, net),
        "channels_last_3d": lambda: inferer(last_volume, last_net),
        "compiled": compiled,
        "eager_1_thread": one_thread(lambda: inferer(volume, net)),
    }


def whole_head_windows(seg, head: str) -> dict:
    """medfcn's compute on the whole-head series per (overlap, sliding-window batch); one run each."""
    image = seg.preprocessing({"image": head})["image"][None]
    window = seg.inferer.inferer.inferer  # Autocast(FlipTTA(SlidingWindowInferer))
    defaults = (window.overlap, window.sw_batch_size)
    rows = {"shape": list(image.shape[2:])}
    for overlap, batch in ((0.5, 4), (0.25, 4), (0.5, 1), (0.5, 8), (0.25, 8)):
        window.overlap, window.sw_batch_size = overlap, batch
        start = time.perf_counter()
        seg.inferer(image, seg.network)
        rows[f"overlap_{overlap}_batch_{batch}_s"] = time.perf_counter() - start
    window.overlap, window.sw_batch_size = defaults
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    # a cold compilation, as a user's first run sees it, not one served from an earlier run's cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    root = data_root()
    scan = sorted((root / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    seg, models = load_models()
    volume = seg.preprocessing({"image": str(scan)})["image"][None].as_tensor()
    figures: dict[str, dict] = {}
    calls = {}
    with torch.no_grad():
        for name, (net, inferer) in models.items():
            inferer.enabled = True  # bfloat16 autocast for both models: like for like
            compiled, figures[name] = compile_first_calls(net, inferer, volume)
            for variant, fn in variant_calls(net, inferer, volume, compiled).items():
                calls[name, variant] = fn
        # both models' variants in one rotation, so that the ratios between them see the same drift
        for (name, variant), seconds in interleaved(calls, args.repeats).items():
            figures[name][f"{variant}_s"] = seconds
        figures["medfcn_whole_head"] = whole_head_windows(seg, str(root / "dicom" / "PGBM-003_T1post"))

    print("| figure (bf16 autocast, seconds) | medfcn | baseline UNet |")
    print("| --- | --- | --- |")
    for key in figures["medfcn"]:
        print(f"| {key} | {figures['medfcn'][key]:.4f} | {figures['baseline_unet'][key]:.4f} |")
    print("\n| whole-head series, medfcn | seconds |")
    print("| --- | --- |")
    for key, value in figures["medfcn_whole_head"].items():
        print(f"| {key} | {value} |" if key == "shape" else f"| {key} | {value:.2f} |")
    OUT.parent.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "cpu_bf16": cpu_bf16_supported()}
    OUT.write_text(json.dumps({**meta, **figures}))
    print(f"\nwritten: {OUT}")


if __name__ == "__main__":
    main()
