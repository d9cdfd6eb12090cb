"""Training and inference in several processes (torchrun, ``--nproc-per-node N``): gloo on the CPU,
so the whole path runs here. Training: one job, rank 0 alone writing; the ranks' weights equal;
the Dice logged that of one process evaluating the same weights; a killed process ending the job
in one line; a resume on another number of processes; user errors said once. Inference: the
masks and table of one process, in input order; a bad scan of one process leaving no mask of any."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.handlers import CheckpointSaver, TensorBoardStatsHandler
from typer.testing import CliRunner

from medfcn import distributed
from medfcn.bundle import bundle_files, read_config
from medfcn.cli import app
from medfcn.errors import PEER_LOST_STATUS, FailedOnAnotherRank, UserError
from medfcn.infer import Extras, infer
from medfcn.training.handlers import CheckpointWriter, ReseedEachEpoch, ValidateEvery
from medfcn.training.monitoring import EpochProgress
from medfcn.training.run import training_files

from .conftest import BUNDLE, BUNDLE_2D, REPO, write_msd_dataset
from .test_train_split import SHAPE, TINY

# a launcher's variables, which a test run inside torchrun would pass on to the jobs it starts
_LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
ENV["PYTHONPATH"] = os.pathsep.join([str(REPO), ENV.get("PYTHONPATH", "")])
# the validation Dice of each rank's share, gathered (MONAI's metric), against one process's
DICE_TOLERANCE = 1e-6

# rank 0 writes the weights digest of every rank, gathered after training (a bundle's own module,
# as a bundle's scripts are: its folder is on the path while it runs)
_PROBE = """
import json, os
from medfcn import distributed

def record(network, output_dir):
    digests = distributed.gather(distributed.weights_digest(network))
    if distributed.is_main():
        with open(os.path.join(output_dir, "digests.json"), "w") as f:
            json.dump(digests, f)
"""


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def _train(*args, processes: int | None = 2, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``medfcn train ARGS [--nproc-per-node N]`` in a new process, on the CPU."""
    nproc = ["--nproc-per-node", str(processes)] if processes else []
    command = [sys.executable, "-m", "medfcn", "train", *map(str, args), "--device", "cpu", *nproc]
    return subprocess.run(command, capture_output=True, text=True, env=env or ENV, cwd=cwd, timeout=300)


def _dataset(tmp_path, n_cases=6):
    """6 cases and a 2-fold split: fold 0 validates 3 of them, 2 on rank 0 and 1 on rank 1."""
    return write_msd_dataset(tmp_path / "data", n_cases=n_cases, shape=SHAPE)


