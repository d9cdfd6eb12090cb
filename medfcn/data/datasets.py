"""MSD ``dataset.json`` parsing, data-root resolution and deterministic k-fold splits.

Only file names and splits live in the repository (``datasets/<Task>/folds.json``); images
stay wherever the user keeps them: a path argument, ``$MEDFCN_DATA``, or ``../shared/datasets``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from medfcn.errors import UserError
from medfcn.io import atomic_write_text, refuse_existing, writable_dir
from medfcn.outputs import plural, refuse_output_over

__all__ = [
    "DEFAULT_DATA_ROOT",
    "data_root",
    "case_id",
    "load_msd_datalist",
    "make_folds",
    "folds_record",
    "write_folds",
    "fold_datalists",
    "split_datalists",
]

DEFAULT_DATA_ROOT = "../shared/datasets"


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The folder that holds the datasets: ``path``, else ``$MEDFCN_DATA``, else ``../shared/datasets``."""
    return Path(path or os.environ.get("MEDFCN_DATA") or DEFAULT_DATA_ROOT)


def case_id(path: str | os.PathLike) -> str:
    """A case's name: the file name without ``.nii.gz``/``.nii`` or ``.nrrd``/``.nhdr``/``.mha``/``.mhd``
    in any letter case (or a folder's name)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_msd_datalist(dataset_dir: str | os.PathLike, section: str = "training") -> list[dict]:
    """Read an MSD ``dataset.json`` and return ``[{"image": path, "label": path}, ...]``.

    Paths are made absolute against ``dataset_dir`` without following symbolic links, so a
    case linked to a file of another name keeps its own name. Every listed file must exist.

    Raises:
        FileNotFoundError: no ``dataset.json``, or it names files that are missing.
        ValueError: the file is not valid JSON, has no ``section`` list, has an entry that is
            no case (``null``, a number, no ``"label"``, ``"image": 42``), or lists one case
            name twice (the same file, or namesakes in different folders).
    """
    dataset_dir = Path(dataset_dir)
    index = dataset_dir / "dataset.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: not found; pass the folder that holds an MSD dataset.json.")
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index}: not valid JSON ({err}); fix the file.") from err
    entries = meta.get(section) if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f'{index}: has no \'{section}\' list of cases; list them as [{{"image": ..., "label": ...}}, ...].'
        )
    datalist, missing = [], []
    for number, entry in enumerate(entries):
        _check_entry(index, section, number, entry)
        item = {}
        for key, rel in entry.items() if isinstance(entry, dict) else [("image", entry)]:
            path = Path(os.path.abspath(dataset_dir / rel))
            if not path.exists():
                missing.append(str(path))
            elif path.is_dir():  # images and labels are NIfTI files; a folder fails later, or not at all in folds
                raise FileNotFoundError(
                    f"{index}: entry {number} of '{section}' names the folder {path} as its {key}; "
                    "point it at a NIfTI file."
                )
            item[key] = str(path)
        datalist.append(item)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{index}: names {plural(len(missing), 'missing file')}: {shown}. Fix the paths or the files."
        )
    _refuse_shared_case_names(index, datalist)
    return datalist


def _check_entry(index: Path, section: str, number: int, entry) -> None:
    """One case of ``section``: ``{"image": path, "label": path}`` in ``training`` (a path or
    ``{"image": path}`` elsewhere, as MSD's ``test`` lists them), every path a non-empty string.

    Raises:
        ValueError: naming dataset.json, the entry's index (from 0) and what to fix.
    """
    where = f"{index}: entry {number} of {section!r} ({json.dumps(entry)[:80]})"
    example = '{"image": "./imagesTr/case.nii.gz", "label": "./labelsTr/case.nii.gz"}'
    if section != "training" and isinstance(entry, str) and entry.strip():
        return
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: is not a case; write it as {example}.")
    required = ("image", "label") if section == "training" else ("image",)
    for key in required:
        if key not in entry:
            raise ValueError(f"{where}: has no {key!r}; write it as {example}.")
    for key, path in entry.items():
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{where}: {key!r} is {json.dumps(path)}, not a file path; write it as {example}.")


def _refuse_shared_case_names(index: Path, datalist: list[dict]) -> None:
    """Folds and datalists key cases by file name, so two entries of one name (the same file
    listed twice, or namesakes in different folders) would silently merge, or put one case in
    two folds: refuse them."""
    first: dict[str, str] = {}
    for item in datalist:
        name = case_id(item["image"])
        if name in first:
            raise ValueError(
                f"{index}: lists the case name {name!r} twice ({first[name]}, {item['image']}); "
                "list each case once, under its own file name."
            )
        first[name] = item["image"]


def make_folds(case_ids: list[str], n_folds: int = 5, seed: int = 0) -> list[list[str]]:
    """Split case ids into ``n_folds`` disjoint validation sets, deterministically.

    The ids are sorted before a seeded shuffle, so the split depends only on the set of ids,
    ``n_folds`` and ``seed``; fold sizes differ by at most one.
    """
    if n_folds < 2 or n_folds > len(case_ids):
        raise ValueError(f"n_folds must be between 2 and the number of cases ({len(case_ids)}), got {n_folds}.")
    ids = sorted(case_ids)
    random.Random(seed).shuffle(ids)
    return [sorted(ids[k::n_folds]) for k in range(n_folds)]


def folds_record(case_ids: list[str], n_folds: int = 5, seed: int = 0) -> dict:
    """The split file's content: ``{"n_folds", "seed", "folds"}``, ``folds`` from :func:`make_folds`."""
    return {"n_folds": n_folds, "seed": seed, "folds": make_folds(case_ids, n_folds, seed)}


# The split a bundle without one trains on (``folds_file`` null): what ``medfcn folds DATA``
# writes by default, with fewer folds for fewer than 5 cases.
DEFAULT_FOLDS, DEFAULT_SEED = 5, 0


def default_split(case_ids: list[str]) -> dict:
    """:func:`folds_record` of the default split of ``case_ids`` (at least 2 of them)."""
    return folds_record(case_ids, min(DEFAULT_FOLDS, len(case_ids)), DEFAULT_SEED)


def user_datalist(dataset_dir: Path) -> list[dict]:
    """:func:`load_msd_datalist` of a folder the user named, its failures as one-line user errors.

    Raises:
        UserError: no such folder, or no readable ``dataset.json`` with cases.
    """
    if not dataset_dir.is_dir():
        what = "is a file, not a dataset folder" if dataset_dir.exists() else "dataset folder not found"
        raise UserError(f"{dataset_dir}: {what}; pass the folder that holds an MSD dataset.json.")
    try:
        datalist = load_msd_datalist(dataset_dir)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    return datalist


def write_folds(
    dataset_dir: str | os.PathLike, out: str | os.PathLike, n_folds: int = 5, seed: int = 0, overwrite: bool = False
) -> dict:
    """Make the k-fold split of an MSD dataset and write it as JSON to ``out`` (atomically).

    Returns:
        ``{"n_folds", "seed", "folds"}`` as written; ``folds`` holds ``n_folds`` lists of case ids.

    Raises:
        UserError: no dataset folder or no readable ``dataset.json`` with cases, ``n_folds``
            outside 2..number of cases, an existing ``out`` without ``overwrite``, or an
            ``out`` that cannot be written.
    """
    dataset_dir, out = Path(dataset_dir), Path(out)
    datalist = user_datalist(dataset_dir)
    ids = [case_id(item["image"]) for item in datalist]
    if not 2 <= n_folds <= len(ids):
        fix = f"pass --n-folds between 2 and {len(ids)}" if len(ids) >= 2 else "a split needs at least 2 cases"
        raise UserError(
            f"{dataset_dir / 'dataset.json'}: lists {plural(len(ids), 'case')}, cannot make "
            f"{plural(n_folds, 'fold')}; {fix}."
        )
    if out.is_dir():
        raise UserError(f"{out}: is a folder; pass a file name for --out, e.g. {out / 'folds.json'}.")
    dataset_files = [dataset_dir / "dataset.json", *(path for item in datalist for path in item.values())]
    refuse_output_over(out, dataset_files, "--out", "dataset file")  # --overwrite would replace it
    refuse_existing([out], overwrite)
    writable_dir(out.parent, fix="choose another --out")
    folds = folds_record(ids, n_folds, seed)
    atomic_write_text(json.dumps(folds, indent=1) + "\n", out)
    return folds


def fold_datalists(
    dataset_dir: str | os.PathLike, folds_file: str | os.PathLike | None, fold: int, max_cases: int | None = None
) -> tuple[list[dict], list[dict]]:
    """Training and validation datalists for ``fold`` of the split in ``folds_file``.

    ``folds_file`` None: the :func:`default_split` of the dataset's cases, the split ``medfcn
    train`` writes into a run folder for a bundle that names none (so ``python -m monai.bundle
    run`` trains a planned bundle on the same cases). ``fold = -1`` trains on every case and
    validates on fold 0 (for a final model whose score is then reported by cross-validation).
    ``max_cases`` keeps only the first cases of each list, for quick runs and tests.

    Raises:
        ValueError: unknown fold, the split names cases the dataset does not have, or (no
            ``folds_file``) fewer than 2 cases.
    """
    if folds_file is None:
        ids = [case_id(item["image"]) for item in load_msd_datalist(dataset_dir)]
        if len(ids) < 2:
            raise ValueError(
                f"{Path(dataset_dir) / 'dataset.json'}: lists {plural(len(ids), 'case')}; a split needs 2."
            )
        where = f"the default {min(DEFAULT_FOLDS, len(ids))}-fold split of {dataset_dir}"
        return split_datalists(dataset_dir, default_split(ids)["folds"], fold, max_cases, where=where)
    split = json.loads(Path(folds_file).read_text())
    return split_datalists(dataset_dir, split["folds"], fold, max_cases, where=str(folds_file))


def split_datalists(
    dataset_dir: str | os.PathLike, folds: list[list[str]], fold: int, max_cases: int | None = None, where: str = ""
) -> tuple[list[dict], list[dict]]:
    """:func:`fold_datalists` of a split at hand (``folds``: lists of case ids); ``where`` names it
    in messages (its file).

    Raises:
        ValueError: unknown fold, or the split names cases the dataset does not have.
    """
    if not -1 <= fold < len(folds):
        raise ValueError(f"{where}: unknown fold {fold}; choose 0..{len(folds) - 1} (or -1 for all cases).")
    cases = {case_id(item["image"]): item for item in load_msd_datalist(dataset_dir)}
    unknown = sorted({c for f in folds for c in f} - set(cases))
    if unknown:
        raise ValueError(f"{where}: names cases not in {dataset_dir}: {', '.join(unknown[:3])}.")
    val_ids = set(folds[max(fold, 0)])
    train = [cases[c] for c in sorted(cases) if fold == -1 or c not in val_ids]
    val = [cases[c] for c in sorted(val_ids)]
    if max_cases:
        train, val = train[:max_cases], val[:max_cases]
    return train, val
