"""Write the bundle of a :class:`~medfcn.planning.rules.Plan`: what ``medfcn plan`` leaves behind.

The bundle is the shipped bundles' layout (:mod:`medfcn.bundle`): ``configs/common.json`` holds
every decision of the plan under the keys the shipped ``bundles/hippocampus_fcn`` (3D) and
``bundles/hippocampus_fcn_2d`` (2D) use; the stage configs (``train.json``, ``inference.json``,
``evaluate.json``, ``logging.conf``) are ``medfcn/planning/template``'s, byte for byte;
``configs/fingerprint.json`` and ``configs/plan.json`` record what the plan was made from and
what it decided; ``metadata.json``, ``docs/README.md`` (every decision with its reason) and
``LICENSE`` describe it. No ``models/`` folder: ``medfcn train`` then ``medfcn package`` make
the weights.

Example::

    from medfcn.planning.writer import write_bundle
    write_bundle(plan, fingerprint, Path("bundles/left_atrium_fcn"))
"""

from __future__ import annotations

import datetime
import json
import os
from importlib import metadata as package_metadata
from importlib import resources
from pathlib import Path
from typing import Any

from medfcn.bundle import COMMON_FILE, MULTI_GPU_FILE
from medfcn.errors import UserError
from medfcn.io import refuse_existing, replace_folder, writable_dir
from medfcn.outputs import plural, refuse_output_over
from medfcn.planning.rules import Plan

__all__ = ["STAGE_FILES", "write_bundle", "template_text"]

# The stage configs every bundle shares, copied from medfcn/planning/template byte for byte
STAGE_FILES = ("train.json", MULTI_GPU_FILE, "inference.json", "evaluate.json", "logging.conf")
# The recipe entries train.json states (a later file of the merge wins, so common.json cannot
# change them): a plan must keep the template's values
_TRAIN_ENTRIES = ("ema_decay", "learning_rate")
_IMPORTS = [
    "$import glob",
    "$import os",
    "$import torch",
    "$import monai",
    "$import medfcn",
    "$import medfcn.data",
    "$import medfcn.handlers",
    "$import medfcn.training.handlers",
    "$import medfcn.masks",
    "$import medfcn.inferers",
    "$import medfcn.losses",
]
# The hippocampus recipe's augmentation and inference settings (bundles/hippocampus_fcn*)
_ROTATE_RAD, _SCALE = 0.26, 0.15
_SW_BATCH = {2: 64, 3: 4}
# 2D: slices cropped per volume and step (bundles/hippocampus_fcn_2d), where a Plan has no
# slices_per_volume field
_SLICES_PER_VOLUME = 4
_LICENSE = """Code and configs: Apache License 2.0 (see the LICENSE file at the root of the medfcn repository).

Data: {dataset}. The training data's terms are unknown to medfcn: state them here before sharing
weights trained on it. Weights trained on the data are a derived work of it and fall under its
licence and terms of use.
"""


def template_text(name: str) -> str:
    """The text of the stage config ``name`` (``train.json``...) of ``medfcn/planning/template``."""
    return resources.files("medfcn.planning").joinpath("template", name).read_text(encoding="utf-8")


def write_bundle(plan: Plan, fingerprint: dict, out: Path, overwrite: bool = False) -> Path:
    """Write the bundle of ``plan`` (made from ``fingerprint``, the dataset's, see
    :mod:`medfcn.planning`) into the folder ``out``; return ``out``.

    The bundle is assembled in a hidden folder beside ``out`` and renamed into place, so a
    failure leaves nothing behind; with ``overwrite`` an existing ``out`` is replaced as a whole.

    Raises:
        UserError: ``out`` exists (without ``overwrite``), is or holds the dataset, or its
            parent cannot be written.
        ValueError: a plan the bundle cannot state (patch of the wrong length, a recipe entry
            of train.json other than the template's).
    """
    out = Path(out)
    check_out(out, Path(fingerprint["dataset"]["dir"]), overwrite)
    common = common_config(plan, fingerprint, out.name)
    writable_dir(out.parent, fix="choose another --out")
    with replace_folder(out) as tmp:
        _assemble(tmp, plan, fingerprint, common)
    return out


