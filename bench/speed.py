"""Speed and memory of the medfcn hippocampus FCN against the plain MONAI UNet baseline.

Per model: training throughput (volumes/s, forward+backward+step at each recipe's batch and
input size, in the recipe's precision and in the other one), inference model compute per
hippocampus volume (each recipe's sliding window, in both precisions), compute and peak RSS on
the whole-head series (each model in its own process), FLOPs of one forward pass
(torch.utils.flop_counter) and that compute as a fraction of the CPU's measured GEMM peak in
the same precision. For medfcn also the whole `medfcn infer`
process (start-up included) on one scan, on the three DICOM crops and on the 280 x 320 x 22
whole-head series, with the process's peak RSS. For both recipes the whole training process:
one epoch of `medfcn train` on fold 0 (the baseline by the `--set` overrides bench/accuracy.py
uses), wall time (start-up, caching, validation and checkpoints included) and peak RSS with
the dataset cached in memory, as a user's run holds it; one run each. Other figures: medians
over repeats. Ratio medfcn / baseline.

Run it alone on the machine (other load skews every figure). Writes bench/results/speed.json.

    python bench/speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from torch.utils.flop_counter import FlopCounterMode

from medfcn.data.datasets import data_root
from medfcn.infer import load_segmenter
from medfcn.inferers import Autocast, use_cpu_bf16

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hippocampus_fcn"


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """Achieved GFLOP/s of an n x n matmul in ``dtype`` (the practical peak of this CPU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = median_time(lambda: a @ b, 5)
    return 2 * n**3 / seconds / 1e9


def forward_flops(net, shape) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(shape))
    return counter.get_total_flops()


def train_throughput(net, batch_shape, bf16: bool, repeats: int) -> float:
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.randn(batch_shape)
    net.train()

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = net(x).float().square().mean()
        loss.backward()
        opt.step()

    return batch_shape[0] / median_time(step, repeats)


# RUSAGE_CHILDREN's ru_maxrss is the largest of all children so far, so each command runs under
# a fresh wrapper process whose only child is that command, and the wrapper reports its peak.
_PEAK_RSS = (
    "import resource, subprocess, sys; out = subprocess.run(sys.argv[1:], check=True, capture_output=True, "
    "text=True).stdout.strip(); print(out); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def process(cmd: list[str], output: bool = False):
    """Wall seconds (wrapper start-up included, ~20 ms) and peak RSS (MiB) of one command.

    With ``output``, also the command's last stdout line.
    """
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *cmd], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    rss = int(lines[-1]) / 1024
    return (wall, rss, lines[-2] if len(lines) > 1 else "") if output else (wall, rss)


def load_models():
    """The shipped bundle's segmenter, and ``{name: (network, inferer)}`` for both models.

    medfcn: the bundle's network and inferer (its sliding window, bfloat16 autocast where the
    CPU has it). Baseline: the tutorial UNet (untrained: speed does not depend on the weights)
    with a float32 Gaussian sliding window over its 48 x 64 x 48 training size.
    """
    seg = load_segmenter(BUNDLE, device="cpu")
    baseline = UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2).eval()
    window = SlidingWindowInferer(roi_size=(48, 64, 48), sw_batch_size=4, overlap=0.5, mode="gaussian")
    return seg, {"medfcn": (seg.network, seg.inferer), "baseline_unet": (baseline, Autocast(window, enabled=False))}


def whole_head_worker(name: str, head: str) -> None:
    """Run one model on the whole-head series (preprocessed at 1 mm) and print its compute seconds.

    Runs in its own process (see :func:`process`), so the peak RSS is this model's alone.
    """
    seg, models = load_models()
    net, inferer = models[name]
    image = seg.preprocessing({"image": head})["image"][None]
    with torch.no_grad():
        start = time.perf_counter()
        inferer(image, net)
        print(f"{time.perf_counter() - start:.4f} {tuple(image.shape[2:])}")


