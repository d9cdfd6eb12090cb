"""Where the hippocampus model's Dice is lost: the outer boundary or the head/body split.

Task04's two labels split one structure: anterior (hippocampal head) and posterior (body and
tail). In these labels the split is a coronal plane: along the anterior axis of the RAS voxel
grid every slice holds one label only in 160 of the 208 cases (one or two slices hold both in the
other 48), and the anterior label lies anterior in all 208. So the
error of a prediction parts into

- the outer boundary: Dice of the whole hippocampus (labels 1 and 2 as one), and
- the split plane: where the prediction puts the first anterior slice, against the reference.

For one weights file and its held-out fold, validated as the bundle validates in training
(train.json's ``validate`` section: 1 mm RAS, sliding window, bf16 on CPU), this prints per-class
Dice as validated, whole-hippocampus Dice, per-class Dice with the predicted foreground split at
the reference's plane (what a perfect split would give), per-class Dice with the prediction's own
best-fitting plane (a planar split as post-processing), the predicted plane's offset from the
reference's in slices (1 mm), and voxel counts. Writes bench/results/errors<tag>.json.

    python bench/errors.py bundles/hippocampus_fcn/models/model.pt [--fold 0] [--tag T]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ensemble import REPO, load_member, validation_parser

ANTERIOR, POSTERIOR = 1, 2
AXIS = 1  # the anterior axis of the bundle's RAS voxel grid (Orientationd, axcodes RAS)


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = reference.sum() + prediction.sum()
    return 1.0 if total == 0 else float(2 * (reference & prediction).sum() / total)


def split_plane(anterior_evidence: np.ndarray) -> int:
    """The first anterior slice ``s`` of the best coronal split: slices ``< s`` posterior, ``>= s``
    anterior, maximising the anterior evidence summed over slices ``>= s``.

    ``anterior_evidence``: ``(Y,)``, per slice along the anterior axis, the evidence for anterior
    over posterior of the foreground voxels in that slice (a log-odds sum, or a voxel count
    difference). Returns ``s`` in ``[0, Y]``.
    """
    suffix = np.concatenate([np.cumsum(anterior_evidence[::-1])[::-1], [0.0]])
    return int(np.argmax(suffix))


def split_at(foreground: np.ndarray, s: int) -> np.ndarray:
    """Label map ``(X, Y, Z)``: ``foreground`` voxels posterior below slice ``s`` along the
    anterior axis, anterior from it; 0 elsewhere."""
    index = np.arange(foreground.shape[AXIS]).reshape([-1 if d == AXIS else 1 for d in range(3)])
    return np.where(foreground, np.where(index >= s, ANTERIOR, POSTERIOR), 0)


def class_dice(reference: np.ndarray, labels: np.ndarray) -> list[float]:
    return [dice(reference == c, labels == c) for c in (ANTERIOR, POSTERIOR)]


def case_errors(probability: np.ndarray, reference: np.ndarray) -> dict:
    """Error parts of one case. ``probability``: ``(3, X, Y, Z)`` softmax; ``reference``:
    ``(X, Y, Z)`` labels 0/1/2, on the same 1 mm RAS grid."""
    prediction = probability.argmax(0)
    fg, ref_fg = prediction > 0, reference > 0
    other = tuple(d for d in range(3) if d != AXIS)
    log_odds = np.log(probability[ANTERIOR] + 1e-6) - np.log(probability[POSTERIOR] + 1e-6)
    predicted_plane = split_plane(np.where(fg, log_odds, 0.0).sum(other))
    count_difference = (reference == ANTERIOR).sum(other) - (reference == POSTERIOR).sum(other)
    reference_plane = split_plane(count_difference.astype(float))
    confused = ((reference == ANTERIOR) & (prediction == POSTERIOR)) | (
        (reference == POSTERIOR) & (prediction == ANTERIOR)
    )
    return {
        "dice": class_dice(reference, prediction),
        "whole_dice": dice(ref_fg, fg),
        "reference_split_dice": class_dice(reference, split_at(fg, reference_plane)),
        "planar_dice": class_dice(reference, split_at(fg, predicted_plane)),
        "reference_planarity": class_dice(reference, split_at(ref_fg, reference_plane)),
        # an empty or one-label prediction has no plane of its own to compare
        "plane_offset": (
            predicted_plane - reference_plane
            if (prediction == ANTERIOR).any() and (prediction == POSTERIOR).any()
            else None
        ),
        "voxels": {
            "reference": [int((reference == c).sum()) for c in (ANTERIOR, POSTERIOR)],
            "predicted": [int((prediction == c).sum()) for c in (ANTERIOR, POSTERIOR)],
            "outer_errors": int((fg != ref_fg).sum()),
            "split_errors": int(confused.sum()),
        },
    }


def summarise(cases: list[dict]) -> dict:
    def mean_pair(key: str) -> list[float]:
        return np.mean([c[key] for c in cases], axis=0).tolist()

    offsets = collections.Counter(c["plane_offset"] for c in cases if c["plane_offset"] is not None)
    voxels = {k: int(np.sum([c["voxels"][k] for c in cases])) for k in ("outer_errors", "split_errors")}
    return {
        "cases": len(cases),
        "dice": mean_pair("dice"),
        "whole_dice": float(np.mean([c["whole_dice"] for c in cases])),
        "reference_split_dice": mean_pair("reference_split_dice"),
        "planar_dice": mean_pair("planar_dice"),
        "reference_planarity": mean_pair("reference_planarity"),
        "plane_offsets": {str(k): offsets[k] for k in sorted(offsets)},
        **voxels,
    }


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("weights", type=Path, help="model.pt, best_model.pt or a run's last.pt")
    cli.add_argument("--fold", type=int, default=0, help="the fold the weights did not train on")
    cli.add_argument("--tag", default="", help="suffix of the result file")
    args = cli.parse_args()
    torch.set_grad_enabled(False)

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        parser = validation_parser(args.fold, tmp)
        network = load_member(parser, args.weights)
        inferer = parser.get_parsed_content("validate#inferer")
        device = next(network.parameters()).device
        for item in parser.get_parsed_content("validate#dataset"):
            if nib.aff2axcodes(item["image"].affine.numpy()) != ("R", "A", "S"):
                raise SystemExit(f"{item['image'].meta['filename_or_obj']}: not RAS after the bundle's transforms")
            logits = inferer(item["image"][None].to(device), network)
            probability = logits.float().softmax(1)[0].cpu().numpy()
            cases.append(case_errors(probability, item["label"][0].cpu().numpy().astype(np.int64)))
    s = summarise(cases)

    def pair(v: list[float]) -> str:
        return f"{v[0]:.4f} / {v[1]:.4f} / {np.mean(v):.4f}"

    print(f"fold {args.fold}, {s['cases']} cases, {args.weights}\n")
    print("| prediction | Dice anterior / posterior / mean |\n| --- | --- |")
    print(f"| as validated (argmax) | {pair(s['dice'])} |")
    print(f"| split at the prediction's best coronal plane | {pair(s['planar_dice'])} |")
    print(f"| split at the reference's plane (a perfect split) | {pair(s['reference_split_dice'])} |")
    print(f"| whole hippocampus (labels 1 + 2) | {s['whole_dice']:.4f} |")
    print(f"| reference split at its own plane (how planar the labels are) | {pair(s['reference_planarity'])} |")
    print(f"\nplane offset, predicted - reference (slices): count {s['plane_offsets']}")
    print(f"misclassified voxels: outer boundary {s['outer_errors']}, anterior/posterior swapped {s['split_errors']}")
    out = REPO / "bench" / "results" / f"errors{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "fold": args.fold, "weights": str(args.weights), **s}
    out.write_text(json.dumps({**record, "per_case": cases}, indent=1) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
