"""Run a bundle's training config (``configs/train.json``), checking the inputs first.

The bundle config holds every hyperparameter; this module only resolves paths, validates
them so that mistakes surface as one clear message before any work starts, and runs MONAI's
``ConfigWorkflow`` exactly as ``python -m monai.bundle run`` would.

Example::

    from medfcn.train import train
    out = train("bundles/hippocampus_fcn", fold=0, epochs=5, output_dir="runs/try")
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.reference_resolver import ReferenceResolver

from medfcn.bundle import NOT_SETTINGS, RUN_FILE, bundle_files, check_override_keys, read_config
from medfcn.data.checks import check_training_pairs
from medfcn.data.datasets import fold_datalists
from medfcn.data.profile import RUN_PROFILE, write_run_profile
from medfcn.data.transforms import intensity_normalization
from medfcn.devices import device_expression
from medfcn.errors import UserError, root_message
from medfcn.io import atomic_write_text, checkpoint_reason, load_weights, refuse_full_disk
from medfcn.outputs import output_lock
from medfcn.settings import check_settings

__all__ = ["train"]

# Options that name files: compared as resolved paths, so ``data/`` and ``/abs/data`` agree.
_PATH_KEYS = ("dataset_dir", "folds_file", "pretrained_encoder")
# How the CLI spells the options that are not ``--set``.
_OPTION_NAMES = {
    "dataset_dir": "--data",
    "fold": "--fold",
    "folds_file": "--folds",
    "epochs": "--epochs",
    "pretrained_encoder": "--encoder",
    "freeze_encoder": "--freeze-encoder",
}
# Settings a resume may change: they do not change what the network learns.
_RUNTIME_KEYS = ("num_workers", "val_interval")


class _DropRunEndEcho(logging.Filter):
    """Ignite logs the exception that ends a run ("Engine run is terminating due to exception:
    ...") before raising it; the CLI prints a user error (a full disk in a handler) as its one
    line and anything else with its traceback, so the echo only doubles it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Engine run is terminating due to exception")


for _engine in ("SupervisedTrainer", "SupervisedEvaluator"):
    logging.getLogger(f"ignite.engine.engine.{_engine}").addFilter(_DropRunEndEcho())


def _source(key: str, overrides: dict[str, Any]) -> str:
    """The option a given setting came from: ``--set`` for overrides (also ``--set epochs=3``;
    the CLI passes ``--encoder``/``--freeze-encoder`` as overrides too, but never an invalid value)."""
    return "--set" if key in overrides else _OPTION_NAMES.get(key, "--set")


def _option(key: str) -> str:
    return _OPTION_NAMES.get(key, f"--set {key}")


def _same(key: str, a: Any, b: Any) -> bool:
    """Whether two values of option ``key`` agree as recorded in a RUN_FILE (JSON: tuples are
    lists; paths are compared resolved)."""
    if key in _PATH_KEYS and a is not None and b is not None:
        return os.path.realpath(str(a)) == os.path.realpath(str(b))
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def _resume_settings(out: Path, args: dict[str, Any], given: set[str], config_file: list[Path]) -> dict[str, Any]:
    """``args`` completed with the settings the run in ``out`` started with (its RUN_FILE).

    A resumed run must train on the same data, split and config as before, or it would
    silently mix two experiments: options not given again are taken from the run; options
    given with another value (than the run's, or the bundle's default where the run set none)
    are refused, except ``epochs`` (the LR schedule follows the new length) and settings that
    do not change what is learnt (``_RUNTIME_KEYS``). ``given``: the settings given again, none of
    ``NOT_SETTINGS`` (the device), which are neither compared nor reused. Runs without a RUN_FILE
    (``python -m monai.bundle run``, older medfcn) are resumed as given.
    """
    run_file = out / RUN_FILE
    if not run_file.is_file():
        return args
    try:
        saved = {k: v for k, v in json.loads(run_file.read_text())["settings"].items() if k not in NOT_SETTINGS}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{run_file}: unreadable ({err}); restore it, or start a new run with another --output."
        ) from err
    default = read_config(config_file, {})
    for key in given - {"epochs", *_RUNTIME_KEYS}:
        before = saved[key] if key in saved else default.get(key.replace(ReferenceResolver.sep, "#"))
        if not _same(key, before, args[key]):
            # JSON, as --set takes values (null, true, "concat"), not Python's None / True / 'concat'
            shown = _json(before) if key in saved else f"the bundle's default {_json(before)}"
            raise UserError(
                f"{out}: this run started with {_option(key)} {shown}, not {_json(args[key])}; "
                "resume without that option (the run's settings are reused) or start a new run with another --output."
            )
    return {**args, **{k: v for k, v in saved.items() if k not in given}}


