"""The run's fold split: the one given, or a deterministic split of the dataset made for the run.

A split the user gives (``--folds FILE``, ``--set folds_file=FILE``, or one a resumed run
recorded) is used as is, and refused when missing or naming other cases. Where the bundle
names none (``folds_file`` null), or its own default is missing or names cases the dataset
does not have (a bundle trained on another dataset), the run makes the split ``medfcn folds
DATA`` would write (5 folds, seed 0; fewer folds for fewer than 5 cases) into its output
folder, once the pre-flight checks have passed and the folder is locked, and records it as
its ``folds_file``: a resume and ``medfcn package`` use that file, never a new split. Since
training takes every case outside the validation fold, a resume refuses a dataset whose cases
changed since that split named them all (:func:`refuse_changed_cases`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medfcn.bundle import RUN_FILE, RUN_SPLIT_FILE
from medfcn.data.datasets import case_id, default_split, load_msd_datalist
from medfcn.errors import UserError
from medfcn.io import atomic_write_text
from medfcn.outputs import plural
from medfcn.training.settings import RunSettings

__all__ = [
    "SPLIT_FILE",
    "AutomaticSplit",
    "automatic_split",
    "refuse_changed_cases",
    "run_made_split",
    "write_split",
]

SPLIT_FILE = RUN_SPLIT_FILE  # in the run folder


@dataclass
class AutomaticSplit:
    """A split made for the run.

    Attributes:
        record: the split file's content (``{"n_folds", "seed", "folds"}``).
        path: where it is written: the run folder's :data:`SPLIT_FILE`.
        text: the file's text, as ``medfcn folds`` writes it.
        reason: why the bundle's split is not used (``the bundle's split names other cases``).
        written: whether this run writes the file (False: the run folder holds this very split).
    """

    record: dict
    path: Path
    text: str
    reason: str
    written: bool = True

    def notice(self, dataset_dir: str, fold: int) -> str:
        """The one line that tells the user."""
        folds = self.record["folds"]
        cases = sum(len(f) for f in folds)
        trained = "training on all cases" if fold == -1 else f"training fold {fold}"
        verb = "written to" if self.written else "reused from"
        made = f"{len(folds)} folds of {plural(cases, 'case')} of {dataset_dir} {verb} {self.path}"
        return f"split: {made} ({self.reason}); {trained}"


def automatic_split(run: RunSettings) -> AutomaticSplit | None:
    """The split to make for ``run`` (nothing written yet); None: its ``folds_file`` is used.

    Raises:
        UserError: the dataset has a single case (no split), or the run folder already holds
            another ``folds.json`` (it would be replaced).
    """
    data, split = run.get("dataset_dir"), run.get("folds_file")
    given = "folds_file" in run.recorded  # by the user, or recorded by the run resumed
    if split is not None and given:
        return None
    ids = _case_ids(data)
    if split is None:
        reason = "folds_file null" if given else "the bundle names no split"
    else:
        reason = _unusable(Path(split), ids)
    if reason is None:
        return None
    if len(ids) < 2:
        raise UserError(
            f"{Path(data) / 'dataset.json'}: lists {plural(len(ids), 'case')}, cannot make a fold split; "
            "a split needs at least 2 cases."
        )
    record = default_split(ids)
    path = Path(run.get("output_dir")) / SPLIT_FILE
    made = AutomaticSplit(record, path, json.dumps(record, indent=1) + "\n", reason)
    made.written = _refuse_other_split(path, made.text, run)
    return made


def run_made_split(run: RunSettings) -> bool:
    """Whether the split of the run in ``run``'s output folder is one the run made: its RUN_FILE
    says so; a record of a medfcn before 2026-12-03 does not, and there the run folder's
    :data:`SPLIT_FILE` counts as made by the run."""
    out = Path(run.get("output_dir"))
    try:
        made = json.loads((out / RUN_FILE).read_text()).get("split_made_by_run")
    except (OSError, ValueError, AttributeError):
        made = None
    if isinstance(made, bool):
        return made
    split = run.get("folds_file")
    return bool(split) and Path(split).resolve() == (out / SPLIT_FILE).resolve()


def refuse_changed_cases(run: RunSettings) -> None:
    """For a resume whose split is the one the run made (which named every case of the
    dataset): refuse a dataset that has gained or lost cases since, which the resumed run
    would train on. A split the user gave may leave cases out of every fold on purpose (always
    trained on), so it cannot tell; it is not checked, even when the user wrote it into the
    run folder as :data:`SPLIT_FILE` (:func:`run_made_split`).

    Raises:
        UserError: naming the dataset folder, how many cases differ, and the fix.
    """
    split, data = run.get("folds_file"), run.get("dataset_dir")
    if not run_made_split(run):
        return
    try:
        named = {case for fold in json.loads(Path(split).read_text())["folds"] for case in fold}
    except (OSError, ValueError, KeyError, TypeError):
        return  # refused, naming the file, where the split is read
    ids = set(_case_ids(data))
    changes = [f"{plural(len(ids - named), 'case')} added"] if ids - named else []
    changes += [f"{plural(len(named - ids), 'case')} removed"] if named - ids else []
    if changes:
        raise UserError(
            f"{data}: {' and '.join(changes)} since the run split it ({split}); resumed, it would train on other "
            f"cases: start a new run with another {run.option('output_dir')}."
        )


def _case_ids(dataset_dir: str) -> list[str]:
    try:
        return [case_id(item["image"]) for item in load_msd_datalist(dataset_dir)]
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err


def _unusable(split: Path, ids: list[str]) -> str | None:
    """Why the bundle's default split ``split`` does not fit a dataset of cases ``ids``; None
    when it does (or cannot be read: refused as a given split is, naming the file)."""
    if not split.is_file():
        return f"the bundle's split {split} does not exist"
    try:
        named = {case for fold in json.loads(split.read_text())["folds"] for case in fold}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return "the bundle's split names other cases" if named - set(ids) else None


def _refuse_other_split(path: Path, text: str, run: RunSettings) -> bool:
    """Whether the run writes its split to ``path``: not when the file holds this very split
    already (a run folder reused); refused when it holds another one.

    Raises:
        UserError: ``path`` holds something else, which the run would replace."""
    if not path.exists():
        return True
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    raise UserError(
        f"{path}: already exists and is not the split this run would make; pass it with "
        f"{run.option('folds_file')} {path}, or choose another --output."
    )


def write_split(split: AutomaticSplit) -> None:
    """Write the split (atomically) into the run folder, if it is not there already."""
    if split.written:
        atomic_write_text(split.text, split.path)
