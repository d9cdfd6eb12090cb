"""medfcn.cli: help texts and user errors as one line with exit code 2 (run as a real process)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medfcn.cli import app

from .conftest import BUNDLE, REPO, medfcn


def test_help_lists_commands():
    result = medfcn("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "folds" in result.stdout
    train_help = medfcn("train", "--help").stdout
    for option in ("--data", "--fold", "--epochs", "--output", "--resume"):
        assert option in train_help
    as_module = subprocess.run([sys.executable, "-m", "medfcn", "--help"], capture_output=True, text=True, cwd=REPO)
    assert as_module.returncode == 0 and "train" in as_module.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "bundles/does_not_exist"], "bundle folder not found"),
        (["train", str(BUNDLE), "--data", "/nonexistent/data"], "no dataset.json"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, fragment):
    result = medfcn(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medfcn: error:"), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_fold_names_the_split(spheres_dataset):
    result = medfcn(
        "train",
        str(BUNDLE),
        "--data",
        str(spheres_dataset),
        "--fold",
        "9",
        "--set",
        f"folds_file={spheres_dataset / 'folds.json'}",
    )
    assert result.returncode == 2
    assert "unknown fold 9" in result.stderr and "folds.json" in result.stderr


def test_debug_shows_traceback():
    result = medfcn("--debug", "train", "bundles/does_not_exist")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_folds_command_writes_split(spheres_dataset, tmp_path):
    out = tmp_path / "folds.json"
    result = medfcn("folds", str(spheres_dataset), "--out", str(out), "--n-folds", "3")
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "3 folds of 4, 4, 4 cases" in result.stdout


def test_infer_and_evaluate_commands(spheres_dataset, tmp_path):
    scan = spheres_dataset / "imagesTr" / "case_000.nii.gz"
    out = tmp_path / "masks"
    result = medfcn("infer", str(BUNDLE), str(scan), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "[1/1] case_000.nii.gz" in result.stdout and (out / "case_000.nii.gz").is_file()
    again = medfcn("infer", str(BUNDLE), str(scan), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    result = medfcn("evaluate", str(out), str(spheres_dataset / "labelsTr"))
    assert result.returncode == 0, result.stderr
    assert "dice_mean" in result.stdout
    missing = medfcn("infer", str(BUNDLE), str(tmp_path / "nope.nii.gz"), "--out", str(out))
    assert missing.returncode == 2 and "nope.nii.gz: not found" in missing.stderr


def test_evaluate_says_which_hd95_were_not_scored(tmp_path):
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    label[2:6, 2:6, 2:6], label[7:10, 7:10, 7:10] = 1, 2
    missed = np.where(label == 2, 0, label).astype(np.uint8)
    for folder, a, b in (("labels", label, label), ("pred", missed, label)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / folder / "a.nii.gz")
        nib.save(nib.Nifti1Image(b, np.eye(4)), tmp_path / folder / "b.nii.gz")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels")])
    assert result.exit_code == 0, result.output
    assert "2 cases" in result.output
    notes = [line for line in result.output.splitlines() if "not scored" in line]
    assert notes == [
        "hd95_2: 1 case not scored (label missing from prediction or reference: 1 missed, 0 false positive); "
        "dice_2 is 0 there."
    ]


def test_evaluate_names_labels_without_common_voxels(tmp_path):
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    label[2:6, 2:6, 2:6], label[7:10, 7:10, 7:10] = 1, 2
    swapped = np.select([label == 1, label == 2], [2, 1], 0).astype(np.uint8)
    for folder, data in (("labels", label), ("pred", swapped)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "a.nii.gz")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "no voxel in common" in line]
    assert [n.split(":")[0] for n in notes] == ["dice_1", "dice_2"]
    assert "not scored" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", ""], "--out '': an empty argument"),
        (["--out="], "--out=: an empty value"),
        (["", "--out", "o"], "'' (argument 4): an empty argument"),
    ],
    ids=["out_empty", "out_equals_empty", "empty_input"],
)
def test_empty_arguments_are_refused_before_typer_reads_them_as_the_current_folder(tmp_path, args, message):
    """Typer turns '' into Path('.'): `--out ''` wrote masks into the current folder."""
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 22, 18)).astype(np.float32), np.eye(4)), scan)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "medfcn", "infer", str(BUNDLE), str(scan), *args]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "p", "l", "--labels", "abc"], "Invalid value for '--labels'"),
        (["infer", str(BUNDLE), "scan.nii.gz", "--out", "o", "--overlap", "half"], "Invalid value for '--overlap'"),
        (["infer", "--bogus"], "No such option: --bogus"),
        (["train"], "Missing argument 'bundle'"),
    ],
    ids=["labels_abc", "overlap_half", "unknown_option", "missing_argument"],
)
def test_command_line_errors_are_one_line(tmp_path, args, message):
    """Option values of the wrong type, unknown options and missing arguments: one line naming
    the option and where the help is, exit 2 (Typer printed its usage and an error box)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "medfcn", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"medfcn: error: {message}") and "--help." in proc.stderr, proc.stderr


def test_help_and_no_arguments_keep_their_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "medfcn"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    bare = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert helped.returncode == 0 and "infer" in helped.stdout
    assert bare.returncode == 2 and "infer" in bare.stdout and bare.stderr == ""


COMMANDS = ("plan", "folds", "train", "package", "infer", "report", "evaluate", "export")


