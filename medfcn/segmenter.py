"""A bundle's inference pipeline, built from its ``inference.json`` (merged onto ``common.json``),
ready to segment one scan at a time: what ``medfcn infer`` runs and ``medfcn package`` loads to
check a packaged bundle.

The components are those MONAI's runner uses for ``python -m monai.bundle run --config_file
"['configs/common.json','configs/inference.json']"``: ``preprocessing``, ``inferer``,
``postprocessing``, ``weights_file`` and ``writer``; this module adds the checks of each scan
before it is resampled.

Example::

    from medfcn.segmenter import load_segmenter
    segment = load_segmenter("bundles/hippocampus_fcn", device="cpu")
    labels, affine, seconds = segment("scan.nii.gz")
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Activationsd, AsDiscreted

from medfcn.bundle import BundleParser, bundle_files, configured_weights
from medfcn.data.checks import check_scan, warn_if_label_map
from medfcn.data.nifti import (
    check_gzip_integrity,
    check_nifti_data_size,
    check_nifti_geometry,
    is_nifti,
    use_file_affine,
)
from medfcn.devices import device_expression
from medfcn.errors import UserError, collected_input_warnings, root_message
from medfcn.formats import check_itk_data, check_memory_from_header, is_itk_file, itk_read_reason
from medfcn.inferers import FlipTTA
from medfcn.io import file_sha256, load_weights
from medfcn.masks import SaveMaskd, mask_labels
from medfcn.onnx_network import OnnxNetwork
from medfcn.settings import stating_file

__all__ = ["BACKENDS", "Ensemble", "Prediction", "Segmenter", "bundle_names", "load_ensemble", "load_segmenter"]


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
    writer: SaveMaskd | None = None  # inference.json's writer: stages the masks medfcn infer writes
    flip_axes: list[int] = field(default_factory=list)  # the spatial axes test-time augmentation flips

    def _checked_load(self, path: str | os.PathLike) -> dict:
        """``{"image": MetaTensor (C, X, Y, Z)}`` of the scan as loaded (before any resampling),
        after the checks of its file; a NIfTI scan gets its file's own affine in mm."""
        nifti = None
        if is_nifti(path):  # nibabel would read a damaged .nii.gz, or a singular affine, without complaint
            data_bytes = check_gzip_integrity(path)
            nifti = check_nifti_geometry(path)
        check_memory_from_header(path, self.in_channels, self.pixdim, len(self.class_names) + 1)  # before the voxels
        if nifti is not None:  # dim fields that do not match the data: nibabel reads rows shifted
            check_nifti_data_size(path, nifti, data_bytes)
        elif is_itk_file(path):  # SimpleITK reads damaged or short data silently
            check_itk_data(path)
        try:  # loading alone first, so the scan can be checked before any resampling
            with warnings.catch_warnings():
                # numpy's "overflow encountered in cast" (scl_slope 1e36): check_scan names the
                # Inf voxels in one line
                warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)
                data = self.preprocessing({"image": str(path)}, end=1)
        except Exception as err:
            reason = (is_itk_file(path) and itk_read_reason(path)) or root_message(err)  # not MONAI's "no reader"
            raise UserError(f"{path}: cannot be read as an image ({reason}).") from err
        # the file's own affine, in mm whatever its spatial units, for the checks before resampling
        # (inference.json's FileAffined, next in the pipeline, applies the same function again)
        if nifti is not None:
            use_file_affine(data["image"], nifti)
        return data

    def __call__(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, float]:
        """Segment one scan.

        Returns:
            ``(labels, affine, seconds)``: uint8 labels ``(X, Y, Z)`` on the scan's own voxel
            grid, its RAS affine (mm; a NIfTI scan's as nibabel reads it, scaled from metres or
            microns to mm), and the model-compute time in seconds.
        """
        prediction = self.predict(path)
        return prediction.labels, prediction.affine, prediction.seconds

    def predict(self, path: str | os.PathLike, probabilities: bool = False) -> Prediction:
        """Segment one scan; with ``probabilities`` keep the class probabilities on the scan's
        grid too: the postprocessing's output before its last step, the argmax."""
        data = self._checked_load(path)
        check_scan(data["image"], path, self.in_channels, self.pixdim, self.slice_axis, len(self.class_names) + 1)
        warn_if_label_map(data["image"], path)
        data = self.preprocessing(data, start=1)
        with torch.no_grad():
            start = time.perf_counter()
            logits = self.inferer(data["image"][None].to(self.device), self.network)
            seconds = time.perf_counter() - start
        data["pred"] = logits[0].cpu()
        probs = None
        if probabilities:
            steps = len(self.postprocessing.transforms)  # the last is the argmax (checked_probabilities)
            data = self.postprocessing(data, end=steps - 1)
            probs = data["pred"].as_tensor().float() if hasattr(data["pred"], "as_tensor") else data["pred"].float()
            data = self.postprocessing(dict(data), start=steps - 1)
        else:
            data = self.postprocessing(data)
        labels, affine = mask_labels(data["pred"])
        return Prediction(labels, affine, seconds, probs)


