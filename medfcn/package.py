"""Package a training run as a MONAI bundle that ``medfcn infer`` and MONAI's runner can use.

A run of ``medfcn train`` records the bundle it trained and every option it was given
(``medfcn_run.json``). Packaging copies that bundle and writes each option into the config that
states it: the model's (network, patch, spacing, modality, classes, slice axis, the data) into
``configs/common.json``, which every stage's config is merged onto, the recipe's into
``configs/train.json`` (so the new bundle retrains the same recipe on the same data; there is
nothing to copy into ``inference.json``). It records the axes training flipped
(``trained_flip_axes``), puts the run's weights in ``models/model.pt`` and rewrites
``metadata.json`` (with the profile of the run's training cases, :mod:`medfcn.data.profile`) and
``docs/README.md`` for the new model. The bundle is assembled in a hidden folder beside the
target, loaded once with its weights as ``medfcn infer`` would, and only then renamed into
place, so a failed packaging leaves nothing behind.

Example::

    from medfcn.package import package_run
    package_run("runs/spleen/fold0", "bundles/spleen_fcn")
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver
from monai.transforms import Compose, RandFlipd

from medfcn.bundle import (
    COMMON_FILE,
    MODEL_KEYS,
    MULTI_GPU_FILE,
    NOT_SETTINGS,
    RUN_SPLIT_FILE,
    bundle_files,
    read_run_record,
    weights_file,
)
from medfcn.data.datasets import fold_datalists
from medfcn.data.profile import PROFILE_KEY, RUN_PROFILE, training_profile
from medfcn.errors import UserError
from medfcn.io import atomic_torch_save, read_checkpoint, refuse_existing, replace_folder, writable_dir
from medfcn.outputs import plural, refuse_output_over
from medfcn.segmenter import load_segmenter

__all__ = ["package_run", "trained_flip_axes"]

_STAGES = ("train.json", MULTI_GPU_FILE, "inference.json", "evaluate.json")
_CONFIGS = (COMMON_FILE, *_STAGES, "logging.conf", "metadata.json")
# what `medfcn plan` wrote into the bundle the run trained: kept, so the packaged bundle still
# says what the data looked like and why each setting was chosen
_PLAN_FILES = ("fingerprint.json", "plan.json")
# a run's settings that are no setting of a shipped bundle: a smoke run's subset of the cases
_RUN_ONLY = ("max_cases", "cache", "cache_dir", "data_on_device")  # how this run was fed, not what the bundle is
# where the packaged bundle keeps a split the run made in its own folder (RUN/folds.json), so
# that it records which cases were held out and retrains on the same split
_SPLIT = "folds.json"
_SPLIT_ENTRY = f"$os.path.join(@bundle_root, 'configs', {_SPLIT!r})"
# sections of a planned bundle's README that speak of the untrained bundle: its next steps
# ("It holds no weights yet: train it", the commands) and the untrained bundle's licence
_STALE_SECTIONS = ("## Commands", "## Deployment exports", "## Licence")
_LICENSE = """Code and configs: Apache License 2.0 (see the LICENSE file at the root of the medfcn repository).

