"""Export a bundle's weights for deployment, each checked against the state dict before it replaces
any existing export:

- ``torchscript``: ``models/model.ts`` with MONAI's ``ckpt_export`` (metadata and inference config
  embedded, as Model Zoo bundles ship it). TorchScript is deprecated in torch 2.13.
- ``exported``: ``models/model.pt2``, a ``torch.export`` program (``torch.export.load(path)
  .module()``): dynamic batch; the spatial size of the bundle's sliding window (``patch_size``),
  which is what sliding-window inference feeds the network. (With dynamic spatial axes,
  ``torch.export`` specialises the decoder's crops to the example's odd or even sizes, so a
  program traced on one size fails on others.)
- ``onnx``: ``models/model.onnx``, input ``image`` ``(B, C, *S)`` float32 and output ``logits``
  ``(B, K, *S)`` with dynamic batch and spatial axes (any size, odd or even), from the
  TorchScript-based exporter for that reason; checked with onnxruntime on two input sizes.
  Needs the ``onnx`` extra. ``medfcn infer --backend onnxruntime`` runs it.

Every export is written under its final name inside a temporary folder and then moved into
place, so no archive's inner names carry a temporary name; ``exported`` and ``onnx`` are listed
in the bundle's ``metadata.json`` (``medfcn_exports``: file, input, how to load, the check).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.bundle import ckpt_export

from medfcn.bundle import BundleParser, bundle_files, configured_weights
from medfcn.errors import UserError
from medfcn.io import atomic_named_path, atomic_write_text, file_sha256, load_weights, refuse_existing
from medfcn.notices import logger_level
from medfcn.onnx_network import onnx_session, onnxruntime_module

__all__ = ["EXPORTS_KEY", "FORMATS", "export_bundle", "export_torchscript"]

FORMATS = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}
EXPORTS_KEY = "medfcn_exports"
_ONNX_OPSET = 17


@dataclass
class _Source:
    """The bundle being exported: its files, parser and network (eval mode, CPU)."""

    files: dict
    parser: BundleParser
    weights: Path
    network: torch.nn.Module

    @property
    def root(self) -> Path:
        return Path(self.files["bundle_root"])

    def get(self, key: str):
        return self.parser.get_parsed_content(key)


def _quiet_ckpt_export() -> contextlib.AbstractContextManager:
    """Hide the INFO lines of MONAI's ``ckpt_export`` (its arguments and "exported to file"),
    which name the temporary file; warnings still show. The caller reports the final path."""
    return logger_level("monai.bundle.scripts", logging.WARNING)


def _load(bundle: str | os.PathLike) -> _Source:
    files = bundle_files(bundle, "inference.json")
    parser = BundleParser(files["config_files"])  # a broken entry fails in one line naming the file
    parser["bundle_root"] = str(files["bundle_root"])
    weights = configured_weights(parser, files["bundle_root"], "nothing to export")
    network = load_weights(parser.get_parsed_content("network_def"), weights).eval()
    return _Source(files, parser, weights, network)


def _write_torchscript(source: _Source, path: Path, example: torch.Tensor) -> Callable:
    with _quiet_ckpt_export():
        ckpt_export(
            net_id="network_def",
            filepath=str(path),
            ckpt_file=str(source.weights),
            meta_file=str(source.files["meta_file"]),
            config_file=[str(f) for f in source.files["config_files"]],  # embedded merged, as MONAI's runner reads them
            bundle_root=str(source.root),
        )
    return torch.jit.load(str(path), map_location="cpu")


def _write_exported(source: _Source, path: Path, example: torch.Tensor) -> Callable:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(source.network, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def _write_onnx(source: _Source, path: Path, example: torch.Tensor) -> Callable:
    axes = {0: "batch", **{k: f"spatial_{k - 2}" for k in range(2, example.dim())}}
    with warnings.catch_warnings():
        # instance norm always normalises by the input's own statistics (no running stats): the
        # exporter's note that it exports it "with train=True" is about exactly that
        warnings.filterwarnings("ignore", message=".*instance_norm.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            source.network,
            (example,),
            str(path),
            dynamo=False,  # the TorchScript-based exporter keeps odd and even spatial sizes dynamic
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=_ONNX_OPSET,
        )
    session = onnx_session(path)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    return run


_WRITERS = {"torchscript": _write_torchscript, "exported": _write_exported, "onnx": _write_onnx}


def _examples(source: _Source, format: str, check_shape: tuple[int, ...] | None) -> list[torch.Tensor]:
    """The inputs an export is checked on (seeded): ``check_shape``, else odd sizes
    ``(1, C, 35, 51, 32)`` (2D: ``(1, C, 35, 51)``), and for ONNX also an even-sized batch of 2,
    to show its axes are dynamic; for ``exported`` two windows of the bundle's ``patch_size``."""
    dims, channels = int(source.get("network_def#spatial_dims")), int(source.get("network_def#in_channels"))
    if format == "exported":
        # traced on a batch of 2 (1 would be specialised); checked on 1 too, a sliding window's last batch
        shapes = [(2, channels, *source.get("patch_size")), (1, channels, *source.get("patch_size"))]
    else:
        shapes = [check_shape or (1, channels, *(35, 51, 32)[:dims])]
        shapes += [(2, channels, *(40, 48, 36)[:dims])] if format == "onnx" else []
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


