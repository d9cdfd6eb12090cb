"""``--device`` checked against this machine and this PyTorch build, whatever the test machine has."""

from __future__ import annotations

import pytest
import torch

from medfcn.devices import check_device, device_expression
from medfcn.errors import UserError


def test_cuda_with_a_cpu_only_pytorch_says_to_install_a_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError, match=r"^--device cuda: this PyTorch \(.+\) is a CPU-only build; install a CUDA"):
        check_device("cuda")


def test_cuda_build_without_the_gpu_asked_for(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_expression("cuda:1") == "$torch.device('cuda:1')"
    with pytest.raises(UserError, match=r"^--device cuda:2: no such CUDA device on this machine; use --device cpu"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA build on a machine without a GPU
    with pytest.raises(UserError, match="no such CUDA device"):
        check_device("cuda")


def test_mps_where_present_refused_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("mps") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^--device mps: no Apple GPU \(MPS\) on this machine; use --device cpu"):
        check_device("mps")
