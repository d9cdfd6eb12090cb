"""What each top-level setting of a training config accepts (type and range), in one table.

``medfcn train`` checks every value against :data:`RULES` before it reads any data or writes
any file: the bundle's defaults, ``--set`` overrides, ``--epochs``/``--fold``, the values
``train(...)`` is called with from Python, and those a resume reads back from
``medfcn_run.json``. A value outside its range would otherwise fail deep in MONAI, PyTorch or
NumPy with a traceback (``batch_size=0``), or train something else than asked
(``--set 'patch_size=[40,56'``, taken as a string). Settings missing from a config (a 3D
bundle has no ``slice_axis``) are not checked; nested component arguments
(``network_def#features``) are checked when the network is built.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from medfcn.errors import UserError, root_message

__all__ = ["REQUIRED_ENTRIES", "RULES", "Rule", "check_bundle_json", "check_settings", "parse_value", "stating_file"]

# numpy's seeds (``set_determinism``) are unsigned 32-bit
_MAX_SEED = 2**32 - 1
_MODALITIES = ("MRI", "MR", "CT")


@dataclass(frozen=True)
class Rule:
    """What one setting accepts.

    Attributes:
        accepts: ``(value, spatial_dims) -> bool``; ``spatial_dims`` is the network's number
            of spatial axes (2 or 3), None when unknown.
        text: what it accepts, completing "must be ..."; ``{dims}`` stands for ``spatial_dims``.
        example: a valid value as JSON, used when the bundle's own default is no valid example.
    """

    accepts: Callable[[Any, int | None], bool]
    text: str
    example: str


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(low: int, high: int | None = None, none_ok: bool = False) -> Callable[[Any, int | None], bool]:
    def accepts(value: Any, _dims: int | None) -> bool:
        if value is None:
            return none_ok
        return _is_whole(value) and value >= low and (high is None or value <= high)

    return accepts


def _number(low: float, low_inclusive: bool, high: float = math.inf, none_ok: bool = False):
    def accepts(value: Any, _dims: int | None) -> bool:
        if value is None:
            return none_ok
        if not _is_number(value):
            return False
        above = value >= low if low_inclusive else value > low
        return above and value < high

    return accepts


def _sizes(value: Any, dims: int | None) -> bool:
    """Patch size in voxels: one whole number >= 1 per spatial axis of the network."""
    fits = dims is None or len(value) == dims if isinstance(value, (list, tuple)) else False
    return fits and all(_is_whole(s) and s >= 1 for s in value)


def _spacing(value: Any, _dims: int | None) -> bool:
    """Voxel size in mm along x, y, z (volumes are resampled in 3D, also for 2D networks)."""
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(s) and s > 0 for s in value)


def _window(value: Any, _dims: int | None) -> bool:
    """CT intensity window ``[low, high]`` in HU; null where the modality is no CT (MRI)."""
    if value is None:
        return True
    pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value))
    return pair and value[0] < value[1]


def _names(value: Any, _dims: int | None) -> bool:
    """Foreground class names: distinct, non-empty text."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    return all(isinstance(n, str) and n.strip() for n in value) and len(set(value)) == len(value)


def _stats(value: Any, _dims: int | None) -> bool:
    if value is None:
        return True
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)) and value[1] > 0


def _modality(value: Any, _dims: int | None) -> bool:
    return isinstance(value, str) and value.upper() in _MODALITIES


def _cache(value: Any, _dims: int | None) -> bool:
    return value in ("ram", "disk", "none")  # medfcn.data.cache.CACHE_KINDS, without importing MONAI


def _data_on_device(value: Any, _dims: int | None) -> bool:
    return value == "auto" or isinstance(value, bool)  # not 1 or 0, which equal True and False


def _flag(value: Any, _dims: int | None) -> bool:
    return isinstance(value, bool)


def _path(none_ok: bool) -> Callable[[Any, int | None], bool]:
    def accepts(value: Any, _dims: int | None) -> bool:
        if isinstance(value, os.PathLike):
            return True
        return (none_ok and value is None) or (isinstance(value, str) and bool(value.strip()))

    return accepts