def train_command(name: str, output: str) -> list[str]:
    """`medfcn train` for one epoch of each recipe on fold 0, writing its run folder to ``output``."""
    # imported here, not at the top, so the whole-head worker processes do not load the engines
    from accuracy import BASELINE  # bench/ is sys.path[0] when this file runs as a script

    cmd = [sys.executable, "-m", "medfcn.cli", "train", str(BUNDLE), "--fold", "0", "--epochs", "1"]
    cmd += ["--output", output]
    if name == "baseline_unet":
        for key, value in BASELINE.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--whole-head-worker", choices=["medfcn", "baseline_unet"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = data_root()
    scan = sorted((root / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    dicoms = [str(root / "dicom" / f"PGBM-00{k}_HippoCrop") for k in (2, 3, 6)]
    head = str(root / "dicom" / "PGBM-003_T1post")

    if args.whole_head_worker:
        whole_head_worker(args.whole_head_worker, head)
        return

    seg, models = load_models()
    bf16 = use_cpu_bf16("cpu")
    baseline = models["baseline_unet"][0]
    volume = seg.preprocessing({"image": str(scan)})["image"][None]

    fcn = seg.network
    figures: dict[str, dict] = {"medfcn": {}, "baseline_unet": {}}
    with torch.no_grad():
        for name, (net, inferer) in models.items():
            figures[name]["infer_compute_s"] = median_time(lambda n=net, f=inferer: f(volume, n), args.repeats * 4)
            # like for like: each model's window in the other precision too (Autocast toggled)
            inferer.enabled = not inferer.enabled
            other = "bf16" if inferer.enabled else "fp32"
            figures[name][f"infer_compute_{other}_s"] = median_time(
                lambda n=net, f=inferer: f(volume, n), args.repeats * 4
            )
            inferer.enabled = not inferer.enabled
    figures["medfcn"]["forward_gflop"] = forward_flops(fcn.float(), (1, 1, 40, 56, 40)) / 1e9
    figures["baseline_unet"]["forward_gflop"] = forward_flops(baseline, (1, 1, 48, 64, 48)) / 1e9
    peak = {"bf16": gemm_peak(torch.bfloat16), "fp32": gemm_peak(torch.float32)}
    # one window covers a hippocampus crop, so compute per volume ~ one forward (+ padding)
    figures["medfcn"]["fraction_of_peak"] = (
        figures["medfcn"]["forward_gflop"] / figures["medfcn"]["infer_compute_s"] / peak["bf16" if bf16 else "fp32"]
    )
    figures["baseline_unet"]["fraction_of_peak"] = (
        figures["baseline_unet"]["forward_gflop"] / figures["baseline_unet"]["infer_compute_s"] / peak["fp32"]
    )
    # each recipe's batch, input size and precision; then the other precision, like for like
    batch = json.loads((BUNDLE / "configs" / "common.json").read_text())["batch_size"]
    for name, net, shape, precision in (
        ("medfcn", fcn, (batch, 1, 40, 56, 40), bf16),
        ("baseline_unet", baseline, (8, 1, 48, 64, 48), False),
    ):
        figures[name]["train_volumes_per_s"] = train_throughput(copy.deepcopy(net), shape, precision, args.repeats)
        other = "fp32" if precision else "bf16"
        figures[name][f"train_volumes_per_s_{other}"] = train_throughput(
            copy.deepcopy(net), shape, not precision, args.repeats
        )

    for name in figures:
        runs = [process([sys.executable, __file__, "--whole-head-worker", name], output=True) for _ in range(3)]
        figures[name]["whole_head_compute_s"] = statistics.median(float(out.split()[0]) for _, _, out in runs)
        figures[name]["whole_head_peak_rss_mib"] = max(rss for _, rss, _ in runs)

    # one run each (not a median): the figure of interest is the peak RSS; a run takes ~25-35 s
    for name in figures:
        with tempfile.TemporaryDirectory() as tmp:
            wall, rss = process(train_command(name, tmp))
        figures[name]["train_process_1_epoch_s"] = wall
        figures[name]["train_process_peak_rss_mib"] = rss

    cli = [sys.executable, "-m", "medfcn.cli", "infer", str(BUNDLE)]
    for label, inputs in (
        ("infer_process_1_scan", [str(scan)]),
        ("infer_process_3_dicom", dicoms),
        ("infer_process_whole_head", [head]),
    ):
        walls, rss = [], 0.0
        for _ in range(3):
            with tempfile.TemporaryDirectory() as tmp:
                wall, peak_rss = process([*cli, *inputs, "--out", tmp])
            walls.append(wall)
            rss = max(rss, peak_rss)
        figures["medfcn"][f"{label}_s"] = statistics.median(walls)
        figures["medfcn"][f"{label}_peak_rss_mib"] = rss

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": torch.get_num_threads(),
        "gemm_peak_gflops": peak,
        "medfcn_bf16": bf16,
        "models": figures,
    }
    out = REPO / "bench" / "results" / "speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"GEMM peak: bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s, "
        f"{torch.get_num_threads()} threads"
    )
    print("| figure | medfcn | baseline UNet | medfcn / baseline |\n| --- | --- | --- | --- |")
    for key in sorted(set(figures["medfcn"]) | set(figures["baseline_unet"])):
        a, b = figures["medfcn"].get(key), figures["baseline_unet"].get(key)
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        show = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        print(f"| {key} | {show(a)} | {show(b)} | {ratio} |")


if __name__ == "__main__":
    main()