def check_out(out: Path, dataset_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is or holds the dataset (``--overwrite`` would replace it) or lies
    inside it (a bundle is no part of the data), and an existing ``out`` without ``overwrite``."""
    refuse_output_over(out, [dataset_dir], "--out", "dataset")
    spelt, resolved = Path(os.path.abspath(out)), out.resolve()
    if spelt.is_relative_to(os.path.abspath(dataset_dir)) or resolved.is_relative_to(dataset_dir.resolve()):
        raise UserError(f"--out {out}: lies inside the dataset {dataset_dir}; write the bundle outside the data.")
    refuse_existing([out], overwrite, fix="pass --overwrite to replace it, or choose another --out")
    if _not_a_bundle(out):  # --overwrite replaces a bundle (or an empty folder), never other files
        what = "a file" if not out.is_dir() else "a folder that is no bundle (no configs/metadata.json)"
        raise UserError(f"--out {out}: is {what}; --overwrite replaces a bundle only: choose another --out.")


def _not_a_bundle(out: Path) -> bool:
    if not out.exists():
        return False
    if not out.is_dir():
        return True
    return any(out.iterdir()) and not (out / "configs" / "metadata.json").is_file()


def _assemble(tmp: Path, plan: Plan, fingerprint: dict, common: dict) -> None:
    """Write every file of the bundle into the empty folder ``tmp``."""
    configs, docs = tmp / "configs", tmp / "docs"
    configs.mkdir()
    docs.mkdir()
    for name in STAGE_FILES:
        (configs / name).write_text(template_text(name), encoding="utf-8")
    _write_json(configs / COMMON_FILE, common)
    _write_json(configs / "fingerprint.json", fingerprint)
    _write_json(configs / "plan.json", plan.to_json())
    _write_json(configs / "metadata.json", bundle_metadata(plan, fingerprint))
    (docs / "README.md").write_text(readme(plan, fingerprint, common["bundle_name"]), encoding="utf-8")
    (tmp / "LICENSE").write_text(_LICENSE.format(dataset=_dataset_title(fingerprint)), encoding="utf-8")


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")


# --- configs/common.json --------------------------------------------------------------------


def common_config(plan: Plan, fingerprint: dict, bundle_name: str) -> dict:
    """``configs/common.json`` of the plan: the shipped bundles' keys, in their order."""
    _check_plan(plan)
    common = {
        "imports": list(_IMPORTS),
        "bundle_name": bundle_name,
        "bundle_root": ".",
        "dataset_dir": os.path.abspath(fingerprint["dataset"]["dir"]),
        "folds_file": None,  # medfcn train makes a 5-fold split of the data into the run folder
        "weights_file": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "bf16": True,
        "modality": plan.modality,
        # CT only; null, not left out, since the template's train.json and inference.json pass
        # @hu_window to the normalisation whatever the modality
        "hu_window": None if plan.hu_window is None else list(plan.hu_window),
        "intensity_stats": None if plan.intensity_stats is None else list(plan.intensity_stats),
        "pixdim": [float(s) for s in plan.pixdim],
        "class_names": list(plan.class_names),
        "num_classes": plan.num_classes,
        "patch_size": [int(p) for p in plan.patch_size],
    }
    if plan.dims == 2:
        common["slice_axis"] = plan.slice_axis
    common["network_def"] = network_def(plan)
    common["trained_flip_axes"] = sorted(plan.flip_axes) if plan.dims == 3 else _flips_2d(plan)[0]
    # budget_minutes: medfcn train's ETA says where the run ends against it, and its BudgetKeeper
    # ends a run the machine slowed down within it
    common.update(epochs=plan.epochs, budget_minutes=float(plan.budget_minutes))
    common.update(batch_size=plan.batch_size, val_interval=plan.val_interval)
    if plan.dims == 2:
        common["slices_per_volume"] = getattr(plan, "slices_per_volume", _SLICES_PER_VOLUME)
    common["patch_sampler"] = _patch_sampler(plan)
    common["spatial_augmentation"] = _spatial_augmentation(plan)
    common.update(sw_batch_size=_SW_BATCH[plan.dims], overlap=0.5, window_inferer=_window_inferer(plan))
    return common


def _check_plan(plan: Plan) -> None:
    """The plan must be one a bundle can state (a bug of the planner otherwise, not the user's)."""
    if plan.dims not in (2, 3) or len(plan.patch_size) != plan.dims or len(plan.pixdim) != 3:
        raise ValueError(f"plan: dims {plan.dims} with patch {plan.patch_size} and pixdim {plan.pixdim}")
    if plan.dims == 2 and plan.slice_axis not in (0, 1, 2):
        raise ValueError(f"plan: a 2D plan needs slice_axis 0, 1 or 2, not {plan.slice_axis}")
    if any(a not in range(plan.dims) for a in plan.flip_axes):
        raise ValueError(f"plan: flip_axes {plan.flip_axes} are not axes of a {plan.dims}D network")
    if (plan.modality == "CT") != (plan.hu_window is not None):
        raise ValueError(f"plan: hu_window {plan.hu_window} with modality {plan.modality} (a window is for CT only)")
    train = json.loads(template_text("train.json"))
    for key in _TRAIN_ENTRIES:
        if getattr(plan, key) != train[key]:
            raise ValueError(
                f"plan: {key} {getattr(plan, key)} differs from train.json's {train[key]}, which every "
                "bundle shares (medfcn/planning/template): move the entry into common.json first"
            )


def network_def(plan: Plan) -> dict:
    """``medfcn.FCN``'s arguments: ``encoder_blocks`` only where a scale has more than one
    block, ``strides`` only where pooling is not 2 on every axis (the shipped bundles' form)."""
    network = {
        "_target_": "medfcn.FCN",
        "spatial_dims": plan.dims,
        "in_channels": plan.in_channels,
        "out_channels": "@num_classes",
        "features": list(plan.features),
        "fusion": "sum",
        "deep_supervision": plan.deep_supervision,
    }
    if any(b != 1 for b in plan.encoder_blocks):
        network["encoder_blocks"] = list(plan.encoder_blocks)
    if any(s != 2 for scale in plan.strides for s in scale):
        network["strides"] = [list(scale) for scale in plan.strides]
    return network


def _flips_2d(plan: Plan) -> tuple[list[int], list[int]]:
    """A 2D plan's flips: ``plan.flip_axes`` are the network's (the slice's) axes, which
    training flips; test-time augmentation flips the volume (``trained_flip_axes``), whose
    axes hold ``slice_axis`` too. Returns (volume axes, slice axes)."""
    in_plane = sorted(plan.flip_axes)
    return [a + (a >= plan.slice_axis) for a in in_plane], in_plane


def _patch_sampler(plan: Plan) -> list[dict]:
    """Pad to the patch, then foreground-weighted crops (pos:neg 2:1); 2D: slices of the volume."""
    keys = ["image", "label"]
    if plan.dims == 3:
        pad, crop, samples = "@patch_size", "@patch_size", 1
    else:  # the 2D bundle's: one slice thick along slice_axis, squeezed below
        pad = "$list(@patch_size)[:@slice_axis] + [-1] + list(@patch_size)[@slice_axis:]"
        crop = "$list(@patch_size)[:@slice_axis] + [1] + list(@patch_size)[@slice_axis:]"
        samples = "@slices_per_volume"
    sampler = [
        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": pad},
        {
            "_target_": "RandCropByPosNegLabeld",
            "keys": keys,
            "label_key": "label",
            "spatial_size": crop,
            "pos": 2,
            "neg": 1,
            "num_samples": samples,
        },
    ]
    if plan.dims == 2:
        sampler.append({"_target_": "SqueezeDimd", "keys": keys, "dim": "$@slice_axis + 1"})
    return sampler


def _spatial_augmentation(plan: Plan) -> list[dict]:
    """Random affine (rotation +-15 degrees, scale +-15 %, probability 0.3), then one
    ``RandFlipd`` per flip axis (probability 0.5): the hippocampus recipe."""
    keys = ["image", "label"]
    affine = {
        "_target_": "RandAffined",
        "keys": keys,
        "prob": 0.3,
        "rotate_range": [_ROTATE_RAD] * (3 if plan.dims == 3 else 1),
        "scale_range": [_SCALE] * plan.dims,
        "mode": ["bilinear", "nearest"],
        "padding_mode": "zeros",
    }
    axes = sorted(plan.flip_axes) if plan.dims == 3 else _flips_2d(plan)[1]
    flips = [{"_target_": "RandFlipd", "keys": keys, "spatial_axis": a, "prob": 0.5} for a in axes]
    return [affine, *flips]


def _window_inferer(plan: Plan) -> dict:
    """Gaussian-weighted sliding window of the patch; 2D: slice by slice along ``slice_axis``."""
    inferer = {"_target_": "SlidingWindowInferer"} if plan.dims == 3 else {"_target_": "SliceInferer"}
    if plan.dims == 2:
        inferer["spatial_dim"] = "@slice_axis"
    inferer.update(roi_size="@patch_size", sw_batch_size="@sw_batch_size", overlap="@overlap", mode="gaussian")
    return inferer


# --- configs/metadata.json ------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        if package == "medfcn":
            from medfcn import __version__

            return __version__
        return "unknown"


def bundle_metadata(plan: Plan, fingerprint: dict) -> dict:
    """MONAI bundle metadata, as the shipped bundles': versions of this environment, labels,
    input/output format, and the fingerprint's volume distribution per label (mm^3). The
    training-data profile (:data:`medfcn.data.profile.PROFILE_KEY`) is left to
    ``medfcn package``, which knows the run's training cases."""
    names = ["background", *plan.class_names]
    dataset = _dataset_title(fingerprint)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"planned by medfcn plan on {datetime.date.today().isoformat()} for {dataset}"},
        "monai_version": _version("monai"),
        "pytorch_version": _version("torch"),
        "numpy_version": _version("numpy"),
        "required_packages_version": {
            p: _version(p) for p in ("nibabel", "pytorch-ignite", "tensorboard", "SimpleITK", "medfcn")
        },
        "task": f"Segmentation of {', '.join(plan.class_names)} in {plan.modality} ({fingerprint['dataset']['name']})",
        "description": (
            f"A {plan.dims}D fully convolutional network with skip fusion by sum (medfcn.FCN) segmenting "
            f"{', '.join(plan.class_names)}, configured by medfcn plan from the data and a "
            f"{plan.budget_minutes:g}-minute training budget; see docs/README.md."
        ),
        "authors": "medfcn developers",
        "copyright": "Copyright (c) medfcn developers",
        "data_source": f"{dataset}, {fingerprint['dataset']['dir']} (licence: unknown until stated)",
        "data_type": "nibabel",
        "image_classes": (
            f"{plural(plan.in_channels, 'channel')} {plan.modality}, resampled to "
            f"{' x '.join(map(str, plan.pixdim))} mm, RAS"
        ),
        "label_classes": ", ".join(f"{i} {n}" for i, n in enumerate(names)),
        "intended_use": "Research only; not for clinical use.",
        "network_data_format": _data_format(plan, fingerprint),
        "label_volumes_mm3": _label_volumes(fingerprint),
    }