RULES: dict[str, Rule] = {
    "dataset_dir": Rule(_path(False), "a folder path", '"datasets/Task04_Hippocampus"'),
    "folds_file": Rule(_path(True), "null (a 5-fold split made in the run folder) or a file path", '"folds.json"'),
    "output_dir": Rule(_path(False), "a folder path", '"runs/try"'),
    "fold": Rule(_whole(-1), "a fold number 0, 1, ... or -1 (train on all cases)", "0"),
    "max_cases": Rule(_whole(1, none_ok=True), "null (all cases) or a whole number >= 1", "null"),
    "seed": Rule(_whole(0, _MAX_SEED), f"a whole number from 0 to {_MAX_SEED}", "0"),
    "epochs": Rule(_whole(1), "a whole number >= 1", "100"),
    "budget_minutes": Rule(
        _number(0, False, none_ok=True), "null (no budget: every epoch trains) or a number of minutes > 0", "60"
    ),
    "val_interval": Rule(_whole(1), "a whole number of epochs >= 1", "10"),
    "batch_size": Rule(_whole(1), "a whole number >= 1", "2"),
    "num_workers": Rule(_whole(0), "a whole number >= 0 (0: load data in the main process)", "0"),
    "cache": Rule(_cache, "ram (preprocessed cases in memory), disk (in files under cache_dir) or none", '"disk"'),
    "cache_dir": Rule(_path(False), "a folder path (the disk cache; runs may share it)", '"/scratch/cache"'),
    "data_on_device": Rule(
        _data_on_device,
        "auto (on CUDA with cache ram and no workers), true or false (keep the cached cases on the GPU)",
        "false",
    ),
    "collective_timeout_minutes": Rule(
        _number(0, False), "a number of minutes > 0 (how long a process waits for the others)", "10"
    ),
    "learning_rate": Rule(_number(0, False), "a number > 0", "0.002"),
    "weight_decay": Rule(_number(0, True), "a number >= 0", "0.0001"),
    "patch_size": Rule(_sizes, "a list of {dims} whole numbers >= 1 (voxels, one per spatial axis)", "[]"),
    "slice_axis": Rule(_whole(0, 2), "0, 1 or 2 (the axis the 2D network slices along)", "0"),
    "slices_per_volume": Rule(_whole(1), "a whole number >= 1", "4"),
    "modality": Rule(_modality, "MRI, MR or CT", '"MRI"'),
    "hu_window": Rule(_window, "null (MRI) or [low, high] in HU with low < high", "[-160, 240]"),
    "intensity_stats": Rule(_stats, "null or [mean, std] in HU with std > 0 (CT only)", "[40.0, 60.0]"),
    "pixdim": Rule(_spacing, "a list of 3 numbers > 0 (voxel size in mm along x, y, z)", "[1.0, 1.0, 1.0]"),
    "class_names": Rule(_names, "a list of distinct, non-empty names, one per foreground label", '["tumour"]'),
    "num_classes": Rule(_whole(2), "a whole number >= 2 (background and the labels)", "3"),
    "bf16": Rule(_flag, "true or false", "true"),
    "ema_decay": Rule(_number(0, True, 1.0, none_ok=True), "null (no averaging) or a number in [0, 1)", "0.999"),
    "pretrained_encoder": Rule(_path(True), "null or a checkpoint path", "null"),
    "freeze_encoder": Rule(_flag, "true or false", "false"),
    "resume": Rule(_flag, "true or false", "false"),
}


def parse_value(key: str, text: str, option: str = "--set") -> Any:
    """A ``--set KEY=VALUE`` value: JSON, else the text itself (``modality=CT``).

    Raises:
        UserError: text that starts like a JSON list, object or quoted string but is no valid
            JSON (``[40,56``): taken as text it would silently become a string.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip()[:1] in ("[", "{", '"'):
            raise UserError(
                f"{option} {key}={text}: not valid JSON ({err.msg}, column {err.colno}); "
                f"quote the whole option, e.g. {option} '{key}=[40, 56, 40]'."
            ) from err
        return text


def _spatial_dims(parser: ConfigParser) -> int | None:
    try:
        dims = parser.get_parsed_content("network_def#spatial_dims", default=None)
    except Exception:  # a broken network_def is reported when the network is built
        return None
    return dims if _is_whole(dims) else None


def _shown(value: Any) -> str:
    """A value as the user would type it: text as is, anything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))


def _as_option(option: str, key: str | None, value: Any) -> str:
    """``--set key=value`` or ``--epochs value`` as typed in a shell (quoted where JSON lists
    or quotes would be taken apart by it)."""
    text = f"{key}={_shown(value)}" if key else _shown(value)
    if any(c in text for c in " []{}\"'$*?"):
        text = f"'{text}'"
    return f"{option} {text}"


def _example(key: str, rule: Rule, default: Any, dims: int | None) -> Any:
    """The bundle's default where it is valid, else the rule's example (patch: 64 per axis)."""
    if rule.accepts(default, dims) and not (isinstance(default, str) and default.startswith(("$", "@", "%"))):
        return default
    if key == "patch_size":
        return [64] * (dims or 3)
    return json.loads(rule.example)


