"""Run a bundle's inference config on scans: NIfTI files, folders of them, DICOM series.

The bundle's ``configs/inference.json`` (merged onto ``configs/common.json``) supplies the
network, its weights (``weights_file``), preprocessing, inferer, the postprocessing that inverts
the preprocessing (``Invertd``) and the mask writer, the same components MONAI's runner uses
(:mod:`medfcn.segmenter`); this module finds the scans, feeds them one at a time, stages each
mask with the bundle's writer (uint8, exactly the scan's geometry) so that a batch is written
all or nothing, and tabulates the volume of every label in mm^3.

Example::

    from medfcn.infer import infer
    rows = infer("bundles/hippocampus_fcn", ["scan.nii.gz", "dicom/series1"], "out/")
    rows[0]["anterior_mm3"]
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfcn import distributed
from medfcn.data.dicom import find_series, gdcm_series_files, looks_like_dicom, series_files
from medfcn.data.nifti import voxel_spacing
from medfcn.data.profile import bundle_profile, warn_if_unlike_training
from medfcn.dicom_seg import check_dicom_seg_available, seg_path, stage_dicom_seg
from medfcn.errors import UserError, collected_input_warnings
from medfcn.formats import SCAN_SUFFIXES, check_mask_format, is_itk_file, mask_suffix
from medfcn.io import NIFTI_SUFFIXES, atomic_path, csv_text, nifti_files, refuse_existing
from medfcn.masks import MAP_KINDS, companion_path, mask_name, stage_map, stage_mask
from medfcn.outputs import is_utf8, output_lock, path_text, plural, refuse_non_utf8, refuse_outputs_over_inputs
from medfcn.segmenter import Ensemble, Prediction, Segmenter, bundle_names, load_ensemble, load_segmenter
from medfcn.uncertainty import keep_largest_components, normalised_entropy, uncertainty_score

__all__ = [
    "Extras",
    "expand_inputs",
    "expand_named_inputs",
    "label_volumes",
    "infer",
    "InferenceRows",
]


def _is_dicom_series(folder: Path) -> bool:
    """True for a folder with exactly one DICOM series that reads as an even 3D stack (a
    localizer in it is left out with a warning); UserError for a broken one."""
    others = [n for n in os.listdir(folder) if not n.lower().endswith(NIFTI_SUFFIXES)]  # GDCM skips NIfTI
    if not (is_utf8(folder) and all(map(is_utf8, others))):
        # SimpleITK aborts the process on a file name that is not UTF-8: probe without it, and
        # refuse only a folder of DICOM files (a stray note in a NIfTI folder is no reason)
        if not looks_like_dicom(folder):
            return False
        refuse_non_utf8(folder, others)
    files = gdcm_series_files(folder)
    if not files:
        return False
    series_files(folder, files, warn=True)
    return True


def _series_or_bad(folder: Path, on_bad_series: Callable[[Path, UserError], None] | None) -> bool | None:
    """:func:`_is_dicom_series`, except that a broken series (its UserError: only a folder of
    DICOM files raises one) goes to ``on_bad_series`` when given: then None."""
    try:
        return _is_dicom_series(folder)
    except UserError as err:
        if on_bad_series is None:
            raise
        on_bad_series(folder, err)
        return None


def _scans_in(item: Path, on_bad_series: Callable[[Path, UserError], None] | None = None) -> list[tuple[Path, Path]]:
    """``(scan, path its mask is named after)`` of one input: a NIfTI, NRRD or MetaImage file, a
    DICOM series folder, the NIfTI/NRRD/MetaImage files of a folder, or else the DICOM series in
    its subfolders (an export, PATIENT/STUDY/SERIES), each named by its path below ``item``
    joined with ``_`` so that namesakes stay apart.

    ``on_bad_series`` (a cohort run): called with a DICOM folder whose series is broken, which
    is then left out, instead of the UserError stopping everything.
    """
    if not item.exists():
        raise UserError(
            f"{item}: not found; pass NIfTI, NRRD or MetaImage files, folders of them, or DICOM series folders."
        )
    if item.is_file():
        if not item.name.lower().endswith(SCAN_SUFFIXES):
            raise UserError(
                f"{item}: not a NIfTI, NRRD or MetaImage file (.nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd; a .raw is "
                "read through its .mhd); DICOM is read per series folder."
            )
        if is_itk_file(item):  # SimpleITK aborts the process on a file name that is not UTF-8
            refuse_non_utf8(item)
        return [(item, item)]
    found = nifti_files(item, SCAN_SUFFIXES)
    state = _series_or_bad(item, on_bad_series)
    if state and found:  # one of the two would be skipped silently
        names = ", ".join(path_text(f.name) for f in found[:3]) + (" ..." if len(found) > 3 else "")
        raise UserError(
            f"{item}: holds a DICOM series and NIfTI, NRRD or MetaImage files ({names}); put the series in a "
            "folder of its own, or pass the files by name."
        )
    if state is not False:
        return [(item, item)] if state else []
    if found:
        return [(scan, scan) for scan in found]
    states = {folder: _series_or_bad(folder, on_bad_series) for folder in find_series(item)}
    series = [folder for folder, state in states.items() if state]
    if all(state is False for state in states.values()):  # also when there is no candidate
        raise UserError(
            f"{item}: no NIfTI, NRRD or MetaImage files and no DICOM series in this folder or its subfolders."
        )
    return [(folder, Path("_".join(folder.relative_to(item).parts))) for folder in series]


def expand_named_inputs(
    inputs: Sequence[str | os.PathLike], on_bad_series: Callable[[Path, UserError], None] | None = None
) -> list[tuple[Path, Path]]:
    """``(scan, path its mask is named after)`` of every scan named by ``inputs`` (see
    :func:`expand_inputs`; ``on_bad_series``: see :func:`_scans_in`)."""
    if not inputs:
        raise UserError("no input scans given.")
    named = [pair for item in map(Path, inputs) for pair in _scans_in(item, on_bad_series)]
    seen: set[Path] = set()
    unique = []
    for scan, name in named:  # a file given twice, or by name and through its folder, is one scan
        if scan.resolve() not in seen:
            seen.add(scan.resolve())
            unique.append((scan, name))
    return unique


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Scans named by ``inputs``: NIfTI, NRRD and MetaImage files, DICOM series folders, the
    NIfTI/NRRD/MetaImage files of other folders (sorted; hidden files skipped), or else the DICOM
    series in their subfolders. A scan named twice (also through its folder) is kept once.
    Raises UserError for missing paths, folders with no scan and DICOM series that do not read
    as an even 3D stack."""
    return [scan for scan, _ in expand_named_inputs(inputs)]