def _data_format(plan: Plan, fingerprint: dict) -> dict:
    """``network_data_format``: one patch of ``in_channels`` in, ``num_classes`` logits out."""
    ct = plan.modality == "CT"
    channels = fingerprint["dataset"].get("modality", {})
    patch = [int(p) for p in plan.patch_size]
    common = {"type": "image", "spatial_shape": patch, "dtype": "float32", "value_range": [], "is_patch_data": True}
    image = {
        **common,
        "format": "hounsfield" if ct else "magnitude",
        "modality": "CT" if ct else "MR",
        "num_channels": plan.in_channels,
        "channel_def": {str(i): channels.get(str(i), f"channel {i}") for i in range(plan.in_channels)},
    }
    pred = {
        **common,
        "format": "segmentation",
        "num_channels": plan.num_classes,
        "channel_def": {str(i): n for i, n in enumerate(["background", *plan.class_names])},
    }
    return {"inputs": {"image": image}, "outputs": {"pred": pred}}


def _label_volumes(fingerprint: dict) -> dict:
    """Per label name: volume (mm^3) over the cases holding it, and in how many cases it is."""
    return {
        label["name"]: {
            **{k: label["volume_mm3"][k] for k in ("min", "median", "max", "quantiles") if k in label["volume_mm3"]},
            "cases_present": label.get("cases_present"),
        }
        for _, label in sorted(fingerprint.get("labels", {}).items(), key=lambda item: int(item[0]))
    }


