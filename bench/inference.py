"""Benchmark a shipped bundle: held-out Dice and CPU inference time, the figures of its model card.

- Held-out Dice/HD95: `medfcn infer` on the validation fold's images of the bundle's own split
  (its ``dataset_dir`` and ``folds_file``: fold 0 of datasets/Task04_Hippocampus/folds.json for
  the hippocampus bundles, of datasets/LeftAtrium/folds.json for left_atrium_fcn; never seen in
  training), then `medfcn evaluate` against the reference labels.
- Model compute per scan (median over that fold) and the whole `medfcn infer` process, start-up
  included (median of repeats), on three scans: the three DICOM hippocampus crops for a
  hippocampus bundle, the fold's first three images otherwise.

Prints a markdown table and writes bench/results/inference[_<bundle>][_tta][_mirrored].json.

    python bench/inference.py [--data ../shared/datasets] [--fold 0] [--repeats 3] [--tta] [--mirror] [--bundle DIR]

``--tta`` measures flip test-time augmentation (its Dice gain and time cost against a run
without it); ``--mirror`` measures Dice on the fold's scans and labels mirrored left-right
(every Task04 crop shows one side, so this stands in for a crop of the other hemisphere);
``--bundle`` measures another bundle folder (another shipped one, or a candidate model) instead of
``bundles/hippocampus_fcn``.
"""

from __future__ import annotations

import argparse
import json
import os
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

from medfcn.bundle import bundle_files, read_config
from medfcn.data.datasets import data_root
from medfcn.evaluate import evaluate_folders, label_names
from medfcn.infer import infer
from medfcn.inferers import use_cpu_bf16

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hippocampus_fcn"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def held_out_scans(bundle: Path, fold: int) -> tuple[list[Path], Path, str]:
    """The bundle's validation images of ``fold`` (its train config's ``datalists``, read as
    ``medfcn train`` reads them), their label folder and the dataset folder's name."""
    config = read_config(bundle_files(bundle, "train.json")["config_files"])
    config.update({"bundle_root": str(bundle), "fold": fold, "max_cases": None})
    _, validation = config.get_parsed_content("datalists")
    images = [Path(item["image"]) for item in validation]
    return images, Path(validation[0]["label"]).parent, Path(config.get_parsed_content("dataset_dir")).name


def mirror_left_right(images: list[Path], labels: Path, out: Path) -> tuple[list[Path], Path]:
    """Write each image and its label flipped along its RAS left-right axis, same affine.

    The voxel grid and world position stay; the anatomy is mirrored (left becomes right), as a
    crop of the other hemisphere would look. Returns the image paths and the label folder.
    """
    mirrored_images, mirrored_labels = out / "images", out / "labels"
    mirrored_images.mkdir(parents=True)
    mirrored_labels.mkdir()
    for image in images:
        for src, dst in ((image, mirrored_images), (labels / image.name, mirrored_labels)):
            img = nib.load(src)
            axis = int(np.argmax(np.abs(img.affine[:3, 0:3])[0]))  # voxel axis along world x (L-R)
            data = np.flip(np.asanyarray(img.dataobj), axis=axis)
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine, img.header), dst / image.name)
    return [mirrored_images / i.name for i in images], mirrored_labels


def process_seconds(bundle: Path, scans: list[str], tta: bool, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` whole ``medfcn infer`` processes on ``scans``, start-up included."""
    walls = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "medfcn.cli", "infer", str(bundle), *scans, "--out", tmp, "--device", "cpu"]
                + (["--tta"] if tta else []),
                check=True,
                capture_output=True,
            )
            walls.append(time.perf_counter() - start)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="datasets root (default: $MEDFCN_DATA or ../shared/datasets)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta", action="store_true", help="left-right flip test-time augmentation")
    parser.add_argument("--mirror", action="store_true", help="Dice on the scans mirrored left-right")
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="bundle folder (default: bundles/hippocampus_fcn)")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    root = data_root(args.data)
    os.environ["MEDFCN_DATA"] = str(root)  # the bundle's dataset_dir reads it
    images, labels, dataset = held_out_scans(bundle, args.fold)
    classes = label_names(bundle)

    with tempfile.TemporaryDirectory() as tmp:
        scored = images
        if args.mirror:
            scored, labels = mirror_left_right(images, labels, Path(tmp) / "mirrored")
        rows = infer(bundle, scored, Path(tmp) / "pred", tta=args.tta, device="cpu")  # CPU figures
        _, summary = evaluate_folders(Path(tmp) / "pred", labels, labels=list(classes))
    compute = statistics.median(r["model_seconds"] for r in rows)

    if dataset == "Task04_Hippocampus":
        scans = [str(root / "dicom" / f"PGBM-00{k}_HippoCrop") for k in (2, 3, 6)]
    else:
        scans = [str(i) for i in images[:3]]
    walls = process_seconds(bundle, scans, args.tta, args.repeats)

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{torch.get_num_threads()} threads, {cpu_model()}",
        "precision": "bfloat16 autocast" if use_cpu_bf16("cpu") else "float32",
        "torch": torch.__version__,
        "bundle": str(bundle),
        "dataset": dataset,
        "tta": args.tta,
        "mirrored": args.mirror,
        "fold": args.fold,
        "cases": len(rows),
        **{f"dice_{name.replace(' ', '_')}": summary[f"dice_{k}"]["mean"] for k, name in classes.items()},
        "dice_mean": summary["dice_mean"]["mean"],
        **{f"hd95_{name.replace(' ', '_')}_mm": summary[f"hd95_{k}"]["mean"] for k, name in classes.items()},
        "model_compute_s_median": compute,
        "infer_process_scans": [Path(s).name for s in scans],
        "infer_process_s_median": statistics.median(walls),
        "infer_process_s_all": walls,
    }
    name = "inference" + ("" if bundle == BUNDLE else f"_{bundle.name}")
    name += ("_tta" if args.tta else "") + ("_mirrored" if args.mirror else "")
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
