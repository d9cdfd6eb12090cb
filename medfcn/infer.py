"""Run a bundle's inference config on scans: NIfTI files, folders of them, DICOM series.

The bundle's ``configs/inference.json`` supplies the network, preprocessing, inferer and the
postprocessing that inverts the preprocessing (``Invertd``); this module feeds it one scan at a
time, writes each mask atomically as a uint8 NIfTI with exactly the scan's geometry, and
tabulates the volume of every label in mm^3.

Example::

    from medfcn.infer import infer
    rows = infer("bundles/hippocampus_fcn", ["scan.nii.gz", "dicom/series1"], "out/")
    rows[0]["anterior_mm3"]
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from medfcn.data.checks import check_scan, warn_if_label_map
from medfcn.data.datasets import case_id
from medfcn.data.readers import quiet_itk
from medfcn.devices import check_device, device_expression
from medfcn.errors import UserError, root_message
from medfcn.io import NIFTI_SUFFIXES, atomic_path, load_weights, nifti_files, refuse_existing, writable_dir
from medfcn.settings import BundleParser
from medfcn.train import bundle_files

__all__ = ["Segmenter", "load_segmenter", "check_device", "expand_inputs", "mask_name", "label_volumes", "infer"]


@dataclass
class Segmenter:
    """A bundle's network and pipeline, ready to segment one scan at a time."""

    network: torch.nn.Module
    preprocessing: Callable
    inferer: Callable
    postprocessing: Callable
    class_names: list[str]
    device: torch.device
    in_channels: int = 1
    pixdim: Sequence[float] | None = None
    slice_axis: int | None = None  # slice-by-slice bundles: the axis (after RAS) they slice along

    def __call__(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, float]:
        """Segment one scan.

        Returns:
            ``(labels, affine, seconds)``: uint8 labels ``(X, Y, Z)`` on the scan's own voxel
            grid, its RAS affine (mm), and the model-compute time in seconds.
        """
        try:  # loading alone first, so the scan can be checked before any resampling
            data = self.preprocessing({"image": str(path)}, end=1)
        except Exception as err:
            raise UserError(f"{path}: cannot be read as an image ({root_message(err)}).") from err
        check_scan(data["image"], path, self.in_channels, self.pixdim, self.slice_axis)
        warn_if_label_map(data["image"], path)
        data = self.preprocessing(data, start=1)
        image = data["image"]
        with torch.no_grad():
            start = time.perf_counter()
            logits = self.inferer(image[None].to(self.device), self.network)
            seconds = time.perf_counter() - start
        data["pred"] = logits[0].cpu()
        data = self.postprocessing(data)
        labels = np.asarray(data["pred"][0].cpu().numpy()).round().astype(np.uint8)
        affine = np.asarray(data["pred"].affine, dtype=np.float64)
        return labels, affine, seconds


def load_segmenter(
    bundle: str | os.PathLike,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    tta: bool = False,
) -> Segmenter:
    """Build the segmenter of ``bundle`` with the weights in ``models/model.pt``.

    With ``tta`` the inferer also averages over the flips along the bundle's
    ``trained_flip_axes`` (spatial axes its model was trained flipped along; ``[0]``,
    left-right, where a bundle does not say).

    Raises:
        UserError: incomplete bundle, missing weights, weights of another architecture, or
            ``tta`` for a bundle trained without flips.
    """
    files = bundle_files(bundle, "inference.json")
    weights = files["bundle_root"] / "models" / "model.pt"
    if not weights.is_file():
        raise UserError(f"{weights}: missing; train the bundle and copy best_model.pt there.")
    parser = BundleParser(files["config_file"])  # a broken entry fails in one line naming the file
    parser.update({"bundle_root": str(files["bundle_root"]), **(overrides or {})})
    if device:
        parser["device"] = device_expression(device)
    if tta:
        axes = parser.get_parsed_content("trained_flip_axes", default=[0])
        if not axes:
            raise UserError(
                f"{files['config_file']}: this model was trained without flips, so --tta has nothing to average; "
                "run without --tta."
            )
        parser["tta_flip_axes"] = list(axes)
    network = load_weights(parser.get_parsed_content("network"), weights)
    dev = parser.get_parsed_content("device")
    network.eval()
    return Segmenter(
        network=network,
        preprocessing=parser.get_parsed_content("preprocessing"),
        inferer=parser.get_parsed_content("inferer"),
        postprocessing=parser.get_parsed_content("postprocessing"),
        class_names=list(parser.get_parsed_content("class_names")),
        device=dev,
        in_channels=int(parser.get_parsed_content("network_def#in_channels")),
        pixdim=parser.get_parsed_content("pixdim"),
        slice_axis=parser.get_parsed_content("slice_axis", default=None),
    )