Model weights (models/model.pt) were trained by the user of medfcn on their own data and are a
derived work of it: they fall under that data's licence and terms of use, which this file does
not know. State them here before sharing the bundle.
"""


def trained_flip_axes(train: ConfigParser) -> list[int]:
    """Spatial axes the training augmentation (``train#augmentation``, as built: ``%file#id``
    macros, expressions and disabled entries resolved) flips one at a time: ``RandFlipd`` with
    a single axis. Joint flips (``spatial_axis=[0, 1]``, or None for all axes) are left out: the
    model never saw one of those axes flipped alone, which is what ``--tta`` would show it.
    For a 2D config (``slice_axis``), the volume's axes that the slice's flipped axes are."""
    train.resolve_macro_and_relative_ids()
    axes = set()
    for transform in _flat(train.get_parsed_content("train#augmentation", lazy=False)):
        if not isinstance(transform, RandFlipd):
            continue
        axis = transform.flipper.spatial_axis
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if isinstance(axis, int) and not isinstance(axis, bool):
            axes.add(axis)
    slice_axis = train.get_parsed_content("slice_axis", default=None)
    if slice_axis is not None and int(train.get_parsed_content("network_def#spatial_dims")) == 2:
        # a 2D model was flipped along its slice's axes; --tta flips the volume, which has slice_axis too
        axes = {a + (a >= slice_axis) for a in axes}
    return sorted(axes)


def _flat(transforms: Any) -> list:
    """The transforms of a list or ``Compose``, nested ones included, in order."""
    if isinstance(transforms, Compose):
        transforms = transforms.transforms
    if isinstance(transforms, (list, tuple)):
        return [t for item in transforms for t in _flat(item)]
    return [transforms]


def _run_weights(run_dir: Path, which: str) -> tuple[dict, str, dict]:
    """The state dict to ship, a sentence on where it came from, and the run's record of its
    best validation (``best_metric``, ``best_metric_epoch``; ``{}`` when unreadable).

    ``best``: ``best_model.pt`` (moving-average weights of the best validation epoch); ``last``:
    the last epoch's moving average in ``last.pt`` (its plain weights when the run kept none).
    """
    if which not in ("best", "last"):
        raise UserError(f"--weights {which!r}: use best or last.")
    path = run_dir / ("best_model.pt" if which == "best" else "last.pt")
    if not path.is_file():
        raise UserError(f"{path}: missing; the run has not finished a validation yet, or pass the other --weights.")
    state = read_checkpoint(path, fix="pass the other --weights, or package another run")
    if which == "best":
        return state, "best_model.pt: the moving-average weights of the best validation epoch", _best(run_dir)
    best = dict(state.get("best", {}))
    average = (state.get("weight_average") or {}).get("network")
    if average:
        return average, "last.pt: the moving-average weights of the last epoch", best
    return state["network"], "last.pt: the weights of the last epoch (the run kept no moving average)", best


def _best(run_dir: Path) -> dict:
    """``last.pt``'s record of the best validation (``best_metric``, ``best_metric_epoch``)."""
    try:
        return dict(torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True).get("best", {}))
    except Exception:  # the score is documentation only; the weights were checked on their own
        return {}


def _bundle_settings(settings: dict, run_dir: Path, configs: Path) -> dict:
    """The run's ``settings`` as the packaged bundle states them: without :data:`_RUN_ONLY`, and
    the run's split file (the one it made or the one it was given) copied into ``configs`` and
    named relative to ``@bundle_root``, so the bundle says which cases it held out wherever it goes.

    A run folder copied from another machine records the split it made by that machine's path:
    then the run folder's own :data:`RUN_SPLIT_FILE` is the split."""
    kept = {k: v for k, v in settings.items() if k not in _RUN_ONLY}
    if not kept.get("folds_file"):
        return kept
    split = Path(kept["folds_file"])
    if not split.is_file() and split.name == RUN_SPLIT_FILE and (run_dir / RUN_SPLIT_FILE).is_file():
        split = run_dir / RUN_SPLIT_FILE
    if split.is_file():
        shutil.copy2(split, configs / _SPLIT)
        kept["folds_file"] = _SPLIT_ENTRY
    return kept


def _metadata(meta: dict, train: ConfigParser, name: str, run_dir: Path, best: dict, source: str, split: str) -> dict:
    """``meta`` (the source bundle's metadata.json) rewritten for the packaged model, whose
    validation cases were a fold of ``split``."""
    classes = list(train.get_parsed_content("class_names"))
    patch = list(train.get_parsed_content("patch_size"))
    channels = int(train.get_parsed_content("network_def#in_channels"))
    modality = str(train.get_parsed_content("modality"))
    today = datetime.date.today().isoformat()
    meta = dict(meta)
    meta["version"] = "0.1.0"
    meta["changelog"] = {"0.1.0": f"packaged by medfcn on {today} from the run in {run_dir} ({source})"}
    dims = int(train.get_parsed_content("network_def#spatial_dims"))
    meta["task"] = f"Segmentation of {', '.join(classes)}"
    meta["description"] = (
        f"A {dims}D fully convolutional network with skip fusion (medfcn.FCN) segmenting {', '.join(classes)}, "
        "packaged by medfcn from a training run; see docs/README.md."
    )
    meta["data_source"] = str(train.get_parsed_content("dataset_dir"))
    meta["image_classes"] = f"{plural(channels, 'channel')} {modality}, resampled to {train.get('pixdim')} mm, RAS"
    meta["label_classes"] = ", ".join(f"{i} {n}" for i, n in enumerate(["background", *classes]))
    fmt = meta.setdefault("network_data_format", {})
    image = fmt.setdefault("inputs", {}).setdefault("image", {})
    image.update(
        num_channels=channels,
        spatial_shape=patch,
        modality=modality,
        channel_def={str(i): f"channel {i}" for i in range(channels)},
    )
    pred = fmt.setdefault("outputs", {}).setdefault("pred", {})
    pred.update(
        num_channels=len(classes) + 1,
        spatial_shape=patch,
        channel_def={str(i): n for i, n in enumerate(["background", *classes])},
    )
    meta["performance"] = {
        "validation": f"fold {train.get('fold')} of {split}",
        "best_validation_mean_dice": best.get("best_metric"),
        "best_validation_epoch": best.get("best_metric_epoch"),
    }
    meta["name"] = name
    return meta


