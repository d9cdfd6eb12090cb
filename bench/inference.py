"""Benchmark the shipped hippocampus bundle: held-out Dice and CPU inference time.

- Held-out Dice/HD95: `medfcn infer` on the validation fold's images (fold 0 of
  datasets/Task04_Hippocampus/folds.json, never seen in training), then `medfcn evaluate`
  against the reference labels.
- Model compute per hippocampus volume (median over that fold) and the whole `medfcn infer`
  process on the three DICOM hippocampus crops, start-up included (median of repeats).

Prints a markdown table and writes bench/results/inference.json.

    python bench/inference.py [--data ../shared/datasets] [--fold 0] [--repeats 3] [--tta] [--mirror] [--bundle DIR]

``--tta`` measures flip test-time augmentation (its Dice gain and time cost against a run
without it); ``--mirror`` measures Dice on the fold's crops and labels mirrored left-right
(every Task04 crop shows one side, so this stands in for a crop of the other hemisphere);
``--bundle`` measures another bundle folder (e.g. a candidate model) instead of the shipped one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medfcn.data.datasets import data_root
from medfcn.evaluate import evaluate_folders
from medfcn.infer import infer

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hippocampus_fcn"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def mirror_left_right(cases: list[str], hippo: Path, out: Path) -> tuple[list[Path], Path]:
    """Write each case's image and label flipped along its RAS left-right axis, same affine.

    The voxel grid and world position stay; the anatomy is mirrored (left becomes right), as a
    crop of the other hemisphere would look. Returns the image paths and the label folder.
    """
    images, labels = out / "images", out / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for case in cases:
        for src, dst in ((hippo / "imagesTr", images), (hippo / "labelsTr", labels)):
            img = nib.load(src / f"{case}.nii.gz")
            axis = int(np.argmax(np.abs(img.affine[:3, 0:3])[0]))  # voxel axis along world x (L-R)
            data = np.flip(np.asanyarray(img.dataobj), axis=axis)
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine, img.header), dst / f"{case}.nii.gz")
    return [images / f"{c}.nii.gz" for c in cases], labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="datasets root (default: $MEDFCN_DATA or ../shared/datasets)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta", action="store_true", help="left-right flip test-time augmentation")
    parser.add_argument("--mirror", action="store_true", help="Dice on the crops mirrored left-right")
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="bundle folder (default: the shipped one)")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    root = data_root(args.data)
    hippo = root / "Task04_Hippocampus"
    folds = json.loads((REPO / "datasets" / "Task04_Hippocampus" / "folds.json").read_text())["folds"]
    images = [hippo / "imagesTr" / f"{c}.nii.gz" for c in folds[args.fold]]

    with tempfile.TemporaryDirectory() as tmp:
        labels = hippo / "labelsTr"
        if args.mirror:
            images, labels = mirror_left_right(folds[args.fold], hippo, Path(tmp) / "mirrored")
        rows = infer(bundle, images, Path(tmp) / "pred", tta=args.tta)
        _, summary = evaluate_folders(Path(tmp) / "pred", labels, labels=[1, 2])
    compute = statistics.median(r["model_seconds"] for r in rows)

    dicoms = [str(root / "dicom" / f"PGBM-00{k}_HippoCrop") for k in (2, 3, 6)]
    walls = []
    tta = ["--tta"] if args.tta else []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "medfcn.cli", "infer", str(bundle), *dicoms, "--out", tmp, *tta],
                check=True,
                capture_output=True,
            )
            walls.append(time.perf_counter() - start)

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{torch.get_num_threads()} threads, {cpu_model()}",
        "torch": torch.__version__,
        "bundle": str(bundle),
        "tta": args.tta,
        "mirrored": args.mirror,
        "fold": args.fold,
        "cases": len(rows),
        "dice_anterior": summary["dice_1"]["mean"],
        "dice_posterior": summary["dice_2"]["mean"],
        "dice_mean": summary["dice_mean"]["mean"],
        "hd95_anterior_mm": summary["hd95_1"]["mean"],
        "hd95_posterior_mm": summary["hd95_2"]["mean"],
        "model_compute_s_median": compute,
        "infer_3_dicom_process_s_median": statistics.median(walls),
        "infer_3_dicom_process_s_all": walls,
    }
    name = "inference" + ("_tta" if args.tta else "") + ("_mirrored" if args.mirror else "")
    out = REPO / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| figure | value |\n| --- | --- |")
    for key, value in result.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"| {key} | {shown} |")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
