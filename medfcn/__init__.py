"""medfcn: medical image segmentation with fully convolutional networks, built on MONAI.

``import medfcn`` is light: it loads neither torch nor MONAI and installs no warning filter or
log setting. :class:`medfcn.FCN` (what bundle configs name, ``"_target_": "medfcn.FCN"``) is
imported on first use (PEP 562); library notices are silenced only where medfcn runs
(:func:`medfcn.notices.quiet_library_notices`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["FCN", "__version__"]

# what config expressions may name after ``$import medfcn`` alone, imported on first use:
# medfcn.networks (which ``import medfcn`` made reachable before it became light) and
# medfcn.distributed (which the bundles' multi_gpu_train.json names)
_SUBPACKAGES = ("networks", "distributed")


def __getattr__(name: str):
    """``medfcn.FCN`` on first use: importing it loads torch and MONAI (seconds). A subpackage
    not yet imported (``medfcn.networks.transfer_encoder`` in a config expression after only
    ``$import medfcn``) is imported on first use too, as it was when this file imported it."""
    if name == "FCN":
        from medfcn.networks.fcn import FCN

        globals()["FCN"] = FCN  # later look-ups find it without this function
        return FCN
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")  # also sets the attribute
    raise AttributeError(f"module 'medfcn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
