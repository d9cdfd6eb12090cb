"""The standard MONAI recipe vs medfcn on LeftAtrium: same fold, same wall-clock budget, one run.

(a) ``monai``: the recipe a careful user would paste (issue 24, section 3): LoadImaged,
    EnsureChannelFirstd, Orientationd RAS, Spacingd 1.25 mm (bilinear / nearest),
    NormalizeIntensityd (z-score), CacheDataset; SpatialPadd then RandCropByPosNegLabeld
    96 x 96 x 64 (pos:neg 2:1), RandFlipd on the 3 axes, RandAffined (rotation, scaling),
    RandScaleIntensityd / RandShiftIntensityd; ``UNet(3, 1, 2, channels=(32, 64, 128, 256),
    strides=(2, 2, 2), num_res_units=2, norm=INSTANCE)``, DiceCE, AdamW 2e-3, batch 2, bf16
    autocast on a CPU that has it (AMP on CUDA). A user with a time limit: the clock starts
    before the caching, the cosine schedule follows the elapsed fraction of the budget
    (lr = lr0 * 0.5 * (1 + cos(pi * elapsed / budget))) and training stops at the budget.
(b) ``medfcn``: ``medfcn.planning.plan_bundle`` for the budget (or ``--medfcn-bundle DIR``),
    then ``medfcn.training.train`` on the fold, nothing set by hand; its wall time is recorded
    against the budget.
(c) both scored the same way on the fold's held-out cases at their original resolution
    (0.625 mm): the MONAI model by sliding window at its spacing, softmax, Invertd back to the
    original grid (linear interpolation of the probabilities), argmax; medfcn by its own path
    (``medfcn package --weights last``, then ``medfcn infer``); then ``medfcn evaluate``'s
    scoring (Dice per foreground label, per case) of both folders of masks.

medfcn's masks come from the last epoch's weights (its moving average), not the best
validation's: its validation cases are the held-out cases scored here, so choosing by them
would flatter it. Prints a table; writes JSON (``--out``, default
``bench/results/left_atrium.json``) and the run folders under ``--work``.

    python bench/left_atrium.py --minutes 20 --fold 0      # ~45 min: both arms + planning + scoring
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.layers import Norm
from monai.networks.nets import UNet
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import set_determinism

from medfcn.data.datasets import case_id, fold_datalists
from medfcn.errors import UserError
from medfcn.evaluate import evaluate_folders
from medfcn.inferers import use_cpu_bf16
from medfcn.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_FOLDS = REPO / "datasets" / "LeftAtrium" / "folds.json"
LEARNING_RATE = 2e-3
BATCH_SIZE = 2


def add_output_options(parser: argparse.ArgumentParser, result: str, folders: str = "run folders") -> None:
    """``--work`` (the benchmark's ``folders``, default a temporary folder) and ``--out`` (its
    JSON, default ``RESULTS/result``)."""
    parser.add_argument("--work", type=Path, default=None, help=f"{folders} (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / result)


@contextlib.contextmanager
def work_folder(given: Path | None) -> Iterator[Path]:
    """``given`` (``--work``), or a temporary folder removed afterwards."""
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def report_rows(rows: list[dict], columns: dict[str, str], out: Path, device: torch.device, **facts) -> dict:
    """Print ``rows`` as a table (``columns``: key -> header) and write ``{date, machine, **facts,
    rows}`` to ``out``; return that result."""
    print("\n".join(table(list(columns.values()), [[str(row[key]) for key in columns] for row in rows])))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(device), **facts, "rows": rows}
    write_result(result, out)
    return result


def write_result(result: dict, out: Path) -> None:
    """Write a benchmark's ``result`` as JSON to ``out`` (atomically) and say so."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2) + "\n", out)
    print(f"wrote {out}")


def default_data() -> Path:
    """``$MEDFCN_DATA/LeftAtrium``, else ``../shared/datasets/LeftAtrium`` beside the checkout."""
    return Path(os.environ.get("MEDFCN_DATA") or REPO.parent / "shared" / "datasets") / "LeftAtrium"


def monai_preprocessing(keys: list[str], spacing_mm: float) -> list:
    """The recipe's deterministic transforms (cached): RAS, ``spacing_mm`` isotropic, z-score."""
    modes = ["bilinear", "nearest"][: len(keys)]
    return [
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=(spacing_mm,) * 3, mode=modes),
        NormalizeIntensityd(keys="image", channel_wise=True),
    ]