def _training_profile(run_dir: Path, settings: dict, train: ConfigParser) -> dict | None:
    """The profile of the run's training cases: the one ``medfcn train`` wrote beside the run,
    else computed from the run's data and split; None when neither is at hand."""
    run_profile = run_dir / RUN_PROFILE
    if run_profile.is_file():
        try:
            return json.loads(run_profile.read_text())
        except (OSError, ValueError):
            pass  # a damaged copy: compute it again below
    data, split, fold = (settings.get(k) for k in ("dataset_dir", "folds_file", "fold"))
    try:
        cases, _ = fold_datalists(data, split, int(fold))
        classes = train.get_parsed_content("class_names")
        return training_profile(cases, classes, source=f"training cases of fold {fold} of {split}, {data}")
    except Exception:  # the data moved or is gone: the bundle goes without (infer then checks nothing)
        return None


def _readme(name: str, run_dir: Path, settings: dict, shipped: dict, best: dict, source: str, origin: Path) -> str:
    """The packaged bundle's README: the run's ``settings``, of which the bundle states ``shipped``."""
    score = best.get("best_metric")
    score = f"{score:.4f}" if isinstance(score, float) else score
    lines = [
        f"# {name}",
        "",
        f"Packaged by `medfcn package` on {datetime.date.today().isoformat()} from the training run in `{run_dir}`,",
        f"a run of the bundle `{origin}`. Weights: {source}.",
        "",
        "Run it: `medfcn infer <this folder> scan.nii.gz dicom_series/ --out masks/`.",
        "Retrain the same recipe: `medfcn train <this folder> --output RUN` (configs/train.json holds the",
        "run's options below).",
        "Deploy it: `medfcn export <this folder> --format onnx` (`models/model.onnx`, for onnxruntime and",
        "`medfcn infer --backend onnxruntime`) or `--format exported` (`models/model.pt2`, torch.export);",
        "`configs/metadata.json` (`medfcn_exports`) then says how to load each.",
        "",
        "## Training options of the run (`medfcn_run.json`)",
        "",
        "| entry | value |",
        "| --- | --- |",
        *(f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(settings.items())),
        "",
        *_unshipped_note(settings, shipped),
        "## Validation during training",
        "",
        f"Best mean Dice {score} at epoch {best.get('best_metric_epoch')} on fold "
        f"{settings.get('fold')} of `{settings.get('folds_file')}`.",
        _held_out_note(settings.get("fold")),
        "",
        "Licence: see LICENSE. The code and configs are medfcn's (Apache-2.0); the weights are derived",
        "from the training data and fall under its licence.",
        "",
    ]
    return "\n".join(lines)


def _unshipped_note(settings: dict, shipped: dict) -> list[str]:
    """README lines on the run's settings the bundle states otherwise (none: no lines)."""
    notes = []
    if shipped.get("folds_file") == _SPLIT_ENTRY:
        notes.append(f"The run's split (`folds_file`) is kept in the bundle as `configs/{_SPLIT}`.")
    notes += [f"`{k}` is the run's alone: not packaged." for k in _RUN_ONLY if k in settings]
    return [" ".join(notes), ""] if notes else []


