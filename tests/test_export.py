"""medfcn.export: the TorchScript export gives the state dict's outputs."""

from __future__ import annotations

import shutil

import pytest
import torch
from monai.bundle import ConfigParser

from medfcn import FCN
from medfcn.export import export_torchscript

from .conftest import BUNDLES


@pytest.mark.parametrize("source", BUNDLES)
def test_torchscript_export_matches_state_dict(tmp_path, source):
    bundle = tmp_path / "bundle"
    shutil.copytree(source / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, FCN)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    path, diff = export_torchscript(bundle)
    assert path == bundle / "models" / "model.ts" and diff <= 1e-5
    exported = torch.jit.load(str(path))
    x = torch.randn(1, 1, *(37, 45, 29)[: net.spatial_dims])
    torch.testing.assert_close(exported(x), net.eval()(x), atol=1e-5, rtol=0)
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt", "model.ts"]  # no temp left