def _probe_bundle(tmp_path):
    """The hippocampus bundle, whose distributed config also records every rank's weights digest
    (``ddp_probe.py`` beside it: :data:`_probe_env` puts it on the path, as bundles' scripts are)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models"))
    (tmp_path / "ddp_probe.py").write_text(_PROBE)
    common = json.loads((bundle / "configs" / "common.json").read_text())
    common["imports"].append("$import ddp_probe")
    (bundle / "configs" / "common.json").write_text(json.dumps(common, indent=1))
    multi = bundle / "configs" / "multi_gpu_train.json"
    config = json.loads(multi.read_text())
    config["finalize"] = ["$ddp_probe.record(@network, @output_dir)", *config["finalize"]]
    multi.write_text(json.dumps(config, indent=1))
    return bundle


def _probe_env(tmp_path) -> dict:
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]]), "PYTHONDONTWRITEBYTECODE": "1"}


def _single_process_dice(bundle, run_dir, tmp_path) -> float:
    """The mean validation Dice of ``run_dir/best_model.pt`` evaluated by the run's own evaluator
    config, in this one process."""
    settings = json.loads((run_dir / "medfcn_run.json").read_text())["settings"]
    overrides = {**settings, "bundle_root": str(bundle), "output_dir": str(tmp_path / "evaluation")}
    parser = read_config(bundle_files(BUNDLE, "train.json")["config_files"], overrides)  # no probe
    parser["device"] = "$torch.device('cpu')"
    parser.get_parsed_content("imports")
    network = parser.get_parsed_content("eval_network")
    network.load_state_dict(torch.load(run_dir / "best_model.pt", weights_only=True))
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    return float(evaluator.state.metrics["val_mean_dice"])


def test_two_processes_train_one_run_written_by_rank_0(tmp_path):
    data, bundle, out = _dataset(tmp_path), _probe_bundle(tmp_path), tmp_path / "run"
    options = ["--data", data, "--folds", data / "folds.json", "--output", out, "--epochs", 2, *_sets(TINY)]
    result = _train(bundle, *options, cwd=tmp_path, env=_probe_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("processes: 2 (cpu, 1 thread each); effective batch 2 x 2 = 4 patches per step"), lines
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]  # rank 0 alone
    assert sum(line.startswith("done: ") for line in lines) == 1
    assert "Traceback" not in result.stderr and "OMP_NUM_THREADS" not in result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert [n for n in written if not n.startswith("events.out.tfevents")] == [
        "best_model.pt",
        "curves.csv",
        "curves.png",
        "digests.json",
        "last.pt",
        "medfcn_run.json",
        "training_data.json",
    ]
    assert len(written) == 8  # one TensorBoard events file: rank 1 wrote none
    assert (out / "curves.csv").read_text().count("\n") == 3  # rank 0's header and its 2 epochs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "data", "ddp_probe.py", "run"]  # no ./runs
    digests = json.loads((out / "digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]  # the ranks stayed in step
    best = torch.load(out / "last.pt", weights_only=True)["best"]
    assert best["best_metric_epoch"] in (1, 2)
    assert _single_process_dice(bundle, out, tmp_path) == pytest.approx(best["best_metric"], abs=DICE_TOLERANCE)

    # transfer learning under DDP: a frozen encoder (parameters without gradients) stays the donor's
    transfer = tmp_path / "transfer"
    options = ["--data", data, "--folds", data / "folds.json", "--output", transfer, "--epochs", 1, *_sets(TINY)]
    encoder = ["--encoder", out / "best_model.pt", "--freeze-encoder"]
    result = _train(bundle, *options, *encoder, cwd=tmp_path, env=_probe_env(tmp_path))
    assert result.returncode == 0, result.stderr
    donor = torch.load(out / "best_model.pt", weights_only=True)
    trained = torch.load(transfer / "last.pt", weights_only=True)["network"]
    frozen = [k for k in donor if k.startswith("encoder.") and donor[k].is_floating_point()]
    changed = [k for k in donor if not k.startswith("encoder.") and not torch.equal(trained[k], donor[k])]
    assert frozen and changed and all(torch.equal(trained[k], donor[k]) for k in frozen)
    digests = json.loads((transfer / "digests.json").read_text())
    assert digests[0] == digests[1]


def _process_of_rank(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of the worker of ``rank`` the launcher ``launcher_pid`` started (its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if env.get(b"RANK") == str(rank).encode() and parent == launcher_pid:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker through /proc (Linux)")
def test_a_killed_process_ends_the_job_in_one_line(tmp_path):
    data = _dataset(tmp_path)
    overrides = {**TINY, "collective_timeout_minutes": 1}
    command = [sys.executable, "-m", "medfcn", "train", str(BUNDLE), "--data", str(data)]
    command += ["--folds", str(data / "folds.json"), "--output", str(tmp_path / "run"), "--epochs", "1000"]
    command += [*_sets(overrides), "--device", "cpu", "--nproc-per-node", "2"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in job.stdout:
            if line.startswith("epoch 2/"):  # training, in step
                break
        os.kill(_process_of_rank(job.pid, 1), signal.SIGKILL)
        started = time.monotonic()
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert time.monotonic() - started < 60  # well within the collective timeout
    assert job.returncode == 128 + signal.SIGKILL
    assert stderr.splitlines() == ["medfcn: error: rank 1 was killed by SIGKILL; the other processes were stopped."]
    assert (tmp_path / "run" / "last.pt").is_file()  # what rank 0 wrote stays, to resume


def _trainer_state(out) -> dict:
    return torch.load(out / "last.pt", weights_only=True)["trainer"]


def test_a_resume_may_change_the_number_of_processes(tmp_path):
    data, out = _dataset(tmp_path), tmp_path / "run"
    common = ["--data", data, "--folds", data / "folds.json", "--output", out, *_sets(TINY)]
    # 3 training cases, batch 2: 1 step an epoch in each of 2 processes, 2 steps in one
    first = _train(BUNDLE, *common, "--epochs", 1, processes=2)
    assert first.returncode == 0, first.stderr
    assert _trainer_state(out)["epoch_length"] == 1
    alone = _train(BUNDLE, "--output", out, "--resume", "--epochs", 2, processes=None)
    assert alone.returncode == 0, alone.stderr
    assert [line.split()[1] for line in alone.stdout.splitlines() if line.startswith("epoch ")] == ["2/2"]
    state = _trainer_state(out)
    assert (state["epoch_length"], state["iteration"]) == (2, 4)  # epoch 2 done, counted in one process's steps
    again = _train(BUNDLE, "--output", out, "--resume", "--epochs", 3, processes=2)
    assert again.returncode == 0, again.stderr
    assert [line.split()[1] for line in again.stdout.splitlines() if line.startswith("epoch ")] == ["3/3"]
    state = _trainer_state(out)
    assert (state["epoch_length"], state["iteration"]) == (1, 3)


def test_user_errors_are_said_once(tmp_path):
    data, out = _dataset(tmp_path), tmp_path / "run"
    common = ["--data", data, "--folds", data / "folds.json", "--output", out, "--epochs", 1]
    bad_value = _train(BUNDLE, *common, *_sets({**TINY, "batch_size": 0}))  # before the processes meet
    assert bad_value.returncode == 2
    assert len(bad_value.stderr.splitlines()) == 1 and "batch_size" in bad_value.stderr, bad_value.stderr
    # found by every process in the checks they run together: rank 0 says it
    one_case = _train(BUNDLE, *common, *_sets({**TINY, "max_cases": 1}))
    assert one_case.returncode == 2
    assert one_case.stderr.splitlines() == [
        f"medfcn: error: fold 0 of {data / 'folds.json'}: 1 validation case for 2 processes, which validate a share "
        "each; train in at most 1 processes, or with a split of more cases per fold."
    ]
    assert not out.exists()


def test_monai_bundle_run_takes_the_multi_gpu_config(tmp_path):
    data, out = _dataset(tmp_path), tmp_path / "run"
    configs = [str(BUNDLE / "configs" / name) for name in ("common.json", "train.json", "multi_gpu_train.json")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "monai.bundle", "run", "--config_file", json.dumps(configs), "--bundle_root", str(BUNDLE)]
    command += ["--dataset_dir", str(data), "--folds_file", str(data / "folds.json"), "--output_dir", str(out)]
    command += ["--epochs", "1", "--device", "$torch.device('cpu')"]
    for key, value in TINY.items():
        command += [f"--{key}", json.dumps(value)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"last.pt", "best_model.pt"} <= {p.name for p in out.iterdir()}
    assert len(list(out.glob("events.out.tfevents*"))) == 1


def test_nproc_per_node_restarts_the_command_as_given(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, args: started.append((nproc, args)))
    args = ["train", str(BUNDLE), "--epochs", "3", "--resume", "--set", "batch_size=4", "--set", "seed=-1"]
    result = CliRunner().invoke(app, [*args, "--nproc-per-node", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # the options given (in the command's order), not the defaults: the bundle's, in every process;
    # then the arguments, after `--` (an input named like an option stays an input)
    options = ["--epochs=3", "--resume", "--set=batch_size=4", "--set=seed=-1", "--device=cpu"]
    assert started == [(2, ["train", *options, "--", str(BUNDLE)])]
    scans = ["-odd name.nii.gz", str(tmp_path)]
    options = ["--out", "o", "--tta", "--nproc-per-node", "3"]
    result = CliRunner().invoke(app, ["infer", *options, "--", str(BUNDLE), *scans])
    assert result.exit_code == 0, result.output
    assert started[1] == (3, ["infer", "--out=o", "--tta", "--", str(BUNDLE), *scans])
    result = CliRunner().invoke(app, ["train", str(BUNDLE), "--set", "batch_size", "--nproc-per-node", "2"])
    assert result.exit_code == 2 and len(started) == 2  # a malformed --set is said before the processes start
    monkeypatch.setenv("WORLD_SIZE", "2")  # already one of several processes
    result = CliRunner().invoke(app, [*args, "--nproc-per-node", "2"])
    assert result.exit_code == 2 and "already one of several" in result.output
    assert len(started) == 2


def test_ranks_other_than_0_drop_the_handlers_that_write(monkeypatch, tmp_path):
    writer = distributed.summary_writer(str(tmp_path / "tb"))
    tensorboard = TensorBoardStatsHandler(summary_writer=writer)
    checkpoints = CheckpointWriter(str(tmp_path), {"network": torch.nn.Linear(1, 1)})
    saver = CheckpointSaver(str(tmp_path), {"network": torch.nn.Linear(1, 1)})
    kept = [ValidateEvery(1), ReseedEachEpoch(None, None)]
    handlers = [kept[0], tensorboard, checkpoints, EpochProgress(), saver, kept[1]]
    assert distributed.main_rank_only(handlers) == handlers
    writer.close()
    monkeypatch.setenv("RANK", "1")  # a launcher's rank, before (or without) the process group
    assert distributed.main_rank_only(handlers) == kept
    quiet = distributed.summary_writer(str(tmp_path / "rank1"))
    quiet.add_scalar("loss", 1.0, 1)
    quiet.close()
    assert not (tmp_path / "rank1").exists()


def test_a_bundle_without_the_multi_gpu_config_trains_in_one_process_only(monkeypatch, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(BUNDLE, older, ignore=shutil.ignore_patterns("models", "multi_gpu_train.json"))
    assert training_files(older)["config_files"][-1].name == "train.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert training_files(BUNDLE)["config_files"][-1].name == "multi_gpu_train.json"
    with pytest.raises(UserError, match=r"multi_gpu_train.json: missing, so this bundle trains in one process only"):
        training_files(older)


def test_devices_threads_and_agreement_outside_and_inside_a_launcher(monkeypatch):
    assert distributed.threads_per_process(2, cores=2) == 1 and distributed.threads_per_process(4, cores=2) == 1
    assert distributed.threads_per_process(2, cores=16) == 8
    assert distributed.agreed(lambda: 7) == 7  # one process: the work's result
    with pytest.raises(UserError, match="^bad$"):
        distributed.agreed(lambda: (_ for _ in ()).throw(UserError("bad")))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.process_device("cuda:0") == "cuda:0"  # one process: as given
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.process_device("cuda") == "cuda:1" and distributed.process_device("cpu") == "cpu"
    assert distributed.process_device(None) is None  # the bundle's: cuda:LOCAL_RANK or the CPU
    with pytest.raises(UserError, match=r"^--device cuda:0: with several processes each takes cuda:LOCAL_RANK"):
        distributed.process_device("cuda:0")
    with pytest.raises(FailedOnAnotherRank, match="^bad$"), distributed.said_once_per_node():
        raise UserError("bad")  # the node's first process says it
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="^bad$") as raised, distributed.said_once_per_node():
        raise UserError("bad")
    assert not isinstance(raised.value, FailedOnAnotherRank)


def test_more_processes_than_gpus_are_refused_by_every_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.process_device(None) is None  # one process: nothing to check
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for local_rank in ("0", "1"):  # the first process too, which says it
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        for device in (None, "cuda"):
            with pytest.raises(UserError, match=r"^--nproc-per-node 2: this machine has 1 GPU, one per process"):
                distributed.process_device(device)
        assert distributed.process_device("cpu") == "cpu"  # processes on the CPU need no GPU


def test_a_collective_that_failed_ends_the_process_in_one_line_or_none(monkeypatch):
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:56038.")
    wrapped = RuntimeError("Failed to evaluate ConfigExpression")
    wrapped.__cause__ = lost
    assert distributed.collective_failure(wrapped) is None  # one process: not a distributed run
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.collective_failure(wrapped) == (PEER_LOST_STATUS, "")
    status, line = distributed.collective_failure(RuntimeError("[gloo] Timed out waiting 60000ms for recv"))
    assert status == 2 and "collective_timeout_minutes" in line
    assert distributed.collective_failure(ValueError("shapes differ")) is None  # a failure of its own


def _failed(*failures):
    """A ChildFailedError's ``failures``: (rank, exit status, timestamp) each."""
    return SimpleNamespace(failures={r: SimpleNamespace(exitcode=c, timestamp=t) for r, c, t in failures})


