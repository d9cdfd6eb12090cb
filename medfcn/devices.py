"""Which device a command computes on: ``--device`` checked against this machine, and the bundle
config expression that selects it."""

from __future__ import annotations

import torch

from medfcn.errors import UserError

__all__ = ["check_device", "device_expression"]


def check_device(device: str) -> str:
    """``device`` if this machine has it; UserError otherwise (e.g. ``cuda`` without a GPU)."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r}: not a device name; use cpu, cuda or cuda:N.") from err
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {device}: no such CUDA device on this machine; use --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: unsupported; use cpu, cuda or cuda:N.")
    return device


def device_expression(device: str) -> str:
    """The value of a bundle's ``device`` entry that computes on ``device`` (checked first)."""
    return f"$torch.device({check_device(device)!r})"
