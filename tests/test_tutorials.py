"""The tutorials of the documentation site run as written.

Each page's ``bash`` and ``python`` fenced blocks are extracted from the page itself, in order,
and run as one ``set -euo pipefail`` shell script in a fresh folder holding a copy of
``bundles/`` and ``datasets/``, with ``MEDFCN_DATA`` pointing at a few real cases: every
Task04_Hippocampus case (the data is small), two of the DICOM series (hippocampus crops) and 5
LeftAtrium cases. Every fence of a page must be ``bash``,
``python`` or ``text``, so that no block is skipped unseen. Blocks
of other languages (``text``, ``console``) are shown, not run: multi-machine commands.

To make the runs short, :data:`TUTORIALS` replaces a few strings of each page (a 60-minute
budget by seconds, tens of epochs by one, on a few cases). Each replacement must find its
string, so a page whose commands change fails here until this table follows it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA_ROOT, REPO, need, need_module

DOCS = REPO / "docs"
FEW_CASES = "--set max_cases=4"
# page (below docs/) -> {string in the page's commands: what runs instead}
TUTORIALS = {
    "getting-started.md": {},
    "tutorials/segment-scans.md": {},
    "tutorials/train-your-own.md": {
        "--budget-minutes 60": "--budget-minutes 0.3",
        "--epochs 20": f"--epochs 1 {FEW_CASES}",
    },
    "tutorials/transfer-learning.md": {"--epochs 10": f"--epochs 1 {FEW_CASES}"},
    "multi-gpu.md": {
        "--nproc-per-node 4": "--nproc-per-node 2",
        "--epochs 100": f"--epochs 1 {FEW_CASES}",
        "--epochs 110": "--epochs 2",
        "--epochs 120": "--epochs 3",
    },
    "tutorials/export-deploy.md": {},
    "tutorials/bundle-runner.md": {"--epochs 5": "--epochs 1 --max_cases 4"},
}
# page -> files its runs must leave (globs below the work folder, each matching a non-empty file):
# what the page tells the reader to look at, so a command that runs but writes nothing fails
OUTPUTS = {
    "getting-started.md": [
        "first/PGBM-002_HippoCrop.nii.gz",
        "first/hippocampus_004.nii.gz",
        "first/hippocampus_004_uncertainty.nii.gz",
        "first/volumes.csv",
        "first/volumes.json",
        "first/report.html",
    ],
    "tutorials/segment-scans.md": [
        "seg/one/hippocampus_004.nii.gz",
        "seg/series/PGBM-002_HippoCrop.nii.gz",
        "seg/export/PGBM-006_HippoCrop.nii.gz",
        "seg/uncertain/hippocampus_004_probabilities.nii.gz",
        "seg/ensemble/hippocampus_004_uncertainty.nii.gz",
        "seg/pacs/PGBM-002_HippoCrop_seg.dcm",
        "seg/qc/report.html",
        "seg/metrics/metrics.csv",
        "seg/shared/PGBM-006_HippoCrop.nii.gz",
    ],
    "tutorials/train-your-own.md": [
        "my_bundles/left_atrium/configs/train.json",
        "runs/left_atrium/fold0/curves.csv",
        "my_bundles/left_atrium_trained/models/model.pt",
        "seg/left_atrium/report.html",
        "seg/left_atrium_metrics/metrics.csv",
        "runs/la_recipe/last.pt",
    ],
    "tutorials/transfer-learning.md": [
        "runs/source/best_model.pt",
        "runs/fine_tuned/last.pt",
        "runs/frozen/last.pt",
    ],
    "multi-gpu.md": ["runs/ddp/last.pt", "masks/PGBM-002_HippoCrop.nii.gz"],
    "tutorials/export-deploy.md": [
        "my_bundles/hippocampus_deploy/models/model.onnx",
        "my_bundles/hippocampus_deploy/models/model.pt2",
        "my_bundles/hippocampus_deploy/models/model.ts",
        "seg/onnx/hippocampus_004.nii.gz",
    ],
    "tutorials/bundle-runner.md": [
        "runner/monai/hippocampus_004.nii.gz",
        "runner/medfcn/hippocampus_006.nii.gz",
        "runner/train/last.pt",
    ],
}
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
LEFT_ATRIUM_CASES = 5
# not the oblique whole head PGBM-003_T1post: 4 of the pages' runs segment every series of
# dicom/, and with it they took 200 s more here (its warning and DICOM SEG are tested elsewhere:
# tests/test_ood.py, tests/test_dicom_seg.py)
DICOM_SERIES = ("PGBM-002_HippoCrop", "PGBM-006_HippoCrop")


def tutorial_script(page: Path, replacements: dict[str, str], folder: Path) -> str:
    """The page's runnable blocks as one shell script: ``bash`` blocks as written, ``python``
    blocks saved beside it and run with this interpreter; ``replacements`` applied to each."""
    parts = ["set -euo pipefail"]
    unused = set(replacements)
    text = page.read_text()
    blocks = FENCE.findall(text)
    opened = len(re.findall(r"^\s*(```|~~~)\S", text, re.MULTILINE))
    assert opened == len(blocks), f"{page.name}: {opened} fences opened, {len(blocks)} read (an indented or ~~~ fence?)"
    for number, (language, body) in enumerate(blocks):
        assert language in ("bash", "python", "text"), f"{page.name}: a {language!r} block; use bash, python or text"
        if language == "text":
            continue
        for old, new in replacements.items():  # not inside a longer number: --epochs 10 in --epochs 100
            body, found = re.subn(re.escape(old) + r"(?![\d.])", new.replace("\\", "\\\\"), body)
            if found:
                unused.discard(old)
        if language == "python":
            code = folder / f"block_{number}.py"
            code.write_text(body)
            body = f'python "{code}"'
        parts.append(f'echo "--- {page.name} block {number}"\n{body}')
    assert not unused, f"{page.name} no longer holds {sorted(unused)}: update TUTORIALS in {Path(__file__).name}"
    return "\n".join(parts) + "\n"


def _few_cases(data: Path) -> Path:
    """A datasets folder of real cases (links): all of Task04, :data:`DICOM_SERIES`, and the first
    :data:`LEFT_ATRIUM_CASES` LeftAtrium cases with a ``dataset.json`` naming them."""
    data.mkdir()
    (data / "Task04_Hippocampus").symlink_to(need(DATA_ROOT / "Task04_Hippocampus"))
    (data / "dicom").mkdir()
    for series in DICOM_SERIES:
        (data / "dicom" / series).symlink_to(need(DATA_ROOT / "dicom" / series))
    source = need(DATA_ROOT / "LeftAtrium")
    atrium = data / "LeftAtrium"
    description = json.loads((source / "dataset.json").read_text())
    description["training"] = description["training"][:LEFT_ATRIUM_CASES]
    description["numTraining"] = LEFT_ATRIUM_CASES
    for pair in description["training"]:
        for key in ("image", "label"):
            target = atrium / pair[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source / pair[key])
    (atrium / "dataset.json").write_text(json.dumps(description, indent=1))
    return data


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    return _few_cases(tmp_path_factory.mktemp("tutorial_data") / "datasets")


def test_every_tutorial_page_is_run():
    nav = (REPO / "mkdocs.yml").read_text()
    section = nav[nav.index("  - Tutorials:") : nav.index("  - Guides:")]
    assert {*re.findall(r": ([\w/-]+\.md)", section), "getting-started.md"} == set(TUTORIALS)
    assert {f"tutorials/{p.name}" for p in (DOCS / "tutorials").glob("*.md")} <= set(TUTORIALS)


def test_a_replacement_that_finds_nothing_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nmedfcn train b --epochs 3\nmedfcn train c --epochs 30\n```\n")
    with pytest.raises(AssertionError, match=r"no longer holds \['--epochs 5'\]"):
        tutorial_script(page, {"--epochs 5": "--epochs 1"}, tmp_path)
    script = tutorial_script(page, {"--epochs 3": "--epochs 1"}, tmp_path)
    assert "medfcn train b --epochs 1\n" in script and "medfcn train c --epochs 30\n" in script


@pytest.mark.parametrize("fence", ["```sh\nls\n```\n", "  ```bash\n  ls\n  ```\n", "~~~bash\nls\n~~~\n"])
def test_a_block_that_would_not_run_unseen_fails(tmp_path, fence):
    page = tmp_path / "page.md"
    page.write_text("```bash\necho one\n```\n\n" + fence)
    with pytest.raises(AssertionError, match="page.md: "):
        tutorial_script(page, {}, tmp_path)


@pytest.mark.parametrize("name", sorted(TUTORIALS))
def test_tutorial_runs_as_written(name, datasets, tmp_path):
    if name == "tutorials/export-deploy.md":
        need_module("onnxruntime", "pip install -e '.[onnx]'")
    work = tmp_path / "work"
    work.mkdir()
    for folder in ("bundles", "datasets"):  # the page writes exports into a bundle: never the repository's
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("eval", "*.onnx", "*.pt2", "*.ts"))
    script = work / "tutorial.sh"
    script.write_text(tutorial_script(DOCS / name, TUTORIALS[name], tmp_path))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MEDFCN_DATA": str(datasets), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{name}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    missing = [pattern for pattern in OUTPUTS[name] if not _written(work, pattern)]
    assert not missing, f"{name} ran but did not write {missing}:\n{done.stdout[-4000:]}"


def _written(work: Path, pattern: str) -> bool:
    """Whether a non-empty file below ``work`` matches ``pattern``."""
    return any(path.is_file() and path.stat().st_size > 0 for path in work.glob(pattern))


def test_every_tutorial_names_its_outputs():
    assert set(OUTPUTS) == set(TUTORIALS)
