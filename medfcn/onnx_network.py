"""A bundle's network as an ONNX model run by onnxruntime, in place of the PyTorch network.

``medfcn infer --backend onnxruntime`` runs ``models/model.onnx`` (written by ``medfcn export
BUNDLE --format onnx``) through the bundle's own preprocessing, sliding window and
postprocessing: only the network's forward pass leaves PyTorch. Needs the ``onnx`` extra.
"""

from __future__ import annotations

import os

import torch

from medfcn.errors import UserError

__all__ = ["ONNX_INSTALL", "OnnxNetwork", "onnx_session", "onnxruntime_module"]

ONNX_INSTALL = "pip install onnx onnxruntime onnxscript (medfcn's onnx extra: pip install -e '.[onnx]' in a clone)"


def onnxruntime_module(what: str):
    """The ``onnxruntime`` module; a UserError naming ``what`` needs it and the install command
    when it is not installed."""
    try:
        import onnxruntime
    except ImportError as err:
        raise UserError(f"{what} needs onnxruntime, which is not installed: {ONNX_INSTALL}") from err
    return onnxruntime


def onnx_session(path: str | os.PathLike, threads: int | None = None, what: str = "ONNX"):
    """An onnxruntime CPU session of ``path`` (``threads``: its intra-op threads; default all cores).

    Raises:
        UserError: onnxruntime is not installed (naming ``what`` and the install command), or
            the file is not an ONNX model it can run.
    """
    onnxruntime = onnxruntime_module(what)
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for a bad file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: cannot be loaded by onnxruntime ({reason}); export it again.") from err


class OnnxNetwork(torch.nn.Module):
    """Call an ONNX segmentation network like the PyTorch one: ``(B, C, *S)`` float32 in,
    ``(B, K, *S)`` float32 logits out, on the CPU.

    Args:
        path: ``models/model.onnx`` (input ``image``, output ``logits``).
        threads: onnxruntime's intra-op threads (default: PyTorch's thread count).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.path = str(path)
        self.session = onnx_session(path, threads or torch.get_num_threads(), "--backend onnxruntime")
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        except Exception as err:  # onnxruntime's own exception types: a model of another input
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"{self.path}: onnxruntime cannot run it on an input of shape {tuple(array.shape)} ({reason}); "
                "export the bundle again."
            ) from err
