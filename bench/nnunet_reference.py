"""nnU-Net v2 itself on medfcn's fold of Task04, on this machine, for a given number of epochs.

The reference for issue 5's Dice target: nnU-Net's 3d_fullres configuration, planned by nnU-Net
from the same 208 cases, trained on the training cases of one fold of
``datasets/Task04_Hippocampus/folds.json`` and validated by nnU-Net (sliding window, mirroring
on all axes) on that fold's cases, so its Dice compares with ``bench/accuracy.py`` and
``bench/ensemble.py`` (mean over cases of each class's Dice). nnU-Net's defaults are kept (its
plan, augmentation, SGD with poly learning rate, 250 iterations per epoch, float32 on a CPU):
only the length of the schedule is set: ``--epochs`` (nnU-Net's default is 1000) of
``--iterations`` (its default 250; its validation iterations per epoch are scaled alike, 50 at
250). nnU-Net steps its poly learning rate once per epoch, so a short schedule needs many short
epochs to anneal: 20 epochs of 25 iterations end at 0.00067 (0.01 x 0.05^0.9), where 2 of 250
stay at 0.01 and then 0.0054.

Dice is nnU-Net's: per case and class, NaN (left out of the mean) only when both the reference
and the prediction are empty; MONAI's, as medfcn uses it, is NaN whenever the reference is
empty. Task04 has no case with an empty label, so the two agree there.

nnU-Net pins its own dependencies: run this in an environment of its own, not in medfcn's.

    python3 -m venv .venv-nnunet && . .venv-nnunet/bin/activate
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # the CPU build
    echo torch==2.13.0 > /tmp/c.txt && pip install nnunetv2 -c /tmp/c.txt
    python bench/nnunet_reference.py --epochs 20 --iterations 25 [--fold 0] [--data DIR] [--tag T]
    python bench/nnunet_reference.py --epochs 20 --iterations 25 --validate-only   # validate again

Writes nnU-Net's folders under bench/results/nnunet/ (raw: links to the images, nothing copied;
preprocessed; results) and bench/results/nnunet_reference<tag>.json; prints a markdown table.
Planning and preprocessing run once (~4 minutes); delete bench/results/nnunet/ to redo them.
The trainer is named ``nnUNetTrainer_<epochs>x<iterations>``, which nnU-Net's own commands
(``nnUNetv2_predict``) cannot find by name: its results folders serve this script only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = "Task04_Hippocampus"
DATASET = "Dataset004_Hippocampus"
CLASSES = {"1": "anterior", "2": "posterior"}


def link_raw_dataset(source: Path, raw: Path) -> list[str]:
    """nnU-Net's raw layout of the MSD folder ``source`` under ``raw/Dataset004_Hippocampus``:
    images linked as ``<case>_0000.nii.gz``, labels as ``<case>.nii.gz``. Returns the case ids."""
    target = raw / DATASET
    (target / "imagesTr").mkdir(parents=True, exist_ok=True)
    (target / "labelsTr").mkdir(parents=True, exist_ok=True)
    labels = (source / "labelsTr").glob("*.nii.gz")
    cases = sorted(p.name[: -len(".nii.gz")] for p in labels if not p.name.startswith("."))
    if not cases:
        raise SystemExit(f"{source / 'labelsTr'}: no .nii.gz labels; pass --data with the folder that holds {TASK}.")
    for case in cases:
        for link, file in (
            (target / "imagesTr" / f"{case}_0000.nii.gz", source / "imagesTr" / f"{case}.nii.gz"),
            (target / "labelsTr" / f"{case}.nii.gz", source / "labelsTr" / f"{case}.nii.gz"),
        ):
            if not file.is_file():
                raise SystemExit(f"{file}: missing; every label in labelsTr needs its image in imagesTr.")
            if link.is_symlink() and link.resolve() != file.resolve():
                link.unlink()  # an earlier run with another --data
            if not link.is_symlink():
                link.symlink_to(file.resolve())
    meta = {
        "name": "Hippocampus",
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (target / "dataset.json").write_text(json.dumps(meta, indent=1))
    return cases


def write_splits(preprocessed: Path, cases: list[str]) -> None:
    """medfcn's five folds as nnU-Net's ``splits_final.json`` (each fold: train = all others)."""
    folds = json.loads((REPO / "datasets" / TASK / "folds.json").read_text())["folds"]
    in_folds = {c for f in folds for c in f}
    if in_folds != set(cases):
        odd = sorted(in_folds ^ set(cases))
        raise SystemExit(f"datasets/{TASK}/folds.json and the data differ in {len(odd)} cases ({', '.join(odd[:3])}).")
    splits = [{"train": [c for c in cases if c not in val], "val": sorted(val)} for val in map(set, folds)]
    (preprocessed / DATASET / "splits_final.json").write_text(json.dumps(splits, indent=1))


def nnunet_trainer(epochs: int, iterations: int) -> type:
    """nnU-Net's default trainer with ``epochs`` of ``iterations``, named
    ``nnUNetTrainer_<epochs>x<iterations>`` (the name of its results folder)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    # Built here rather than found by name: nnU-Net's trainer search imports every trainer
    # module, some of which need a torchvision built for a CUDA torch.
    # nnU-Net records its constructor's arguments by looking its own parameter names up in
    # locals(): the parameters must be exactly nnUNetTrainer.__init__'s (no **kwargs).
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device):
        nnUNetTrainer.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.num_val_iterations_per_epoch = max(1, round(self.num_val_iterations_per_epoch * iterations / 250))
        self.num_iterations_per_epoch = iterations

    return type(f"nnUNetTrainer_{epochs}x{iterations}", (nnUNetTrainer,), {"__init__": __init__})


