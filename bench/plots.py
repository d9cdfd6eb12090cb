"""Draw the Benchmarks page's figures from the JSON the benchmarks wrote.

- ``docs/images/bench_dice_minutes.png``: mean validation Dice against training minutes, the
  bundle's recipe and the baseline UNet (the curves of one ``bench/accuracy.py`` run).
- ``docs/images/bench_inference_speed.png``: per shipped bundle, the model's compute per scan
  and the whole ``medfcn infer`` process on three scans, start-up included (one
  ``bench/inference.py --bundle B`` run each).

The figures are committed (the site shows them; ``bench/results/`` is not), and each caption on
the page names the runs, their date and machine. Re-draw after re-running the benchmarks:

    python bench/plots.py [--accuracy bench/results/accuracy_docs.json]
        [--inference bench/results/inference.json bench/results/inference_hippocampus_fcn_2d.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
from accuracy import plot_curves  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
IMAGES = REPO / "docs" / "images"
INFERENCE = ["inference.json", "inference_hippocampus_fcn_2d.json", "inference_left_atrium_fcn.json"]


def plot_inference_speed(results: list[dict], path: Path) -> None:
    """Write ``path``: two bar charts side by side, one bar per bundle: model compute per scan
    (s, median over its held-out fold) and the whole ``medfcn infer`` process on three scans (s,
    median of repeats)."""
    names = [f"{Path(r['bundle']).name}\n({r['dataset']}, {r['cases']} scans)" for r in results]
    panels = [
        ("model compute per scan (s)", [r["model_compute_s_median"] for r in results]),
        ("medfcn infer on 3 scans, whole process (s)", [r["infer_process_s_median"] for r in results]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 0.8 * len(results)), sharey=True)
    for ax, (title, seconds) in zip(axes, panels, strict=True):
        bars = ax.barh(names, seconds, color="#4c72b0")
        ax.bar_label(bars, labels=[f"{s:.2f}" for s in seconds], padding=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max(seconds) * 1.25)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yinverted(True)  # the first bundle on top (the y axis is shared: once)
    runs = sorted({f"{r['machine']}, {r['precision']}, {r['date']}" for r in results})
    fig.suptitle("; ".join(runs), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", type=Path, default=RESULTS / "accuracy_docs.json")
    parser.add_argument("--inference", type=Path, nargs="+", default=[RESULTS / n for n in INFERENCE])
    args = parser.parse_args()
    accuracy = json.loads(args.accuracy.read_text())
    plot_curves(accuracy["runs"], accuracy["fold"], IMAGES / "bench_dice_minutes.png")
    plot_inference_speed([json.loads(p.read_text()) for p in args.inference], IMAGES / "bench_inference_speed.png")
    print(f"written: {IMAGES / 'bench_dice_minutes.png'}, {IMAGES / 'bench_inference_speed.png'}")


if __name__ == "__main__":
    main()
