"""What a dataset's ``dataset.json`` says of its classes and modality, as training and planning
read it: labels ``0..N`` with 0 the background (``{"0": "background", "1": "left atrium"}``),
and a single-channel modality the intensity normalisation knows (CT, or some MR)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medfcn.errors import UserError

__all__ = ["label_classes", "modality_kind"]

# how MSD and others name the unlabelled voxels
_BACKGROUND = re.compile(r"^(background|bg|clear label|none|unlabell?ed)$", re.IGNORECASE)
# single-channel modalities the normalisation knows: CT (clipped to hu_window), anything MR (z-scored)
_CT = re.compile(r"^(ct|computed tomography)$", re.IGNORECASE)
_MR = re.compile(r"^(mri?|mri? .*|t1.*|t2.*|flair|adc|dwi|pd|lge.*)$", re.IGNORECASE)


def label_classes(index: Path, labels: Any, fix: str) -> dict[str, Any]:
    """``num_classes`` and ``class_names`` from ``dataset.json``'s ``labels`` (``{"0": "background", "1": ...}``).

    Args:
        index: the ``dataset.json``, named in messages.
        labels: its ``labels`` entry.
        fix: what the user can do besides fixing the file, ending the messages
            (``"or give the classes yourself: --set ..."``).

    Raises:
        UserError: labels that are not 0..N, a label 0 that is no background, names that are not
            distinct non-empty text.
    """
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


def modality_kind(modality: Any) -> str | None:
    """``CT`` or ``MRI`` for a single-channel ``modality`` entry (``{"0": "CT"}``) that names one;
    None for several channels or another name (PET, US, ...)."""
    if not isinstance(modality, dict) or len(modality) != 1:
        return None
    name = str(next(iter(modality.values()))).strip()
    return "CT" if _CT.match(name) else "MRI" if _MR.match(name) else None
