"""medfcn.training's stages: the config parsed once, the network built once and last.pt read
once per run; the dry run leaves the run's network as it was; the run's logging filter is
scoped to it; the end of a run reports its best validation (and the CLI the next command)."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from monai.bundle import ConfigParser
from typer.testing import CliRunner

import medfcn.networks.fcn
from medfcn import FCN
from medfcn.cli import app
from medfcn.errors import UserError
from medfcn.training import best_validation, train
from medfcn.training.preflight import check_dry_run
from medfcn.training.settings import _MOVED

from .conftest import BUNDLE, write_msd_dataset
from .test_train import SMALL

ENGINE_LOGGERS = [f"ignite.engine.engine.{name}" for name in ("SupervisedTrainer", "SupervisedEvaluator")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_msd_dataset(tmp_path_factory.mktemp("data") / "Spheres", n_cases=4, shape=(20, 24, 16))


@pytest.fixture
def counts(monkeypatch):
    """How often, while it is in use, train.json is parsed (``ConfigParser.read_config``), an
    FCN is constructed and a ``last.pt`` is read (``torch.load``)."""
    seen = {"parses": 0, "networks": 0, "last_pt_reads": 0}
    read_config, load, init = ConfigParser.read_config, torch.load, medfcn.networks.fcn.FCN.__init__

    def counted_read_config(self, f, *args, **kwargs):
        seen["parses"] += "train.json" in str(f)
        return read_config(self, f, *args, **kwargs)

    def counted_load(f, *args, **kwargs):
        seen["last_pt_reads"] += str(f).endswith("last.pt")
        return load(f, *args, **kwargs)

    def counted_init(self, *args, **kwargs):
        seen["networks"] += 1
        return init(self, *args, **kwargs)

    monkeypatch.setattr(ConfigParser, "read_config", counted_read_config)
    monkeypatch.setattr(torch, "load", counted_load)
    monkeypatch.setattr(medfcn.networks.fcn.FCN, "__init__", counted_init)
    return seen


def _run_filters() -> list[logging.Filter]:
    """The filters of ignite's engine loggers that drop the echo of the exception ending a run."""
    loggers = [logging.getLogger(name) for name in ENGINE_LOGGERS]
    return [f for logger in loggers for f in logger.filters if type(f).__name__ == "_DropEngineExceptionEcho"]


def test_a_run_parses_builds_and_reads_once(dataset, tmp_path, counts):
    """Before the stages (medfcn/train.py): 5 parses and 2 networks for a new run; 7 parses,
    2 networks and 3 reads of last.pt for a resume."""
    out = tmp_path / "run"
    overrides = {**SMALL, "folds_file": str(dataset / "folds.json")}
    assert not _run_filters()  # none installed by importing medfcn.training
    train(BUNDLE, dataset, fold=0, epochs=1, output_dir=out, overrides=overrides, device="cpu")
    assert counts == {"parses": 1, "networks": 1, "last_pt_reads": 0}
    counts.update(parses=0, networks=0, last_pt_reads=0)
    train(BUNDLE, output_dir=out, resume=True, epochs=2, device="cpu")
    assert counts == {"parses": 1, "networks": 1, "last_pt_reads": 1}
    assert not _run_filters()  # the run's filter went with it

    best = best_validation(out)
    assert best is not None and best.epoch in (1, 2) and 0.0 <= best.mean <= 1.0
    assert list(best.per_class) == ["anterior", "posterior"]
    assert best.mean == pytest.approx(sum(best.per_class.values()) / 2, abs=1e-6)  # both classes in every case


def test_cli_prints_the_best_dice_and_the_next_command(dataset, tmp_path):
    out = tmp_path / "run"
    sets = [a for key, value in SMALL.items() for a in ("--set", f"{key}={str(value).lower()}")]
    args = ["train", str(BUNDLE), "--data", str(dataset), "--folds", str(dataset / "folds.json")]
    result = CliRunner().invoke(app, [*args, "--epochs", "1", "--output", str(out), "--device", "cpu", *sets])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    best = best_validation(out)
    per_class = f"anterior {best.per_class['anterior']:.4f}, posterior {best.per_class['posterior']:.4f}"
    assert lines[-2] == f"best validation Dice: mean {best.mean:.4f}, {per_class} (epoch 1)"
    assert lines[-1] == f"next: medfcn package {out} --out <bundle>"


