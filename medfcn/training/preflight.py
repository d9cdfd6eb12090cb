"""The second stage of a run: checks that make mistakes fail in one line before any data is
loaded into the run or any file written.

The data and its split (one made for the run where the bundle's does not fit the data:
:mod:`medfcn.training.split`), the class list and intensity normalisation, the network (built once:
the instance checked is the one the run trains), a dry run of one patch, the checkpoint a
resume continues (read once: the run's ``Resume`` handler is handed its contents) and a
pretrained encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medfcn import distributed
from medfcn.data.checks import check_training_pairs
from medfcn.data.datasets import fold_datalists, split_datalists
from medfcn.data.placement import data_on_device_conflict
from medfcn.data.transforms import intensity_normalization
from medfcn.errors import UserError, root_message
from medfcn.io import checkpoint_reason, load_state
from medfcn.outputs import plural
from medfcn.settings import stating_file
from medfcn.training.handlers import OPTIONAL_CHECKPOINT_OBJECTS
from medfcn.training.settings import RunSettings
from medfcn.training.split import AutomaticSplit, automatic_split, refuse_changed_cases

__all__ = ["Preflight", "preflight"]


@dataclass
class Preflight:
    """What the checks found, for the run.

    Attributes:
        train_cases: the training cases of the fold (``{"image", "label"}`` paths).
        checkpoint: the contents of ``last.pt`` for a resume (read on the CPU), else None.
        split: the split made for the run, to write into its folder (the run's ``folds_file``
            names it already), else None.
    """

    train_cases: list[dict]
    checkpoint: dict | None
    split: AutomaticSplit | None = None


def preflight(run: RunSettings) -> Preflight:
    """Check the run's inputs in the order a user fixes them (data, split, config, network,
    checkpoint); the network built is the config's ``network_def`` the run then trains.

    Raises:
        UserError: naming the file or option and what to do.
    """
    split = _split(run)
    train_cases, val_cases = _fold_cases(run, split)
    _check_validation_shares(run, val_cases)
    _check_classes(run)
    _check_cache_dir(run)
    _check_data_on_device(run)
    network = _build_network(run)
    check_training_pairs(train_cases + val_cases, int(run.get("num_classes")), int(run.get("network_def#in_channels")))
    checkpoint = _read_resume_checkpoint(run) if run.resume else _refuse_existing_run(run)
    check_dry_run(network, run)
    if checkpoint is not None:  # a run of another network_def must fail here, in one line, not deep in MONAI's loader
        _check_resumable(run, checkpoint, network)
    elif run.get("pretrained_encoder"):
        _check_encoder(network, run.get("pretrained_encoder"))
    return Preflight(train_cases, checkpoint, split)


def _split(run: RunSettings) -> AutomaticSplit | None:
    """The split to make for the run (:func:`~medfcn.training.split.automatic_split`), whose
    future file becomes the run's ``folds_file`` now, before the network is built (a change of
    the parser afterwards would drop it); the file is written once the checks have passed."""
    data = run.get("dataset_dir")
    if not (Path(data) / "dataset.json").is_file():
        raise UserError(
            f"{data}: no dataset.json here; pass {run.option('dataset_dir')} with the MSD dataset folder "
            "or set MEDFCN_DATA."
        )
    split = automatic_split(run)
    if split is not None:
        run.parser.update({"folds_file": str(split.path)})
    elif run.resume:
        refuse_changed_cases(run)
    return split


def _fold_cases(run: RunSettings, made: AutomaticSplit | None) -> tuple[list[dict], list[dict]]:
    """The training and validation cases of the run's fold, from its dataset and split (``made``
    for the run, else its ``folds_file``)."""
    data, split, fold = run.get("dataset_dir"), run.get("folds_file"), run.get("fold")
    new_split = f"make one with `medfcn folds {data} --out FILE` and pass {run.option('folds_file')} FILE"
    if made is None and not Path(split).is_file():
        raise UserError(f"{split}: fold split not found; {new_split}.")
    try:
        if made is not None:
            return split_datalists(data, made.record["folds"], _made_fold(run, made), where=str(made.path))
        return fold_datalists(data, split, int(fold))
    except FileNotFoundError as err:
        raise UserError(str(err)) from err
    except ValueError as err:
        hint = f" The split is for another dataset: {new_split}." if "names cases not in" in str(err) else ""
        raise UserError(f"{err}{hint}") from err


def _made_fold(run: RunSettings, made: AutomaticSplit) -> int:
    """The run's fold, checked against the split made for it (whose file is not written yet).

    Raises:
        UserError: a fold the split does not have, naming the split and its folds.
    """
    fold, n_folds = int(run.get("fold")), len(made.record["folds"])
    if not -1 <= fold < n_folds:
        raise UserError(
            f"{run.option('fold')} {fold}: the automatic {n_folds}-fold split of {run.get('dataset_dir')} has folds "
            f"0..{n_folds - 1}; choose one of them, or -1 to train on all cases."
        )
    return fold


def _check_validation_shares(run: RunSettings, val_cases: list[dict]) -> None:
    """Each process of a distributed run validates its share of the fold's validation cases (their
    Dice gathered, equal to one process's): every process needs one."""
    processes = distributed.world_size()
    max_cases = run.parser.get_parsed_content("max_cases", default=None)
    n_val = min(len(val_cases), max_cases) if max_cases else len(val_cases)
    if n_val < processes:
        raise UserError(
            f"fold {run.get('fold')} of {run.get('folds_file') or run.get('dataset_dir')}: "
            f"{plural(n_val, 'validation case')} for {processes} processes, which validate a share each; "
            f"train in at most {n_val} processes, or with a split of more cases per fold."
        )