def _planned_readme(origin: Path) -> str:
    """The planned bundle's ``docs/README.md`` (every decision with its reason), one heading level
    down, for the packaged bundle's README; empty for a bundle ``medfcn plan`` did not write."""
    planned = origin / "docs" / "README.md"
    if not (origin / "configs" / "plan.json").is_file() or not planned.is_file():
        return ""
    # what precedes the first section is the untrained bundle's title and next step
    sections = re.split(r"(?m)^(?=## )", planned.read_text())[1:]
    kept = "".join(s for s in sections if not s.startswith(_STALE_SECTIONS))
    body = "\n".join("#" + line if line.startswith("#") else line for line in kept.splitlines())
    return f"\n## How `medfcn plan` configured the bundle ({origin})\n\n{body}\n"


def _held_out_note(fold: int | None) -> str:
    if fold == -1:
        return (
            "With fold -1 the validation cases were trained on, so this is not a held-out score: "
            "estimate one by cross-validation (one run per fold)."
        )
    return (
        "The fold's cases were held out from training; the best epoch was chosen on them, so its "
        "score is slightly optimistic: cross-validation (one run per fold) estimates new cases."
    )


def _move_model_keys(common: ConfigParser, train: ConfigParser) -> None:
    """For a bundle without ``common.json``: its :data:`MODEL_KEYS`, taken out of ``train.json``
    into ``common`` (``inference.json`` then states none of them: see :func:`_drop_model_keys`)."""
    for key in MODEL_KEYS:
        if key in train:
            common[key] = train.get(key)
            del train.get()[key]


def _split_settings(common: ConfigParser, train: ConfigParser, settings: dict) -> None:
    """Write each of the run's ``settings`` into the config that states it: ``common.json``
    (the model: network, patch, spacing, modality, classes; the data) or ``train.json`` (the
    recipe)."""
    for key, value in settings.items():
        (common if key.replace(ReferenceResolver.sep, "#").split("#")[0] in common else train)[key] = value
    for parser in (common, train):
        parser.resolve_macro_and_relative_ids()  # a %file#id macro would not resolve from another folder


def _drop_model_keys(config: Path, common: dict) -> None:
    """Remove from ``config`` (another stage's file) the entries ``common.json`` states, which it
    would override when merged after it: the model is stated once."""
    if not config.is_file():
        return
    content = json.loads(config.read_text())
    kept = {k: v for k, v in content.items() if k not in common or k == "imports"}
    if kept != content:
        ConfigParser.export_config_file(kept, config, indent=4)


def _as_read(config: Path) -> tuple[dict, dict]:
    """``config``'s JSON as written and as MONAI's parser holds it (``#`` read as ``::``);
    empty dicts for a missing file."""
    if not config.is_file():
        return {}, {}
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.resolve_macro_and_relative_ids()  # as _split_settings leaves the packaged parsers
    return json.loads(config.read_text()), parser.get()


def _write_config(content: dict, config: Path, original: tuple[dict, dict]) -> None:
    """Write ``content`` (a parser's) to ``config``, each entry the packaging left unchanged as the
    source bundle wrote it (``@train#dataset``, not the parser's ``@train::dataset``), without the
    parser's empty ``_meta_``: a packaged config differs from its source in the run's options only."""
    raw, parsed = original
    kept = {
        # an entry with a %file#id macro stays resolved: the file would not be found from the new folder
        key: raw[key] if key in raw and parsed.get(key) == value and "%" not in json.dumps(raw[key]) else value
        for key, value in content.items()
        if not (key == "_meta_" and key not in raw and not value)
    }
    config.write_text(json.dumps(kept, indent=4) + "\n")


def _write_configs(configs: Path, name: str, settings: dict) -> ConfigParser:
    """Write the run's ``settings`` and ``name`` into the copied ``configs`` folder; return a
    parser of the packaged training config (``common.json`` + ``train.json``)."""
    originals = {f: _as_read(configs / f) for f in (COMMON_FILE, "train.json")}
    common, train = ConfigParser(), ConfigParser()
    train.read_config(str(configs / "train.json"))
    if (configs / COMMON_FILE).is_file():
        common.read_config(str(configs / COMMON_FILE))
    else:
        _move_model_keys(common, train)
    _split_settings(common, train, settings)
    if "bundle_name" in common:  # its own default run folder, not the source bundle's
        common["bundle_name"] = name
    else:
        train["output_dir"] = f"$os.path.join('runs', {name!r}, 'fold' + str(@fold))"
    # what --tta may flip: what training flipped
    common["trained_flip_axes"] = trained_flip_axes(ConfigParser(copy.deepcopy({**common.get(), **train.get()})))
    merged = ConfigParser(copy.deepcopy({**common.get(), **train.get()}))  # as MONAI merges the two files
    _write_config(common.get(), configs / COMMON_FILE, originals[COMMON_FILE])
    _write_config(train.get(), configs / "train.json", originals["train.json"])
    for other in ("inference.json", "evaluate.json"):
        _drop_model_keys(configs / other, common.get())
    return merged


