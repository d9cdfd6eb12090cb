"""medfcn bundle vs a plain MONAI UNet baseline on one fold, same machine, same wall-clock budget.

(a) the hippocampus bundle's recipe (configs/train.json) and (b) the baseline the tutorial user
would paste: UNet(3, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2),
DiceCE, Adam 1e-3, batch 8, whole volumes padded to 48 x 64 x 48, z-score, no augmentation,
float32. Both run on MONAI's engines through the same bundle config (the baseline by overrides),
one after the other in this process, each for `--minutes` of training time (validation time is
not counted). Validation Dice per class on the fold is recorded against training minutes.

Writes bench/results/accuracy.json and accuracy.png (Dice vs minutes) and prints a table.

    python bench/accuracy.py --minutes 60 --fold 0     # the issue's budget: ~2 h in all
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import typer
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.engines import SupervisedEvaluator

from medfcn.cli import _parse_overrides
from medfcn.handlers import PerClassMetrics
from medfcn.training.handlers import ValidateEvery

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hippocampus_fcn"
RESULTS = REPO / "bench" / "results"

BASELINE = {
    "network_def": {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2],
        "num_res_units": 2,
    },
    "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "batch": True},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.001},
    "batch_size": 8,
    "lr_scheduler#power": 0.0,  # constant learning rate
    "train#augmentation": [{"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": [48, 64, 48]}],
    "patch_size": [48, 64, 48],
    "bf16": False,
    "ema_decay": None,  # plain weights, as the tutorial user trains them
}


def run(
    name: str,
    overrides: dict,
    minutes: float,
    fold: int,
    val_every: int,
    out: Path,
    epochs: int,
    dense_minutes: float = 0.0,
    dense_seconds: float = 0.0,
) -> dict:
    """Train one recipe for ``minutes`` of training time; validate every epoch during the first
    ``dense_minutes`` (so the time to a Dice level is known to one epoch), then every ``val_every``.
    With ``dense_seconds``, during ``dense_minutes`` also validate within an epoch after every
    ``dense_seconds`` of training, so the time to a level is known to that resolution."""
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / name) for name in ("common.json", "train.json")],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        fold=fold,
        epochs=epochs,
        val_interval=1 if dense_minutes > 0 else val_every,
        output_dir=str(out / name),
        **overrides,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    validation = next(h for h in workflow.parser.get_parsed_content("train#handlers") if isinstance(h, ValidateEvery))
    raw_evaluator = _raw_weights_evaluator(workflow.parser, evaluator)
    # training time only: the clock is paused during validation and between epochs
    clock = {"train": 0.0, "start": None, "last_validation": 0.0}
    curve: list[dict] = []

    def _resume(engine=None):
        clock["start"] = time.perf_counter()

    def _pause(engine=None):
        if clock["start"] is not None:
            clock["train"] += time.perf_counter() - clock["start"]
            clock["start"] = None

    trainer.add_event_handler(Events.EPOCH_STARTED, _resume)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _pause)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _validate_within_epoch(engine):
        if dense_seconds <= 0 or engine.state.iteration % engine.state.epoch_length == 0:
            return  # the epoch-end validation comes next anyway
        trained = clock["train"] + time.perf_counter() - clock["start"]
        if trained < dense_minutes * 60 and trained - clock["last_validation"] >= dense_seconds:
            _pause()
            evaluator.run(engine.state.epoch)
            _resume()

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _record(engine):
        m = engine.state.metrics
        clock["last_validation"] = clock["train"]
        curve.append(
            {
                "epoch": trainer.state.epoch,
                "iteration": trainer.state.iteration,
                "minutes": clock["train"] / 60,
                "anterior": m["val_dice_anterior"],
                "posterior": m["val_dice_posterior"],
                "mean": m["val_mean_dice"],
            }
        )
        if raw_evaluator is not None:  # the same validation of the trained (not averaged) weights
            raw_evaluator.run()
            r = raw_evaluator.state.metrics
            curve[-1].update(
                raw_anterior=r["val_dice_anterior"], raw_posterior=r["val_dice_posterior"], raw_mean=r["val_mean_dice"]
            )
        print(
            f"{name}: epoch {trainer.state.epoch} {clock['train'] / 60:.1f} min mean Dice {m['val_mean_dice']:.4f}",
            flush=True,
        )
        if clock["train"] >= dense_minutes * 60:
            validation.interval = val_every
        if clock["train"] >= minutes * 60:
            trainer.terminate()

    # _pause must run before validation: move it to the front of EPOCH_COMPLETED handlers
    handlers = trainer._event_handlers[Events.EPOCH_COMPLETED]
    handlers.insert(0, handlers.pop())
    n_cases = len(workflow.parser.get_parsed_content("datalists")[0])
    batch = int(workflow.parser.get_parsed_content("batch_size"))
    trainer.run()
    # a run stopped within an epoch has trained whole epochs plus that epoch's full batches
    whole, partial = divmod(trainer.state.iteration, trainer.state.epoch_length)
    return run_summary(name, curve, trainer.state.epoch, clock["train"], whole * n_cases + partial * batch)


def run_summary(name: str, curve: list[dict], epochs: int, train_seconds: float, volumes: int) -> dict:
    """One run's result as ``accuracy.json`` holds it: its validations (``curve``, training
    minutes and Dice each), the best and the last of them, and the training throughput."""
    return {
        "name": name,
        "curve": curve,
        "best": max(curve, key=lambda c: c["mean"]),
        "final": curve[-1],
        "epochs": epochs,
        "train_minutes": train_seconds / 60,
        "volumes_per_s": volumes / max(train_seconds, 1e-9),
    }


def _raw_weights_evaluator(parser, evaluator) -> SupervisedEvaluator | None:
    """With weight averaging on (``ema_decay``), the bundle validates the averaged weights; this
    evaluator validates the trained weights on the same cases, so one run shows both curves."""
    network = parser.get_parsed_content("network")
    if evaluator.network is network:
        return None
    # the bundle's own metric, a fresh instance (a metric handler serves one engine), from a
    # copy of the config: lazy=False would reset the parser and rebuild everything it holds
    key_metric = ConfigParser(parser.get()).get_parsed_content("validate#key_metric")
    return SupervisedEvaluator(
        device=parser.get_parsed_content("device"),
        val_data_loader=parser.get_parsed_content("validate#dataloader"),
        network=network,
        inferer=parser.get_parsed_content("validate#inferer"),
        postprocessing=parser.get_parsed_content("validate#postprocessing"),
        key_val_metric=key_metric,
        val_handlers=[PerClassMetrics(next(iter(key_metric)), parser.get_parsed_content("class_names"))],
        amp=evaluator.amp,
    )


def first_time(curve: list[dict], level: float) -> float | None:
    """Training minutes of the first validation at or above ``level``."""
    return next((c["minutes"] for c in curve if c["mean"] >= level), None)


def settled_time(curve: list[dict], level: float) -> float | None:
    """Training minutes from which every later validation of the run stays at or above ``level``
    (early validation Dice swings by a few hundredths, so a first crossing can be a lucky one)."""
    below = [i for i, c in enumerate(curve) if c["mean"] < level]
    start = below[-1] + 1 if below else 0
    return curve[start]["minutes"] if start < len(curve) else None


def markdown_table(runs: list[dict]) -> list[str]:
    """The printed table: one row per run (``run()``'s results) and, with two runs, a row comparing
    the first with the second (medfcn with the baseline): Dice differences, and the ratios of the
    minutes to mean Dice 0.84 and 0.85 and of the throughput."""

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    rows = [
        "| model | epochs | train min | best mean (ant/post) | final mean (ant/post) | min to 0.84 | min to 0.85 "
        "| vol/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        b, f = r["best"], r["final"]
        rows.append(
            f"| {r['name']} | {r['epochs']} | {r['train_minutes']:.1f} | {b['mean']:.4f} "
            f"({b['anterior']:.4f}/{b['posterior']:.4f}) | {f['mean']:.4f} ({f['anterior']:.4f}/{f['posterior']:.4f}) "
            f"| {fmt(first_time(r['curve'], 0.84))} | {fmt(first_time(r['curve'], 0.85))} | {r['volumes_per_s']:.1f} |"
        )
    if len(runs) == 2:
        a, b = runs

        def ratio(x: float | None, y: float | None) -> str:
            return "-" if x is None or y is None else f"{x / y:.2f}"

        times = [ratio(first_time(a["curve"], lv), first_time(b["curve"], lv)) for lv in (0.84, 0.85)]
        rows.append(
            f"| {a['name']} vs {b['name']} (Dice: difference; times: ratio) | | "
            f"| {a['best']['mean'] - b['best']['mean']:+.4f} "
            f"| {a['final']['mean'] - b['final']['mean']:+.4f} | {times[0]} | {times[1]} "
            f"| {a['volumes_per_s'] / b['volumes_per_s']:.2f} |"
        )
    return rows


def plot_curves(runs: list[dict], fold: int, path: Path) -> None:
    """Write ``path``: each run's mean validation Dice (y) against its training minutes (x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot([c["minutes"] for c in r["curve"]], [c["mean"] for c in r["curve"]], marker=".", label=r["name"])
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel(f"mean validation Dice, fold {fold}")
    ax.set_ylim(0.5, 0.95)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training minutes per model")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--val-every", type=int, default=2, help="validate every N epochs")
    parser.add_argument(
        "--dense-minutes", type=float, default=5.0, help="validate every epoch during the first N training minutes"
    )
    parser.add_argument(
        "--seconds-per-epoch",
        type=float,
        default=25.0,
        help="medfcn's measured epoch time: its LR schedule is fitted to the budget with it",
    )
    parser.add_argument(
        "--dense-seconds",
        type=float,
        default=0.0,
        help="during --dense-minutes, also validate every N training seconds (within epochs)",
    )
    parser.add_argument(
        "--schedule-minutes",
        type=float,
        default=None,
        help="fit medfcn's LR schedule to this budget instead of --minutes (measure a long recipe's start)",
    )
    parser.add_argument("--tag", default="", help="suffix of the result files: accuracy<tag>.json/.png")
    parser.add_argument(
        "--medfcn-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train.json entry of the medfcn run, as `medfcn train --set` (JSON value; a "
        "longer one from a file by MONAI's macro, e.g. "
        "'train#augmentation=%%bench/recipes/nnunet_augmentation.json#augmentation'); repeatable",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="train the medfcn recipe only")
    args = parser.parse_args()
    try:
        overrides = _parse_overrides(args.medfcn_set, option="--medfcn-set")
    except typer.BadParameter as err:
        parser.error(str(err))  # one line, exit 2, as argparse reports its own errors
    RESULTS.mkdir(parents=True, exist_ok=True)
    medfcn_epochs = max(2, round((args.schedule_minutes or args.minutes) * 60 / args.seconds_per_epoch))
    out = RESULTS / f"runs{args.tag}"
    dense = (args.dense_minutes, args.dense_seconds)
    runs = [run("medfcn", overrides, args.minutes, args.fold, args.val_every, out, medfcn_epochs, *dense)]
    if not args.skip_baseline:
        runs.append(run("baseline_unet", BASELINE, args.minutes, args.fold, args.val_every, out, 100_000, *dense))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": torch.get_num_threads(),
        "fold": args.fold,
        "minutes_per_model": args.minutes,
        "medfcn_overrides": overrides,
        "runs": runs,
    }
    for level in (0.84, 0.85, 0.88):
        result[f"minutes_to_{level}"] = {r["name"]: first_time(r["curve"], level) for r in runs}
        result[f"minutes_settled_{level}"] = {r["name"]: settled_time(r["curve"], level) for r in runs}
    (RESULTS / f"accuracy{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")

    plot_curves(runs, args.fold, RESULTS / f"accuracy{args.tag}.png")

    print("\n".join(markdown_table(runs)))


if __name__ == "__main__":
    main()