def _check_classes(run: RunSettings) -> None:
    """``class_names`` names every foreground label, and the intensity normalisation exists."""
    num_classes, names = run.get("num_classes"), run.get("class_names")
    if len(names) != int(num_classes) - 1:
        raise UserError(
            f"{_stating(run, 'num_classes')}: num_classes {num_classes} (background + {int(num_classes) - 1}"
            f"{_given(run, 'num_classes')}) but class_names has {plural(len(names), 'name')} {list(names)}"
            f"{_given(run, 'class_names')}; set both, e.g. --set num_classes=2 --set 'class_names=[\"tumour\"]'."
        )
    window = {key: run.get(key) for key in ("hu_window", "intensity_stats") if key in run.parser}
    try:
        intensity_normalization("image", run.get("modality"), **window)
    except (ValueError, TypeError) as err:
        raise UserError(f"{_stating(run, 'modality')}: {err}") from err


def _check_cache_dir(run: RunSettings) -> None:
    """A disk cache needs a folder (made when missing): a file there would fail in MONAI mid-run."""
    if "cache" not in run.parser or run.get("cache") != "disk":
        return
    folder = Path(run.get("cache_dir"))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{run.option('cache_dir')} {folder}: is a file, not a folder; give the disk cache a folder.")


def _check_data_on_device(run: RunSettings) -> None:
    """``data_on_device`` true needs the ``ram`` cache and no worker processes
    (:mod:`medfcn.data.placement`)."""
    if "data_on_device" not in run.parser or run.get("data_on_device") is not True:
        return
    conflict = data_on_device_conflict(run.get("cache"), int(run.get("num_workers")))
    if conflict:
        raise UserError(
            f"{run.option('data_on_device')} true: {conflict}; "
            f"give {run.option('data_on_device')} false or auto, or change that setting."
        )


def _given(run: RunSettings, key: str) -> str:
    """``", from --set num_classes"`` where the run's value of ``key`` was given (or taken from
    the dataset.json), not the bundle's: the file the message names does not hold it."""
    recorded = getattr(run, "recorded", None) or {}
    return f", from {run.option(key)} or the dataset.json" if key in recorded else ""


def _stating(run: RunSettings, key: str) -> Path:
    """The config file that states ``key`` (``common.json`` for the model's entries), named in
    messages about it."""
    # a caller's stand-in for the run (check_dry_run is public) may name the training config only
    return stating_file(getattr(run, "config_files", None) or [run.config_file], key)


def _build_network(run: RunSettings) -> torch.nn.Module:
    """Build ``network_def`` once, so that an impossible network (e.g. ``deep_supervision``
    larger than ``features`` allows after an override) fails in one line before any data is
    loaded. The parser keeps the instance: the run trains this very network.

    The config's ``initialize`` expressions (the seeding) run first, as they run before the
    network is built in ``python -m monai.bundle run``, so the run starts from the weights a
    run of MONAI's runner draws."""
    run.get("initialize")
    try:
        return run.get("network_def")
    except Exception as err:
        raise UserError(
            f"{_stating(run, 'network_def')}: network_def cannot be built ({root_message(err)}); "
            "fix the --set overrides or the config."
        ) from err


