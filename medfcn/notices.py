"""Library notices a medfcn user can do nothing about, silenced only while medfcn runs.

Importing medfcn installs no warning filter and touches no logger (a program that imports
``medfcn.FCN`` keeps its own settings); the CLI runs every command inside
:func:`quiet_library_notices`, and a library entry point may do the same.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["engine_exception_echo_dropped", "quiet_library_notices"]

# The logger of MONAI's GPU DICOM decoding plugin, and nibabel's (header fixes).
_NVIMGCODEC_LOGGER = "monai.data.nvimgcodec_pydicom_plugin"
_NIBABEL_LOGGER = "nibabel.global"


class _DropNvImageCodecNotice(logging.Filter):
    """With pydicom installed, MONAI logs that GPU DICOM decoding (nvImageCodec) is unavailable
    on every LoadImage call; on a CPU machine that is expected, so only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "nvImageCodec is not available" not in record.getMessage()


# what Ignite logs at ERROR about the exception that ends a run, before raising it
_ENGINE_ECHOES = ("Current run is terminating due to exception", "Engine run is terminating due to exception")


class _DropEngineExceptionEcho(logging.Filter):
    """Drops Ignite's log lines about the exception that ends a run: the caller handles that
    exception (the CLI prints a user error as its one line and anything else with its traceback;
    the planner's probe takes running out of memory as a verdict on a candidate), so the lines
    only double it, or report an error where there is none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_ENGINE_ECHOES)


@contextlib.contextmanager
def engine_exception_echo_dropped(logger_names) -> Iterator[None]:
    """Inside the block, the Ignite engine loggers ``logger_names`` (``"ignite.engine.engine."``
    + the engine's class name) drop their echo of the exception that ends a run; every other
    line shows as before."""
    echo = _DropEngineExceptionEcho()
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addFilter(echo)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(echo)


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """Inside the block, the logger ``name`` shows records of ``level`` and above only."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _ignore_library_warnings() -> None:
    """Add the filters for the warnings below to the current (caller-scoped) filter list."""
    # MONAI's LoadImage makes an NvImgCodecPydicomReader, which warns the same on a CPU machine
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
    # MONAI's trainer makes its AMP gradient scaler through torch.cuda.amp, which PyTorch
    # deprecates: a FutureWarning at the start of every CUDA run that the user can do nothing about
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
        category=FutureWarning,
        module=r"monai\.engines\.trainer",
    )


@contextlib.contextmanager
def quiet_library_notices() -> Iterator[None]:
    """Inside the block, drop the notices of MONAI, PyTorch and nibabel that say nothing to a
    medfcn user; every other warning and log line shows as before. On exit the warning filters,
    the nvImageCodec logger's filters and nibabel's log level are what they were.

    Dropped: MONAI's "nvImageCodec is not available" log line and "NvImgCodecPydicomReader ...
    did not register" warning (GPU DICOM decoding, absent on a CPU machine), the FutureWarning
    of ``torch.cuda.amp.GradScaler`` raised from ``monai.engines.trainer``, and nibabel's log
    lines on the header fixes it makes on every load ("pixdim[1,2,3] should be positive; setting
    to abs"): what matters for a scan is checked and said once
    (:func:`medfcn.data.nifti.check_nifti_geometry`).

    Like :func:`warnings.catch_warnings`, not thread-safe: threads started inside the block
    share its filters while it runs.
    """
    drop = _DropNvImageCodecNotice()
    nvimgcodec = logging.getLogger(_NVIMGCODEC_LOGGER)
    nibabel = logging.getLogger(_NIBABEL_LOGGER)
    nibabel_level = nibabel.level
    with warnings.catch_warnings():
        _ignore_library_warnings()
        nvimgcodec.addFilter(drop)
        nibabel.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            nibabel.setLevel(nibabel_level)
            nvimgcodec.removeFilter(drop)
