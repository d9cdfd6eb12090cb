"""The run's classes and modality, from the dataset's ``dataset.json`` where they differ from the bundle's.

A bundle trained on other labels must not silently be trained (or reused) on a dataset whose
``dataset.json`` names others: ``num_classes``, ``class_names`` and ``modality`` are taken
from it, each unless the caller sets it (``--set``), and the run says so in one line. The
network follows (``network_def``'s ``out_channels`` is ``@num_classes``); a pretrained encoder
still fits (it does not depend on the classes). The values taken are recorded like settings
given, so a resume repeats them and ``medfcn package`` writes them into the new bundle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medfcn.data.classes import label_classes, modality_kind
from medfcn.outputs import plural
from medfcn.training.settings import RunSettings

__all__ = ["dataset_labels"]

_LABEL_KEYS = ("num_classes", "class_names", "modality")
_FIX = "or give the classes yourself: --set num_classes=N --set 'class_names=[...]'"


def dataset_labels(run: RunSettings) -> str | None:
    """Apply the classes and modality of the run's ``dataset.json`` where they differ from the
    bundle's and the caller set none (a resume repeats its own instead); return the one line
    that says so, None when nothing changed. A missing or unreadable ``dataset.json`` changes
    nothing: the pre-flight checks report it.

    Raises:
        UserError: ``dataset.json``'s labels are not 0..N (0 the background) with distinct names.
    """
    wanted = [key for key in _LABEL_KEYS if key not in run.recorded and key in run.parser]
    index = Path(run.get("dataset_dir")) / "dataset.json"
    meta = _read(index) if wanted and not run.resume else None
    if meta is None:
        return None
    found = {}
    if {"num_classes", "class_names"} & set(wanted) and "labels" in meta:
        found.update(label_classes(index, meta["labels"], _FIX))
    modality = modality_kind(meta.get("modality"))
    if modality is not None:
        found["modality"] = modality
    bundle = {key: _bundle_value(run, key) for key in _LABEL_KEYS if key in run.parser}
    taken = {key: value for key, value in found.items() if key in wanted and not _same(key, value, bundle[key])}
    if not taken:
        return None
    run.parser.update(taken)
    run.recorded = {**run.recorded, **taken}
    trained = {key: run.get(key) for key in _LABEL_KEYS if key in run.parser}
    return _notice(index, found, bundle, trained, taken, given=[key for key in _LABEL_KEYS if key not in wanted])


def _bundle_value(run: RunSettings, key: str) -> Any:
    """The bundle's own value of ``key`` (before ``--set``), where it states a plain one; else the run's."""
    value = run.defaults.get(key)
    if value is None or (isinstance(value, str) and value.startswith(("$", "@", "%"))):
        return run.get(key)
    return value


def _read(index: Path) -> dict | None:
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _same(key: str, found: Any, bundle: Any) -> bool:
    """Whether the dataset's value says what the bundle's does (names in any letter case, MR as MRI)."""
    if key == "class_names":
        return [str(n).strip().casefold() for n in found] == [str(n).strip().casefold() for n in bundle]
    if key == "modality":
        return modality_kind({"0": bundle}) == found
    return found == bundle


def _notice(index: Path, found: dict, bundle: dict, trained: dict, taken: dict, given: list[str]) -> str:
    """``labels: DIR/dataset.json names 1 label ['left atrium'], the bundle 2 [...]: training ...``."""
    parts = []
    if {"num_classes", "class_names"} & set(taken):
        names, before = found["class_names"], bundle["class_names"]
        setting = f"num_classes={trained['num_classes']}, class_names={list(trained['class_names'])}"
        stated = [key for key in ("num_classes", "class_names") if key in given]
        kept = f" ({' and '.join(stated)} as given)" if stated else ""
        parts.append(
            f"labels: {index} names {plural(len(names), 'label')} {names}, "
            f"the bundle {len(before)} {list(before)}: training {setting}{kept}"
        )
    if "modality" in taken:
        parts.append(
            f"modality: {index} names {taken['modality']}, the bundle {bundle['modality']}: "
            f"training modality={taken['modality']}"
        )
    return "; ".join(parts)
