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
import re
from pathlib import Path
from typing import Any

from medfcn.errors import UserError
from medfcn.training.settings import RunSettings

__all__ = ["dataset_labels"]

_LABEL_KEYS = ("num_classes", "class_names", "modality")
# how MSD and others name the unlabelled voxels
_BACKGROUND = re.compile(r"^(background|bg|clear label|none|unlabell?ed)$", re.IGNORECASE)
# single-channel modalities the normalisation knows: CT (clipped to hu_window), anything MR (z-scored)
_CT = re.compile(r"^(ct|computed tomography)$", re.IGNORECASE)
_MR = re.compile(r"^(mri?|mri? .*|t1.*|t2.*|flair|adc|dwi|pd|lge.*)$", re.IGNORECASE)


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
        found.update(_classes(index, meta["labels"]))
    modality = _modality(meta.get("modality"))
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


def _classes(index: Path, labels: Any) -> dict[str, Any]:
    """``num_classes`` and ``class_names`` from ``dataset.json``'s ``labels`` (``{"0": "background", "1": ...}``).

    Raises:
        UserError: labels that are not 0..N, a label 0 that is no background, names that are not
            distinct non-empty text.
    """
    fix = "or give the classes yourself: --set num_classes=N --set 'class_names=[...]'"
    if not isinstance(labels, dict) or not labels:
        raise UserError(f'{index}: "labels" must be {{"0": "background", "1": NAME, ...}}; fix it, {fix}.')
    try:
        numbered = {int(str(key)): value for key, value in labels.items()}
    except ValueError as err:
        raise UserError(f'{index}: "labels" has a key that is no label value ({err}); fix it, {fix}.') from err
    if sorted(numbered) != list(range(len(numbered))) or len(numbered) < 2:
        shown = ", ".join(map(str, sorted(numbered)))
        raise UserError(f"{index}: labels {shown} are not 0..N contiguous (N >= 1); renumber the labels, {fix}.")
    if not _BACKGROUND.match(str(numbered[0]).strip()):
        raise UserError(f"{index}: label 0 is {numbered[0]!r}, not the background; {fix}.")
    names = [numbered[k] for k in range(1, len(numbered))]
    if not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names):
        raise UserError(f"{index}: label names {names} must be distinct, non-empty text; fix them, {fix}.")
    return {"num_classes": len(numbered), "class_names": names}


def _modality(modality: Any) -> str | None:
    """``CT`` or ``MRI`` for a single-channel ``modality`` entry (``{"0": "CT"}``) that names one;
    None for several channels (the bundle's, with preflight's channel check) or another name."""
    if not isinstance(modality, dict) or len(modality) != 1:
        return None
    name = str(next(iter(modality.values()))).strip()
    return "CT" if _CT.match(name) else "MRI" if _MR.match(name) else None


def _same(key: str, found: Any, bundle: Any) -> bool:
    """Whether the dataset's value says what the bundle's does (names in any letter case, MR as MRI)."""
    if key == "class_names":
        return [str(n).strip().casefold() for n in found] == [str(n).strip().casefold() for n in bundle]
    if key == "modality":
        return _modality({"0": bundle}) == found
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
            f"labels: {index} names {len(names)} label{'s' * (len(names) != 1)} {names}, "
            f"the bundle {len(before)} {list(before)}: training {setting}{kept}"
        )
    if "modality" in taken:
        parts.append(
            f"modality: {index} names {taken['modality']}, the bundle {bundle['modality']}: "
            f"training modality={taken['modality']}"
        )
    return "; ".join(parts)
