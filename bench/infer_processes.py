"""Batch inference by number of processes (``medfcn infer --nproc-per-node N``).

For each N of ``--processes`` (default 1 and 2): ``medfcn infer BUNDLE INPUTS --out DIR`` on the
CPU, in a new output folder; N = 1 in one process with every core, N > 1 through the launcher
(cores / N threads each). Per N: wall seconds (start-up, reading and writing included), scans per
second, and whether every mask holds the same voxels and header as N = 1's.

Prints a table; writes ``infer_processes.json`` (``--out``). Not a test: a benchmark (bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from left_atrium import add_output_options, report_rows, work_folder

from medfcn.data.datasets import data_root
from medfcn.distributed import threads_per_process

REPO = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace, processes: int, out: Path) -> float:
    """Segment the inputs into ``out`` in ``processes`` processes; the wall seconds.

    Raises:
        RuntimeError: the command failed (its output)."""
    command = [sys.executable, "-m", "medfcn", "infer", str(args.bundle), *map(str, args.inputs), "--out", str(out)]
    command += ["--device", args.device] + (["--nproc-per-node", str(processes)] if processes > 1 else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return wall


def same_masks(a: Path, b: Path) -> bool:
    """Whether the folders hold masks of the same names, voxels and headers."""
    names = sorted(p.name for p in a.glob("*.nii.gz"))
    if names != sorted(p.name for p in b.glob("*.nii.gz")):
        return False
    for name in names:
        x, y = nib.load(a / name), nib.load(b / name)
        if x.header.binaryblock != y.header.binaryblock or not np.array_equal(np.asarray(x.dataobj), y.dataobj):
            return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "hippocampus_fcn")
    parser.add_argument("--inputs", type=Path, nargs="+", default=None, help="default: Task04's imagesTr")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    add_output_options(parser, "infer_processes.json", "output folders")
    args = parser.parse_args(argv)
    args.inputs = args.inputs or [data_root() / "Task04_Hippocampus" / "imagesTr"]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    rows = []
    with work_folder(args.work) as work:
        for n in args.processes:
            wall = run(args, n, work / f"p{n}")
            scans = len(list((work / f"p{n}").glob("*.nii.gz")))
            same = same_masks(work / f"p{args.processes[0]}", work / f"p{n}")
            threads = cores if n == 1 else threads_per_process(n, cores)
            row = {"processes": n, "threads_per_process": threads, "scans": scans, "wall_s": round(wall, 1)}
            rows.append({**row, "scans_per_s": round(scans / wall, 2), f"masks_as_p{args.processes[0]}": same})
    columns = {"processes": "processes", "threads_per_process": "threads each", "scans": "scans"}
    columns |= {"wall_s": "wall s", "scans_per_s": "scans/s", f"masks_as_p{args.processes[0]}": "same masks"}
    facts = {"bundle": str(args.bundle), "inputs": [str(p) for p in args.inputs]}
    return report_rows(rows, columns, args.out, torch.device(args.device), **facts)


if __name__ == "__main__":
    main()
