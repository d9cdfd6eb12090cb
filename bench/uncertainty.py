"""Does ``medfcn infer --uncertainty`` mean something, and what does ``--largest-component`` do to Dice?

For each task (Task04_Hippocampus and LeftAtrium by default, each on its bundle's held-out fold
0: cases the shipped weights never trained on), ``medfcn.infer.infer`` segments the held-out
scans with ``Extras(uncertainty=True)``, once per run of :data:`RUNS`: without and with ``--tta``
(only where the bundle trained with flips), and for Task04 the ensemble of the 3D bundle with
``--tta`` and the 2D bundle (``--models``; same fold 0, which neither trained on). Then, against the reference labels:

- voxel AUROC: how well the uncertainty map ranks the voxels where the mask is wrong above those
  where it is right (1.0: every wrong voxel more uncertain than every right one; 0.5: chance),
  pooled over the scans, on all voxels and on the "near" voxels only (within ``--near`` voxels
  of the predicted or reference foreground, where a wrong label is possible at all);
- Spearman's rho between each per-scan score and 1 - Dice (mean over labels): the score
  ``infer`` writes (the entropy in a band of ``BAND_WIDTH`` voxels around the mask's boundaries,
  summed and divided by the foreground voxels) beside other candidates computed from the same
  map, probabilities and mask;
- Dice with and without ``keep_largest_components`` (what ``--largest-component`` applies to
  each mask), per label, and how many scans it changed.

Prints a table per task; writes ``uncertainty.json`` (``--out``). Not a test: a benchmark.

    python bench/uncertainty.py [--tasks hippocampus left_atrium] [--max-cases N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from left_atrium import add_output_options, git_commit, report_rows, work_folder
from scipy import stats

from medfcn.data.datasets import data_root, fold_datalists
from medfcn.infer import Extras, infer
from medfcn.uncertainty import boundary_band, keep_largest_components

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    "hippocampus": ("Task04_Hippocampus", REPO / "bundles" / "hippocampus_fcn", [1, 2]),
    "left_atrium": ("LeftAtrium", REPO / "bundles" / "left_atrium_fcn", [1]),
}
# the runs of each task: (--tta, --models); LeftAtrium's bundle trained without flips, and is
# the only one of its task (no ensemble)
RUNS = {
    "hippocampus": [(False, ()), (True, ()), (True, (REPO / "bundles" / "hippocampus_fcn_2d",))],
    "left_atrium": [(False, ())],
}
BINS = 1 << 16  # entropy histogram bins for the pooled AUROC (ties within a bin count half)


def dice(pred: np.ndarray, label: np.ndarray, value: int) -> float:
    """Dice of one label value; NaN when neither mask holds it."""
    p, y = pred == value, label == value
    total = int(p.sum()) + int(y.sum())
    return 2.0 * int((p & y).sum()) / total if total else float("nan")


def near_foreground(pred: np.ndarray, label: np.ndarray, width: int) -> np.ndarray:
    """Voxels within ``width`` voxels (a cube) of the predicted or reference foreground."""
    from scipy import ndimage

    return ndimage.maximum_filter(((pred > 0) | (label > 0)).astype(np.uint8), size=2 * width + 1) > 0


class PooledAuroc:
    """AUROC of a score in 0..1 for positives (wrong voxels) against negatives, from histograms."""

    def __init__(self) -> None:
        self.positive = np.zeros(BINS, dtype=np.int64)
        self.negative = np.zeros(BINS, dtype=np.int64)

    def add(self, score: np.ndarray, wrong: np.ndarray) -> None:
        bins = np.minimum((score * BINS).astype(np.int64), BINS - 1)
        self.positive += np.bincount(bins[wrong], minlength=BINS)
        self.negative += np.bincount(bins[~wrong], minlength=BINS)

    def value(self) -> float:
        """P(score of a positive > score of a negative) + P(equal) / 2."""
        pos, neg = self.positive.astype(float), self.negative.astype(float)
        if not pos.sum() or not neg.sum():
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives in lower bins
        return float((pos * (below + neg / 2)).sum() / (pos.sum() * neg.sum()))


def soft_dice_error(probabilities: np.ndarray, mask: np.ndarray) -> float:
    """1 - the mean over foreground classes of the soft Dice of the class probabilities ``(X, Y, Z, K)``
    with the mask: the Dice the mask loses if the probabilities were right (an expected 1 - Dice)."""
    dices = []
    for k in range(1, probabilities.shape[-1]):
        p, m = probabilities[..., k], mask == k
        total = float(p.sum()) + int(m.sum())
        dices.append(2 * float(p[m].sum()) / total if total else 1.0)
    return 1 - float(np.mean(dices))


def scan_scores(entropy: np.ndarray, mask: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Candidate per-scan scores from the uncertainty map, the probabilities and the mask."""
    foreground = mask > 0
    scores = {f"band{w}": float(entropy[boundary_band(mask, w)].mean()) for w in (1, 2, 3)}
    scores["foreground_mean"] = float(entropy[foreground].mean()) if foreground.any() else float("nan")
    scores["sum_per_foreground"] = float(entropy.sum() / max(int(foreground.sum()), 1))
    scores["scan_mean"] = float(entropy.mean())
    scores["soft_dice_error"] = soft_dice_error(probabilities, mask)
    return scores