def monai_augmentation(patch: tuple[int, int, int]) -> list:
    """The recipe's random transforms: a ``patch`` (voxels) with the label's centre 2 times in 3,
    flips on the 3 axes, rotation (+-15 degrees) and scaling (+-10 %), intensity scale and shift."""
    keys = ["image", "label"]
    return [
        SpatialPadd(keys=keys, spatial_size=patch),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=2, neg=1, num_samples=1),
        *(RandFlipd(keys=keys, spatial_axis=axis, prob=0.5) for axis in range(3)),
        RandAffined(
            keys=keys,
            prob=0.3,
            rotate_range=(0.26, 0.26, 0.26),
            scale_range=(0.1, 0.1, 0.1),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ]


def monai_unet(num_classes: int) -> UNet:
    """The issue's network: ``UNet(3, 1, 2, channels=(32, 64, 128, 256), strides=(2, 2, 2),
    num_res_units=2, norm=INSTANCE)`` (``num_classes`` outputs, background included)."""
    return UNet(3, 1, num_classes, channels=(32, 64, 128, 256), strides=(2, 2, 2), num_res_units=2, norm=Norm.INSTANCE)


def cosine_lr(lr0: float, elapsed_s: float, budget_s: float) -> float:
    """Cosine decay over the time budget: ``lr0`` at the start, 0 when ``elapsed_s`` reaches it."""
    fraction = min(max(elapsed_s / budget_s, 0.0), 1.0)
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * fraction))


