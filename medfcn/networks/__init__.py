"""Networks: the skip-fusion FCN."""

from medfcn.networks.fcn import FCN

__all__ = ["FCN"]
