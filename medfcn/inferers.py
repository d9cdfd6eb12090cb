"""Mixed-precision inference and training on CPU.

MONAI's engines cast to float16 under ``torch.autocast("cuda")`` when ``amp=True``; on a CPU
that has native bfloat16 (AVX-512 BF16 or AMX) autocast to bfloat16 is 1.4-2x faster for this
FCN, but MONAI has no switch for it. :class:`Autocast` wraps any MONAI inferer so that the
network runs under autocast while outputs (and so losses, sliding-window blending and
metrics) stay float32.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import TextIO

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep

__all__ = ["Autocast", "FlipTTA", "WindowProgress", "cpu_bf16_supported", "sliding_windows", "use_cpu_bf16"]


def cpu_bf16_supported() -> bool:
    """True when this CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def use_cpu_bf16(device: torch.device | str, requested: bool = True) -> bool:
    """Whether to autocast to bfloat16: asked for, running on CPU, and the CPU supports it."""
    return bool(requested) and torch.device(device).type == "cpu" and cpu_bf16_supported()


class Autocast(Inferer):
    """Run ``inferer`` with the network under ``torch.autocast``; return float32 outputs.

    Args:
        inferer: the MONAI inferer to wrap (``SimpleInferer``, ``SlidingWindowInferer``...).
        enabled: autocast on or off (off: exactly the wrapped inferer).
        dtype: autocast dtype, bfloat16 by default.
    """

    def __init__(self, inferer: Inferer, enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.inferer = inferer
        self.enabled = bool(enabled)
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)

        def run(x, *a, **k):
            with torch.autocast(device_type=x.device.type, dtype=self.dtype):
                out = network(x, *a, **k)
            return out.float()

        return self.inferer(inputs, run, *args, **kwargs)


class FlipTTA(Inferer):
    """Flip test-time augmentation: the mean of the logits over the input and its flips.

    Args:
        inferer: the MONAI inferer to wrap.
        spatial_axes: spatial axes (0 = first spatial axis) to flip, one extra pass each;
            empty means no augmentation. Flip only along axes the model saw flipped in
            training (the hippocampus bundle: axis 0, left-right).
        average: ``"logits"``, the mean of the passes' logits; or ``"probabilities"``, the mean
            of their softmax over channels (nnU-Net's way; what ``medfcn infer --uncertainty``
            takes the entropy of), returned as its logarithm so that a softmax after it gives
            that mean back exactly.

    Input ``(B, C, *S)``; output the wrapped inferer's ``(B, K, *S)``.
    """

    AVERAGES = ("logits", "probabilities")

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] = (), average: str = "logits"):
        super().__init__()
        if average not in self.AVERAGES:
            raise ValueError(f"average {average!r}: one of {', '.join(self.AVERAGES)}")
        self.inferer = inferer
        self.spatial_axes = [int(a) for a in spatial_axes]
        self.average = average

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        def one_pass(x: torch.Tensor) -> torch.Tensor:
            out = self.inferer(x, network, *args, **kwargs)
            return torch.softmax(out.float(), 1) if self.average == "probabilities" else out

        out = one_pass(inputs)
        for axis in self.spatial_axes:
            dim = [axis + 2]
            out = out + torch.flip(one_pass(torch.flip(inputs, dim)), dim)
        out = out / (1 + len(self.spatial_axes))
        # softmax(log p) = p where the p sum to 1; the floor keeps log finite (p ~ 0 stays ~0)
        return torch.log(out.clamp(min=1e-20)) if self.average == "probabilities" else out


def sliding_windows(inferer: Inferer, spatial_shape: tuple[int, ...]) -> int | None:
    """How many windows ``inferer`` (a ``SlidingWindowInferer`` or ``SliceInferer``) runs the
    network on for an input of ``spatial_shape`` (voxels); None for other inferers."""
    if not isinstance(inferer, SlidingWindowInferer):
        return None
    dims = len(spatial_shape)
    roi = list(getattr(inferer, "orig_roi_size", inferer.roi_size))
    if isinstance(inferer, SliceInferer) and len(roi) == dims - 1:
        roi.insert(inferer.spatial_dim, 1)  # one slice at a time
    if len(roi) != dims:
        return None
    # inputs smaller than the window are padded to it; a window size <= 0 means the whole axis
    padded = [max(s, r if r > 0 else s) for s, r in zip(spatial_shape, roi, strict=True)]
    roi = [r if r > 0 else s for r, s in zip(roi, padded, strict=True)]
    overlap = ensure_tuple_rep(inferer.overlap, dims)
    # the steps MONAI's sliding_window_inference takes (one window where it covers the axis)
    interval = [max(int(r * (1 - o)), 1) if r < s else 1 for r, o, s in zip(roi, overlap, padded, strict=True)]
    return len(dense_patch_slices(padded, roi, interval))


class WindowProgress(Inferer):
    """Run ``inferer`` and show, on one line of ``stream`` (stderr), how many of its sliding
    windows are done and the time left, once a scan has taken ``after_s`` seconds; nothing when
    the stream is no terminal (logs, pipes, tests) or the scan is quick.

    The network's inputs and outputs pass through untouched, so the masks do not depend on it.

    Args:
        inferer: the MONAI inferer to wrap (``SlidingWindowInferer``, ``SliceInferer``...).
        after_s: seconds of silence before the line appears (three silent minutes look like a hang).
        stream: where to write; default ``sys.stderr`` at call time.
    """

    def __init__(self, inferer: Inferer, after_s: float = 3.0, stream: TextIO | None = None):
        super().__init__()
        self.inferer = inferer
        self.after_s = float(after_s)
        self.stream = stream

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        stream = self.stream or sys.stderr
        if not (hasattr(stream, "isatty") and stream.isatty()):
            return self.inferer(inputs, network, *args, **kwargs)
        windows = sliding_windows(self.inferer, tuple(inputs.shape[2:]))
        total = windows * inputs.shape[0] if windows else None
        start, done, shown = time.perf_counter(), 0, False

        def counted(x, *a, **k):
            nonlocal done, shown
            out = network(x, *a, **k)
            done += x.shape[0]  # a batch of windows
            elapsed = time.perf_counter() - start
            if elapsed >= self.after_s:
                stream.write("\r" + _progress_text(done, total, elapsed))
                stream.flush()
                shown = True
            return out

        try:
            return self.inferer(inputs, counted, *args, **kwargs)
        finally:
            if shown:
                stream.write("\r\033[K")  # the line goes, the scan's own line follows
                stream.flush()


def _progress_text(done: int, total: int | None, elapsed: float) -> str:
    """``  windows 12/40 (30%), 9 s, about 21 s left`` (without total and time left when unknown)."""
    if not total:
        return f"  windows {done}, {elapsed:.0f} s"
    left = elapsed * max(total - done, 0) / max(done, 1)
    return f"  windows {done}/{total} ({math.floor(100 * done / total)}%), {elapsed:.0f} s, about {left:.0f} s left"
