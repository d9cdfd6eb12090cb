"""Export a bundle's weights to TorchScript (``models/model.ts``) with MONAI's ``ckpt_export``.

The exported file embeds the bundle's metadata and inference config, as MONAI's Model Zoo
bundles do, and is checked against the state dict on a random input before it replaces any
existing export.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from monai.bundle import ckpt_export

from medfcn.bundle import BundleParser, bundle_files, configured_weights
from medfcn.errors import UserError
from medfcn.io import atomic_path, load_weights, refuse_existing
from medfcn.notices import logger_level

__all__ = ["export_torchscript"]


def _quiet_ckpt_export() -> contextlib.AbstractContextManager:
    """Hide the INFO lines of MONAI's ``ckpt_export`` (its arguments and "exported to file"),
    which name the temporary file; warnings still show. The caller reports the final path."""
    return logger_level("monai.bundle.scripts", logging.WARNING)


def export_torchscript(
    bundle: str | os.PathLike,
    check_shape: tuple[int, ...] | None = None,
    atol: float = 1e-5,
    overwrite: bool = False,
) -> tuple[Path, float]:
    """Write the TorchScript beside the weights the bundle names (``models/model.ts``); return
    its path and the largest output difference.

    Args:
        bundle: bundle folder with ``configs/inference.json`` and ``models/model.pt``.
        check_shape: input shape ``(B, C, *S)`` for the equality check; default
            ``(1, in_channels, 35, 51, 32)``, or ``(1, in_channels, 35, 51)`` for a 2D network
            (odd sizes on purpose).
        atol: largest allowed absolute difference of logits between the state dict and export.
        overwrite: replace an existing ``models/model.ts``; otherwise it is an error.

    Raises:
        UserError: missing or foreign weights, an existing export without ``overwrite``, or an
            export whose outputs differ by more than ``atol``.
    """
    files = bundle_files(bundle, "inference.json")
    root = files["bundle_root"]
    parser = BundleParser(files["config_files"])  # a broken entry fails in one line naming the file
    parser["bundle_root"] = str(root)
    weights = configured_weights(parser, root, "nothing to export")
    target = weights.with_suffix(".ts")
    refuse_existing([target], overwrite, fix="pass --overwrite to replace it")
    network = load_weights(parser.get_parsed_content("network_def"), weights).eval()
    if check_shape is None:
        dims, channels = (parser.get_parsed_content(f"network_def#{k}") for k in ("spatial_dims", "in_channels"))
        check_shape = (1, int(channels), *(35, 51, 32)[: int(dims)])
    with atomic_path(target, suffix=".ts") as tmp, _quiet_ckpt_export():
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp),
            ckpt_file=str(weights),
            meta_file=str(files["meta_file"]),
            config_file=[str(f) for f in files["config_files"]],  # embedded merged, as MONAI's runner reads them
            bundle_root=str(root),
        )
        exported = torch.jit.load(str(tmp), map_location="cpu")
        x = torch.randn(*check_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((exported(x) - network(x)).abs().max())
        if not diff <= atol:
            raise UserError(f"{target}: export differs from the state dict by {diff:.2e} (> {atol}); not written.")
    return target, diff