def test_the_launcher_names_the_process_that_failed_first(capsys):
    # rank 1 killed; the launcher stopped rank 0 with SIGTERM in the same second
    assert distributed._failure_status(_failed((0, -signal.SIGTERM, 5), (1, -signal.SIGKILL, 5))) == 137
    assert capsys.readouterr().err == "medfcn: error: rank 1 was killed by SIGKILL; the other processes were stopped.\n"
    # a user error (said by that process), the other stopped by the lost collective
    assert distributed._failure_status(_failed((0, PEER_LOST_STATUS, 4), (1, 2, 5))) == 2
    assert capsys.readouterr().err == ""
    assert distributed._failure_status(_failed((0, 1, 4), (1, PEER_LOST_STATUS, 4))) == 1
    assert capsys.readouterr().err == "medfcn: error: rank 0 exited with status 1; the other processes were stopped.\n"


def _infer(*args, processes: int | None = 2) -> subprocess.CompletedProcess:
    """``medfcn infer ARGS [--nproc-per-node N]`` in a new process, on the CPU."""
    nproc = ["--nproc-per-node", str(processes)] if processes else []
    command = [sys.executable, "-m", "medfcn", "infer", *map(str, args), "--device", "cpu", *nproc]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def _table(folder) -> list[dict]:
    return json.loads((folder / "volumes.json").read_text())