@dataclass
class Prediction:
    """One scan's segmentation: uint8 ``labels`` ``(X, Y, Z)`` on the scan's own grid, its RAS
    ``affine`` (mm), the model-compute ``seconds``, and when asked the class ``probabilities``
    ``(K, X, Y, Z)`` float32 on the same grid (K = background + classes; each voxel's sum ~1)."""

    labels: np.ndarray
    affine: np.ndarray
    seconds: float
    probabilities: torch.Tensor | None = None


@dataclass
class Ensemble:
    """Several bundles' segmenters as one: each scan's class probabilities are averaged over
    the ``members`` on the scan's own grid, and the mask is their argmax (nnU-Net's way of
    ensembling folds or configurations). Used like a :class:`Segmenter` by ``medfcn infer``;
    the first member's writer stages the masks.

    ``names``: the members' bundle folder names, in the same order (for messages).
    """

    members: list[Segmenter]
    names: list[str]

    @property
    def class_names(self) -> list[str]:
        return self.members[0].class_names

    @property
    def writer(self) -> SaveMaskd | None:
        return self.members[0].writer

    def predict(self, path: str | os.PathLike, probabilities: bool = False) -> Prediction:
        """Segment one scan with every member: labels ``(X, Y, Z)`` the argmax of the mean of
        their probabilities ``(K, X, Y, Z)`` (returned too with ``probabilities``); ``seconds``
        the sum of their model-compute times."""
        with collected_input_warnings(once=True):  # every member checks the same scan: each warning once
            first = self.members[0].predict(path, probabilities=True)
            total, seconds = first.probabilities, first.seconds  # a running sum: one member's maps at a time
            for name, member in zip(self.names[1:], self.members[1:], strict=True):
                prediction = member.predict(path, probabilities=True)
                _check_same_grid(path, (self.names[0], first), (name, prediction))
                total += prediction.probabilities
                seconds += prediction.seconds
        mean = total.div_(len(self.members))
        labels = mean.argmax(0).numpy().astype(np.uint8)
        return Prediction(labels, first.affine, seconds, mean if probabilities else None)


def _check_same_grid(path: str | os.PathLike, *named: tuple[str, Prediction]) -> None:
    """UserError unless the predictions (``(bundle name, Prediction)``) lie on one voxel grid:
    every bundle's postprocessing must bring its output back to the scan's own grid."""
    (name_a, a), (name_b, b) = named
    shape_a, shape_b = tuple(a.probabilities.shape), tuple(b.probabilities.shape)
    if shape_a != shape_b:
        differs = f"shapes {shape_a[1:]} and {shape_b[1:]} voxels, classes {shape_a[0]} and {shape_b[0]}"
    elif not np.allclose(a.affine, b.affine, atol=1e-4):
        differs = f"affines up to {np.abs(a.affine - b.affine).max():.3g} mm apart"
    else:
        return
    raise UserError(
        f"{path}: {name_a} and {name_b} give predictions on different voxel grids ({differs}); ensemble bundles "
        "whose postprocessing inverts their resampling (Invertd), or run them one at a time."
    )