def check_dry_run(network: torch.nn.Module, run: RunSettings) -> None:
    """One forward pass of a zero patch ``(1, in_channels, *patch_size)`` in training mode, so
    that a patch the network cannot take (too small for its poolings, or of another
    dimensionality) fails in one line before any data is loaded.

    The network is the run's own: its parameters, buffers (a BatchNorm's running statistics),
    mode and the random state (dropout) are as they were before the pass."""
    patch = [int(s) for s in run.get("patch_size")]
    channels = int(run.get("network_def#in_channels"))
    buffers = {name: b.clone() for name, b in network.named_buffers()}
    was_training = network.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            network.train()(torch.zeros(1, channels, *patch))
    except Exception as err:
        raise UserError(
            f"{_stating(run, 'patch_size')}: the network cannot train on patch_size {patch} ({root_message(err)}); "
            "give one size per spatial axis of the network, each large enough for its poolings "
            "(halved per scale on each axis its strides pool)."
        ) from err
    finally:
        with torch.no_grad():
            for name, buffer in network.named_buffers():
                buffer.copy_(buffers[name])
        network.train(was_training)


def _refuse_existing_run(run: RunSettings) -> None:
    """A new run must not overwrite another one's checkpoints."""
    out = run.get("output_dir")
    if (Path(out) / "last.pt").exists():
        raise UserError(f"{out}: already holds a run (last.pt); add --resume to continue it, or pick another --output.")


def _read_resume_checkpoint(run: RunSettings) -> dict:
    """The ``last.pt`` a resume continues, read once (on the CPU), with epochs left to train."""
    last = Path(run.get("output_dir")) / "last.pt"
    if not last.is_file():
        raise UserError(f"{last}: no checkpoint to resume from; train without --resume first.")
    try:
        saved = torch.load(last, map_location="cpu", weights_only=True)
        state = saved["trainer"]
    except (KeyError, TypeError) as err:
        raise UserError(f"{last}: no 'trainer' entry; not a medfcn training checkpoint.") from err
    except Exception as err:
        raise UserError(f"{last}: not a readable medfcn training checkpoint ({checkpoint_reason(err)}).") from err
    done = int(state["iteration"]) // max(int(state["epoch_length"]), 1)
    if done >= int(run.get("epochs")):
        raise UserError(
            f"{last}: run has finished {plural(done, 'epoch')} already; pass {run.option('epochs')} larger than {done}."
        )
    _refuse_ended_by_budget(run, last, done, saved.get("budget"))
    return saved


def _refuse_ended_by_budget(run: RunSettings, last: Path, done: int, kept: dict | None) -> None:
    """A run its time budget ended early has finished too: ``done`` epochs reached the last
    epoch that :class:`~medfcn.training.handlers.BudgetKeeper` set (``kept``, its record in
    ``last.pt``) for the run's planned epochs."""
    budget = run.get("budget_minutes") if "budget_minutes" in run.parser else None
    if budget is None or not isinstance(kept, dict) or kept.get("planned") != int(run.get("epochs")):
        return
    ended = kept.get("last_epoch")
    if ended is not None and ended <= done:
        raise UserError(
            f"{last}: run has finished {plural(done, 'epoch')} already, the last that fit its {budget:g}-min budget; "
            f"pass {run.option('epochs')} {run.get('epochs')} to train all the planned epochs without the budget."
        )


def _check_resumable(run: RunSettings, saved: dict, network: torch.nn.Module) -> None:
    """``saved`` (``last.pt``) must fit the network, hold every checkpoint object of the config
    (a run of an older recipe, e.g. one without ``weight_average``, does not), and its weight
    average must match the config's ``ema_decay`` (on or off), or the resumed run would fail or
    drop the average. The network takes last.pt's weights, as the run's ``Resume`` would."""
    last = Path(run.get("output_dir")) / "last.pt"
    load_state(network, saved, last, key="network")
    objects = run.parser.get("checkpoint_objects", {})
    missing = [key for key in objects if key not in saved and key not in OPTIONAL_CHECKPOINT_OBJECTS]
    if missing:
        raise UserError(
            f"{last}: has no {', '.join(missing)} (written by another recipe or medfcn version); "
            "start a new run with another --output."
        )
    if "weight_average" in saved and "ema_decay" in run.parser:
        averaging = bool(run.get("ema_decay"))
        if bool(saved["weight_average"]) != averaging:
            fix = "add --set ema_decay=null" if not saved["weight_average"] else "drop --set ema_decay=null"
            state = "off" if not saved["weight_average"] else "on"
            raise UserError(f"{last}: written with weight averaging {state}; {fix} to resume it.")


def _check_encoder(network: torch.nn.Module, path: str) -> None:
    """A ``pretrained_encoder`` must exist and fit ``network``'s encoder (one clear line if not);
    the run's ``network`` entry loads the same weights again."""
    if not Path(path).is_file():
        raise UserError(f"{path}: encoder checkpoint not found; pass a best_model.pt or last.pt of an FCN run.")
    try:
        network.load_encoder(str(path))
    except Exception as err:
        raise UserError(
            f"{path}: does not fit this bundle's encoder ({checkpoint_reason(err)}); "
            "use a checkpoint of an FCN with the same features and in_channels."
        ) from err
