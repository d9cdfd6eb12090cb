"""The bundle contract: what every stage (train, infer, evaluate, export, package) knows about a
MONAI bundle, in one place below them.

A bundle is a folder::

    configs/common.json      the model: network, patch, spacing, modality, classes, inferer,
                             weights path (merged first into every stage's config)
    configs/train.json       training recipe          (``python -m monai.bundle run``
    configs/inference.json   inference pipeline        ``--config_file "['configs/common.json',``
    configs/evaluate.json    evaluation of the masks   ``'configs/train.json']"``)
    configs/metadata.json    MONAI metadata, with the training-data profile (medfcn.data.profile)
    configs/logging.conf     logging of MONAI's runner
    models/model.pt          the weights (a state dict of ``network_def``)

A training run's folder holds :data:`RUN_FILE`, the record of the options it started with
(what a resume repeats and ``medfcn package`` writes into a new bundle), and
:data:`RUN_SPLIT_FILE` where the run made its own split. :data:`MODEL_KEYS`
are the entries that describe the model (architecture, patch, spacing, modality, classes).

Stages import this module and never each other.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import pydoc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator, ConfigComponent
from monai.bundle.reference_resolver import ReferenceResolver

from medfcn.errors import UserError, find_user_error, root_message
from medfcn.settings import check_bundle_json

__all__ = [
    "COMMON_FILE",
    "MODEL_KEYS",
    "MULTI_GPU_FILE",
    "NOT_SETTINGS",
    "RUN_FILE",
    "RUN_SPLIT_FILE",
    "BundleParser",
    "bundle_files",
    "check_override_keys",
    "configured_weights",
    "named",
    "read_config",
    "read_run_record",
    "weights_file",
]

# The config every stage's config is merged onto: what the bundle's model is (MODEL_KEYS and the
# rest that train.json, inference.json and evaluate.json share), stated once.
COMMON_FILE = "common.json"
# Written into every run folder: the options a resume must repeat (see medfcn.training).
RUN_FILE = "medfcn_run.json"
# Written into a run folder whose bundle names no split of its data (see medfcn.training.split);
# medfcn package copies it into the bundle it makes.
RUN_SPLIT_FILE = "folds.json"
# Arguments of a run that are no settings of it: where its bundle and output are, whether it
# resumes, and where it computes (a resume or a packaged bundle picks its own device; the device
# sets the precision, so only a resume on the same one is bit-identical), and how long the
# processes of a distributed run wait for each other (a resume may run in one process, whose
# config has no such entry). Never written to RUN_FILE, and ignored where a record of an older
# medfcn holds them (`--set device`).
NOT_SETTINGS = ("bundle_root", "output_dir", "resume", "device", "collective_timeout_minutes")
# The config merged onto train.json when the run is one of several processes (torchrun), as in
# MONAI Model Zoo bundles.
MULTI_GPU_FILE = "multi_gpu_train.json"
# Entries that describe the model: the network, the patch it sees, the grid and intensities it
# was trained on, and its classes.
MODEL_KEYS = (
    "network_def",
    "patch_size",
    "modality",
    "hu_window",
    "intensity_stats",
    "pixdim",
    "num_classes",
    "class_names",
    "slice_axis",
)


def named(component: Any) -> Any:
    """``component`` itself: a list entry that is a named top-level component of the config,
    ``{"_target_": "medfcn.bundle.named", "component": "@weight_average"}``, so that others find
    it by name (``@weight_average``) instead of by its position in the list, while every entry
    stays a ``{"_target_": ...}`` dict (MONAI's property checks read ``_target_`` of each handler)."""
    return component


def weights_file(bundle: str | os.PathLike) -> Path:
    """Where a bundle's weights live: ``models/model.pt`` (a state dict of ``network_def``)."""
    return Path(bundle) / "models" / "model.pt"


def configured_weights(parser: ConfigParser, root: str | os.PathLike, fix: str) -> Path:
    """The weights a bundle's config names (``weights_file``, the path its CheckpointLoader loads;
    :func:`weights_file` where it names none), ``parser`` having ``bundle_root`` set.

    Raises:
        UserError: the file is missing, with ``fix``.
    """
    weights = Path(parser.get_parsed_content("weights_file", default=str(weights_file(root))))
    if not weights.is_file():
        raise UserError(f"{weights}: missing; {fix}.")
    return weights


def read_config(
    config: str | os.PathLike | Sequence[str | os.PathLike], overrides: dict[str, Any] | None = None
) -> ConfigParser:
    """A ``ConfigParser`` of ``config`` (one file, or a list merged in order as MONAI's runner
    merges ``--config_file "['a.json','b.json']"``; ``bundle_files(...)["config_files"]``) with
    ``overrides`` (config ids) applied."""
    parser = ConfigParser()
    parser.read_config([str(c) for c in config] if isinstance(config, (list, tuple)) else str(config))
    parser.update(overrides or {})
    return parser


def read_run_record(run_dir: str | os.PathLike) -> dict:
    """A training run's :data:`RUN_FILE`: ``{"bundle": folder, "settings": {...},
    "split_made_by_run": bool}`` (the last absent from records of a medfcn before 2026-12-03).

    Raises:
        UserError: the file is missing or not JSON.
    """
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        raise UserError(f"{run_file}: missing; package a run of `medfcn train` (it writes this file).")
    try:
        return json.loads(run_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{run_file}: unreadable ({err}); package another run.") from err


def bundle_files(bundle: str | os.PathLike, config: str) -> dict[str, Any]:
    """Paths of a bundle's ``config`` (e.g. ``train.json``), metadata and logging config, and
    as ``config_files`` the list a stage merges: ``[configs/common.json, config]`` (only
    ``[config]`` for a bundle without ``common.json``).

    Raises:
        UserError: the folder or the config is missing, or a JSON file of them is broken
            (:func:`medfcn.settings.check_bundle_json`).
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
    # every config file the stage merges, in order (MONAI's ``--config_file`` list): the model's
    # facts in common.json first, where the bundle has one, then the stage's own config
    common = root / "configs" / COMMON_FILE
    files["config_files"] = [common, files["config_file"]] if common.is_file() else [files["config_file"]]
    for key in ("config_file", "meta_file"):
        if not files[key].is_file():
            raise UserError(f"{files[key]}: missing; {root} is not a complete MONAI bundle.")
    check_bundle_json(files["config_files"], files["meta_file"])
    return files


def _arguments(component: Any) -> list[str] | None:
    """Constructor arguments of the MONAI component ``component`` (a dict with ``_target_``);
    None where any name is accepted (``**kwargs``, an expression, a target that cannot be
    inspected) and ``[]`` for entries that are not components (plain dicts and lists)."""
    if not isinstance(component, dict) or not isinstance(component.get("_target_"), str):
        return []
    item = ConfigComponent(config=component, locator=ComponentLocator())
    target = pydoc.locate(str(item.resolve_module_name() or component["_target_"]))
    try:
        params = list(inspect.signature(target).parameters.values()) if target is not None else None
    except (TypeError, ValueError):
        params = None
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not p.VAR_POSITIONAL]


def check_override_keys(
    config_file: Path | Sequence[Path], overrides: dict[str, Any], parser: ConfigParser | None = None
) -> None:
    """Each override must name an entry of the config (one file, or the list a stage merges;
    after the overrides before it, macros resolved), or an argument of one of its components
    (``network_def#encoder_blocks``, and MONAI's reserved ``_disabled_`` etc.): a misspelt key
    would otherwise be added unused and the run would silently train with the default, or fail
    late with a traceback.

    ``parser``: the config already read (it is left with the overrides applied); default: read
    ``config_file``."""
    parser = read_config(config_file) if parser is None else parser
    stage = config_file[-1] if isinstance(config_file, (list, tuple)) else config_file  # named in messages
    for key, value in overrides.items():
        path = key.replace(ReferenceResolver.sep, "#")
        parent, _, name = path.rpartition("#")
        if path not in parser:
            while parent and parent not in parser:  # name the deepest entry that exists
                parent, _, name = parent.rpartition("#")
            scope = parser[parent] if parent else parser.get()
            arguments = _arguments(scope) if parent else []
            reserved = name.startswith("_") and name.endswith("_") and arguments != []
            if arguments is None or reserved or (path.endswith(f"#{name}") and name in (arguments or [])):
                _apply(parser, key, path, value)
                continue
            known = [str(k) for k in (scope if isinstance(scope, dict) else range(len(scope)))]
            known = sorted({k for k in known + (arguments or []) if not k.startswith("_")})
            close = difflib.get_close_matches(name, known, n=1)
            where = f"{parent!r}" if parent else str(stage)
            hint = f"did you mean {close[0]!r}?" if close else f"entries there: {', '.join(known)}"
            raise UserError(f"--set {key}: no {name!r} in {where}; {hint}")
        _apply(parser, key, path, value)


def _apply(parser: ConfigParser, key: str, path: str, value: Any) -> None:
    """Set one checked override, resolving ``%file#id`` macros so the next key sees their content."""
    parser[path] = value
    try:
        parser.resolve_macro_and_relative_ids()
    except Exception as err:
        raise UserError(f"--set {key}: cannot resolve {value!r} ({root_message(err)}); check the file and id.") from err


class BundleParser(ConfigParser):
    """A ``ConfigParser`` of one bundle config whose entries fail in one line naming the file:
    an entry that cannot be built (``"network_def": 42``, a reference to a missing entry) is
    a :class:`UserError` instead of MONAI's chain of RuntimeErrors."""

    def __init__(self, config: str | os.PathLike | Sequence[str | os.PathLike]):
        super().__init__()
        files = list(config) if isinstance(config, (list, tuple)) else [config]
        self.config_file = Path(files[-1])  # named in messages: the stage's own config
        self.read_config([str(f) for f in files])

    def get_parsed_content(self, id: str = "", **kwargs: Any) -> Any:
        try:
            return super().get_parsed_content(id, **kwargs)
        except Exception as err:
            if find_user_error(err) is not None:  # e.g. --device cuda without a GPU: already one line
                raise
            raise UserError(
                f"{self.config_file}: entry {id!r} cannot be built ({root_message(err)}); "
                "fix the file or restore it from the bundle's source."
            ) from err