def load_ensemble(
    bundles: Sequence[str | os.PathLike],
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    tta: bool = False,
    backend: str = "torch",
) -> Ensemble:
    """The :class:`Ensemble` of ``bundles`` (two or more), each loaded by :func:`load_segmenter`
    with its class probabilities; with ``tta`` each member trained with flips is averaged over
    them, the others run unflipped (see ``Ensemble.members[i].flip_axes``).

    Raises:
        UserError: a bundle given twice, bundles with other class names or input channels, a
            member whose postprocessing gives no probabilities, ``tta`` when no member was
            trained with flips; and each member's own errors.
    """
    paths = [Path(b) for b in bundles]
    resolved = [p.resolve() for p in paths]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise UserError(f"{paths[i]}: given twice for one ensemble; name each bundle once.")
    members = [
        load_segmenter(b, device, overrides, tta=tta, probabilities=True, backend=backend, flips_required=False)
        for b in paths
    ]
    names = bundle_names(paths)
    if tta and not any(m.flip_axes for m in members):
        raise UserError(
            f"--tta: none of {', '.join(names)} was trained with flips, so --tta has nothing to average; "
            "run without --tta."
        )
    for path, member in zip(paths[1:], members[1:], strict=True):
        _check_member_agrees(paths[0], members[0], path, member)
    return Ensemble(members, names)


def bundle_names(bundles: Sequence[str | os.PathLike]) -> list[str]:
    """The bundles' folder names, or ``parent/name`` for those whose name another shares
    (``fold0/spleen`` and ``fold1/spleen``), so that messages tell them apart."""
    resolved = [Path(b).resolve() for b in bundles]
    names = [p.name for p in resolved]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in resolved]


def _check_member_agrees(first_path: Path, first: Segmenter, path: Path, member: Segmenter) -> None:
    """UserError unless ``member`` segments the same classes from the same input channels as
    ``first``: only then are their probabilities averaged class by class."""
    if member.class_names != first.class_names:
        raise UserError(
            f"{path}: its class_names {member.class_names} are not {first_path}'s {first.class_names}; "
            "an ensemble averages the same classes in the same order."
        )
    if member.in_channels != first.in_channels:
        raise UserError(
            f"{path}: takes {member.in_channels} input channels, {first_path} {first.in_channels}; "
            "an ensemble's bundles read the same scans."
        )


def _check_probabilities(postprocessing: Callable, config_file: Path) -> None:
    """UserError unless ``postprocessing`` is a Compose that turns the logits into probabilities
    (``Activationsd(softmax=True)``) and ends with the argmax (``AsDiscreted(argmax=True)``): the
    steps before the last then give the class probabilities on the scan's grid."""
    steps = list(getattr(postprocessing, "transforms", ()))
    argmax_last = bool(steps) and isinstance(steps[-1], AsDiscreted) and all(steps[-1].argmax)
    softmax = any(isinstance(step, Activationsd) and all(step.softmax) for step in steps[:-1])
    if not (argmax_last and softmax):
        raise UserError(
            f"{config_file}: its postprocessing does not apply a softmax and then end with AsDiscreted(argmax=true), "
            "so it gives no class probabilities, which --uncertainty, --probabilities and --models need; run "
            "without them, or add Activationsd(softmax=true) before the argmax."
        )


BACKENDS = ("torch", "onnxruntime")


def _network(parser: BundleParser, weights: Path, backend: str, device: str | None) -> torch.nn.Module:
    """The bundle's network with its weights (``backend`` "torch"), or its ONNX export beside
    the weights run by onnxruntime on the CPU (``backend`` "onnxruntime": ``models/model.onnx``).

    Raises:
        UserError: an unknown backend, a missing export, a device other than the CPU for onnxruntime.
    """
    if backend == "torch":
        return load_weights(parser.get_parsed_content("network"), weights).eval()
    if backend != "onnxruntime":
        raise UserError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}.")
    if device and torch.device(device).type != "cpu":
        raise UserError(f"--device {device}: --backend onnxruntime runs on the CPU here; leave --device out.")
    model = weights.with_suffix(".onnx")
    export = f"medfcn export {weights.parent.parent} --format onnx"
    if not model.is_file():
        raise UserError(f"{model}: not found; export it first: {export}.")
    listed = _onnx_listing(parser)
    if listed.get("weights_sha256") != file_sha256(weights):
        raise UserError(
            f"{model}: not exported from the bundle's {weights.name} (its metadata.json records another or no "
            f"digest of the weights); export it again: {export} --overwrite."
        )
    parser["device"] = "$torch.device('cpu')"  # inputs stay where onnxruntime reads them
    return OnnxNetwork(model)