def export_bundle(
    bundle: str | os.PathLike,
    format: str = "torchscript",
    check_shape: tuple[int, ...] | None = None,
    atol: float | None = None,
    overwrite: bool = False,
) -> tuple[Path, float]:
    """Write the bundle's network as ``format`` beside its weights; return the path and the
    largest absolute difference of logits from the state dict on the check inputs.

    Args:
        bundle: bundle folder with ``configs/inference.json`` and ``models/model.pt``.
        format: ``torchscript`` (``model.ts``), ``exported`` (``model.pt2``) or ``onnx`` (``model.onnx``).
        check_shape: input shape ``(B, C, *S)`` of the equality check (``torchscript``, ``onnx``).
        atol: largest allowed difference of logits, times the largest logit where that is over 1
            (default 1e-5; ONNX, whose runtime orders float sums its own way: 1e-4).
        overwrite: replace an existing export; otherwise it is an error.

    Raises:
        UserError: an unknown format, missing or foreign weights, an existing export without
            ``overwrite``, a missing extra, or an export whose outputs differ by more than ``atol``.
    """
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: one of {', '.join(FORMATS)}.")
    atol = atol if atol is not None else (1e-4 if format == "onnx" else 1e-5)
    source = _load(bundle)
    target = source.weights.with_suffix(FORMATS[format])
    refuse_existing([target], overwrite, fix="pass --overwrite to replace it")
    meta = _metadata(source) if format != "torchscript" else {}  # before any work: where it is listed
    if format == "onnx":
        onnxruntime_module("--format onnx")
    examples = _examples(source, format, check_shape)
    with atomic_named_path(target) as tmp, torch.no_grad():
        exported = _WRITERS[format](source, tmp, examples[0])
        references = [source.network(x) for x in examples]
        diff = max(float((exported(x) - r).abs().max()) for x, r in zip(examples, references, strict=True))
        allowed = atol * max(1.0, max(float(r.abs().max()) for r in references))  # relative to large logits
        if not diff <= allowed:
            raise UserError(
                f"{target}: export differs from the state dict by {diff:.2e} (> {allowed:.1e}); not written."
            )
    if format != "torchscript":
        _list_in_metadata(source, meta, format, target, diff, examples)
    return target, diff


def _metadata(source: _Source) -> dict:
    """The bundle's ``metadata.json``, read before an export that will be listed in it.

    Raises:
        UserError: it is not a JSON object.
    """
    meta_file = Path(source.files["meta_file"])
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{meta_file}: cannot be read as JSON ({err}); fix the file before exporting.") from err
    if not isinstance(meta, dict) or not isinstance(meta.get(EXPORTS_KEY, {}), dict):
        raise UserError(f"{meta_file}: not a JSON object with a {EXPORTS_KEY} mapping; fix the file before exporting.")
    return meta


_HOW_TO_LOAD = {
    "exported": "torch.export.load('models/model.pt2').module()(x); x: (B, C, *patch_size) float32, B dynamic",
    "onnx": "onnxruntime.InferenceSession('models/model.onnx').run(None, {'image': x}); x: (B, C, *S) float32, "
    "B and S dynamic; output 'logits' (B, K, *S)",
}


def _list_in_metadata(source: _Source, meta: dict, format: str, target: Path, diff: float, examples: list) -> None:
    """Record the export in the bundle's ``metadata.json`` (``medfcn_exports``), atomically, with
    the digest of the weights it was made from (``medfcn infer --backend onnxruntime`` checks it)."""
    meta.setdefault(EXPORTS_KEY, {})[format] = {
        "file": str(target.relative_to(source.root)),
        "how_to_load": _HOW_TO_LOAD[format],
        "checked_on": [list(x.shape) for x in examples],
        "max_abs_difference_vs_state_dict": diff,
        "weights_sha256": file_sha256(source.weights),
        "torch_version": torch.__version__,
        "exported": datetime.date.today().isoformat(),
        **({"opset": _ONNX_OPSET} if format == "onnx" else {}),
    }
    atomic_write_text(json.dumps(meta, indent=4) + "\n", source.files["meta_file"])


def export_torchscript(
    bundle: str | os.PathLike,
    check_shape: tuple[int, ...] | None = None,
    atol: float = 1e-5,
    overwrite: bool = False,
) -> tuple[Path, float]:
    """:func:`export_bundle` as TorchScript (``models/model.ts``)."""
    return export_bundle(bundle, "torchscript", check_shape=check_shape, atol=atol, overwrite=overwrite)
