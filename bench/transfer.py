"""Transfer learning with few labels, measured: LeftAtrium with 8 labelled training cases.

Three arms train the same network on the same 8 cases for the same number of epochs (the same
updates and samples), then segment the held-out cases of the fold:

- ``scratch``: random initialisation;
- ``frozen``: the encoder taken from a model trained on other data (default: the shipped
  hippocampus model, ``bundles/hippocampus_fcn``) and kept fixed; only the decoder trains;
- ``fine-tuned``: the same encoder as a starting point, trained with the rest.

How shapes are matched: an FCN encoder's weights depend only on ``in_channels``, ``features``
and ``encoder_blocks`` (max pooling has no weights), so the LeftAtrium network takes the source
model's features and blocks, and keeps the LeftAtrium plan's own voxel size, patch and pooling per
axis (its first ``len(features) - 1`` poolings). Both models read one z-scored MRI channel.

The bundle is ``medfcn plan``'s for LeftAtrium (``--bundle DIR`` to give one), with the network
and epochs changed as above; the 8 cases are drawn from the fold's training cases with a seeded
generator. Each arm is packaged with its last epoch's weights (moving average), ``medfcn infer``
segments the held-out cases at their original resolution, and ``medfcn evaluate``'s scoring gives
Dice per case. Prints a table; writes JSON (``--out``) and the runs under ``--work``.

    python bench/transfer.py --labelled 8 --epochs 100     # ~25 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from left_atrium import (
    RESULTS,
    add_data_arguments,
    foreground_labels,
    machine,
    score,
    summary,
    table,
    trained_epochs,
)

from medfcn.data.datasets import case_id, fold_datalists
from medfcn.errors import UserError
from medfcn.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "bundles" / "hippocampus_fcn"
# arm -> (encoder taken from --source, encoder frozen)
ARMS = {
    "scratch": (False, False),
    "frozen": (True, True),
    "fine-tuned": (True, False),
}


def labelled_subset(train_cases: list[dict], count: int, seed: int) -> list[dict]:
    """``count`` of the fold's training cases, drawn with ``random.Random(seed)`` from the cases
    sorted by id (the same ones on every machine)."""
    if not 1 <= count <= len(train_cases):
        raise UserError(f"--labelled {count}: choose 1..{len(train_cases)}, the fold's training cases.")
    ordered = sorted(train_cases, key=lambda c: case_id(c["image"]))
    return sorted(random.Random(seed).sample(ordered, count), key=lambda c: case_id(c["image"]))


def few_label_dataset(data: Path, cases: list[dict], out: Path) -> Path:
    """An MSD folder at ``out`` holding only ``cases`` (symbolic links to ``data``'s files), with
    ``data``'s ``dataset.json`` cut to them: training takes every case of the dataset that its
    validation fold does not name, so the unlabelled 56 must not be in the folder at all."""
    meta = json.loads((data / "dataset.json").read_text())
    entries = []
    for case in cases:
        entry = {}
        for key in ("image", "label"):
            source = Path(case[key])
            link = out / source.parent.name / source.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.resolve())
            entry[key] = f"./{source.parent.name}/{source.name}"
        entries.append(entry)
    meta |= {"training": entries, "numTraining": len(entries), "test": [], "numTest": 0}
    atomic_write_text(json.dumps(meta, indent=1) + "\n", out / "dataset.json")
    return out


def source_network(source: Path) -> dict:
    """The source bundle's ``network_def`` (features, blocks, deep supervision)."""
    return json.loads((source / "configs" / "common.json").read_text())["network_def"]


def transfer_bundle(planned: Path, source: Path, epochs: int, val_interval: int, out: Path) -> Path:
    """A copy of ``planned`` whose network has ``source``'s features and blocks (so the source's
    encoder loads) and the plan's pooling for that many scales; ``epochs`` and ``val_interval``
    set. The plan's own README and plan records stay, for what the data settings are and why."""
    shutil.copytree(planned, out)
    config = out / "configs" / "common.json"
    common = json.loads(config.read_text())
    planned_net, src = common["network_def"], source_network(source)
    if (src.get("spatial_dims"), src.get("in_channels")) != (planned_net["spatial_dims"], planned_net["in_channels"]):
        dims = planned_net["spatial_dims"]
        raise UserError(f"--source {source}: its network is not {dims}D with the plan's input channels.")
    scales = len(src["features"])
    strides = list(planned_net.get("strides") or [2] * (len(planned_net["features"]) - 1))
    if len(strides) < scales - 1:
        raise UserError(f"--bundle {planned}: pools {len(strides)} times; the source's encoder needs {scales - 1}.")
    # the source's whole network_def (features, blocks, norm, fusion: what its encoder's weights
    # depend on), with the plan's classes and pooling per axis
    network = {k: v for k, v in src.items() if k not in ("strides", "out_channels", "deep_supervision")}
    network |= {"out_channels": planned_net["out_channels"], "strides": strides[: scales - 1]}
    network["deep_supervision"] = min(int(src.get("deep_supervision", 0)), scales - 2)
    # fixed epochs, no time budget: the plan's budget_minutes would make the epoch lines compare
    common |= {"network_def": network, "epochs": epochs, "val_interval": val_interval, "budget_minutes": None}
    config.write_text(json.dumps(common, indent=4) + "\n")
    return out


def planned_bundle(args, work: Path) -> Path:
    """``--bundle``, else ``medfcn plan``'s bundle for LeftAtrium (budget ``--plan-minutes``;
    only its data settings and pooling are used)."""
    if args.bundle:
        return args.bundle
    from medfcn.planning import plan_bundle

    out = work / "planned"
    return Path(
        plan_bundle(args.data, out, budget_minutes=args.plan_minutes, device=args.device, progress=print) or out
    )


def run_arm(name: str, bundle: Path, data: Path, split: Path, val_cases: list[dict], args, work: Path) -> dict:
    """Train one arm, package its last weights, segment and score the held-out cases."""
    from medfcn.infer import infer
    from medfcn.package import package_run
    from medfcn.training import best_validation, train

    transferred, frozen = ARMS[name]
    overrides = {"pretrained_encoder": str(args.source / "models" / "model.pt")} if transferred else {}
    overrides |= {"freeze_encoder": True} if frozen else {}
    start = time.perf_counter()
    run_dir = train(
        bundle, data, 0, folds_file=split, output_dir=work / f"run_{name}", device=args.device, overrides=overrides
    )
    minutes = (time.perf_counter() - start) / 60
    best = best_validation(run_dir)
    packaged = package_run(run_dir, work / f"packaged_{name}", weights="last")
    rows = infer(packaged, [c["image"] for c in val_cases], work / f"masks_{name}", device=args.device)
    parameters = parameter_counts(run_dir, frozen=frozen)
    figures = {
        "encoder": f"{args.source.name} ({'frozen' if frozen else 'trained'})" if transferred else "random",
        "training_minutes": minutes,
        "epochs": trained_epochs(run_dir),
        "best_validation_dice": None if best is None else best.mean,
        "parameters": parameters,
    }
    per_case = score(work / f"masks_{name}", val_cases, foreground_labels(args.data))
    entry = summary(name, minutes, figures, per_case, [float(r["seconds"]) for r in rows])
    for key in ("budget_minutes", "training_over_budget"):  # the arms share epochs, not a time budget
        entry.pop(key)
    return entry


def parameter_counts(run_dir: Path, frozen: bool) -> dict:
    """Parameters of the run's network (from its ``last.pt``): encoder, all, and trained (all
    but the encoder's when it is frozen)."""
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["network"]
    encoder = sum(v.numel() for k, v in state.items() if k.startswith("encoder."))
    total = sum(v.numel() for v in state.values())
    return {"encoder": encoder, "total": total, "trained": total - encoder if frozen else total}


def markdown_table(arms: list[dict], labelled: int) -> list[str]:
    header = [f"arm ({labelled} labelled cases)", "encoder", "epochs", "training min", "mean Dice", "min Dice"]
    rows = [
        [a["arm"], a["encoder"], f"{a['epochs']:.0f}", f"{a['training_minutes']:.1f}"]
        + [f"{a['mean_dice']:.4f}", f"{a['min_dice']:.4f}"]
        for a in arms
    ]
    return table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--labelled", type=int, default=8, help="labelled training cases")
    parser.add_argument("--seed", type=int, default=0, help="which training cases are labelled")
    parser.add_argument("--epochs", type=int, default=100, help="epochs per arm (the same for each)")
    parser.add_argument("--val-interval", type=int, default=10, help="validate every N epochs")
    parser.add_argument("--source", type=Path, default=SOURCE, help="bundle whose encoder is transferred")
    parser.add_argument("--bundle", type=Path, default=None, help="LeftAtrium bundle (default: plan one)")
    parser.add_argument("--plan-minutes", type=float, default=20.0, help="budget of the plan (data settings only)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms to run")
    parser.add_argument("--max-held-out", type=int, default=None, help="score only the first N held-out (smoke)")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: results/transfer_runs/<time>)")
    parser.add_argument("--out", type=Path, default=RESULTS / "transfer.json", help="JSON to write")
    parser.add_argument("--device", default=None, help="cpu, cuda... (default: CUDA when present)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.work = args.work or RESULTS / "transfer_runs" / time.strftime("%Y%m%d-%H%M%S")
    if args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work}: not empty; choose a new folder")
    if not (args.source / "models" / "model.pt").is_file():
        parser.error(f"--source {args.source}: no models/model.pt; give a trained bundle")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    train_cases, val_cases = fold_datalists(args.data, args.folds, args.fold)
    val_cases = val_cases[: args.max_held_out] if args.max_held_out else val_cases
    labelled = labelled_subset(train_cases, args.labelled, args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    data = few_label_dataset(args.data, labelled + val_cases, args.work / "data")
    split = args.work / "split.json"
    folds = [[case_id(c["image"]) for c in val_cases], [case_id(c["image"]) for c in labelled]]
    atomic_write_text(json.dumps({"n_folds": 2, "seed": args.seed, "folds": folds}, indent=1) + "\n", split)
    print(f"fold {args.fold}: {len(labelled)} labelled training cases of {len(train_cases)}, {len(val_cases)} held out")
    bundle = transfer_bundle(
        planned_bundle(args, args.work), args.source, args.epochs, args.val_interval, args.work / "bundle"
    )
    arms = [run_arm(name, bundle, data, split, val_cases, args, args.work) for name in args.arms]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(torch.device(args.device)),
        "data": str(args.data),
        "fold": args.fold,
        "labelled_cases": folds[1],
        "held_out_cases": len(val_cases),
        "source": str(args.source),
        "network_def": json.loads((bundle / "configs" / "common.json").read_text())["network_def"],
        "epochs": args.epochs,
        "work": str(args.work),
        "arms": arms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=1) + "\n", args.out)
    print("\n".join(markdown_table(arms, args.labelled)))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (UserError, ValueError, FileNotFoundError) as err:  # bad --data, --folds, --fold: one line
        sys.exit(f"transfer.py: {err}")
