"""Training throughput by number of processes (``medfcn train --nproc-per-node N``, DDP).

For each N of ``--processes`` (default 1 and 2): ``medfcn train BUNDLE --epochs E`` on fold 0 of
the bundle's split, in a new run folder, validating only after the last epoch; N = 1 runs in one
process with every core, N > 1 through the launcher (cores / N threads each). The epoch lines
are timed as they arrive; the first epoch (caching, warm-up) and the last (validation) are left
out. Per N: seconds per epoch, training volumes per second (the fold's training cases per
epoch), threads per process, wall seconds.

Prints a table; writes ``ddp_throughput.json`` (``--out``). Not a test: a benchmark (bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from left_atrium import add_output_options, report_rows, work_folder

from medfcn.bundle import read_run_record
from medfcn.data.datasets import data_root, fold_datalists
from medfcn.distributed import threads_per_process

REPO = Path(__file__).resolve().parents[1]


def run_command(args: argparse.Namespace, processes: int, output: Path) -> list[str]:
    """The ``medfcn train`` command line of one run."""
    command = [sys.executable, "-m", "medfcn", "train", str(args.bundle), "--data", str(args.data)]
    command += ["--epochs", str(args.epochs), "--output", str(output), "--set", "val_interval=100000"]
    for item in args.set:
        command += ["--set", item]
    command += ["--device", args.device]
    return command + (["--nproc-per-node", str(processes)] if processes > 1 else [])


def epoch_times(command: list[str]) -> tuple[list[float], float]:
    """Run ``command``; the times (s from its start) its epoch lines arrived, and its wall time.

    Raises:
        RuntimeError: the run failed (its last output lines)."""
    start = time.perf_counter()
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    arrived, tail = [], []
    for line in job.stdout:
        tail = [*tail[-20:], line]
        if line.startswith("epoch "):
            arrived.append(time.perf_counter() - start)
    if job.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(tail)}")
    return arrived, time.perf_counter() - start


def measure(args: argparse.Namespace, processes: int, work: Path) -> dict:
    """One run: seconds per steady epoch and volumes per second."""
    output = work / f"p{processes}"
    arrived, wall = epoch_times(run_command(args, processes, output))
    steady = [b - a for a, b in zip(arrived[:-2], arrived[1:-1], strict=True)]  # epochs 2 .. E-1
    settings = read_run_record(output)["settings"]
    max_cases = settings.get("max_cases")
    train, _ = fold_datalists(settings["dataset_dir"], settings["folds_file"], settings["fold"], max_cases)
    per_epoch = statistics.median(steady)
    cores = len(os.sched_getaffinity(0))
    return {
        "processes": processes,
        "threads_per_process": cores if processes == 1 else threads_per_process(processes, cores),
        "training_cases": len(train),
        "s_per_epoch": round(per_epoch, 2),
        "volumes_per_s": round(len(train) / per_epoch, 2),
        "steady_epochs": len(steady),
        "wall_s": round(wall, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "hippocampus_fcn")
    parser.add_argument("--data", type=Path, default=None, help="default: $MEDFCN_DATA/Task04_Hippocampus")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=5, help="at least 3: the first and last are not timed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to medfcn train")
    parser.add_argument("--device", default="cpu")
    add_output_options(parser, "ddp_throughput.json")
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error("--epochs: at least 3 (the first and the last epoch are not timed)")
    args.data = args.data or data_root() / "Task04_Hippocampus"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with work_folder(args.work) as work:
        rows = [measure(args, n, work) for n in args.processes]
    columns = {"processes": "processes", "threads_per_process": "threads each", "training_cases": "training cases"}
    columns |= {"s_per_epoch": "s/epoch", "volumes_per_s": "volumes/s", "steady_epochs": "steady epochs"}
    columns |= {"wall_s": "wall s"}
    facts = {"bundle": str(args.bundle), "epochs": args.epochs, "set": args.set}
    return report_rows(rows, columns, args.out, torch.device(args.device), **facts)


if __name__ == "__main__":
    main()