def _onnx_listing(parser: BundleParser) -> dict:
    """The bundle's ``metadata.json`` entry for its ONNX export (``medfcn_exports.onnx``); empty
    when there is none."""
    try:
        meta = json.loads(Path(parser.get_parsed_content("bundle_root"), "configs", "metadata.json").read_text())
        listed = meta.get("medfcn_exports", {}).get("onnx", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return listed if isinstance(listed, dict) else {}


def _use_probability_average(inferer: Any) -> None:
    """Make the :class:`FlipTTA` in ``inferer``'s chain (wrappers' ``.inferer``) average the
    flips' softmax, not their logits; nothing when there is none (no flips to average)."""
    while inferer is not None:
        if isinstance(inferer, FlipTTA):
            inferer.average = "probabilities"
            return
        inferer = getattr(inferer, "inferer", None)


def _flip_axes(parser: BundleParser, config_file: Path, required: bool = True) -> list[int]:
    """The axes ``--tta`` flips: the bundle's ``trained_flip_axes`` (``[0]`` where it does not say).

    Raises:
        UserError: a bundle trained without flips, when ``required`` (else: none, ``[]``).
    """
    axes = parser.get_parsed_content("trained_flip_axes", default=[0])
    if not axes and required:
        raise UserError(
            f"{config_file}: this model was trained without flips, so --tta has nothing to average; run without --tta."
        )
    return list(axes)


def load_segmenter(
    bundle: str | os.PathLike,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    tta: bool = False,
    probabilities: bool = False,
    backend: str = "torch",
    flips_required: bool = True,
) -> Segmenter:
    """Build the segmenter of ``bundle`` with the weights its ``weights_file`` names
    (``models/model.pt``).

    With ``tta`` the inferer also averages over the flips along the bundle's
    ``trained_flip_axes`` (spatial axes its model was trained flipped along; ``[0]``,
    left-right, where a bundle does not say; a bundle trained without flips is an error unless
    not ``flips_required``, then it runs unflipped). With ``probabilities`` (for
    :meth:`Segmenter.predict`) it averages the flips' softmax, not their logits.

    Raises:
        UserError: incomplete bundle, missing weights, weights of another architecture, or
            ``tta`` for a bundle trained without flips (``flips_required``).
    """
    files = bundle_files(bundle, "inference.json")
    parser = BundleParser(files["config_files"])  # a broken entry fails in one line naming the file
    parser.update({"bundle_root": str(files["bundle_root"]), **(overrides or {})})
    trained = "train the bundle (medfcn train) and package the run (medfcn package RUN --out BUNDLE)"
    weights = configured_weights(parser, files["bundle_root"], trained)
    if device:
        parser["device"] = device_expression(device)
    flip_axes = []
    if tta:
        flip_axes = _flip_axes(parser, stating_file(files["config_files"], "trained_flip_axes"), flips_required)
        parser["tta_flip_axes"] = flip_axes
    network = _network(parser, weights, backend, device)
    writer = parser.get_parsed_content("writer", default=None)
    inferer = parser.get_parsed_content("inferer")
    preprocessing = parser.get_parsed_content("preprocessing")  # first: postprocessing's Invertd refers to it
    postprocessing = parser.get_parsed_content("postprocessing")
    if probabilities:
        _check_probabilities(postprocessing, stating_file(files["config_files"], "postprocessing"))
        _use_probability_average(inferer)
    return Segmenter(
        network=network,
        preprocessing=preprocessing,
        inferer=inferer,
        postprocessing=postprocessing,
        class_names=list(parser.get_parsed_content("class_names")),
        device=parser.get_parsed_content("device"),
        in_channels=int(parser.get_parsed_content("network_def#in_channels")),
        pixdim=parser.get_parsed_content("pixdim"),
        slice_axis=parser.get_parsed_content("slice_axis", default=None),
        writer=writer if isinstance(writer, SaveMaskd) else None,
        flip_axes=flip_axes,
    )