def test_inference_in_two_processes_writes_what_one_process_writes(tmp_path):
    scans = _dataset(tmp_path, n_cases=5) / "imagesTr"
    one = _infer(BUNDLE, scans, "--out", tmp_path / "one", processes=None)
    two = _infer(BUNDLE, scans, "--out", tmp_path / "two")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    names = sorted(p.name for p in scans.glob("*.nii.gz"))
    for name in names:  # the same voxels, header and geometry
        a, b = nib.load(tmp_path / "one" / name), nib.load(tmp_path / "two" / name)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), name
        assert a.header.binaryblock == b.header.binaryblock
    # one table, in input order, with the volumes one process measured
    assert [Path(row["input"]).name for row in _table(tmp_path / "two")] == names
    volumes = [{k: v for k, v in row.items() if k.endswith("_mm3")} for row in _table(tmp_path / "two")]
    assert volumes == [{k: v for k, v in row.items() if k.endswith("_mm3")} for row in _table(tmp_path / "one")]
    lines = two.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines if line.startswith("[")) == [f"[{k}/5]" for k in range(1, 6)]
    assert sum(line.startswith("done: 5 masks") for line in lines) == 1  # said by rank 0 alone


def test_a_bad_scan_in_one_process_leaves_no_mask_of_any(tmp_path):
    scans = _dataset(tmp_path, n_cases=5) / "imagesTr"
    bad = scans / "case_003.nii.gz"  # rank 1's share: scans 1 and 3 of 0..4
    bad.write_bytes(bad.read_bytes()[:-200])  # a truncated copy
    out = tmp_path / "out"
    result = _infer(BUNDLE, scans, "--out", out)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("medfcn: warning: ")]  # spheres
    assert len(errors) == 1 and errors[0].startswith("medfcn: error: rank 1: ") and "case_003.nii.gz" in errors[0]
    assert not out.exists() or not any(out.iterdir())  # rank 0's masks of scans 0, 2, 4 neither


