"""ONNX export checked on real cases, and ``medfcn infer --backend onnxruntime`` timed against PyTorch.

For each task's bundle (a copy, exported with ``medfcn export --format onnx``) and its held-out
fold-0 cases:

- agreement: each case is preprocessed as ``medfcn infer`` does and its sliding-window logits
  computed twice with the same inferer, once by the PyTorch network and once by onnxruntime:
  the largest absolute logit difference and the share of voxels whose argmax agrees;
- time: start-up (bundle loaded, network or ONNX session ready) and seconds per scan (whole
  scan: read, preprocess, network, invert, argmax) of ``load_segmenter`` for each backend, the
  backends alternating scan by scan, and the wall time of ``medfcn infer`` over the cases as a
  command (Python start and imports included).

Prints a table; writes ``onnx_backend.json`` (``--out``). Not a test: a benchmark.

    python bench/onnx_backend.py [--tasks hippocampus left_atrium] [--max-cases N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from left_atrium import add_output_options, git_commit, report_rows, work_folder

from medfcn.data.datasets import data_root, fold_datalists
from medfcn.export import export_bundle
from medfcn.segmenter import load_segmenter

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    "hippocampus": ("Task04_Hippocampus", REPO / "bundles" / "hippocampus_fcn"),
    "left_atrium": ("LeftAtrium", REPO / "bundles" / "left_atrium_fcn"),
}


def agreement(bundle: Path, scans: list[str]) -> dict:
    """Largest |logit difference| and argmax agreement of the two networks, same inputs and inferer."""
    torch_seg = load_segmenter(bundle, device="cpu")
    onnx_seg = load_segmenter(bundle, backend="onnxruntime")
    worst, agree, voxels = 0.0, 0, 0
    for scan in scans:
        data = torch_seg.preprocessing({"image": scan})
        x = data["image"][None].float()
        with torch.no_grad():
            a = torch_seg.inferer(x, torch_seg.network)
            b = onnx_seg.inferer(x, onnx_seg.network)
        worst = max(worst, float((a - b).abs().max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        voxels += a[:, 0].numel()
    return {"max_abs_logit_difference": worst, "argmax_agreement_percent": 100.0 * agree / voxels, "voxels": voxels}


def timing(bundle: Path, scans: list[str]) -> dict:
    """Start-up and seconds per scan of each backend, alternating scan by scan."""
    segmenters, result = {}, {}
    for backend in ("torch", "onnxruntime"):
        start = time.perf_counter()
        segmenters[backend] = load_segmenter(bundle, device="cpu" if backend == "torch" else None, backend=backend)
        segmenters[backend](scans[0])  # the first scan pays one-off costs: counted in start-up
        result[f"{backend}_startup_s"] = round(time.perf_counter() - start, 3)
    seconds = {backend: [] for backend in segmenters}
    for scan in scans:
        for backend, segment in segmenters.items():
            start = time.perf_counter()
            segment(scan)
            seconds[backend].append(time.perf_counter() - start)
    for backend, values in seconds.items():
        result[f"{backend}_s_per_scan"] = round(statistics.mean(values), 4)
    return result


def command_wall(bundle: Path, scans: list[str], backend: str, out: Path) -> float:
    """Wall seconds of ``medfcn infer`` over ``scans`` as a command."""
    command = [sys.executable, "-m", "medfcn", "infer", str(bundle), *scans, "--out", str(out), "--backend", backend]
    command += ["--device", "cpu"] if backend == "torch" else []
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-2000:]}")
    return round(time.perf_counter() - start, 2)


def run_task(task: str, args: argparse.Namespace, work: Path) -> dict:
    folder, source = TASKS[task]
    bundle = work / source.name
    shutil.copytree(source, bundle)
    start = time.perf_counter()
    _, export_diff = export_bundle(bundle, "onnx")
    export_seconds = time.perf_counter() - start
    _, cases = fold_datalists(data_root(args.data) / folder, REPO / "datasets" / folder / "folds.json", 0, None)
    scans = [c["image"] for c in cases[: args.max_cases or None]]
    row = {"task": task, "cases": len(scans), "export_s": round(export_seconds, 1), "export_check_diff": export_diff}
    row.update(agreement(bundle, scans))
    row.update(timing(bundle, scans))
    for backend in ("torch", "onnxruntime"):
        row[f"{backend}_command_s"] = command_wall(bundle, scans, backend, work / f"{task}_{backend}")
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="datasets folder (default: MEDFCN_DATA)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--max-cases", type=int, default=None)
    add_output_options(parser, "onnx_backend.json", "bundle copies and outputs")
    args = parser.parse_args(argv)
    with work_folder(args.work) as work:
        rows = [run_task(task, args, work) for task in args.tasks]
    for row in rows:
        row["agreement"] = f"{row['argmax_agreement_percent']:.5f} %"
        row["logit_diff"] = f"{row['max_abs_logit_difference']:.2e}"
    columns = {
        "task": "task",
        "cases": "cases",
        "agreement": "argmax agreement",
        "logit_diff": "max abs logit diff",
        "torch_startup_s": "torch start-up s",
        "onnxruntime_startup_s": "onnxruntime start-up s",
        "torch_s_per_scan": "torch s/scan",
        "onnxruntime_s_per_scan": "onnxruntime s/scan",
        "torch_command_s": "medfcn infer torch s",
        "onnxruntime_command_s": "medfcn infer onnxruntime s",
    }
    return report_rows(
        rows, columns, args.out, torch.device("cpu"), commit=git_commit(), threads=torch.get_num_threads()
    )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