def _is_dicom_series(folder: Path) -> bool:
    """True for a folder with exactly one complete DICOM series; UserError for a broken one."""
    with quiet_itk():  # a folder of NIfTI files is probed too; GDCM would print "No Series were found"
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        return False
    if len(series) > 1:
        raise UserError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder.")
    with quiet_itk():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    _check_slice_spacing(folder, files)
    return True


def _check_slice_spacing(folder: Path, files: Sequence[str]) -> None:
    """Slices must be evenly spaced along the slice normal; a gap means a missing file."""
    if len(files) < 3:
        return
    reader = sitk.ImageFileReader()
    positions = []
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        positions.append(reader.GetOrigin())
        direction = reader.GetDirection()
    normal = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2]
    steps = np.diff(np.sort(np.asarray(positions) @ normal))
    if steps.min() <= 1e-6 or steps.max() > 1.5 * np.median(steps):
        raise UserError(
            f"{folder}: slice positions are uneven (steps {steps.min():.3g} to {steps.max():.3g} mm): "
            "a slice is missing or duplicated; export the complete series."
        )


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Scans named by ``inputs``: NIfTI files, DICOM series folders, and the NIfTI files of
    other folders (sorted; hidden files skipped). A scan named twice (also through its folder)
    is kept once. Raises UserError for missing paths and folders with no scan."""
    scans: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise UserError(f"{item}: not found; pass NIfTI files, folders of them, or DICOM series folders.")
        if item.is_file():
            if not item.name.lower().endswith(NIFTI_SUFFIXES):
                raise UserError(f"{item}: not a NIfTI file (.nii/.nii.gz); DICOM is read per series folder.")
            scans.append(item)
        elif _is_dicom_series(item):
            scans.append(item)
        else:
            found = nifti_files(item)
            if not found:
                raise UserError(f"{item}: no NIfTI files and no DICOM series in this folder.")
            scans.extend(found)
    if not scans:
        raise UserError("no input scans given.")
    seen: set[Path] = set()
    unique = []
    for scan in scans:  # a file given twice, or by name and through its folder, is one scan
        if scan.resolve() not in seen:
            seen.add(scan.resolve())
            unique.append(scan)
    return unique


def mask_name(scan: Path) -> str:
    """Output file name for ``scan``: its case name + ``.nii.gz``, reduced to a plain file name
    so that no input name (``..``, separators, leading dots) can place it outside the folder."""
    stem = case_id(scan).replace(os.sep, "_").replace("/", "_").lstrip(".") or "scan"
    return f"{stem}.nii.gz"


def label_volumes(labels: np.ndarray, affine: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Volume of each foreground label in mm^3: voxel count times |det| of the affine's 3x3."""
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    counts = np.bincount(labels.ravel(), minlength=len(class_names) + 1)
    return {f"{name}_mm3": round(float(counts[k + 1]) * voxel_mm3, 3) for k, name in enumerate(class_names)}


