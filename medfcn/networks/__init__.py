"""Networks: the skip-fusion FCN."""

from medfcn.networks.fcn import FCN, transfer_encoder

__all__ = ["FCN", "transfer_encoder"]