def _help(*command: str) -> str:
    """``medfcn COMMAND --help`` as a user's 100-column terminal without colours shows it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run(
        [sys.executable, "-m", "medfcn", *command, "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_renders_cleanly(command):
    """No Typer internals in the help: a flag takes no ``<bool>``, arguments are not ``{bundle}``,
    a list is typed by its items, not ``<list[Path]>``."""
    text = _help(*filter(None, [command]))
    for leak in ("<bool>", "{", "}", "<list[", "list[str]", "list[int]"):
        assert leak not in text, f"{leak!r} in the help of {command or 'medfcn'}:\n{text}"
    if command == "infer":
        assert "Usage: medfcn infer [OPTIONS] BUNDLE INPUTS..." in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_paragraphs_wrap_at_the_terminal_width(command):
    """A command's description is wrapped by the terminal, not by its docstring's line breaks
    (which rich kept and wrapped again: ragged lines at 80 columns)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}
    text = subprocess.run(
        [sys.executable, "-m", "medfcn", command, "--help"], capture_output=True, text=True, env=env, timeout=120
    ).stdout
    description = [line.strip() for line in text.split("Usage:", 1)[1].split("╭", 1)[0].splitlines()[1:]]
    assert any(description), text
    # at 80 columns a line followed by more of its paragraph is filled, not cut at a docstring's break
    assert all(len(a) >= 60 for a, b in zip(description, description[1:], strict=False) if a and b), text


def _flat(text: str) -> str:
    """The help's text without the boxes and line breaks, so that a wrapped row reads as one."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize(
    ("command", "option", "default"),
    [
        ("train", "--fold <int>", "the bundle's fold"),
        ("train", "--epochs <int>", "the bundle's epochs"),
        ("train", "--device <str>", "CUDA if present"),
        ("infer", "--overlap <float>", "the bundle's overlap"),
        ("infer", "--sw-batch-size <int>", "the bundle's sw_batch_size"),
        ("folds", "--n-folds <int>", "5"),
    ],
)
def test_help_shows_defaults(command, option, default):
    flat = _flat(_help(command))
    row = re.search(re.escape(option) + r" [^\[]*\[default: \(?([^\]]*?)\)?\]", flat)
    assert row is not None and row.group(1) == default, flat


def test_commands_are_listed_in_workflow_order():
    listed = [line.split()[1] for line in _help().splitlines() if re.match(r"│ [a-z]+ ", line)]
    assert listed == list(COMMANDS)


def test_version_is_the_package_version():
    import medfcn

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "medfcn", "--version"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout == f"medfcn {medfcn.__version__}\n", result.stderr
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == medfcn.__version__


HEAVY = ("torch", "monai", "nibabel", "SimpleITK", "numpy")


def test_cli_and_every_help_load_no_heavy_library():
    """`import medfcn.cli`, `medfcn --help` and each `medfcn COMMAND --help` (through
    ``python -m medfcn``'s entry point) leave torch, MONAI, nibabel, SimpleITK and numpy unloaded."""
    script = f"""
import contextlib, io, runpy, sys
import medfcn.cli
loaded = {{"import medfcn.cli": [m for m in {HEAVY!r} if m in sys.modules]}}
for command in ([], *[[c] for c in {COMMANDS!r}], ["--version"]):
    sys.argv = ["medfcn", *command, "--help"] if command != ["--version"] else ["medfcn", "--version"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        runpy.run_module("medfcn", run_name="__main__")
    loaded[" ".join(sys.argv)] = [m for m in {HEAVY!r} if m in sys.modules]
print(loaded)
assert not any(loaded.values()), loaded
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _two_label_masks(tmp_path):
    label = np.zeros((12, 12, 12), dtype=np.uint8)
    label[2:6, 2:6, 2:6], label[7:10, 7:10, 7:10] = 1, 2
    missed = np.where(label == 2, 0, label).astype(np.uint8)
    for folder, data in (("labels", label), ("pred", missed)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "a.nii.gz")
    return tmp_path / "pred", tmp_path / "labels"


@pytest.mark.parametrize("naming", [["--bundle", str(BUNDLE)], ["--class-names", "anterior,posterior"]])
def test_evaluate_names_labels_by_class(tmp_path, naming):
    pred, labels = _two_label_masks(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", str(pred), str(labels), *naming], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    metrics = [line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") >= 5]
    assert metrics == [
        "dice_1 (anterior)",
        "dice_2 (posterior)",
        "dice_mean",
        "hd95_1 (anterior)",
        "hd95_2 (posterior)",
    ]
    assert "hd95_2 (posterior): 1 case not scored" in result.output


def test_evaluate_writes_into_no_folder_unless_told(tmp_path):
    pred, labels = _two_label_masks(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", str(pred), str(labels)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in pred.iterdir()) == ["a.nii.gz"]
    assert "per-case metrics: not written (--out FOLDER writes metrics.csv and metrics.json)" in result.output
    out = tmp_path / "metrics"
    result = CliRunner().invoke(app, ["evaluate", str(pred), str(labels), "--out", str(out), "--class-names", "a,p"])
    assert result.exit_code == 0, result.output
    assert f"per-case metrics: {out / 'metrics.csv'}" in result.output
    assert json.loads((out / "metrics.json").read_text())["class_names"] == {"1": "a", "2": "p"}