def autocast(device: torch.device):
    """bf16 autocast on a CPU that computes bf16 natively, float16 AMP on CUDA, else nothing."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_cpu_bf16(device))


def train_monai(cases: list[dict], num_classes: int, args, device: torch.device) -> tuple[UNet, dict]:
    """Train the recipe on ``cases`` until ``args.minutes`` of wall clock have passed since the
    start (caching included). Returns the network and the run's figures."""
    if not cases:
        raise UserError(f"{args.folds}: fold {args.fold} leaves no training case; choose another fold or split.")
    start = time.perf_counter()
    budget_s = args.minutes * 60
    set_determinism(seed=0)
    transforms = Compose(monai_preprocessing(["image", "label"], args.spacing) + monai_augmentation(args.patch))
    dataset = CacheDataset(cases, transforms, cache_rate=1.0, num_workers=0, progress=False)
    cache_s = time.perf_counter() - start
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=0)
    network = monai_unet(num_classes).to(device)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=LEARNING_RATE)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    steps, losses = 0, []
    network.train()
    while time.perf_counter() - start < budget_s:
        for batch in loader:
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                break
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(LEARNING_RATE, elapsed, budget_s)
            images, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                logits = network(images)
            loss = loss_function(logits.float(), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            losses.append(loss.item())
    train_s = time.perf_counter() - start
    print(f"monai: {steps} steps in {train_s / 60:.2f} min (caching {cache_s:.1f} s)", flush=True)
    return network.eval(), {
        "training_minutes": train_s / 60,
        "cache_seconds": cache_s,
        "steps": steps,
        "epochs": steps / max(len(loader), 1),
        "seconds_per_step": (train_s - cache_s) / max(steps, 1),
        "last_epoch_loss": float(np.mean(losses[-len(loader) :])) if losses else None,
    }


def predict_monai(network: UNet, cases: list[dict], out: Path, args, device: torch.device) -> list[float]:
    """Write ``out/<case>.nii.gz``, the network's labels for each case on its original grid:
    sliding window at the training spacing, softmax, Invertd (linear interpolation of the
    probabilities), argmax. Returns seconds per case (reading to written mask)."""
    preprocessing = Compose(monai_preprocessing(["image"], args.spacing))
    postprocessing = Compose(
        [
            Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    inferer = SlidingWindowInferer(roi_size=args.patch, sw_batch_size=4, overlap=0.5, mode="gaussian")
    out.mkdir(parents=True, exist_ok=False)
    seconds = []
    for case in cases:
        start = time.perf_counter()
        data = preprocessing({"image": case["image"]})
        with torch.no_grad(), autocast(device):
            logits = inferer(data["image"][None].to(device), network)
        data["pred"] = torch.softmax(logits[0].float(), dim=0).cpu()
        pred = postprocessing(data)["pred"]
        labels = np.asarray(pred[0].numpy(), dtype=np.uint8)
        affine = np.asarray(pred.affine, dtype=np.float64)  # the original grid's, after Invertd
        nib.save(nib.Nifti1Image(labels, affine), out / f"{case_id(case['image'])}.nii.gz")
        seconds.append(time.perf_counter() - start)
    return seconds


def score(mask_dir: Path, cases: list[dict], labels: list[int]) -> list[dict]:
    """Dice per case of the masks in ``mask_dir`` against the cases' labels (``medfcn evaluate``'s
    scoring): ``[{"case", "dice"}]``, ``dice`` the mean over ``labels`` scored (NaN: none)."""
    rows, _ = evaluate_folders(mask_dir, Path(cases[0]["label"]).parent, labels=labels)
    per_case = []
    for row in rows:
        values = [row[f"dice_{k}"] for k in labels if not math.isnan(row[f"dice_{k}"])]
        per_case.append({"case": row["case"], "dice": float(np.mean(values)) if values else math.nan})
    return per_case


def summary(name: str, minutes: float, figures: dict, per_case: list[dict], seconds: list[float]) -> dict:
    """One arm's entry of the JSON: its training figures, Dice per case, mean and min, and the
    seconds per held-out case."""
    dice = [c["dice"] for c in per_case]
    trained = figures.get("training_minutes")
    return {
        "arm": name,
        "budget_minutes": minutes,
        # the promise for a planned bundle: training ends within +-10 % of the budget
        "training_over_budget": None if trained is None else trained / minutes - 1.0,
        **figures,
        "mean_dice": float(np.nanmean(dice)),
        "min_dice": float(np.nanmin(dice)),
        "seconds_per_case": float(np.mean(seconds)),
        "cases": per_case,
    }


def run_monai(train_cases, val_cases, labels, args, device, work: Path) -> dict:
    """Arm (a): train the pasted recipe for the budget, then score it on ``val_cases``."""
    network, figures = train_monai(train_cases, max(labels) + 1, args, device)
    seconds = predict_monai(network, val_cases, work / "masks_monai", args, device)
    figures |= {"spacing_mm": args.spacing, "patch": list(args.patch)}
    return summary("monai", args.minutes, figures, score(work / "masks_monai", val_cases, labels), seconds)


def medfcn_bundle(args, work: Path) -> tuple[Path, float | None]:
    """The bundle medfcn trains: ``--medfcn-bundle``, else one ``plan_bundle`` makes for the
    budget on this device. Returns it and the planning seconds (None: given)."""
    if args.medfcn_bundle:
        return Path(args.medfcn_bundle), None
    from medfcn.planning import plan_bundle  # lazily: the planner is newer than this script

    start = time.perf_counter()
    out = work / "medfcn_bundle"
    made = plan_bundle(args.data, out, budget_minutes=args.minutes, device=args.device, progress=print)
    return Path(made) if made else out, time.perf_counter() - start


def medfcn_overrides(args) -> dict:
    """The medfcn arm's config overrides: ``--set`` entries, ``--max-cases``, and with
    ``--fit-budget`` up to the planner's most epochs with ``--minutes`` as the budget, so the
    BudgetKeeper ends a variant of the bundle (another width, voxel size...) within the budget
    at its own speed."""
    from medfcn.settings import parse_value

    overrides: dict = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        overrides[key] = parse_value(key, value)
    if args.max_cases:
        overrides["max_cases"] = args.max_cases
    if args.fit_budget:
        from medfcn.planning.rules import MAX_EPOCHS

        overrides.update(epochs=MAX_EPOCHS, budget_minutes=args.minutes)
    return overrides


def trained_epochs(run_dir: Path) -> float:
    """Epochs the run trained, from its ``last.pt`` (the trainer's iteration / epoch length)."""
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["trainer"]
    if "epoch" in state:
        return float(state["epoch"])
    return state["iteration"] / state["epoch_length"]


def run_medfcn(val_cases, labels, args, work: Path) -> dict:
    """Arm (b): plan (or take) a bundle, ``medfcn train`` it on the fold, package the last
    epoch's weights, ``medfcn infer`` the held-out images, score the masks."""
    from medfcn.infer import infer
    from medfcn.package import package_run
    from medfcn.training import best_validation, train

    bundle, plan_s = medfcn_bundle(args, work)
    overrides = medfcn_overrides(args) or None
    start = time.perf_counter()
    run_dir = train(
        bundle,
        args.data,
        args.fold,
        folds_file=args.folds,
        output_dir=work / "medfcn_run",
        device=args.device,
        overrides=overrides,
    )
    train_s = time.perf_counter() - start
    best = best_validation(run_dir)
    packaged = package_run(run_dir, work / "medfcn_packaged", weights="last")
    rows = infer(packaged, [case["image"] for case in val_cases], work / "masks_medfcn", device=args.device)
    figures = {
        "bundle": str(bundle),
        "planned_for_budget": plan_s is not None,  # False: --medfcn-bundle, trained as it is
        "overrides": overrides or {},
        "planning_seconds": plan_s,
        "training_minutes": train_s / 60,
        "epochs": trained_epochs(run_dir),
        "best_validation_dice": None if best is None else best.mean,
        "weights": "last (moving average of the last epoch)",
    }
    plan_file = Path(bundle) / "configs" / "plan.json"  # what the planner chose, where it says
    if plan_file.is_file():
        figures["plan"] = json.loads(plan_file.read_text())
    seconds = [float(row["seconds"]) for row in rows]
    return summary("medfcn", args.minutes, figures, score(work / "masks_medfcn", val_cases, labels), seconds)


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor()
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpu_bf16": use_cpu_bf16(device),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: ``header``, the rule, then ``rows`` (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_table(arms: list[dict]) -> list[str]:
    """The printed table: one row per arm."""
    header = ["arm", "budget min", "training min", "epochs", "mean Dice", "min Dice", "s per held-out case"]
    rows = [
        [a["arm"], f"{a['budget_minutes']:g}", f"{a['training_minutes']:.1f}", f"{a['epochs']:.1f}"]
        + [f"{a['mean_dice']:.4f}", f"{a['min_dice']:.4f}", f"{a['seconds_per_case']:.2f}"]
        for a in arms
    ]
    return table(header, rows)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--folds`` and ``--fold``: the dataset and the split, as every LeftAtrium bench takes them."""
    parser.add_argument("--data", type=Path, default=default_data(), help="MSD dataset folder (default: %(default)s)")
    parser.add_argument("--folds", type=Path, default=DEFAULT_FOLDS, help="the split (default: %(default)s)")
    parser.add_argument("--fold", type=int, default=0, help="held-out fold")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per arm (wall clock)")
    parser.add_argument("--skip-monai", action="store_true", help="train medfcn only")
    parser.add_argument("--skip-medfcn", action="store_true", help="train the MONAI recipe only")
    parser.add_argument("--medfcn-bundle", type=Path, default=None, help="train this bundle instead of planning one")
    parser.add_argument("--max-cases", type=int, default=None, help="first N training and N held-out cases (smoke)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="medfcn arm: override a config entry (JSON)"
    )
    parser.add_argument(
        "--fit-budget",
        action="store_true",
        help="medfcn arm: train up to 100 epochs and let the budget keeper end the run within --minutes",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="run folders (default: results/left_atrium_runs/<time>)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "left_atrium.json", help="JSON to write")
    parser.add_argument("--device", default=None, help="cpu, cuda... (default: CUDA when present)")
    parser.add_argument("--spacing", type=float, default=1.25, help="the MONAI recipe's voxel size, mm")
    parser.add_argument("--patch", type=int, nargs=3, default=(96, 96, 64), help="the MONAI recipe's patch, voxels")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.patch = tuple(args.patch)
    if args.work is None:
        args.work = RESULTS / "left_atrium_runs" / time.strftime("%Y%m%d-%H%M%S")
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work}: not empty; choose a new folder")
    return args


def foreground_labels(data: Path) -> list[int]:
    """The dataset's foreground label values, from its ``dataset.json``."""
    names = json.loads((data / "dataset.json").read_text())["labels"]
    return sorted(int(k) for k in names if int(k) > 0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    train_cases, val_cases = fold_datalists(args.data, args.folds, args.fold, args.max_cases)
    labels = foreground_labels(args.data)
    print(f"fold {args.fold}: {len(train_cases)} training cases, {len(val_cases)} held out; work {args.work}")
    args.work.mkdir(parents=True, exist_ok=True)
    arms = []
    if not args.skip_monai:
        arms.append(run_monai(train_cases, val_cases, labels, args, device, args.work))
    if not args.skip_medfcn:
        arms.append(run_medfcn(val_cases, labels, args, args.work))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(device),
        "data": str(args.data),
        "folds": str(args.folds),
        "fold": args.fold,
        "train_cases": len(train_cases),
        "held_out_cases": len(val_cases),
        "budget_minutes": args.minutes,
        "work": str(args.work),
        "arms": arms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=1) + "\n", args.out)
    print("\n".join(markdown_table(arms)))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"left_atrium.py: {err}")
