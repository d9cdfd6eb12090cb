"""medfcn.export: the TorchScript export gives the state dict's outputs."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from monai.bundle import ConfigParser

from medfcn import FCN
from medfcn.errors import UserError
from medfcn.export import export_torchscript

from .conftest import BUNDLE, BUNDLES


def _bundle_with_random_weights(tmp_path, source):
    """A copy of ``source``'s configs with freshly initialised weights; returns (folder, network)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(source / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in ("common.json", "inference.json")])
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle, net


@pytest.mark.parametrize("source", BUNDLES)
def test_torchscript_export_matches_state_dict(tmp_path, source):
    bundle, net = _bundle_with_random_weights(tmp_path, source)
    assert isinstance(net, FCN)
    path, diff = export_torchscript(bundle)
    assert path == bundle / "models" / "model.ts" and diff <= 1e-5
    exported = torch.jit.load(str(path))
    x = torch.randn(1, 1, *(37, 45, 29)[: net.spatial_dims])
    torch.testing.assert_close(exported(x), net.eval()(x), atol=1e-5, rtol=0)
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt", "model.ts"]  # no temp left


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_export_logs_no_temporary_file_and_refuses_an_existing_one(tmp_path):
    bundle, _ = _bundle_with_random_weights(tmp_path, BUNDLE)
    logger = logging.getLogger("monai.bundle.scripts")
    records, level = _Records(), logger.level
    logger.addHandler(records)
    try:
        export_torchscript(bundle)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if ".tmp" in m], records.messages
    assert logger.level == level  # MONAI's logger is left as it was
    with pytest.raises(UserError) as err:
        export_torchscript(bundle)
    assert str(err.value) == f"{bundle / 'models' / 'model.ts'}: already exists; pass --overwrite to replace it."


def test_export_of_a_network_with_per_axis_pooling(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(BUNDLE / "configs", source / "configs")
    common = source / "configs" / "common.json"
    config = json.loads(common.read_text())
    config["network_def"]["strides"] = [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]  # a thin last axis
    common.write_text(json.dumps(config))
    bundle, net = _bundle_with_random_weights(tmp_path, source)
    assert net.strides[0] == (2, 2, 1)
    path, diff = export_torchscript(bundle)
    assert diff <= 1e-5
    x = torch.randn(1, 1, 37, 45, 5)
    torch.testing.assert_close(torch.jit.load(str(path))(x), net.eval()(x), atol=1e-5, rtol=0)