def _assemble(
    tmp: Path, name: str, origin: Path, run_dir: Path, run: dict, weights: dict, source: str, best: dict
) -> None:
    """Write the packaged bundle ``name`` into the empty folder ``tmp``."""
    # a device recorded by runs before `train --device` is no part of the bundle
    settings = {k: v for k, v in run["settings"].items() if k not in NOT_SETTINGS}
    for folder in ("configs", "models", "docs"):
        (tmp / folder).mkdir()
    for config in _CONFIGS + _PLAN_FILES:
        if (origin / "configs" / config).is_file():
            shutil.copy2(origin / "configs" / config, tmp / "configs" / config)
    shipped = _bundle_settings(settings, run_dir, tmp / "configs")
    train = _write_configs(tmp / "configs", name, shipped)
    meta_file = tmp / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    split = f"configs/{_SPLIT}" if shipped.get("folds_file") == _SPLIT_ENTRY else train.get("folds_file")
    meta = _metadata(meta, train, name, run_dir, best, source, split)
    meta.pop(PROFILE_KEY, None)  # the source bundle's describes its own training data, not the run's
    profile = _training_profile(run_dir, settings, train)
    if profile:
        meta[PROFILE_KEY] = profile
    meta_file.write_text(json.dumps(meta, indent=4) + "\n")
    readme = _readme(name, run_dir, settings, shipped, best, source, origin) + _planned_readme(origin)
    (tmp / "docs" / "README.md").write_text(readme)
    (tmp / "LICENSE").write_text(_LICENSE)
    atomic_torch_save(weights, weights_file(tmp))


def package_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    bundle: str | os.PathLike | None = None,
    weights: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Make the bundle ``out`` from the training run in ``run_dir``; return ``out``.

    Args:
        run_dir: a ``medfcn train`` output folder (``medfcn_run.json``, ``last.pt``,
            ``best_model.pt``).
        out: the bundle folder to create.
        bundle: the bundle the run trained; default: the one ``medfcn_run.json`` names.
        weights: ``best`` (best validation epoch) or ``last`` (last epoch), both the
            moving-average weights; default ``best``, except for a run of ``fold=-1``, whose
            validation cases were trained on: ``last`` then.
        overwrite: replace an existing ``out``.

    Raises:
        UserError: not a medfcn run, missing weights, an existing ``out``, or weights that do
            not load into the packaged inference config.
    """
    run_dir, out = Path(run_dir), Path(out)
    run = read_run_record(run_dir)
    origin = _source_bundle(Path(bundle or run.get("bundle") or ""), run_dir, out)
    refuse_existing([out], overwrite, fix="pass --overwrite to replace it, or choose another --out")
    if weights is None:
        weights = "last" if run["settings"].get("fold") == -1 else "best"
    state, source, best = _run_weights(run_dir, weights)
    writable_dir(out.parent, fix="choose another --out")
    with replace_folder(out) as tmp:
        _assemble(tmp, out.name, origin, run_dir, run, state, source, best)
        try:
            load_segmenter(tmp, device="cpu")
        except UserError as err:
            raise UserError(f"{run_dir}: the packaged bundle does not load its weights ({err}).") from err
    return out


def _source_bundle(origin: Path, run_dir: Path, out: Path) -> Path:
    """``origin``, checked as the bundle to package ``run_dir`` from into ``out``: a complete
    bundle whose configs are JSON, neither ``run_dir`` nor ``origin`` inside ``out``."""
    if not (origin / "configs" / "inference.json").is_file():
        raise UserError(
            f"{origin}: not a bundle with configs/inference.json; pass --bundle with the bundle the run trained."
        )
    # with --overwrite, the folder `out` is replaced as a whole
    refuse_output_over(out, [run_dir], "--out", "training run")
    refuse_output_over(out, [origin], "--out", "source bundle")
    for config in ("train.json", "inference.json"):  # broken JSON: one line naming the file
        bundle_files(origin, config)
    return origin
