"""Shared fixtures: the real data root (skipped when absent) and small synthetic datasets."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hippocampus_fcn"
BUNDLE_2D = REPO / "bundles" / "hippocampus_fcn_2d"  # the same task slice by slice
BUNDLES = [pytest.param(BUNDLE, id="3d"), pytest.param(BUNDLE_2D, id="2d")]
DATA_ROOT = Path(os.environ.get("MEDFCN_DATA") or REPO.parent / "shared" / "datasets")
HIPPO = DATA_ROOT / "Task04_Hippocampus"
DICOM = DATA_ROOT / "dicom"
SPLEEN = DATA_ROOT / "spleen_ct_sample"
# what `--device cuda:N` says where it cannot compute: a CPU-only PyTorch, or no GPU N
NO_CUDA_DEVICE = (
    f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build of PyTorch (README, Set-up), "
    "or use --device cpu"
    if torch.version.cuda is None
    else "no such CUDA device on this machine; use --device cpu"
)


def medfcn(*args: str, env=None) -> subprocess.CompletedProcess:
    """``medfcn ARGS`` in a new process from the repository root: its exit code and output."""
    command = [sys.executable, "-m", "medfcn.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def need_module(name: str, install: str):
    """Import the optional module ``name``; skip the test when it is missing (``install`` says how
    to get it), or fail where ``MEDFCN_REQUIRE_EXTRAS=1`` (.ci/run, which installs every extra)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"{name} not installed ({install})"
        if os.environ.get("MEDFCN_REQUIRE_EXTRAS") == "1":
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


def need(path: Path):
    """Skip the test when a real-data folder is absent."""
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set MEDFCN_DATA to the shared datasets folder)")
    return path


def spheres_volume(shape, n_objects: int, rng: np.random.Generator, noise: float = 0.15):
    """A synthetic MR-like volume: spheres of label 1 (intensity ~0.5) and 2 (~1.0) in noise.

    Returns ``(image float32, label uint8)`` of ``shape`` (x, y, z).
    """
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(n_objects):
        centre = rng.uniform(6, np.array(shape) - 6)
        radius = rng.uniform(3.5, 6.0)
        label[np.linalg.norm(grid - centre, axis=-1) < radius] = 1 + k % 2
    image = np.choose(label, [0.0, 0.5, 1.0]).astype(np.float32)
    image += rng.normal(0, noise, shape).astype(np.float32)
    return image, label


def write_msd_dataset(root: Path, n_cases: int, shape=(28, 32, 24), seed: int = 0, affine=None) -> Path:
    """Write an MSD-layout dataset (dataset.json, imagesTr, labelsTr) and a 2-fold split.

    Returns the dataset folder; its ``folds.json`` sits beside ``dataset.json``.
    """
    rng = np.random.default_rng(seed)
    affine = np.eye(4) if affine is None else affine
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_cases):
        image, label = spheres_volume(shape, 4, rng)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "Spheres",
        "modality": {"0": "MRI"},
        # the hippocampus bundle's classes, spelt as Task04's dataset.json spells them: trained as the bundle's
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": n_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    ids = [f"case_{i:03d}" for i in range(n_cases)]
    (root / "folds.json").write_text(json.dumps({"n_folds": 2, "seed": 0, "folds": [ids[::2], ids[1::2]]}))
    return root


@pytest.fixture
def spheres_dataset(tmp_path) -> Path:
    return write_msd_dataset(tmp_path / "Spheres", n_cases=12)