def _refusal(key: str, value: Any, rule: Rule, source: str, example: Any, dims: int | None) -> UserError:
    """The one-line error for ``value`` of ``key``; ``source`` is an option (``--set``,
    ``--epochs``) or the file the value came from."""
    rule = Rule(rule.accepts, rule.text.format(dims=dims or "2 or 3"), rule.example)
    if source.startswith("--"):
        name = key if source == "--set" else None
        given, fix = _as_option(source, name, value), _as_option(source, name, example)
        return UserError(f"{given}: must be {rule.text}, e.g. {fix}.")
    shown, fix = _shown(value), json.dumps(example)
    return UserError(f'{source}: {key} {shown} must be {rule.text}; fix the file, e.g. "{key}": {fix}.')


def stating_file(config_files: Sequence[Path], key: str) -> Path:
    """The last of ``config_files`` (merged in order) whose top level states ``key``: the file whose
    value the merge keeps, named in messages about it; the last file where none does (unreadable
    files are skipped: they are checked and reported where the bundle is read)."""
    for path in reversed(config_files):
        try:
            if key in json.loads(Path(path).read_text(encoding="utf-8")):
                return Path(path)
        except (OSError, ValueError, TypeError):
            continue
    return Path(config_files[-1])


def check_settings(
    parser: ConfigParser,
    config_file: Path | Sequence[Path],
    sources: Mapping[str, str],
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Check every setting of ``parser`` that :data:`RULES` knows (in its order).

    Args:
        parser: the training config with every override applied.
        config_file: the config's path, or the files it merges (``common.json``, ``train.json``):
            the one stating a setting is named for settings of no other source.
        sources: where a setting's value came from: ``"--set"``, a command-line option
            (``"--epochs"``) or a file (``medfcn_run.json``); the config for others.
        defaults: the config's own entries (as read, before overrides), whose values serve as
            examples; default: read ``config_file``.

    Raises:
        UserError: naming the option or file, the value, and what the setting accepts.
    """
    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    dims = _spatial_dims(parser)
    if defaults is None:
        reader = ConfigParser()
        reader.read_config([str(f) for f in files])
        defaults = reader.get()
    for key, rule in RULES.items():
        if key not in parser:
            continue
        source = sources.get(key) or str(stating_file(files, key))
        try:
            value = parser.get_parsed_content(key)
        except Exception as err:
            shown = {"--set": f"--set {key}"}.get(source, source if source.startswith("--") else f"{source}: {key}")
            raise UserError(f"{shown}: cannot be evaluated ({root_message(err)}); give a plain value.") from err
        if not rule.accepts(value, dims):
            example = _example(key, rule, defaults.get(key), dims)
            raise _refusal(key, value, rule, source, example, dims)


# Entries medfcn reads from a bundle's configs without a default: missing, they would fail
# with a KeyError deep in a command. Checked over the files a stage merges (common.json and the
# stage's config), keyed by the stage's config.
REQUIRED_ENTRIES = {
    "inference.json": ("network_def", "network", "device", "preprocessing", "inferer", "postprocessing", "class_names"),
    "train.json": (
        *("dataset_dir", "folds_file", "fold", "output_dir", "epochs", "num_classes", "class_names", "modality"),
        *("patch_size", "network_def", "pretrained_encoder", "train", "initialize", "run"),
    ),
}


def _json_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path``.

    Raises:
        UserError: the file is unreadable, not JSON, or holds no JSON object (``{...}``).
    """
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err}); {fix}.") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {fix}.") from err
    if not isinstance(content, dict):
        raise UserError(f"{path}: holds a JSON {type(content).__name__}, not an object {{...}}; {fix}.")
    return content


def check_bundle_json(config_files: Path | Sequence[Path], meta_file: Path) -> None:
    """A bundle's configs (one stage's list, merged in order) and ``metadata.json`` must be JSON
    objects, and the merged configs must hold the entries medfcn reads from them
    (:data:`REQUIRED_ENTRIES`, by the stage config's file name: the last of the list).

    Raises:
        UserError: naming the file and what is wrong.
    """
    fix = "restore the file from the bundle's source (or `medfcn package` the run again)"
    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(map(Path, config_files))
    configs = {path: _json_object(path, fix) for path in files}
    _json_object(meta_file, fix)
    merged = {key: path for path, config in configs.items() for key in config}  # key: the last file stating it
    stage = files[-1]
    missing = [key for key in REQUIRED_ENTRIES.get(stage.name, ()) if key not in merged]
    if missing:
        raise UserError(f"{stage}: has no {', '.join(map(repr, missing))} entry; {fix}.")
    source = merged.get("network_def", stage)
    network = configs[source].get("network_def", {}) if source in configs else {}
    if not isinstance(network, dict) or not isinstance(network.get("_target_"), str):
        shown = json.dumps(network)[:60]
        raise UserError(f'{source}: network_def is {shown}, not a component {{"_target_": ...}}; {fix}.')
