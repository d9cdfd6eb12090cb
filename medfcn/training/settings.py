"""The first stage of a run: its settings, resolved into the run's one config parser.

The options given (``train(...)``'s arguments and ``overrides``), the resume policy (a resumed
run repeats the settings it started with, recorded in :data:`medfcn.bundle.RUN_FILE`) and the
checks of every value against :data:`medfcn.settings.RULES`, before any data is read or any
file written. The config is parsed once here; every later stage uses the same parser.

The library speaks config keys: a setting is named ``--set KEY`` in messages unless the caller
says how it spells it (``option_names``, the CLI's flags: ``{"epochs": "--epochs", ...}``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

from medfcn.bundle import NOT_SETTINGS, RUN_FILE, check_override_keys, read_config
from medfcn.devices import device_expression
from medfcn.errors import UserError
from medfcn.io import atomic_write_text
from medfcn.settings import check_settings

__all__ = ["RunSettings", "resolve_settings", "write_run_record"]

# Where the training handlers of ``medfcn.handlers`` went (WeightAverage is defined there again,
# for the planner's probe, and exported by medfcn.training.handlers): bundles packaged by older medfcn
# versions name them there (``"_target_": "medfcn.handlers.Resume"``, ``$medfcn.handlers.BestMetric``).
_MOVED = {
    **dict.fromkeys(
        ("Resume", "ValidateEvery", "ReseedEachEpoch", "BestMetric", "WeightAverage", "CheckpointWriter"),
        "medfcn.training.handlers",
    ),
    **dict.fromkeys(
        ("EpochProgress", "LearningRateWriter", "OverlayWriter", "overlay_slice"), "medfcn.training.monitoring"
    ),
}
_OLD_NAME = re.compile(rf"\bmedfcn\.handlers\.({'|'.join(_MOVED)})\b")
# Options that name files: compared as resolved paths, so ``data/`` and ``/abs/data`` agree.
_PATH_KEYS = ("dataset_dir", "folds_file", "pretrained_encoder")
# Settings a resume may change: they do not change what the network learns.
_RUNTIME_KEYS = ("num_workers", "val_interval", "cache", "cache_dir", "data_on_device")


@dataclass
class RunSettings:
    """A run's resolved settings.

    Attributes:
        parser: the run's one config parser, every setting applied (for a resume: those read
            back from its record too, and ``pretrained_encoder`` null: last.pt's weights
            replace the encoder's initialisation, whose file may be gone by now).
        config_file: the training config, named in messages.
        config_files: the files it merges, in order (``common.json``, ``train.json``).
        recorded: what :func:`write_run_record` writes (the options as given and resumed).
        resume: whether the run continues the one in its output folder.
        option_names: how the caller spells options (config key -> flag).
        defaults: the bundle's own config, as read (before any setting was applied).
        notices: lines that tell the user what the settings decided, once the checks pass.
    """

    parser: ConfigParser
    config_file: Path
    recorded: dict[str, Any]
    resume: bool
    option_names: Mapping[str, str] = field(default_factory=dict)
    config_files: list[Path] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def option(self, key: str) -> str:
        """How the caller spells setting ``key`` (``--epochs`` for the CLI, else ``--set epochs``)."""
        return self.option_names.get(key, f"--set {key}")

    def get(self, key: str) -> Any:
        """The value of config entry ``key``."""
        return self.parser.get_parsed_content(key)


def _given_options(
    bundle_root: Path, options: Mapping[str, Any], overrides: Mapping[str, Any], device: str | None
) -> dict[str, Any]:
    """The config entries the caller sets, in the order they are applied: the bundle, the named
    options (``dataset_dir``, ..., ``output_dir``; None: the config's), the overrides, the device."""
    args: dict[str, Any] = {"bundle_root": str(bundle_root)}
    for key, value in options.items():
        if value is not None:
            args[key] = str(value) if isinstance(value, os.PathLike) else value
    args.update(overrides)
    if device is not None:
        args["device"] = device_expression(device)
    return args


def _check_cache_option(config_file: Path, cache: str | None, defaults: Mapping, option_names: Mapping) -> None:
    """UserError for a ``cache`` given to a bundle whose config has no ``cache`` entry (one from
    before the setting, whose datasets keep the cases in RAM): it would be recorded, unused."""
    if cache is not None and "cache" not in defaults:
        flag = option_names.get("cache", "cache=")
        raise UserError(
            f"{flag} {cache}: {config_file} has no 'cache' entry (a bundle from before the setting: it keeps the "
            f"cases in RAM); train without {flag}, or plan or package the bundle again."
        )


def resolve_settings(
    files: Mapping[str, Any],
    options: Mapping[str, Any],
    overrides: Mapping[str, Any],
    device: str | None,
    resume: bool,
    option_names: Mapping[str, str] | None = None,
) -> RunSettings:
    """Parse the training config once and apply the run's settings, checked.

    Args:
        files: :func:`medfcn.bundle.bundle_files` of the bundle's ``train.json``.
        options: the named options (``dataset_dir``, ``folds_file``, ``fold``, ``epochs``,
            ``output_dir``); None: the config's.
        overrides: more config entries (``--set``).
        device: where to compute (not a setting of the run, never recorded).
        resume: continue the run in the output folder with the settings it recorded.
        option_names: config key -> the caller's flag, for messages; default: ``--set KEY``.

    Raises:
        UserError: a device given as an override, an unknown override key, a value a setting
            does not accept, or a resume with other settings than the run's.
    """
    if "device" in overrides:  # unchecked there, and no setting of the run (NOT_SETTINGS)
        raise UserError("--set device: use --device cpu, cuda, cuda:N or mps instead.")
    parser = read_config(files["config_files"])  # the run's one parse of the config
    parser.set(_moved_handlers(parser.get()))
    parser.read_meta(str(files["meta_file"]))  # `@_meta_#...`, as in MONAI's runner
    defaults = copy.deepcopy(parser.get())  # the bundle's own values, before any override
    check_override_keys(files["config_files"], dict(overrides), parser=parser)
    _check_cache_option(files["config_file"], options.get("cache"), defaults, option_names or {})
    args = _given_options(files["bundle_root"], options, overrides, device)
    run = RunSettings(parser, files["config_file"], args, resume, option_names or {}, files["config_files"], defaults)
    explicit = {k for k in args if k not in NOT_SETTINGS}
    sources = {k: "--set" if k in overrides else run.option_names.get(k, "--set") for k in explicit}
    parser.update(args)
    check_settings(parser, run.config_files, sources, defaults)  # before any file is read or written
    if resume:
        _apply_run_record(run, explicit, sources, defaults)
    _budget_yields_to_epochs(run, explicit, defaults)
    parser.update({"resume": bool(resume)})
    run.recorded = {**run.recorded, "resume": bool(resume)}
    if resume:  # last.pt's weights replace the encoder's initialisation, whose file may be gone by now
        parser.update({"pretrained_encoder": None})
    return run


def _budget_yields_to_epochs(run: RunSettings, given: set[str], defaults: dict) -> None:
    """A run given its own length trains every epoch of it: the ``budget_minutes`` (the time
    the bundle's epochs were planned for) stops shortening the run
    (:class:`~medfcn.training.handlers.BudgetKeeper`) and timing it. It binds still when given
    with the epochs (now, or when the resumed run started: its record holds both)."""
    budget = run.get("budget_minutes") if "budget_minutes" in run.parser else None
    if budget is None or "budget_minutes" in given:
        return
    other_length = not _same("epochs", _raw_entry(defaults, "epochs"), run.get("epochs"))
    if "epochs" in given or (other_length and "budget_minutes" not in run.recorded):
        run.parser.update({"budget_minutes": None})
        run.recorded = {**run.recorded, "budget_minutes": None}  # a later resume keeps it off
        run.notices.append(
            f"budget: {run.option('epochs')} {run.get('epochs')} trains every epoch; the {budget:g}-min budget no "
            f"longer ends the run early or times it (give {run.option('budget_minutes')} too to keep it)"
        )


def _moved_handlers(config: Any) -> Any:
    """``config`` with the training handlers an older bundle names in ``medfcn.handlers`` named
    where they are now (:data:`_MOVED`)."""
    if isinstance(config, str):
        return _OLD_NAME.sub(lambda m: f"{_MOVED[m.group(1)]}.{m.group(1)}", config)
    if isinstance(config, dict):
        return {key: _moved_handlers(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_moved_handlers(value) for value in config]
    return config


def _apply_run_record(run: RunSettings, given: set[str], sources: dict[str, str], defaults: dict) -> None:
    """Complete ``run`` with the settings its output folder's run started with, and check the
    values read back (they may come from an edited or older record)."""
    run_dir = Path(run.get("output_dir"))
    record = _run_record(run_dir)
    if record is None:  # no record (`python -m monai.bundle run`, older medfcn): resumed as given
        return
    bundle, saved = record
    _refuse_another_bundle(run, run_dir, bundle)
    _refuse_other_settings(run, run_dir, saved, given, defaults)
    reused = {k: v for k, v in saved.items() if k not in given}
    run.recorded = {**run.recorded, **reused}
    run.parser.update(reused)
    sources.update({k: str(run_dir / RUN_FILE) for k in reused})
    check_settings(run.parser, run.config_files, sources, defaults)


def _run_record(run_dir: Path) -> tuple[str | None, dict[str, Any]] | None:
    """``run_dir``'s RUN_FILE, read once: the bundle it names and its settings (none of
    ``NOT_SETTINGS``); None without one."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        record = json.loads(run_file.read_text())
        settings = {k: v for k, v in record["settings"].items() if k not in NOT_SETTINGS}  # a dict record, or raises
        return record.get("bundle"), settings
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{run_file}: unreadable ({err}); restore it, or start a new run with another --output."
        ) from err


def _refuse_another_bundle(run: RunSettings, run_dir: Path, recorded: str | None) -> None:
    """A run resumed with another bundle (not ``recorded``, the one its record names) would
    continue with that bundle's recipe (or fail to load last.pt into its network): refused,
    unless the recorded bundle is gone (a moved clone)."""
    bundle = os.path.realpath(str(run.get("bundle_root")))
    if recorded and os.path.isdir(recorded) and os.path.realpath(recorded) != bundle:
        raise UserError(
            f"{run_dir}: this run trained the bundle {recorded}, not {bundle}; resume it with "
            f"`medfcn train {recorded} --output {run_dir} --resume`, or start a new run with another --output."
        )


def _refuse_other_settings(run: RunSettings, run_dir: Path, saved: dict, given: set[str], defaults: dict) -> None:
    """A resumed run must train on the same data, split and config as before, or it would
    silently mix two experiments: an option given with another value (than the run's, or the
    bundle's default where the run set none) is refused, except ``epochs`` and ``budget_minutes``
    (the LR schedule follows the new length) and settings that do not change what is learnt
    (``_RUNTIME_KEYS``)."""
    for key in given - {"epochs", "budget_minutes", *_RUNTIME_KEYS}:
        before = saved[key] if key in saved else _raw_entry(defaults, key)
        if not _same(key, before, run.recorded[key]):
            # JSON, as --set takes values (null, true, "concat"), not Python's None / True / 'concat'
            shown = _json(before) if key in saved else f"{_json(before)} (the bundle's default)"
            raise UserError(
                f"{run_dir}: this run started with {run.option(key)} {shown}, not {_json(run.recorded[key])}; "
                "resume without that option (the run's settings are reused) or start a new run with another --output."
            )


def _raw_entry(config: dict, key: str) -> Any:
    """Entry ``key`` (``a#b#0``) of a raw config, as ``ConfigParser.get`` finds it; None if absent."""
    parser = ConfigParser(config=config)  # a view of the dict: nothing is read or parsed
    return parser.get(key.replace(ReferenceResolver.sep, "#"))


def _same(key: str, a: Any, b: Any) -> bool:
    """Whether two values of option ``key`` agree as recorded in a RUN_FILE (JSON: tuples are
    lists; paths are compared resolved)."""
    if key in _PATH_KEYS and a is not None and b is not None:
        return os.path.realpath(str(a)) == os.path.realpath(str(b))
    return json.loads(_json(a)) == json.loads(_json(b))


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def write_run_record(run: RunSettings, split_made_by_run: bool = False) -> None:
    """Record in the output folder's RUN_FILE the bundle and what a resume must repeat: the
    options given (paths made absolute) and the data, split, fold and length they resolved to
    (``medfcn package`` reads it too), and whether the split is one the run made (a resume
    checks the dataset against it). Rewritten on every resume, so an extended run records its
    new length."""
    settings = {k: v for k, v in run.recorded.items() if k not in NOT_SETTINGS}
    for key in ("dataset_dir", "folds_file", "fold", "epochs"):
        settings[key] = run.get(key)
    for key in _PATH_KEYS:
        if settings.get(key):
            settings[key] = os.path.abspath(str(settings[key]))
    bundle = os.path.abspath(run.get("bundle_root"))
    record = {"bundle": bundle, "settings": settings, "split_made_by_run": bool(split_made_by_run)}
    text = json.dumps(record, indent=1, default=str) + "\n"
    atomic_write_text(text, Path(run.get("output_dir")) / RUN_FILE)