def _stage_mask(stack: contextlib.ExitStack, labels: np.ndarray, affine: np.ndarray, target: Path) -> None:
    """Write the mask to a temporary file that ``stack`` renames onto ``target`` on success."""
    image = nib.Nifti1Image(labels.astype(np.uint8), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")  # the affine is in mm; 0 ("unknown") makes some viewers guess
    nib.save(image, stack.enter_context(atomic_path(target, suffix=".nii.gz")))


def _stage_tables(stack: contextlib.ExitStack, rows: list[dict], out_dir: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    stack.enter_context(atomic_path(out_dir / "volumes.csv")).write_text(buffer.getvalue())
    stack.enter_context(atomic_path(out_dir / "volumes.json")).write_text(json.dumps(rows, indent=1) + "\n")


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
) -> list[dict]:
    """Segment every scan in ``inputs``; write masks and the volume tables to ``out_dir``.

    Args:
        bundle: bundle folder with ``configs/inference.json`` and ``models/model.pt``.
        inputs: NIfTI files, folders of NIfTI files, DICOM series folders.
        out_dir: gets ``<case>.nii.gz`` per scan, ``volumes.csv`` and ``volumes.json``.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        sw_batch_size, overlap: sliding-window settings (default: the bundle's).
        tta: average with predictions on flipped input, along the axes the bundle's model was
            trained flipped (left-right for the 3D hippocampus bundle: twice the compute).
        overwrite: replace existing masks and volume tables; otherwise an existing one is an error.
        progress: called with one line per scan.

    Returns:
        One row per scan: input, mask, shape, spacing (mm), seconds, and ``<label>_mm3``.

    Raises:
        UserError: a bad input, bundle or option; nothing is written then, not even the masks
            of the scans before the bad one.
    """
    scans = expand_inputs(inputs)
    out = Path(out_dir)
    targets = [out / mask_name(s) for s in scans]
    named: dict[Path, Path] = {}
    for scan, target in zip(scans, targets, strict=True):
        if target in named:
            raise UserError(
                f"{named[target]} and {scan}: same case name, so both masks would be {target.name}; "
                "rename one or segment them into separate --out folders."
            )
        named[target] = scan
    refuse_existing([*targets, out / "volumes.csv", out / "volumes.json"], overwrite)
    if overlap is not None and not 0 <= overlap < 1:
        raise UserError(f"--overlap {overlap}: must be in [0, 1).")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise UserError(f"--sw-batch-size {sw_batch_size}: must be at least 1.")

    overrides: dict[str, Any] = {}
    if sw_batch_size is not None:
        overrides["sw_batch_size"] = sw_batch_size
    if overlap is not None:
        overrides["overlap"] = overlap
    segmenter = load_segmenter(bundle, device=device, overrides=overrides, tta=tta)
    writable_dir(out, fix="choose another --out")

    rows = []
    # All or nothing: masks are staged as temporary files and renamed only once every scan
    # has succeeded, so a bad scan in the middle of a batch leaves no partial output behind.
    with contextlib.ExitStack() as stack:
        for k, (scan, target) in enumerate(zip(scans, targets, strict=True), start=1):
            start = time.perf_counter()
            labels, affine, compute = segmenter(scan)
            _stage_mask(stack, labels, affine, target)
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            row = {
                "input": str(scan),
                "mask": str(target),
                "shape": "x".join(map(str, labels.shape)),
                "spacing_mm": "x".join(f"{s:.4g}" for s in spacing),
                "model_seconds": round(compute, 4),
                "seconds": round(time.perf_counter() - start, 4),
                **label_volumes(labels, affine, segmenter.class_names),
            }
            rows.append(row)
            if progress:
                vols = "  ".join(f"{n} {row[f'{n}_mm3']:.0f} mm3" for n in segmenter.class_names)
                progress(f"[{k}/{len(scans)}] {scan.name}: {vols}  ({row['seconds']:.2f} s) -> {target}")
        _stage_tables(stack, rows, out)
    return rows
