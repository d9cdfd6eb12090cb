"""One inference path: ``medfcn infer`` and MONAI's runner on a bundle's
``['configs/common.json', 'configs/inference.json']`` run the same components (preprocessing,
inferer, postprocessing, weights, writer) and write the same mask files, bit for bit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medfcn.infer import infer
from medfcn.inferers import WindowProgress, sliding_windows

from .conftest import BUNDLE, BUNDLES, DICOM, HIPPO, REPO, need, spheres_volume


def _synthetic_scan(path):
    """An MR-like volume larger than the 3D patch (several sliding windows), stored with permuted,
    flipped axes and 0.9 mm voxels, so that the inversion of Orientationd and Spacingd is part of
    what both paths must agree on."""
    image, _ = spheres_volume((62, 72, 52), 6, np.random.default_rng(3))
    affine = np.array([[0, -0.9, 0, 20.0], [0.9, 0, 0, -14.0], [0, 0, -0.9, 9.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image * 300, affine), path)
    return path


def _scan_in_metres(path):
    """A scan whose header states metres (1 mm voxels written as 0.001 m): both paths must read
    its grid in mm (MONAI's own loader would not)."""
    image, _ = spheres_volume((36, 50, 36), 4, np.random.default_rng(4))
    scan = nib.Nifti1Image(image * 300, np.diag([0.001, 0.001, 0.001, 1.0]))
    scan.header.set_xyzt_units("meter")
    nib.save(scan, path)
    return path


def _scans(tmp_path):
    scans = [_synthetic_scan(tmp_path / "synthetic_case.nii.gz"), _scan_in_metres(tmp_path / "in_metres.nii.gz")]
    if HIPPO.is_dir():  # two real cases where the data is at hand
        scans += sorted((HIPPO / "imagesTr").glob("hippocampus_*.nii.gz"))[:2]
    return scans


def _monai_run(bundle, scans, out, datalist=None):
    configs = [str(bundle / "configs" / name) for name in ("common.json", "inference.json")]
    datalist = json.dumps(datalist or [{"image": str(s)} for s in scans])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs)]
    cmd += ["--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)]
    cmd += ["--datalist", datalist, "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_medfcn_infer_and_monai_runner_write_identical_masks(tmp_path, bundle):
    (tmp_path / "in").mkdir()
    scans = _scans(tmp_path / "in")
    infer(bundle, scans, tmp_path / "medfcn")
    result = _monai_run(bundle, scans, tmp_path / "monai")
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "medfcn").glob("*.nii.gz"))
    assert (
        names == sorted(p.name for p in (tmp_path / "monai").iterdir()) == sorted(s.name for s in scans)
    )  # <case>.nii.gz from both, nothing else from MONAI's runner
    for name in names:
        ours, theirs = nib.load(tmp_path / "medfcn" / name), nib.load(tmp_path / "monai" / name)
        assert np.asarray(ours.dataobj).dtype == np.uint8 == np.asarray(theirs.dataobj).dtype
        assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj)), name
        assert np.array_equal(ours.affine, theirs.affine), name
        assert ours.header.binaryblock == theirs.header.binaryblock, name
        assert np.asarray(ours.dataobj).any(), name  # something was segmented: not two empty masks


def test_a_datalist_name_names_the_mask_as_medfcn_infer_names_a_series_of_an_export(tmp_path):
    """``medfcn infer EXPORT`` names the mask of the DICOM series ``EXPORT/PAT/STUDY/SERIES`` after
    its path below EXPORT, ``PAT_STUDY_SERIES.nii.gz``; MONAI's runner sees only the series
    folder, so a datalist item's ``name`` gives it that name (else ``SERIES.nii.gz``)."""
    series = tmp_path / "export" / "PAT1" / "STUDY" / "SER1"
    series.parent.mkdir(parents=True)
    series.symlink_to(need(DICOM) / "PGBM-002_HippoCrop", target_is_directory=True)
    infer(BUNDLE, [tmp_path / "export"], tmp_path / "medfcn")
    datalist = [{"image": str(series), "name": "PAT1_STUDY_SER1"}]
    result = _monai_run(BUNDLE, [series], tmp_path / "monai", datalist)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "monai").iterdir()] == ["PAT1_STUDY_SER1.nii.gz"]
    ours, theirs = (nib.load(tmp_path / folder / "PAT1_STUDY_SER1.nii.gz") for folder in ("medfcn", "monai"))
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    assert ours.header.binaryblock == theirs.header.binaryblock


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("bundle", BUNDLES)
def test_long_scans_show_window_progress_on_a_terminal_only(bundle):
    """inference.json's inferer counts its sliding windows on stderr once a scan has taken
    ``after_s`` seconds, when stderr is a terminal; the logits are those of the bare inferer."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in ("common.json", "inference.json")])
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network").eval()
    progress = parser.get_parsed_content("inferer").inferer.inferer
    assert isinstance(progress, WindowProgress)
    window = progress.inferer
    x = torch.randn(1, 1, 70, 64, 44, generator=torch.Generator().manual_seed(0))
    calls = []

    def counted(batch):
        calls.append(batch.shape[0])
        return network(batch)

    with torch.no_grad():
        bare = window(x, counted)
        terminal, log = _Terminal(), io.StringIO()
        shown = WindowProgress(window, after_s=0, stream=terminal)(x, network)
        quiet = WindowProgress(window, after_s=0, stream=log)(x, network)
    total = sliding_windows(window, (70, 64, 44))
    assert total == sum(calls) > 1
    assert torch.equal(shown, bare) and torch.equal(quiet, bare)
    assert f"windows {total}/{total} (100%)" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r\033[K") and log.getvalue() == ""