def label_volumes(labels: np.ndarray, affine: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Volume of each foreground label in mm^3: voxel count times |det| of the affine's 3x3."""
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    counts = np.bincount(labels.ravel(), minlength=len(class_names) + 1)
    return {f"{name}_mm3": round(float(counts[k + 1]) * voxel_mm3, 3) for k, name in enumerate(class_names)}


def _warning_note(unlike: dict[str, str], messages: list[str]) -> str:
    """The end of a scan's progress line: what is unlike the training data, and how many other
    warnings the scan had (each printed on its own line)."""
    note = f"  WARNING unlike the training data: {', '.join(unlike)}" if unlike else ""
    others = len(messages) - bool(unlike)
    return note + (f"  WARNING: {plural(others, 'input warning')}, see above" if others else "")


def _stage_tables(
    stack: contextlib.ExitStack, rows: list[dict], out_dir: Path, name: str = "volumes", fields: Sequence[str] = ()
) -> None:
    """Stage ``<name>.csv`` and ``<name>.json`` of ``rows`` (``fields``: the columns when there are no rows)."""
    stack.enter_context(atomic_path(out_dir / f"{name}.csv")).write_text(csv_text(rows, fields))
    stack.enter_context(atomic_path(out_dir / f"{name}.json")).write_text(json.dumps(rows, indent=1) + "\n")


class InferenceRows(list):
    """The volume rows :func:`infer` returns, one dict per segmented scan, and as ``failures``
    the scans that ``continue_on_error`` skipped: ``{"input": path, "reason": one line}``."""

    def __init__(self, rows: Sequence[dict] = (), failures: Sequence[dict] = ()):
        super().__init__(rows)
        self.failures = list(failures)


def _volume_columns(class_names: Sequence[str], extras: Extras) -> list[str]:
    """The columns of ``volumes.csv`` (written as its header also when no scan succeeded)."""
    volumes = [f"{n}_mm3" for n in class_names]
    scores = ["uncertainty"] if extras.uncertainty else []
    return ["input", "mask", "shape", "spacing_mm", "model_seconds", "seconds", *volumes, *scores, "warnings"]


@dataclass(frozen=True)
class Extras:
    """What :func:`infer` writes beyond each scan's mask and volumes, and how it cleans the mask.

    Attributes:
        uncertainty: ``<case>_uncertainty.nii.gz`` (float32, the mask's grid): the normalised
            predictive entropy (0..1) of the class probabilities, over the flips' mean softmax
            with ``tta``; and the ``uncertainty`` column, its sum in a band of
            :data:`medfcn.uncertainty.BAND_WIDTH` voxels around the mask's boundaries per
            foreground voxel (:func:`medfcn.uncertainty.uncertainty_score`; empty for an empty mask).
        probabilities: ``<case>_probabilities.nii.gz``: the class probabilities (background
            first), float32 ``(X, Y, Z, K)``, channel last, on the mask's grid.
        largest_component: keep each label's largest connected component (26-connectivity) in
            the mask, as its volumes count it.
        dicom_seg: ``<case>_seg.dcm`` beside the mask of each DICOM series input, a DICOM
            Segmentation of the mask referencing the series (:mod:`medfcn.dicom_seg`); every
            input must be a DICOM series then.
    """

    uncertainty: bool = False
    probabilities: bool = False
    largest_component: bool = False
    dicom_seg: bool = False

    @property
    def maps(self) -> list[str]:
        """The kinds of NIfTI written beside each mask (:func:`medfcn.masks.companion_path`)."""
        return [kind for kind in MAP_KINDS if getattr(self, kind)]

    def outputs(self, mask: Path) -> list[Path]:
        """The files written beside ``mask``: its maps, its DICOM SEG."""
        return [companion_path(mask, kind) for kind in self.maps] + ([seg_path(mask)] if self.dicom_seg else [])


def _list_failure(
    failures: list[dict], scan: Path, err: UserError, counter: str, progress: Callable[[str], None] | None
) -> None:
    """Append ``scan``'s failure to ``failures``: its input and the error's one line, without
    the leading ``<scan>: `` that the input column already says (bytes of a name that are not
    UTF-8 as ``\\xNN``, as in ``volumes.csv``)."""
    reason = path_text(str(err).removeprefix(f"{scan}: "))
    failures.append({"input": path_text(scan), "reason": reason})
    if progress:
        progress(f"{counter} {path_text(scan.name)}: failed: {reason}")


def _cohort_inputs(inputs: Sequence[str | os.PathLike], failures: list[dict]) -> list[tuple[Path, Path]]:
    """:func:`expand_named_inputs` for ``continue_on_error``: a folder of DICOM files whose series
    is broken (a missing slice, two series), also one series of an export, is appended to
    ``failures`` like a scan that fails to read; any other error (a path not found, a file of
    another type) stops everything."""

    def list_bad_series(folder: Path, err: UserError) -> None:
        _list_failure(failures, folder, err, "[inputs]", None)  # printed once the run starts

    return expand_named_inputs(inputs, on_bad_series=list_bad_series)


# How long a process of several waits for the others to finish their shares of the scans
_WAIT_FOR_SHARES_MINUTES = 60.0


def infer(
    bundle: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    device: str | None = None,
    sw_batch_size: int | None = None,
    overlap: float | None = None,
    tta: bool = False,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    mask_format: str = "nifti",
    continue_on_error: bool = False,
    extras: Extras = Extras(),
    backend: str = "torch",
    models: Sequence[str | os.PathLike] = (),
) -> InferenceRows:
    """Segment every scan in ``inputs``; write masks and the volume tables to ``out_dir``.

    Args:
        bundle: bundle folder with ``configs/inference.json`` and ``models/model.pt``.
        inputs: NIfTI, NRRD (``.nrrd``/``.nhdr``) and MetaImage (``.mha``/``.mhd``) files,
            folders of them, DICOM series folders, folders of series folders.
        out_dir: gets ``<case>.nii.gz`` per scan, ``volumes.csv`` and ``volumes.json``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (default: CUDA when available).
        sw_batch_size: windows per sliding-window step (default: the bundle's).
        overlap: sliding-window overlap in [0, 1) (default: the bundle's).
        tta: average with predictions on flipped input, along the axes the bundle's model was
            trained flipped (left-right for the 3D hippocampus bundle: twice the compute).
        overwrite: replace existing masks and tables (else an error).
        progress: gets a line per scan.
        mask_format: ``"nifti"`` (``<case>.nii.gz``), ``"nrrd"``, ``"mha"``, or ``"input"``: the
            scan's own format for NRRD and MetaImage scans (a ``.nhdr`` gives ``.nrrd``, a ``.mhd``
            ``.mha``), NIfTI for the others.
        continue_on_error: a scan that fails with a UserError is listed in ``failures.csv`` /
            ``failures.json`` (input, reason) and the others are segmented and written. Errors not
            about one scan (inputs not found, bundle, options, ``out_dir``) still stop everything;
            a folder holding a broken DICOM series is a bad scan.
        extras: uncertainty and probability maps beside the masks, the largest-component cleanup
            (:class:`Extras`).
        backend: ``"torch"``, or ``"onnxruntime"``: the bundle's ``models/model.onnx`` (``medfcn
            export BUNDLE --format onnx``) computes the network on the CPU.
        models: further bundles to ensemble with ``bundle`` (:class:`medfcn.segmenter.Ensemble`):
            the mask is the argmax of their mean class probabilities on the scan's grid, the
            uncertainty map the entropy of that mean. Same class names; with ``tta`` the members
            trained without flips run unflipped (said through ``progress``). ``bundle`` supplies
            the mask writer and the training profile the scans are compared with.

    Returns:
        A row per segmented scan: input, mask, shape, spacing (mm), seconds, ``<label>_mm3``,
        ``warnings`` (its InputWarnings, `` | ``-separated); ``.failures``: the scans skipped.

    Raises:
        UserError: a bad input, bundle or option, ``out_dir`` being or holding an input, or another
            run writing into it (locked while a run writes). Nothing is written then, not even
            the masks of the scans before a bad one (unless ``continue_on_error``, for a bad scan).
    """
    rows = InferenceRows()  # with continue_on_error: its failures, listed or segmented
    out = Path(out_dir)
    with distributed.said_once_per_node():  # every process of a node reads the same inputs here
        scans, targets, tables = _planned_outputs(inputs, out, mask_format, continue_on_error, rows.failures, extras)
        device = distributed.process_device(device)
    # a process waits for the others' shares at the end: longer than a training step's wait
    with distributed.process_group(device or distributed.local_device(), _WAIT_FOR_SHARES_MINUTES):
        # rank 0's list of the scans for every process: a folder may change between their listings
        scans, targets, rows.failures = distributed.broadcast((scans, targets, rows.failures))
        main = distributed.is_main()
        # one run at a time into `out`, from the existence checks to the last rename (in several
        # processes: held by rank 0 until every process has renamed its masks)
        with output_lock(out, "medfcn infer", "--out") if main else contextlib.nullcontext():
            beside = [path for target in targets for path in extras.outputs(target)]
            outputs = [*targets, *beside, *(out / name for name in tables)]
            distributed.agreed(lambda: refuse_existing(outputs, overwrite) if main else None)
            segmenter = distributed.agreed(
                lambda: _segmenter([bundle, *models], device, sw_batch_size, overlap, tta, extras, backend)
            )
            if progress and main:
                _say_unflipped(segmenter, tta, progress)
            profile = distributed.agreed(lambda: bundle_profile(Path(bundle) / "configs" / "metadata.json"))
            run = _Run(segmenter, profile, extras, continue_on_error, progress, _model_name([bundle, *models]))
            _segment_all(run, scans, targets, out, rows)
    return rows


def _planned_outputs(
    inputs: Sequence[str | os.PathLike],
    out: Path,
    mask_format: str,
    continue_on_error: bool,
    failures: list[dict],
    extras: Extras,
) -> tuple[list[Path], list[Path], list[str]]:
    """``(scans, their masks, the tables)`` :func:`infer` writes into ``out``, checked: a known
    mask format, no two scans with one output (mask or map), no output over an input.

    ``failures``: with ``continue_on_error``, gets the inputs that are broken DICOM series."""
    check_mask_format(mask_format)
    named_scans = _cohort_inputs(inputs, failures) if continue_on_error else expand_named_inputs(inputs)
    scans = [scan for scan, _ in named_scans]
    targets = [out / mask_name(name, mask_suffix(scan, mask_format)) for scan, name in named_scans]
    if extras.dicom_seg:
        _check_dicom_seg_inputs(scans)
    _refuse_namesakes(scans, targets, extras)
    beside = [path for target in targets for path in extras.outputs(target)]
    # the inputs as given too: a broken series left out by continue_on_error is still an input
    refuse_outputs_over_inputs(out, [*scans, *map(Path, inputs)], [*targets, *beside])
    tables = ["volumes.csv", "volumes.json", *(["failures.csv", "failures.json"] if continue_on_error else [])]
    return scans, targets, tables


def _check_dicom_seg_inputs(scans: Sequence[Path]) -> None:
    """UserError unless highdicom is installed and every scan is a DICOM series folder."""
    check_dicom_seg_available()
    for scan in scans:
        if not scan.is_dir():
            raise UserError(
                f"{scan}: not a DICOM series; --dicom-seg writes DICOM SEG for DICOM series inputs only: "
                "segment the other inputs in a run without it."
            )


def _model_name(bundles: Sequence[str | os.PathLike]) -> tuple[str, str]:
    """``(bundle folder's name, its metadata's version)``, naming the algorithm in a DICOM SEG
    (the version empty where the bundle states none); an ensemble's names (:func:`bundle_names`)
    and versions joined by ``+`` (``?`` for a member that states none; empty when none does)."""
    versions = []
    for bundle in bundles:
        try:
            version = json.loads((Path(bundle) / "configs" / "metadata.json").read_text()).get("version", "")
        except (OSError, ValueError, AttributeError):
            version = ""
        versions.append(str(version or ""))
    return "+".join(bundle_names(bundles)), "+".join(v or "?" for v in versions) if any(versions) else ""


def _refuse_namesakes(scans: Sequence[Path], targets: Sequence[Path], extras: Extras = Extras()) -> None:
    """UserError when two scans would get the same mask file, or one scan's map or DICOM SEG
    (``extras``) the name of another's output (``a_uncertainty.nii.gz`` and the uncertainty map
    of ``a.nii.gz``)."""
    named: dict[Path, Path] = {}
    for scan, target in zip(scans, targets, strict=True):
        if target in named:
            raise UserError(
                f"{named[target]} and {scan}: same case name, so both masks would be {target.name}; "
                "rename one or segment them into separate --out folders."
            )
        named[target] = scan
    for scan, target in zip(scans, targets, strict=True):
        for written in extras.outputs(target):
            if written in named:
                raise UserError(
                    f"{named[written]} and {scan}: both would write {written.name} (a mask, map or DICOM SEG); "
                    "rename one or segment them into separate --out folders."
                )
            named[written] = scan


def _segmenter(
    bundles: Sequence[str | os.PathLike],
    device: str | None,
    sw_batch_size: int | None,
    overlap: float | None,
    tta: bool,
    extras: Extras,
    backend: str = "torch",
) -> Segmenter | Ensemble:
    """:func:`load_segmenter` (one bundle) or :func:`load_ensemble` (several) with the
    sliding-window options checked and applied to each."""
    if overlap is not None and not 0 <= overlap < 1:
        raise UserError(f"--overlap {overlap}: must be in [0, 1).")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise UserError(f"--sw-batch-size {sw_batch_size}: must be at least 1.")
    overrides: dict[str, Any] = {}
    if sw_batch_size is not None:
        overrides["sw_batch_size"] = sw_batch_size
    if overlap is not None:
        overrides["overlap"] = overlap
    if len(bundles) > 1:
        return load_ensemble(bundles, device=device, overrides=overrides, tta=tta, backend=backend)
    return load_segmenter(
        bundles[0], device=device, overrides=overrides, tta=tta, probabilities=bool(extras.maps), backend=backend
    )


def _say_unflipped(segmenter: Segmenter | Ensemble, tta: bool, progress: Callable[[str], None]) -> None:
    """With ``tta``, name the members of an ensemble that run unflipped (trained without flips)."""
    if not (tta and isinstance(segmenter, Ensemble)):
        return
    for name, member in zip(segmenter.names, segmenter.members, strict=True):
        if not member.flip_axes:
            progress(f"--tta: {name} was trained without flips, so it runs unflipped in the ensemble.")


@dataclass
class _Run:
    """What every scan of one :func:`infer` run is segmented with, and how its outcome is told."""

    segmenter: Segmenter | Ensemble
    profile: dict | None  # the bundle's training data (medfcn.data.profile); None when it has none
    extras: Extras
    continue_on_error: bool
    progress: Callable[[str], None] | None
    model: tuple[str, str] = ("medfcn", "")  # the bundle's name and version, for a DICOM SEG


def _segment_one(
    run: _Run, scan: Path, target: Path, stack: contextlib.ExitStack
) -> tuple[dict, dict[str, str], list[str]]:
    """Segment ``scan`` and stage its mask ``target`` (and its maps, ``run.extras``) on ``stack``.

    Returns:
        ``(row, unlike, messages)``: the scan's row of ``volumes.csv``, what of it is unlike the
        bundle's training data (``profile``; nothing when the bundle has none), and the
        InputWarnings raised while it was processed (each also printed).
    """
    start = time.perf_counter()
    segmenter = run.segmenter
    with collected_input_warnings() as messages:  # for the row's `warnings` column
        prediction = segmenter.predict(scan, probabilities=bool(run.extras.maps))
        labels, affine = prediction.labels, prediction.affine
        if run.extras.largest_component:
            labels = keep_largest_components(labels)
        volumes = label_volumes(labels, affine, segmenter.class_names)
        mm3 = {n: volumes[f"{n}_mm3"] for n in segmenter.class_names}
        unlike = warn_if_unlike_training(run.profile, scan, affine, labels.shape, mm3)
    with contextlib.ExitStack() as staged:  # this scan's files: all of them, or none (a failed map)
        (segmenter.writer.stage if segmenter.writer else stage_mask)(staged, labels, affine, target, scan)
        scores = _stage_maps(staged, run, prediction, labels, target, scan)
        stack.enter_context(staged.pop_all())  # renamed with the batch's
    spacing = voxel_spacing(affine)
    row = {
        "input": path_text(scan),  # \xNN for the bytes of a name that are not UTF-8
        "mask": path_text(target),
        "shape": "x".join(map(str, labels.shape)),
        "spacing_mm": "x".join(f"{s:.4g}" for s in spacing),
        "model_seconds": round(prediction.seconds, 4),
        "seconds": round(time.perf_counter() - start, 4),
        **volumes,
        **scores,
        "warnings": path_text(" | ".join(messages)),  # messages name the scan: \xNN as in "input"
    }
    return row, unlike, messages


def _stage_maps(
    stack: contextlib.ExitStack, run: _Run, prediction: Prediction, labels: np.ndarray, target: Path, scan: Path
) -> dict[str, float]:
    """Stage the maps ``run.extras`` asks for beside the mask ``target``; return the scan's
    scores for its row (``{"uncertainty": 0.05}``, or nothing)."""
    scores = {}
    if run.extras.uncertainty:
        entropy = normalised_entropy(prediction.probabilities).numpy()
        uncertainty = companion_path(target, "uncertainty")
        stage_map(stack, entropy, prediction.affine, uncertainty, scan, "medfcn: predictive entropy / log K, 0..1")
        score = uncertainty_score(entropy, labels)
        scores["uncertainty"] = None if score is None else round(score, 5)  # an empty cell, JSON null
    if run.extras.probabilities:
        channel_last = prediction.probabilities.permute(*range(1, prediction.probabilities.ndim), 0).numpy()
        names = ",".join(["background", *run.segmenter.class_names])
        stage_map(stack, channel_last, prediction.affine, companion_path(target, "probabilities"), scan, names)
    if run.extras.dicom_seg:
        classes = run.segmenter.class_names
        stage_dicom_seg(stack, scan, labels, prediction.affine, classes, seg_path(target), run.model)
    return scores


def _segment_all(run: _Run, scans: Sequence[Path], targets: Sequence[Path], out: Path, rows: InferenceRows) -> None:
    """Segment ``scans`` into masks ``targets`` and the tables in ``out``, appending to ``rows``.

    All or nothing: masks are staged as temporary files and renamed only once every scan has
    succeeded (or, with ``continue_on_error``, been tried), so a bad scan in the middle of a
    batch leaves no partial output behind. In a process of several, each segments its share
    (:func:`medfcn.distributed.share`); the rows come together in input order, and no process
    renames a mask unless every scan of every process succeeded.
    """
    for failure in rows.failures if run.progress and distributed.is_main() else ():  # inputs left out while listed
        run.progress(f"[inputs] {Path(failure['input']).name}: failed: {failure['reason']}")
    try:
        with contextlib.ExitStack() as stack:
            share = distributed.share(len(scans))
            done = distributed.agreed(lambda: _segment_share(run, scans, targets, share, stack))
            parts = distributed.gather(done)  # every process's (rows, failures), in rank order
            rows.extend(row for _, row in sorted((item for part, _ in parts for item in part), key=_first))
            failed = sorted((item for _, part in parts for item in part), key=_first)
            rows.failures.extend(failure for _, failure in failed)
            # staged by rank 0 before any process renames a mask: a table that cannot be written
            # leaves no mask of any process
            distributed.agreed(lambda: _stage_all_tables(stack, rows, out, run))
    except UserError:
        distributed.barrier()  # every process's staged masks removed before rank 0 removes the folder
        raise
    distributed.barrier()  # every mask renamed before rank 0 releases the output folder


def _stage_all_tables(stack: contextlib.ExitStack, rows: InferenceRows, out: Path, run: _Run) -> None:
    """Stage the tables of every process's rows (rank 0 alone)."""
    if not distributed.is_main():
        return
    _stage_tables(stack, rows, out, fields=_volume_columns(run.segmenter.class_names, run.extras))
    if run.continue_on_error:
        _stage_tables(stack, rows.failures, out, "failures", fields=("input", "reason"))


def _first(item: tuple) -> Any:
    return item[0]


def _segment_share(
    run: _Run, scans: Sequence[Path], targets: Sequence[Path], share: Sequence[int], stack: contextlib.ExitStack
) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """Segment the scans numbered ``share`` and stage their masks on ``stack``: ``(rows, failures)``,
    each item with its scan's number, so that the tables keep the input order.

    Raises:
        UserError: a scan failed (without ``continue_on_error``)."""
    segmented: list[tuple[int, dict]] = []
    failures: list[dict] = []
    failed: list[tuple[int, dict]] = []
    for index in share:
        scan, target, counter = scans[index], targets[index], f"[{index + 1}/{len(scans)}]"
        try:
            row, unlike, messages = _segment_one(run, scan, target, stack)
        except UserError as err:
            if not run.continue_on_error:
                raise
            _list_failure(failures, scan, err, counter, run.progress)
            failed.append((index, failures[-1]))
            continue
        segmented.append((index, row))
        if run.progress:
            run.progress(
                f"{counter} {path_text(scan.name)}: {_row_summary(row, run)}" + _warning_note(unlike, messages)
            )
    return segmented, failed


def _row_summary(row: dict, run: _Run) -> str:
    """A scan's progress line after its name: volumes, uncertainty when asked, time, mask."""
    vols = "  ".join(f"{n} {row[f'{n}_mm3']:.0f} mm3" for n in run.segmenter.class_names)
    score = f"  uncertainty {row['uncertainty']:.3f}" if row.get("uncertainty") is not None else ""
    return f"{vols}{score}  ({row['seconds']:.2f} s) -> {row['mask']}"