def _dataset_title(fingerprint: dict) -> str:
    dataset = fingerprint["dataset"]
    cases = plural(dataset["num_cases"], "case") if "num_cases" in dataset else "? cases"
    return f"{dataset.get('name') or Path(dataset['dir']).name} ({cases})"


# --- docs/README.md -------------------------------------------------------------------------


def readme(plan: Plan, fingerprint: dict, name: str) -> str:
    """``docs/README.md``: the bundle, its data, every decision with its reason, the budget, and
    the commands that train, run, evaluate and package it."""
    lines = [
        f"# {name}",
        "",
        f"A MONAI bundle planned by `medfcn plan` from the data in `{fingerprint['dataset']['dir']}`",
        f"and a training budget of {plural(plan.budget_minutes, 'minute')} on `{plan.device}`. It holds no weights",
        "yet: train it, then package the run (below).",
        "",
        *_data_section(plan, fingerprint),
        *_decisions_section(plan),
        *_budget_section(plan),
        *_commands_section(fingerprint["dataset"]["dir"]),
        *_exports_section(),
        "## Licence",
        "",
        "Code and configs: Apache-2.0. The training data's terms are unknown to medfcn: state them in",
        "`LICENSE` before sharing weights trained on it. Research use only; not a medical device.",
        "",
    ]
    return "\n".join(lines)


