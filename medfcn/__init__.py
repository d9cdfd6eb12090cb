"""medfcn: medical image segmentation with fully convolutional networks, built on MONAI."""

import logging
import warnings


class _DropNvImageCodecNotice(logging.Filter):
    """With pydicom installed, MONAI logs that GPU DICOM decoding (nvImageCodec) is unavailable
    on every LoadImage call; on a CPU machine that is expected, so only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "nvImageCodec is not available" not in record.getMessage()


logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(_DropNvImageCodecNotice())
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
# MONAI's trainer makes its AMP gradient scaler through torch.cuda.amp, which PyTorch deprecates:
# a FutureWarning at the start of every CUDA run that the user can do nothing about.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated",
    category=FutureWarning,
    module=r"monai\.engines\.trainer",
)

from medfcn.networks.fcn import FCN  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FCN", "__version__"]
