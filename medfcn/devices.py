"""Which device a command computes on: ``--device`` checked against this machine and this
PyTorch build, and the bundle config expression that selects it."""

from __future__ import annotations

import torch

from medfcn.errors import UserError

__all__ = ["check_device", "device_expression"]

# where the README says how to install a CUDA build in place of the CPU wheel
_CUDA_BUILD_HINT = "install a CUDA build of PyTorch (README, Set-up)"


def check_device(device: str) -> str:
    """``device`` if this machine has it; UserError otherwise (e.g. ``cuda`` without a GPU, or
    with a CPU-only PyTorch, ``mps`` off Apple silicon)."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"--device {device!r}: not a device name; use cpu, cuda, cuda:N or mps.") from err
    if dev.type == "cuda":
        _check_cuda(device, dev.index or 0)
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: no Apple GPU (MPS) on this machine; use --device cpu.")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: unsupported; use cpu, cuda, cuda:N or mps.")
    return device


def _check_cuda(device: str, index: int) -> None:
    """UserError unless this PyTorch is a CUDA build and sees GPU ``index``."""
    if torch.version.cuda is None and torch.version.hip is None:  # a CPU-only wheel (ROCm builds have hip)
        raise UserError(
            f"--device {device}: this PyTorch ({torch.__version__}) is a CPU-only build; "
            f"{_CUDA_BUILD_HINT}, or use --device cpu."
        )
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: no such CUDA device on this machine; use --device cpu.")


def device_expression(device: str) -> str:
    """The value of a bundle's ``device`` entry that computes on ``device`` (checked first)."""
    return f"$torch.device({check_device(device)!r})"
