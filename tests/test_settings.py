"""Settings, dataset.json entries, broken bundle files and full disks: one line each, exit code 2,
nothing left behind (medfcn.settings, medfcn.io.refuse_full_disk)."""

from __future__ import annotations

import errno
import json
import pathlib
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medfcn.bundle import RUN_FILE
from medfcn.cli import TRAIN_OPTION_NAMES, app
from medfcn.errors import UserError
from medfcn.training import train

from .conftest import BUNDLE, BUNDLE_2D, write_msd_dataset

runner = CliRunner()

# the tests' small recipe (tests/test_train.py): a narrow network, one quick epoch
SMALL = [
    "network_def#features=[8,16,32]",
    "network_def#deep_supervision=1",
    "batch_size=4",
    "bf16=false",
    "val_interval=100",
]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, *fragments: str) -> str:
    """The single ``medfcn: error:`` line of a failed command, holding every fragment (after
    ``medfcn infer``'s progress lines, ``[k/n] scan: ...``, and the warnings of a segmented scan,
    e.g. that a synthetic scan is unlike the bundle's training data, where the failure comes
    after a scan)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [
        line
        for line in result.output.strip().splitlines()
        if line.strip() and not line.startswith(("[", "medfcn: warning:"))
    ]
    assert len(lines) == 1 and lines[0].startswith("medfcn: error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_msd_dataset(tmp_path_factory.mktemp("data") / "Spheres", n_cases=4, shape=(20, 24, 16))


def train_cli(dataset, out, *extra, bundle=BUNDLE):
    return run("train", bundle, "--data", dataset, "--folds", dataset / "folds.json", "--output", out, *extra)


SET_REFUSALS = [
    ("batch_size=abc", "--set batch_size=abc: must be a whole number >= 1, e.g. --set batch_size=2."),
    ("batch_size=0", "--set batch_size=0: must be a whole number >= 1"),
    ("batch_size=true", "--set batch_size=true: must be a whole number >= 1"),
    ("learning_rate=-0.01", "--set learning_rate=-0.01: must be a number > 0, e.g. --set learning_rate=0.002."),
    ("learning_rate=NaN", "--set learning_rate=NaN: must be a number > 0"),
    ("weight_decay=-1", "--set weight_decay=-1: must be a number >= 0"),
    ("num_workers=-2", "--set num_workers=-2: must be a whole number >= 0"),
    ("ema_decay=1.5", "--set ema_decay=1.5: must be null (no averaging) or a number in [0, 1)"),
    ("val_interval=0", "--set val_interval=0: must be a whole number of epochs >= 1"),
    ("epochs=0", "--set epochs=0: must be a whole number >= 1"),
    ("budget_minutes=0", "--set budget_minutes=0: must be null (no budget: every epoch trains) or a number of"),
    ("budget_minutes=soon", "--set budget_minutes=soon: must be null (no budget"),
    ("seed=-1", "--set seed=-1: must be a whole number from 0 to 4294967295"),
    ("max_cases=0", "--set max_cases=0: must be null (all cases) or a whole number >= 1"),
    ('patch_size=[40,"x",40]', "--set 'patch_size=[40,\"x\",40]': must be a list of 3 whole numbers >= 1"),
    ("patch_size=[40,56]", "--set 'patch_size=[40,56]': must be a list of 3 whole numbers >= 1"),
    ("patch_size=[40,56", "--set patch_size=[40,56: not valid JSON"),
    ("patch_size=40", "--set patch_size=40: must be a list of 3 whole numbers"),
    ("num_classes=2.5", "--set num_classes=2.5: must be a whole number >= 2"),
    ("num_classes=1", "--set num_classes=1: must be a whole number >= 2"),
    ('class_names=["a","a"]', "must be a list of distinct, non-empty names"),
    ("class_names=anterior", "--set class_names=anterior: must be a list of distinct, non-empty names"),
    ("modality=PET", "--set modality=PET: must be MRI, MR or CT, e.g. --set modality=MRI."),
    ("hu_window=[240,-160]", "--set 'hu_window=[240,-160]': must be null (MRI) or [low, high] in HU with low < high"),
    ("pixdim=[1,0,1]", "--set 'pixdim=[1,0,1]': must be a list of 3 numbers > 0 (voxel size in mm"),
    ("pixdim=[1,1]", "must be a list of 3 numbers > 0"),
    ("bf16=maybe", "--set bf16=maybe: must be true or false"),
    ("freeze_encoder=1", "--set freeze_encoder=1: must be true or false"),
    ("fold=-3", "--set fold=-3: must be a fold number 0, 1, ... or -1"),
    ("dataset_dir=42", "--set dataset_dir=42: must be a folder path"),
    ("epochs=$1+", "--set epochs: cannot be evaluated (SyntaxError"),
]


@pytest.mark.parametrize(("setting", "message"), SET_REFUSALS, ids=[s for s, _ in SET_REFUSALS])
def test_set_value_refused_before_any_work(dataset, tmp_path, setting, message):
    out = tmp_path / "run"
    one_line(train_cli(dataset, out, "--set", setting), message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("patch_size=[40,56,40]", "--set 'patch_size=[40,56,40]': must be a list of 2 whole numbers >= 1"),
        ("slice_axis=3", "--set slice_axis=3: must be 0, 1 or 2"),
        ("slices_per_volume=0", "--set slices_per_volume=0: must be a whole number >= 1"),
    ],
)
def test_set_value_refused_2d_bundle(dataset, tmp_path, setting, message):
    one_line(train_cli(dataset, tmp_path / "run", "--set", setting, bundle=BUNDLE_2D), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--epochs", "0"], "--epochs 0: must be a whole number >= 1, e.g. --epochs 100."),
        (["--epochs", "-5"], "--epochs -5: must be a whole number >= 1"),
        (["--fold", "-2"], "--fold -2: must be a fold number 0, 1, ... or -1 (train on all cases), e.g. --fold 0."),
    ],
)
def test_cli_options_refused(dataset, tmp_path, option, message):
    one_line(train_cli(dataset, tmp_path / "run", *option), message)
    assert not (tmp_path / "run").exists()


def test_python_api_checks_overrides(dataset, tmp_path):
    with pytest.raises(UserError, match=r"--set batch_size=0: must be a whole number >= 1"):
        train(
            BUNDLE, dataset, folds_file=dataset / "folds.json", output_dir=tmp_path / "r", overrides={"batch_size": 0}
        )
    with pytest.raises(UserError, match=r"--epochs 2.5: must be a whole number >= 1"):
        train(
            BUNDLE,
            dataset,
            folds_file=dataset / "folds.json",
            output_dir=tmp_path / "r",
            epochs=2.5,
            option_names=TRAIN_OPTION_NAMES,
        )
    # without the CLI's spellings, the library names the config key
    with pytest.raises(UserError, match=r"--set epochs=2.5: must be a whole number >= 1, e.g. --set epochs=100."):
        train(BUNDLE, dataset, folds_file=dataset / "folds.json", output_dir=tmp_path / "r", epochs=2.5)
    assert not (tmp_path / "r").exists()


def test_resume_checks_values_read_back_from_the_run_record(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    settings = {"dataset_dir": str(dataset), "folds_file": str(dataset / "folds.json"), "batch_size": 0}
    (out / RUN_FILE).write_text(json.dumps({"bundle": str(BUNDLE), "settings": settings}))
    line = one_line(train_cli(dataset, out, "--resume"), f"{out / RUN_FILE}: batch_size 0 must be a whole number >= 1")
    assert 'e.g. "batch_size": 2' in line
    assert leftovers(out) == [RUN_FILE]


def test_bad_bundle_default_names_train_json(dataset, tmp_path):
    bundle = shutil.copytree(BUNDLE, tmp_path / "bundle", ignore=shutil.ignore_patterns("*.pt"))
    config = json.loads((bundle / "configs" / "train.json").read_text())
    config["val_interval"] = 0
    (bundle / "configs" / "train.json").write_text(json.dumps(config))
    one_line(train_cli(dataset, tmp_path / "run", bundle=bundle), "train.json: val_interval 0 must be a whole number")


# ---- dataset.json entries ------------------------------------------------------------------------

ENTRIES = [
    (None, "entry 1 of 'training' (null): is not a case"),
    (42, "entry 1 of 'training' (42): is not a case"),
    ("./imagesTr/case_001.nii.gz", 'is not a case; write it as {"image"'),
    (
        {"image": "./imagesTr/case_001.nii.gz"},
        "entry 1 of 'training' ({\"image\": \"./imagesTr/case_001.nii.gz\"}): has no 'label'",
    ),
    ({"image": 42, "label": "./labelsTr/case_001.nii.gz"}, "'image' is 42, not a file path"),
    ({"image": "./imagesTr/case_001.nii.gz", "label": None}, "'label' is null, not a file path"),
]


@pytest.mark.parametrize(
    ("entry", "message"), ENTRIES, ids=["null", "number", "string", "no_label", "image_42", "label_null"]
)
@pytest.mark.parametrize("command", ["train", "folds"])
def test_malformed_dataset_entry(dataset, tmp_path, entry, message, command):
    data = shutil.copytree(dataset, tmp_path / "data")
    meta = json.loads((data / "dataset.json").read_text())
    meta["training"][1] = entry
    (data / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    if command == "train":
        result = train_cli(data, out)
    else:
        result = run("folds", data, "--out", out / "folds.json", "--n-folds", "2")
    line = one_line(result, f"{data / 'dataset.json'}: ", message)
    assert "write it as" in line
    assert not out.exists()


# ---- broken bundle files -------------------------------------------------------------------------


def _break(bundle: pathlib.Path, name: str, how: str) -> None:
    path = bundle / "configs" / name
    if "network_def" in how and "network_def" not in json.loads(path.read_text()):
        path = bundle / "configs" / "common.json"  # the model is stated there, for every stage
    config = json.loads(path.read_text())
    if how == "not_json":
        path.write_text(path.read_text()[:-40])
    elif how == "list":
        path.write_text(json.dumps([config]))
    elif how == "no_network_def":
        del config["network_def"]
        path.write_text(json.dumps(config))
    elif how == "network_def_42":
        config["network_def"] = 42
        path.write_text(json.dumps(config))
    elif how == "unknown_transform":
        config["preprocessing"]["transforms"][0]["_target_"] = "NoSuchTransform"
        path.write_text(json.dumps(config))


BROKEN = [
    ("inference.json", "not_json", "inference.json: not valid JSON (Expecting"),
    ("inference.json", "list", "inference.json: holds a JSON list, not an object {...}"),
    ("inference.json", "no_network_def", "inference.json: has no 'network_def' entry"),
    ("inference.json", "network_def_42", "common.json: network_def is 42, not a component"),
    ("metadata.json", "not_json", "metadata.json: not valid JSON"),
    ("metadata.json", "list", "metadata.json: holds a JSON list"),
]


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "in" / "scan.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 34, 28)).astype(np.float32), np.eye(4)), path)
    return path


@pytest.mark.parametrize(("name", "how", "message"), BROKEN, ids=[f"{n}-{h}" for n, h, _ in BROKEN])
@pytest.mark.parametrize("command", ["infer", "export"])
def test_broken_bundle_file(tmp_path, scan, name, how, message, command):
    bundle = shutil.copytree(BUNDLE, tmp_path / "bundle")
    _break(bundle, name, how)
    out = tmp_path / "out"
    result = run("infer", bundle, scan, "--out", out) if command == "infer" else run("export", bundle)
    one_line(result, message, "restore the file")
    assert not out.exists() and not (bundle / "models" / "model.ts").exists()


def test_broken_inference_entry_infer(tmp_path, scan):
    bundle = shutil.copytree(BUNDLE, tmp_path / "bundle")
    _break(bundle, "inference.json", "unknown_transform")
    one_line(
        run("infer", bundle, scan, "--out", tmp_path / "out"),
        "inference.json: entry 'preprocessing' cannot be built (ModuleNotFoundError: Cannot locate",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["not_json", "list", "no_network_def", "network_def_42"])
@pytest.mark.parametrize("command", ["train", "package"])
def test_broken_train_json(dataset, tmp_path, how, command):
    bundle = shutil.copytree(BUNDLE, tmp_path / "bundle")
    _break(bundle, "train.json", how)
    out = tmp_path / "out"
    if command == "train":
        result = train_cli(dataset, out, bundle=bundle)
    else:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / RUN_FILE).write_text(json.dumps({"bundle": str(bundle), "settings": {}}))
        result = run("package", run_dir, "--out", out)
    stating = "common.json" if how == "network_def_42" else "train.json"  # the file that states network_def
    one_line(result, f"{bundle / 'configs' / stating}: ")
    assert not out.exists()


# ---- full disk -----------------------------------------------------------------------------------


def _full(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, __import__("os").strerror(code))

    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_full_disk_writing_the_run_record(dataset, tmp_path, monkeypatch, code):
    """medfcn_run.json is the first file a run writes (through atomic_path's fsync)."""
    monkeypatch.setattr("medfcn.io.os.fsync", _full(code))
    out = tmp_path / "run"
    one_line(
        train_cli(dataset, out, "--epochs", "1", *sum((["--set", s] for s in SMALL), [])),
        f"{out / RUN_FILE}: cannot be written ({__import__('os').strerror(code)}); free space or choose another",
    )
    assert not (out / RUN_FILE).exists()
    assert not [n for n in leftovers(out) if n.endswith(".tmp")]


def test_full_disk_writing_a_checkpoint(dataset, tmp_path, monkeypatch):
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if ".last.pt." in self.name:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    out = tmp_path / "run"
    result = train_cli(dataset, out, "--epochs", "1", *sum((["--set", s] for s in SMALL), []))
    line = one_line(result, f"{out / 'last.pt'}: cannot be written (Disk quota exceeded); free space")
    assert "Traceback" not in result.output, line
    names = leftovers(out)
    assert "last.pt" not in names and RUN_FILE not in names, names  # nothing to resume: no record either
    assert not [n for n in names if n.endswith(".tmp")], names


def test_full_disk_writing_tensorboard_events(dataset, tmp_path, monkeypatch):
    """TensorBoard writes from its own thread; the error must still be one line, no thread traceback."""
    monkeypatch.setattr(
        "tensorboard.summary.writer.record_writer.RecordWriter.write", _full(errno.ENOSPC), raising=True
    )
    out = tmp_path / "run"
    result = train_cli(dataset, out, "--epochs", "1", *sum((["--set", s] for s in SMALL), []))
    one_line(result, f"{out}: cannot be written (No space left on device); free space or choose another")
    assert "Exception in thread" not in result.output
    assert RUN_FILE not in leftovers(out)


@pytest.mark.parametrize("what", ["mask", "volumes.csv"])
def test_full_disk_during_infer(tmp_path, scan, monkeypatch, what):
    if what == "mask":
        monkeypatch.setattr("medfcn.masks.nib.save", _full(errno.ENOSPC))
    else:
        real = pathlib.Path.write_text

        def write_text(self, text, *args, **kwargs):
            if ".volumes.csv." in self.name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, text, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    out = tmp_path / "out"
    target = out / ("scan.nii.gz" if what == "mask" else "volumes.csv")
    one_line(
        run("infer", BUNDLE, scan, "--out", out, "--device", "cpu"),
        f"{target}: cannot be written (No space left on device); free space or choose another --out/--output.",
    )
    assert leftovers(out) == []  # no mask, no table, no hidden temporary file


def test_torch_save_goes_through_python_file_writes(tmp_path):
    """atomic_torch_save serialises in memory, so a full disk is an OSError with its errno
    (PyTorch's own writer reports a RuntimeError without one) and the file is complete."""
    from medfcn.io import atomic_torch_save

    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt", weights_only=True)["w"].tolist() == [0, 1, 2]