def train_and_validate(fold: int, epochs: int, iterations: int, validate_only: bool = False) -> dict:
    """Train nnU-Net's default trainer for ``epochs`` of ``iterations`` on the CPU (or, with
    ``validate_only``, load the final checkpoint of such a run), then run its validation.
    Returns training (None when not trained here) and validation wall seconds and the epoch
    durations."""
    import torch

    base = Path(os.environ["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((base / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8 pops this key from the plans
    dataset_json = json.loads((base / "dataset.json").read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    trainer = nnunet_trainer(epochs, iterations)(
        plans=plans, configuration="3d_fullres", fold=fold, dataset_json=dataset_json, device=torch.device("cpu")
    )
    start = time.monotonic()
    if validate_only:
        final = Path(trainer.output_folder) / "checkpoint_final.pth"
        if not final.is_file():
            raise SystemExit(f"{final}: no final checkpoint; train first (without --validate-only).")
        trainer.load_checkpoint(str(final))
        if trainer.current_epoch != epochs:
            raise SystemExit(f"{final}: holds {trainer.current_epoch} epochs, not {epochs}.")
    else:
        trainer.run_training()
    trained = time.monotonic()
    trainer.perform_actual_validation(False)
    done = time.monotonic()
    log = trainer.logger.get_checkpoint()  # the logged values (nnU-Net 2.x)
    epoch_s = [
        end - begin for begin, end in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"], strict=True)
    ]
    return {
        "versions": {name: version(name) for name in ("nnunetv2", "torch")},
        "output_folder": trainer.output_folder,
        "train_s": None if validate_only else trained - start,
        "validation_s": done - trained,
        "epoch_s": epoch_s,
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "batch_size": trainer.batch_size,
        "patch_size": [int(n) for n in trainer.configuration_manager.patch_size],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--epochs",
        type=int,
        required=True,
        help="nnU-Net epochs (its default: 1000); its poly learning rate steps once per epoch",
    )
    parser.add_argument("--iterations", type=int, default=250, help="iterations per epoch (nnU-Net's: 250)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument(
        "--data", type=Path, default=None, help=f"folder holding {TASK} (default: $MEDFCN_DATA or ../shared/datasets)"
    )
    parser.add_argument("--validate-only", action="store_true", help="validate the final checkpoint of an earlier run")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    # medfcn.data.data_root's rule, written out: importing medfcn needs MONAI, which nnU-Net's
    # environment lacks.
    data = args.data or Path(os.environ.get("MEDFCN_DATA") or REPO.parent / "shared" / "datasets")
    work = REPO / "bench" / "results" / "nnunet"
    env = {"raw": work / "raw", "preprocessed": work / "preprocessed", "results": work / "results"}
    for key, path in env.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{key}"] = str(path)
    cores = str(os.cpu_count() or 1)
    os.environ.setdefault("nnUNet_n_proc_DA", cores)  # augmentation workers
    os.environ.setdefault("nnUNet_def_n_proc", cores)  # export workers in validation (nnU-Net's default: 8)

    cases = link_raw_dataset(data / TASK, env["raw"])
    if not (env["preprocessed"] / DATASET / "nnUNetPlans.json").is_file():
        subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", cores], check=True)
    write_splits(env["preprocessed"], cases)
    run = train_and_validate(args.fold, args.epochs, args.iterations, args.validate_only)

    summary = json.loads((Path(run["output_folder"]) / "validation" / "summary.json").read_text())
    dice = {name: summary["mean"][label]["Dice"] for label, name in CLASSES.items()}
    dice["mean"] = sum(dice.values()) / len(CLASSES)
    result = {"fold": args.fold, "epochs": args.epochs, "threads": os.cpu_count(), "dice": dice, **run}
    out = REPO / "bench" / "results" / f"nnunet_reference{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))

    print("| nnU-Net 3d_fullres | epochs x iterations x batch | training minutes | anterior | posterior | mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| fold {args.fold} | {args.epochs} x {run['iterations_per_epoch']} x {run['batch_size']} "
        f"| {sum(run['epoch_s']) / 60:.1f} | {dice['anterior']:.4f} | {dice['posterior']:.4f} | {dice['mean']:.4f} |"
    )
    print(f"wrote {out}")


# The guard matters: nnU-Net's validation exports through spawned processes, which import
# this module again.
if __name__ == "__main__":
    main()
