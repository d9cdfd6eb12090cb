"""Run a bundle's training config (``configs/train.json``), checking the inputs first.

The bundle config holds every hyperparameter; this module only resolves paths, validates
them so that mistakes surface as one clear message before any work starts, and runs MONAI's
``ConfigWorkflow`` exactly as ``python -m monai.bundle run`` would.

Example::

    from medfcn.train import train
    out = train("bundles/hippocampus_fcn", fold=0, epochs=5, output_dir="runs/try")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from medfcn.data.checks import check_training_pairs
from medfcn.data.datasets import fold_datalists
from medfcn.errors import UserError, root_message
from medfcn.io import load_weights, writable_dir

__all__ = ["bundle_files", "train"]


def bundle_files(bundle: str | os.PathLike, config: str) -> dict[str, Path]:
    """Paths of a bundle's ``config`` (e.g. ``train.json``), metadata and logging config.

    Raises:
        UserError: the folder or the config is missing.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise UserError(f"{root}: bundle folder not found; pass a folder with configs/{config}.")
    files = {
        "bundle_root": root,
        "config_file": root / "configs" / config,
        "meta_file": root / "configs" / "metadata.json",
        "logging_file": root / "configs" / "logging.conf",
    }
    for key in ("config_file", "meta_file"):
        if not files[key].is_file():
            raise UserError(f"{files[key]}: missing; {root} is not a complete MONAI bundle.")
    return files


def _parser(config_file: Path, overrides: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update(overrides)
    return parser


def _read_checkpoint(checkpoint: Path) -> tuple[dict, int]:
    """A ``last.pt``, read once for the resume checks, and the epochs its run completed."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = saved["trainer"]
    except Exception as err:
        raise UserError(f"{checkpoint}: not a readable medfcn training checkpoint ({err}).") from err
    return saved, int(state["iteration"]) // max(int(state["epoch_length"]), 1)


def _check_resumable(checkpoint: Path, saved: dict, parser: ConfigParser) -> None:
    """``saved`` (the contents of ``checkpoint``) must hold every checkpoint object of the
    config (a run of an older recipe, e.g. one without ``weight_average``, does not), and its
    weight average must match the config's ``ema_decay`` (on or off), or the resumed run would
    fail or drop the average."""
    missing = [key for key in parser.get("checkpoint_objects", {}) if key not in saved]
    if missing:
        raise UserError(
            f"{checkpoint}: has no {', '.join(missing)} (written by another recipe or medfcn version); "
            "start a new run with another --output."
        )
    if "weight_average" in saved and "ema_decay" in parser:
        averaging = bool(parser.get_parsed_content("ema_decay"))
        if bool(saved["weight_average"]) != averaging:
            fix = "add --set ema_decay=null" if not saved["weight_average"] else "drop --set ema_decay=null"
            state = "off" if not saved["weight_average"] else "on"
            raise UserError(f"{checkpoint}: written with weight averaging {state}; {fix} to resume it.")


def _network(parser: ConfigParser, config_file: Path) -> torch.nn.Module:
    """Build ``network_def``, so that an impossible network (e.g. ``deep_supervision`` larger
    than ``features`` allows after an override) fails in one line before any data is loaded."""
    try:
        return parser.get_parsed_content("network_def")
    except Exception as err:
        raise UserError(
            f"{config_file}: network_def cannot be built ({root_message(err)}); fix the --set overrides or the config."
        ) from err


def _check_encoder(network: torch.nn.Module, path: str | None) -> None:
    """A ``pretrained_encoder`` must exist and fit ``network``'s encoder (one clear line if not)."""
    if not path:
        return
    if not Path(path).is_file():
        raise UserError(f"{path}: encoder checkpoint not found; pass a best_model.pt or last.pt of an FCN run.")
    try:
        network.load_encoder(str(path))
    except Exception as err:
        raise UserError(
            f"{path}: does not fit this bundle's encoder ({root_message(err)}); "
            "use a checkpoint of an FCN with the same features and in_channels."
        ) from err


def train(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    fold: int | None = None,
    epochs: int | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Train with ``bundle/configs/train.json``; return the run's output folder.

    Args:
        bundle: the bundle folder.
        dataset_dir: folder with the MSD ``dataset.json``; default: the config's
            (``$MEDFCN_DATA/Task04_Hippocampus`` for the hippocampus bundle).
        fold: validation fold of the bundle's split (``-1``: train on all cases).
        epochs: number of epochs (total, counting epochs done before a resume).
        output_dir: where checkpoints (``last.pt``, ``best_model.pt``) and TensorBoard
            events go; default: the config's.
        resume: continue from ``output_dir/last.pt``: weights, optimizer, scheduler, epoch.
        overrides: more config entries to override, e.g. ``{"batch_size": 4}``; transfer
            learning: ``{"pretrained_encoder": "runs/a/best_model.pt", "freeze_encoder": True}``.

    Raises:
        UserError: missing data, unknown fold, nothing to resume, or an output folder that
            already holds a run (resume it or choose another folder).
    """
    files = bundle_files(bundle, "train.json")
    args: dict[str, Any] = {"bundle_root": str(files["bundle_root"])}
    for key, value in (("dataset_dir", dataset_dir), ("fold", fold), ("epochs", epochs), ("output_dir", output_dir)):
        if value is not None:
            args[key] = str(value) if isinstance(value, os.PathLike) else value
    args.update(overrides or {})
    args["resume"] = bool(resume)

    parser = _parser(files["config_file"], args)  # one parser for every check before the run
    data, folds_file, fold_k, out, n_epochs, num_classes, encoder = (
        parser.get_parsed_content(i)
        for i in ("dataset_dir", "folds_file", "fold", "output_dir", "epochs", "num_classes", "pretrained_encoder")
    )
    if not (Path(data) / "dataset.json").is_file():
        raise UserError(f"{data}: no dataset.json here; pass --data with the MSD dataset folder or set MEDFCN_DATA.")
    try:
        train_list, val_list = fold_datalists(data, folds_file, int(fold_k))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    check_training_pairs(train_list + val_list, int(num_classes))
    last = Path(out) / "last.pt"
    if resume:
        if not last.is_file():
            raise UserError(f"{last}: no checkpoint to resume from; train without --resume first.")
        saved, done = _read_checkpoint(last)
        if done >= int(n_epochs):
            raise UserError(f"{last}: run has finished {done} epochs already; pass --epochs larger than {done}.")
    elif last.exists():
        raise UserError(f"{out}: already holds a run (last.pt); add --resume to continue it, or pick another --output.")
    if int(n_epochs) < 1:
        raise UserError(f"epochs must be at least 1, got {n_epochs}.")
    network = _network(parser, files["config_file"])
    if resume or encoder:
        _check_encoder(network, encoder)
        if resume:  # a run of another network_def must fail here, in one line, not deep in MONAI's loader
            load_weights(network, last, key="network")
            _check_resumable(last, saved, parser)
    writable_dir(out, fix="choose another --output")

    logging_file = files["logging_file"] if files["logging_file"].is_file() else None
    workflow = ConfigWorkflow(
        config_file=str(files["config_file"]),
        meta_file=str(files["meta_file"]),
        logging_file=str(logging_file) if logging_file else None,
        workflow_type="train",
        **args,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return Path(out)