def test_dry_run_leaves_the_runs_network_as_it_was():
    """The dry run uses the network the run trains: BatchNorm statistics, mode and the random
    state (dropout) must be as before it, or the run would start elsewhere than MONAI's runner."""

    def network():
        torch.manual_seed(0)
        return FCN(3, 1, 3, features=(4, 8), norm="batch", dropout=0.2).eval()

    net, reference = network(), network()
    run = SimpleNamespace(
        get={"patch_size": [8, 8, 8], "network_def#in_channels": 1}.__getitem__, config_file="train.json"
    )
    rng = torch.get_rng_state()
    check_dry_run(net, run)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not net.training
    state, expected = net.state_dict(), {k: v.clone() for k, v in reference.state_dict().items()}
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # the same pass without the restoring moves the statistics and draws random numbers: the test can fail
    with torch.no_grad():
        reference.train()(torch.zeros(1, 1, 8, 8, 8))
    moved = reference.state_dict()
    assert not all(torch.equal(moved[k], expected[k]) for k in expected)
    assert not torch.equal(torch.get_rng_state(), rng)


def test_impossible_patch_is_a_user_error_and_restores_the_network():
    from medfcn.errors import UserError

    net = FCN(3, 1, 3, features=(4, 8, 16), norm="batch")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run = SimpleNamespace(
        get={"patch_size": [1, 1, 1], "network_def#in_channels": 1}.__getitem__, config_file="train.json"
    )
    with pytest.raises(UserError, match=r"train.json: the network cannot train on patch_size \[1, 1, 1\]"):
        check_dry_run(net, run)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_resume_with_a_config_without_a_checkpoint_loader_is_refused(dataset, tmp_path):
    """A user's train.json without a Resume (or any CheckpointLoader) in ``train#handlers``
    cannot continue last.pt: refused in one line, not a run restarted at epoch 0 over it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    out = tmp_path / "run"
    overrides = {**SMALL, "folds_file": str(dataset / "folds.json")}
    train(bundle, dataset, fold=0, epochs=1, output_dir=out, overrides=overrides, device="cpu")
    config = json.loads((bundle / "configs" / "train.json").read_text())
    handlers = config["train"]["handlers"]
    config["train"]["handlers"] = [h for h in handlers if "Resume" not in h.get("_target_", "")]
    (bundle / "configs" / "train.json").write_text(json.dumps(config, indent=4))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(UserError, match="Resume"):
        train(bundle, output_dir=out, resume=True, epochs=2, device="cpu")
    assert (out / "last.pt").read_bytes() == before


def test_a_bundle_of_an_older_medfcn_naming_medfcn_handlers_still_trains(dataset, tmp_path):
    """Bundles packaged before the training handlers moved to medfcn.training name them
    ``medfcn.handlers.Resume``, ``$medfcn.handlers.BestMetric(...)``...: they still train and resume."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    for name in ("common.json", "train.json"):
        path = bundle / "configs" / name
        text = path.read_text()
        for name in _MOVED:  # what older bundles named there (nothing newer, as BudgetKeeper)
            text = text.replace(f"{_MOVED[name]}.{name}", f"medfcn.handlers.{name}")
        path.write_text(text)
    assert "medfcn.handlers.Resume" in (bundle / "configs" / "train.json").read_text()
    out = tmp_path / "run"
    overrides = {**SMALL, "folds_file": str(dataset / "folds.json")}
    train(bundle, dataset, fold=0, epochs=1, output_dir=out, overrides=overrides, device="cpu")
    train(bundle, output_dir=out, resume=True, epochs=2, device="cpu")
    assert best_validation(out) is not None
    state = torch.load(out / "last.pt", weights_only=True)["trainer"]
    assert state["iteration"] // state["epoch_length"] == 2


def test_best_validation_of_a_run_without_last_pt_is_none(tmp_path):
    """A config whose own checkpoint writer names its files otherwise leaves no last.pt: the CLI's
    summary then has nothing to print, and must not fail a run that succeeded."""
    assert best_validation(tmp_path) is None
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="last.pt: not a readable PyTorch checkpoint"):
        best_validation(tmp_path)


def test_precision_notice_names_a_cpu_without_native_bfloat16(monkeypatch):
    import medfcn.training.run as run_module

    monkeypatch.setattr(run_module, "cpu_bf16_supported", lambda: False)
    line = run_module.precision_notice("cpu", True)
    assert line.startswith("precision: bf16 is set") and "float32" in line
    assert run_module.precision_notice("cpu", False) == ""  # not asked for
    assert run_module.precision_notice("cuda", True) == ""  # CUDA autocasts to float16
    monkeypatch.setattr(run_module, "cpu_bf16_supported", lambda: True)
    assert run_module.precision_notice("cpu", True) == ""
