"""medfcn.export: the TorchScript export gives the state dict's outputs."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medfcn import FCN
from medfcn.errors import UserError
from medfcn.export import export_bundle, export_torchscript
from medfcn.infer import infer

from .conftest import BUNDLE, BUNDLES, need_module


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


def _inner_roots(path) -> set[str]:
    """The top folders inside a zip archive (TorchScript, torch.save, torch.export)."""
    return {name.split("/")[0] for name in zipfile.ZipFile(path).namelist()}


@pytest.mark.parametrize("source", BUNDLES)
def test_onnx_export_has_dynamic_batch_and_spatial_axes_and_is_listed(tmp_path, source):
    ort = need_module("onnxruntime", "pip install -e '.[onnx]'")
    bundle, net = _bundle_with_random_weights(tmp_path, source)
    path, diff = export_bundle(bundle, "onnx")
    assert path == bundle / "models" / "model.onnx" and diff <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for shape in ((3, 1, 21, 40, 17), (1, 1, 64, 48, 32)):  # odd and even sizes, other batches
        x = torch.randn(*shape[: 2 + net.spatial_dims])
        out = session.run(None, {"image": x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), net.eval()(x).detach(), atol=1e-4, rtol=0)
    listed = json.loads((bundle / "configs" / "metadata.json").read_text())["medfcn_exports"]["onnx"]
    assert listed["file"] == "models/model.onnx" and listed["max_abs_difference_vs_state_dict"] == diff
    assert "onnxruntime.InferenceSession" in listed["how_to_load"]
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.onnx", "model.pt"]


def test_torch_export_program_takes_any_batch_of_windows(tmp_path):
    bundle, net = _bundle_with_random_weights(tmp_path, BUNDLE)
    path, diff = export_bundle(bundle, "exported")
    assert path.name == "model.pt2" and diff <= 1e-4
    assert _inner_roots(path) == {"model"}  # not the temporary file's name
    program = torch.export.load(str(path)).module()
    patch = json.loads((bundle / "configs" / "common.json").read_text())["patch_size"]
    x = torch.randn(5, 1, *patch)
    torch.testing.assert_close(program(x), net.eval()(x), atol=1e-4, rtol=0)
    assert "medfcn_exports" in json.loads((bundle / "configs" / "metadata.json").read_text())


def test_no_archive_carries_a_temporary_name(tmp_path):
    bundle, _ = _bundle_with_random_weights(tmp_path, BUNDLE)
    path, _ = export_torchscript(bundle)
    assert _inner_roots(path) == {"model"}
    for shipped in BUNDLES:  # the weights each bundle ships
        assert not [root for root in _inner_roots(shipped.values[0] / "models" / "model.pt") if root.startswith(".")]


def test_unknown_format_and_missing_onnxruntime_are_one_line_errors(tmp_path, monkeypatch):
    bundle, _ = _bundle_with_random_weights(tmp_path, BUNDLE)
    with pytest.raises(UserError, match=r"--format 'tflite': one of torchscript, exported, onnx\."):
        export_bundle(bundle, "tflite")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"--format onnx needs onnxruntime.*pip install onnx onnxruntime onnxscript"):
        export_bundle(bundle, "onnx")
    assert not (bundle / "models" / "model.onnx").exists()


def test_infer_on_onnxruntime_writes_the_masks_pytorch_writes(tmp_path, spheres_dataset):
    need_module("onnxruntime", "pip install -e '.[onnx]'")
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    scans = [spheres_dataset / "imagesTr" / f"case_00{k}.nii.gz" for k in range(3)]
    with pytest.raises(UserError, match=r"model.onnx: not found; export it first: medfcn export .* --format onnx"):
        infer(bundle, scans, tmp_path / "nope", backend="onnxruntime")
    export_bundle(bundle, "onnx")
    infer(bundle, scans, tmp_path / "torch", device="cpu")
    rows = infer(bundle, scans, tmp_path / "onnx", backend="onnxruntime")
    assert len(rows) == 3
    for scan in scans:
        a, b = (np.asarray(nib.load(tmp_path / k / scan.name).dataobj) for k in ("torch", "onnx"))
        assert np.mean(a == b) >= 0.9999


def test_onnxruntime_refuses_an_export_of_other_weights(tmp_path, spheres_dataset):
    need_module("onnxruntime", "pip install -e '.[onnx]'")
    bundle, net = _bundle_with_random_weights(tmp_path, BUNDLE)
    export_bundle(bundle, "onnx")
    torch.save({k: v * 1.01 for k, v in net.state_dict().items()}, bundle / "models" / "model.pt")  # retrained
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    with pytest.raises(UserError, match=r"model.onnx: not exported from the bundle's model.pt.*--overwrite"):
        infer(bundle, [scan], tmp_path / "out", backend="onnxruntime")
    export_bundle(bundle, "onnx", overwrite=True)
    assert len(infer(bundle, [scan], tmp_path / "out", backend="onnxruntime")) == 1
