"""The stage configs ``medfcn plan`` writes (``medfcn/planning/template``) are the shipped
bundles' own: train.json, inference.json, evaluate.json and logging.conf stay byte-identical
across every bundle in ``bundles/``, and a bundle differs from another only by its
``common.json`` and metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "medfcn" / "planning" / "template"
STAGE_FILES = ("train.json", "multi_gpu_train.json", "inference.json", "evaluate.json", "logging.conf")
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "common.json").is_file())


def test_there_are_bundles_and_a_template():
    assert len(BUNDLES) >= 2, BUNDLES
    assert sorted(p.name for p in TEMPLATE.iterdir()) == sorted(STAGE_FILES)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
@pytest.mark.parametrize("name", STAGE_FILES)
def test_stage_configs_are_the_template(bundle, name):
    assert (bundle / "configs" / name).read_bytes() == (TEMPLATE / name).read_bytes(), (
        f"{bundle.name}/configs/{name} differs from medfcn/planning/template/{name}: "
        "edit both (or the model's entries belong in common.json)"
    )