def _data_section(plan: Plan, fingerprint: dict) -> list[str]:
    summary = fingerprint.get("summary", {})
    labels = _label_volumes(fingerprint)
    rows = [
        f"| {n} | {v['cases_present']} | {v['min']:.0f} | {v['median']:.0f} | {v['max']:.0f} |"
        for n, v in labels.items()
    ]
    return [
        "## Data (`configs/fingerprint.json`)",
        "",
        f"{_dataset_title(fingerprint)}; {plural(plan.in_channels, 'channel')}, {plan.modality}; median shape "
        f"{summary.get('median_shape')} voxels, median spacing {summary.get('median_spacing_mm')} mm "
        f"(from {summary.get('min_spacing_mm')} to {summary.get('max_spacing_mm')}).",
        "",
        "| label | cases | min mm^3 | median mm^3 | max mm^3 |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]


def _decisions_section(plan: Plan) -> list[str]:
    values = plan.to_json()  # a reason may name a decision that is no single field (e.g. "normalisation")
    rows = [
        f"| `{key}` | {f'`{json.dumps(values[key])}`' if key in values else ''} | {_cell(reason)} |"
        for key, reason in plan.reasons.items()
    ]
    if plan.modality == "CT":
        low, high = plan.hu_window
        mean, std = plan.intensity_stats
        normalisation = f"clipped to [{low:.1f}, {high:.1f}] HU, then z-score with mean {mean:.1f}, std {std:.1f} HU"
    else:
        normalisation = "z-score per volume"
    average = f"decay {plan.ema_decay}" if plan.ema_decay is not None else "off"
    flips = f"{plan.flip_axes}{' of the slice' if plan.dims == 2 else ''}"
    return [
        "## Decisions (`configs/plan.json`, written into `configs/common.json`)",
        "",
        f"{plan.dims}D `medfcn.FCN`, features {plan.features}, encoder blocks {plan.encoder_blocks}, "
        f"pooling per scale {plan.strides}, deep supervision {plan.deep_supervision}; patch {plan.patch_size} "
        f"voxels at {plan.pixdim} mm{_sliced(plan)}; {plan.modality}, {normalisation}; flips along axes "
        f"{flips}, random affine; weight average {average}; batch {plan.batch_size}, {plural(plan.epochs, 'epoch')}, "
        f"validation every {plan.val_interval}.",
        "",
        "| decision | value | why |",
        "| --- | --- | --- |",
        *rows,
        "",
    ]


def _cell(text: str) -> str:
    """``text`` as one cell of a Markdown table: its ``|`` escaped, on one line."""
    return " ".join(str(text).replace("|", "\\|").split())


def _sliced(plan: Plan) -> str:
    return f", slices along axis {plan.slice_axis}" if plan.dims == 2 else ""


def _budget_section(plan: Plan) -> list[str]:
    share = 100 * plan.planned_minutes / plan.budget_minutes
    return [
        "## Budget",
        "",
        f"Budget {plural(plan.budget_minutes, 'minute')}; planned training time "
        f"{plural(plan.planned_minutes, 'minute', '.1f')} "
        f"({share:.0f} % of the budget) on "
        f"`{plan.device}`: {plural(plan.epochs, 'epoch')} at {plan.seconds_per_step:.2f} s per step (measured), "
        f"{plan.seconds_per_validation:.1f} s per validation every {plural(plan.val_interval, 'epoch')}, "
        f"{plan.seconds_setup:.0f} s of loading. On a machine slower than this one was when timed, "
        "`medfcn train` ends the run after the last epoch that fits the budget, with the learning rate "
        "decayed there (`--epochs` trains a fixed number instead).",
        "",
    ]


def _exports_section() -> list[str]:
    return [
        "## Deployment exports",
        "",
        "```bash",
        "medfcn export TRAINED_BUNDLE --format onnx        # models/model.onnx: onnxruntime, dynamic axes",
        "medfcn export TRAINED_BUNDLE --format exported    # models/model.pt2: torch.export.load(...).module()",
        "medfcn infer TRAINED_BUNDLE scans/ --out masks/ --backend onnxruntime",
        "```",
        "",
        "`configs/metadata.json` (`medfcn_exports`) lists each export, its input and how to load it.",
        "",
    ]


def _commands_section(dataset_dir: str) -> list[str]:
    return [
        "## Commands",
        "",
        "```bash",
        f"medfcn train BUNDLE --data {dataset_dir} --output RUN   # 5-fold split into RUN, fold 0",
        "medfcn package RUN --out TRAINED_BUNDLE                 # weights into TRAINED_BUNDLE/models/model.pt",
        "medfcn infer TRAINED_BUNDLE scans/ --out masks/",
        "medfcn evaluate masks/ labels/ --bundle TRAINED_BUNDLE --out metrics/",
        "python -m monai.bundle run --config_file \"['TRAINED_BUNDLE/configs/common.json',"
        "'TRAINED_BUNDLE/configs/inference.json']\" \\",
        "    --bundle_root TRAINED_BUNDLE --datalist \"[{'image': 'scan.nii.gz'}]\" --output_dir masks/",
        "```",
        "",
        "(BUNDLE: this folder.)",
        "",
    ]
