"""Peak memory of training by where the preprocessed cases are kept (``medfcn train --cache``).

For each ``--cache`` kind (``ram``, ``disk``) and each number of cases (``--cases 40 160``):
``medfcn train BUNDLE --epochs E --cache K --set max_cases=N`` in its own process, on fold 0 of
the bundle's split (N training cases and up to N validation cases), with a new run folder. Per
run: the process's peak RSS (MiB, start-up, caching and validation included), wall seconds, and
for ``disk`` the files under ``RUN/cache`` and their size. ``disk`` must not grow with N: the
cases live in files and only the batch being trained on is in memory.

Prints a table; writes ``cache_memory.json`` (``--out``). Not a test: a benchmark (bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from left_atrium import add_output_options, report_rows, work_folder
from speed import process

from medfcn.data.datasets import data_root

REPO = Path(__file__).resolve().parents[1]


def run_command(args: argparse.Namespace, kind: str, cases: int, output: Path) -> list[str]:
    """The ``medfcn train`` command line of one run."""
    command = [sys.executable, "-m", "medfcn", "train", str(args.bundle), "--data", str(args.data)]
    command += ["--epochs", str(args.epochs), "--cache", kind, "--output", str(output)]
    for item in [f"max_cases={cases}", *args.set]:
        command += ["--set", item]
    return command + (["--device", args.device] if args.device else [])


def measure(args: argparse.Namespace, kind: str, cases: int, work: Path) -> dict:
    """One run: peak RSS, wall time and the disk cache's files."""
    output = work / f"{kind}_{cases}"
    wall, rss = process(run_command(args, kind, cases, output))
    cache = sorted((output / "cache").glob("*.pt")) if kind == "disk" else []
    return {
        "cache": kind,
        "cases": cases,
        "peak_rss_mib": round(rss, 1),
        "wall_s": round(wall, 1),
        "cache_files": len(cache),
        "cache_mib": round(sum(p.stat().st_size for p in cache) / 2**20, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "hippocampus_fcn")
    parser.add_argument("--data", type=Path, default=None, help="default: $MEDFCN_DATA/Task04_Hippocampus")
    parser.add_argument("--cases", type=int, nargs="+", default=[40, 160], help="max_cases of each run")
    parser.add_argument("--kinds", nargs="+", default=["ram", "disk"], choices=["ram", "disk", "none"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to medfcn train")
    parser.add_argument("--device", default=None)
    add_output_options(parser, "cache_memory.json")
    args = parser.parse_args(argv)
    args.data = args.data or data_root() / "Task04_Hippocampus"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with work_folder(args.work) as work:
        rows = [measure(args, kind, cases, work) for kind in args.kinds for cases in args.cases]
    columns = {"cache": "cache", "cases": "cases", "peak_rss_mib": "peak RSS MiB", "wall_s": "wall s"}
    columns |= {"cache_files": "cache files", "cache_mib": "cache MiB"}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return report_rows(rows, columns, args.out, device, bundle=str(args.bundle), epochs=args.epochs)


if __name__ == "__main__":
    main()