def _write_run_settings(out: Path, parser: ConfigParser, args: dict[str, Any]) -> None:
    """Record in ``out/RUN_FILE`` the bundle and what a resume must repeat: the options given
    (paths made absolute) and the data, split, fold and length they resolved to (``medfcn
    package`` reads it too). Rewritten on every resume, so an extended run records its new length."""
    settings = {k: v for k, v in args.items() if k not in NOT_SETTINGS}
    for key in ("dataset_dir", "folds_file", "fold", "epochs"):
        settings[key] = parser.get_parsed_content(key)
    for key in _PATH_KEYS:
        if settings.get(key):
            settings[key] = os.path.abspath(str(settings[key]))
    bundle = os.path.abspath(parser.get_parsed_content("bundle_root"))
    text = json.dumps({"bundle": bundle, "settings": settings}, indent=1, default=str) + "\n"
    atomic_write_text(text, out / RUN_FILE)


def _read_checkpoint(checkpoint: Path) -> tuple[dict, int]:
    """A ``last.pt``, read once for the resume checks, and the epochs its run completed."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = saved["trainer"]
    except (KeyError, TypeError) as err:
        raise UserError(f"{checkpoint}: no 'trainer' entry; not a medfcn training checkpoint.") from err
    except Exception as err:
        raise UserError(f"{checkpoint}: not a readable medfcn training checkpoint ({checkpoint_reason(err)}).") from err
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


def _check_dry_run(network: torch.nn.Module, parser: ConfigParser, config_file: Path) -> None:
    """One forward pass of a zero patch, so that a patch the network cannot take (too small
    for its poolings, or of another dimensionality) fails in one line before any data is
    loaded. The network is a throwaway copy: the run builds its own from the config."""
    patch = [int(s) for s in parser.get_parsed_content("patch_size")]
    channels = int(parser.get_parsed_content("network_def#in_channels"))
    try:
        with torch.no_grad():
            network.train()(torch.zeros(1, channels, *patch))
    except Exception as err:
        raise UserError(
            f"{config_file}: the network cannot train on patch_size {patch} ({root_message(err)}); "
            "give one size per spatial axis of the network, each large enough for its poolings (halved per scale)."
        ) from err


def _check_classes(parser: ConfigParser, config_file: Path) -> None:
    """``class_names`` names every foreground label, and the intensity normalisation exists."""
    num_classes, names = (parser.get_parsed_content(k) for k in ("num_classes", "class_names"))
    if len(names) != int(num_classes) - 1:
        raise UserError(
            f"{config_file}: num_classes {num_classes} (background + {int(num_classes) - 1}) but class_names has "
            f"{len(names)} name(s) {list(names)}; set both, e.g. --set num_classes=2 --set 'class_names=[\"tumour\"]'."
        )
    window = {"hu_window": parser.get_parsed_content("hu_window")} if "hu_window" in parser else {}
    try:
        intensity_normalization("image", parser.get_parsed_content("modality"), **window)
    except (ValueError, TypeError) as err:
        raise UserError(f"{config_file}: {err}") from err


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
            f"{path}: does not fit this bundle's encoder ({checkpoint_reason(err)}); "
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
    folds_file: str | os.PathLike | None = None,
    device: str | None = None,
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
        resume: continue from ``output_dir/last.pt``: weights, optimizer, scheduler, epoch,
            and the data, split and overrides the run started with (``output_dir/medfcn_run.json``).
        overrides: more config entries to override, e.g. ``{"batch_size": 4}``; transfer
            learning: ``{"pretrained_encoder": "runs/a/best_model.pt", "freeze_encoder": True}``.
        folds_file: the fold split (``medfcn folds`` writes one); default: the config's.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: the config's (CUDA when
            present). Not part of the run's settings: a resume computes where its own
            ``device`` (or the default) says, on this machine or another. Not accepted in
            ``overrides``, where it would escape the check.

    Raises:
        UserError: missing data or split, unknown fold or config entry, a device this machine
            lacks (or one given as an override), a patch or class list the network cannot
            train on, nothing to resume, a resume with other settings, or an output folder
            that already holds a run (resume it or choose another folder).
    """
    files = bundle_files(bundle, "train.json")
    if "device" in (overrides or {}):  # unchecked there, and no setting of the run (NOT_SETTINGS)
        raise UserError("--set device: use --device cpu, cuda or cuda:N instead.")
    check_override_keys(files["config_files"], overrides or {})
    args: dict[str, Any] = {"bundle_root": str(files["bundle_root"])}
    given = {"dataset_dir": dataset_dir, "folds_file": folds_file, "fold": fold, "epochs": epochs}
    for key, value in (*given.items(), ("output_dir", output_dir)):
        if value is not None:
            args[key] = str(value) if isinstance(value, os.PathLike) else value
    args.update(overrides or {})
    if device is not None:
        args["device"] = device_expression(device)
    explicit = {k for k in args if k not in NOT_SETTINGS}
    sources = {k: _source(k, overrides or {}) for k in explicit}
    given_config = read_config(files["config_files"], args)
    check_settings(given_config, files["config_files"], sources)  # before any file is read or written
    if resume:
        run_dir = Path(given_config.get_parsed_content("output_dir"))
        args = _resume_settings(run_dir, args, explicit, files["config_files"])
        sources.update({k: str(run_dir / RUN_FILE) for k in args if k not in {*explicit, *NOT_SETTINGS}})
    args["resume"] = bool(resume)

    parser = read_config(files["config_files"], args)  # one parser for every check before the run
    if resume:  # the values read back from the run's record
        check_settings(parser, files["config_files"], sources)
    data, split, fold_k, out, n_epochs, num_classes, encoder = (
        parser.get_parsed_content(i)
        for i in ("dataset_dir", "folds_file", "fold", "output_dir", "epochs", "num_classes", "pretrained_encoder")
    )
    if not (Path(data) / "dataset.json").is_file():
        raise UserError(f"{data}: no dataset.json here; pass --data with the MSD dataset folder or set MEDFCN_DATA.")
    new_split = f"make one with `medfcn folds {data} --out FILE` and pass --folds FILE"
    if not Path(split).is_file():
        raise UserError(f"{split}: fold split not found; {new_split}.")
    try:
        train_list, val_list = fold_datalists(data, split, int(fold_k))
    except FileNotFoundError as err:
        raise UserError(str(err)) from err
    except ValueError as err:
        hint = f" The split is for another dataset: {new_split}." if "names cases not in" in str(err) else ""
        raise UserError(f"{err}{hint}") from err
    _check_classes(parser, files["config_file"])
    network = _network(parser, files["config_file"])
    check_training_pairs(
        train_list + val_list, int(num_classes), int(parser.get_parsed_content("network_def#in_channels"))
    )
    last = Path(out) / "last.pt"
    if resume:
        if not last.is_file():
            raise UserError(f"{last}: no checkpoint to resume from; train without --resume first.")
        saved, done = _read_checkpoint(last)
        if done >= int(n_epochs):
            raise UserError(f"{last}: run has finished {done} epochs already; pass --epochs larger than {done}.")
    elif last.exists():
        raise UserError(f"{out}: already holds a run (last.pt); add --resume to continue it, or pick another --output.")
    _check_dry_run(network, parser, files["config_file"])
    if resume:  # a run of another network_def must fail here, in one line, not deep in MONAI's loader
        load_weights(network, last, key="network")
        _check_resumable(last, saved, parser)
    elif encoder:
        _check_encoder(network, encoder)
    recorded = args
    if resume:  # last.pt's weights replace the encoder's initialisation, whose file may be gone by now
        args = {**args, "pretrained_encoder": None}

    logging_file = files["logging_file"] if files["logging_file"].is_file() else None
    with output_lock(out, "medfcn train", "--output"):  # two trainers would interleave last.pt
        workflow = ConfigWorkflow(
            config_file=[str(f) for f in files["config_files"]],
            meta_file=str(files["meta_file"]),
            logging_file=str(logging_file) if logging_file else None,
            workflow_type="train",
            **args,
        )
        try:
            with refuse_full_disk(out):  # checkpoints, medfcn_run.json, TensorBoard events
                workflow.initialize()
                # after the set-up: a resume failing there keeps its record
                _write_run_settings(Path(out), parser, recorded)
                _write_profile(out, parser, train_list, f"training cases of fold {fold_k} of {split}, {data}", resume)
                workflow.run()
                workflow.finalize()
        except BaseException:
            if not resume:
                _forget_failed_run(Path(out))
            raise
    return Path(out)


def _write_profile(out: str | os.PathLike, parser: ConfigParser, cases: list[dict], source: str, resume: bool) -> None:
    """Record the profile of the cases the run trains on (``max_cases`` applied, as the config's
    datalists do) for ``medfcn package``; a new run replaces one a failed run left behind."""
    max_cases = parser.get_parsed_content("max_cases", default=None)
    trained = cases[:max_cases] if max_cases else cases
    write_run_profile(out, trained, parser.get_parsed_content("class_names"), source, replace=not resume)


def _forget_failed_run(out: Path) -> None:
    """A new run that failed before its first checkpoint has nothing to resume or package:
    remove its record (RUN_FILE) and training-data profile (the output folder itself goes when
    :func:`medfcn.outputs.output_lock` created it and it is left empty)."""
    if (out / "last.pt").exists():
        return
    for name in (RUN_FILE, RUN_PROFILE):
        (out / name).unlink(missing_ok=True)