def bootstrap_rho(score: np.ndarray, error: np.ndarray, draws: int = 2000) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of Spearman's rho over ``draws`` resamplings of the scans
    (with replacement; fixed seed): how far the rho of a few dozen scans may be from the truth."""
    rng = np.random.default_rng(0)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(score), len(score))
        value = stats.spearmanr(score[pick], error[pick])[0]
        if np.isfinite(value):
            values.append(value)
    if not values:  # too few scans to rank
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def evaluate_run(out: Path, cases: list[dict], labels: list[int], near: int, rows: list[dict]) -> dict:
    """AUROC, Spearman rho per score and the largest-component Dice for one inference run."""
    everywhere, nearby = PooledAuroc(), PooledAuroc()
    dices, kept_dices, changed, scores, written = [], [], 0, [], []
    by_input = {Path(row["input"]).name: row for row in rows}
    for case in cases:
        name = Path(case["image"]).name
        mask_path = Path(by_input[name]["mask"])
        mask = np.asarray(nib.load(mask_path).dataobj)
        entropy = np.asarray(nib.load(str(mask_path).replace(".nii.gz", "_uncertainty.nii.gz")).dataobj)
        probabilities = np.asarray(nib.load(str(mask_path).replace(".nii.gz", "_probabilities.nii.gz")).dataobj)
        label = np.asarray(nib.load(case["label"]).dataobj).astype(np.uint8)
        wrong = mask != label
        everywhere.add(entropy, wrong)
        region = near_foreground(mask, label, near)
        nearby.add(entropy[region], wrong[region])
        dices.append(float(np.nanmean([dice(mask, label, k) for k in labels])))
        kept = keep_largest_components(mask)
        changed += int((kept != mask).any())
        kept_dices.append([dice(kept, label, k) for k in labels] + [dice(mask, label, k) for k in labels])
        scores.append(scan_scores(entropy, mask, probabilities))
        written.append(by_input[name]["uncertainty"])
    error = 1 - np.array(dices)
    rho = {key: float(stats.spearmanr([s[key] for s in scores], error)[0]) for key in scores[0]}
    rho["written"] = float(stats.spearmanr(written, error)[0])
    low, high = bootstrap_rho(np.array(written, dtype=float), error)
    kept_dices = np.array(kept_dices)
    k = len(labels)
    return {
        "cases": len(cases),
        "dice_mean": float(np.mean(dices)),
        "auroc_all_voxels": everywhere.value(),
        f"auroc_within_{near}_voxels": nearby.value(),
        "spearman_vs_1_minus_dice": rho,
        "spearman_written_95ci": [round(low, 3), round(high, 3)],
        "largest_component": {
            "dice_per_label_with": np.nanmean(kept_dices[:, :k], 0).round(5).tolist(),
            "dice_per_label_without": np.nanmean(kept_dices[:, k:], 0).round(5).tolist(),
            "dice_mean_with": float(np.nanmean(kept_dices[:, :k])),
            "dice_mean_without": float(np.nanmean(kept_dices[:, k:])),
            "scans_changed": changed,
        },
    }


def run_task(task: str, args: argparse.Namespace, work: Path) -> list[dict]:
    """Every run of one task (:data:`RUNS`): a result row each."""
    folder, bundle, labels = TASKS[task]
    data = data_root(args.data) / folder
    _, cases = fold_datalists(data, REPO / "datasets" / folder / "folds.json", 0, None)
    cases = cases[: args.max_cases] if args.max_cases else cases
    results = []
    for tta, models in RUNS[task]:
        out = work / f"{task}_tta{int(tta)}_models{len(models)}"
        start = time.perf_counter()
        scans = [c["image"] for c in cases]
        rows = infer(bundle, scans, out, device=args.device, tta=tta, extras=Extras(True, True), models=models)
        seconds = time.perf_counter() - start
        result = {"task": task, "tta": tta, "models": [m.name for m in models], "infer_seconds": round(seconds, 1)}
        result.update(evaluate_run(out, cases, labels, args.near, rows))
        results.append(result)
        print(f"{task} tta={tta}: {result}", flush=True)
    return results


def table_rows(results: list[dict], near: int) -> list[dict]:
    """One printable row per run."""
    rows = []
    for r in results:
        rho, lcc = r["spearman_vs_1_minus_dice"], r["largest_component"]
        rows.append(
            {
                "run": f"{r['task']}{' --tta' if r['tta'] else ''}{''.join(f' --models {m}' for m in r['models'])}",
                "cases": r["cases"],
                "dice": f"{r['dice_mean']:.4f}",
                "auroc": f"{r['auroc_all_voxels']:.4f}",
                "auroc_near": f"{r[f'auroc_within_{near}_voxels']:.4f}",
                "rho": f"{rho['written']:.3f}",
                "rho_ci": "{:.2f} to {:.2f}".format(*r["spearman_written_95ci"]),
                "rho_others": ", ".join(f"{k} {v:.3f}" for k, v in rho.items() if k != "written"),
                "lcc": f"{lcc['dice_mean_without']:.4f} -> {lcc['dice_mean_with']:.4f}",
                "changed": lcc["scans_changed"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="datasets folder (default: MEDFCN_DATA)")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--max-cases", type=int, default=None, help="the first N held-out cases only")
    parser.add_argument("--near", type=int, default=5, help="voxels around the foreground for the near AUROC")
    parser.add_argument("--device", default="cpu")
    add_output_options(parser, "uncertainty.json", "inference outputs")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    with work_folder(args.work) as work:
        results = [row for task in args.tasks for row in run_task(task, args, work)]
    columns = {
        "run": "run",
        "cases": "cases",
        "dice": "mean Dice",
        "auroc": "voxel AUROC",
        "auroc_near": f"AUROC within {args.near} vox",
        "rho": "rho (score written)",
        "rho_ci": "its 95 % bootstrap interval",
        "rho_others": "rho of other scores",
        "lcc": "Dice -> largest component",
        "changed": "scans it changed",
    }
    return report_rows(
        table_rows(results, args.near), columns, args.out, torch.device(args.device), commit=git_commit(), runs=results
    )


if __name__ == "__main__":
    main()