def test_an_ensemble_in_two_processes_writes_what_one_process_writes(tmp_path):
    scans = _dataset(tmp_path, n_cases=3) / "imagesTr"
    two = _infer(BUNDLE, scans, "--out", tmp_path / "two", "--models", BUNDLE_2D, "--uncertainty")
    assert two.returncode == 0, two.stderr
    rows = infer(BUNDLE, [scans], tmp_path / "one", device="cpu", models=[BUNDLE_2D], extras=Extras(uncertainty=True))
    assert [row["uncertainty"] for row in _table(tmp_path / "two")] == [row["uncertainty"] for row in rows]
    for name in sorted(p.name for p in scans.glob("*.nii.gz")):
        one, other = nib.load(tmp_path / "one" / name), nib.load(tmp_path / "two" / name)
        assert np.array_equal(np.asarray(one.dataobj), np.asarray(other.dataobj)), name


def test_an_existing_report_is_refused_in_one_line_before_any_scan(tmp_path):
    scans = _dataset(tmp_path, n_cases=2) / "imagesTr"
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("mine")
    result = _infer(BUNDLE, scans, "--out", out, "--report", "--models", BUNDLE_2D)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"medfcn: error: {out / 'report.html'}: already exists; pass --overwrite to replace it, "
        "or choose another output."
    ], result.stderr
    assert [p.name for p in out.iterdir()] == ["report.html"] and (out / "report.html").read_text() == "mine"


def test_the_shares_cover_every_scan_once_in_input_order(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    for count in (0, 1, 2, 5, 7):
        shares = []
        for rank in range(3):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            shares.append(distributed.share(count))
        assert sorted(i for share in shares for i in share) == list(range(count))
        assert all(share == sorted(share) for share in shares)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_scans_that_failed_with_continue_on_error_end_the_job_as_one_process(capsys):
    assert distributed._failure_status(_failed((0, 3, 9))) == 3  # rank 0 listed them itself
    assert capsys.readouterr().err == ""


def test_a_process_of_several_releases_what_its_config_built():
    """The network (in a process of several, the DDP wrapper holding the gloo backend) and the
    engines built from the run's config are freed when training ends, not at interpreter shutdown."""
    import weakref

    from medfcn.training.run import _release_built_objects

    parser = read_config(bundle_files(BUNDLE, "train.json")["config_files"], {"bundle_root": str(BUNDLE)})
    network = weakref.ref(parser.get_parsed_content("network"))
    assert network() is not None  # held by the parser's resolved content
    _release_built_objects(SimpleNamespace(parser=parser))
    assert network() is None
