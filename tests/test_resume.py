"""Interrupted training resumes exactly: SIGKILL after a checkpoint, --resume, same weights as an
uninterrupted run with the same seed on CPU. Also: same seed twice gives identical weights.

The runs are pinned to the CPU: on CUDA the backward passes of 3D max pooling and trilinear
interpolation accumulate with atomics, so two same-seed runs differ (seen on an H100) and
bit-identity is a CPU property (docs/robustness.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medfcn.training import train

from .conftest import BUNDLE, REPO

EPOCHS = 30


def _overrides(dataset) -> dict:
    return {
        "network_def#features": [8, 16, 32],
        "network_def#deep_supervision": 1,
        "batch_size": 2,
        "val_interval": 5,
        "bf16": False,
        "folds_file": str(dataset / "folds.json"),
        "patch_size": [24, 24, 24],
    }


def _cli_train(dataset, out, *extra) -> list[str]:
    sets = [a for k, v in _overrides(dataset).items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return [
        sys.executable,
        "-m",
        "medfcn.cli",
        "train",
        str(BUNDLE),
        "--data",
        str(dataset),
        "--fold",
        "0",
        "--epochs",
        str(EPOCHS),
        "--output",
        str(out),
        *sets,
        "--device",
        "cpu",  # exact resume needs one device: max_pool3d's CUDA backward is not deterministic
        *extra,
    ]


def _weights(path, part: str = "network") -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)[part]
    return state["network"] if part == "weight_average" else state


def _epoch(path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)["trainer"]
    return state["iteration"] // state["epoch_length"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(spheres_dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both runs
    reference = tmp_path / "reference"
    subprocess.run(_cli_train(spheres_dataset, reference), check=True, cwd=REPO, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli_train(spheres_dataset, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        last = killed / "last.pt"
        if last.exists():
            try:
                if _epoch(last) >= 3:
                    break
            except Exception:  # noqa: BLE001 - the file is being replaced; look again
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _epoch(killed / "last.pt")
    assert 3 <= done < EPOCHS, f"the run was not interrupted mid-way (epoch {done})"

    result = subprocess.run(
        _cli_train(spheres_dataset, killed, "--resume"), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"epoch {done + 1}/{EPOCHS}" in result.stdout  # continued from the saved epoch
    assert f"epoch {done}/{EPOCHS}" not in result.stdout
    assert _epoch(killed / "last.pt") == EPOCHS
    for part in ("network", "weight_average"):  # the moving average resumes exactly too
        a, b = (_weights(run / "last.pt", part) for run in (reference, killed))
        assert a, part
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{part} {key}")


def test_same_seed_same_weights(spheres_dataset, tmp_path):
    runs = [
        train(
            BUNDLE,
            spheres_dataset,
            fold=0,
            epochs=3,
            output_dir=tmp_path / f"r{i}",
            overrides=_overrides(spheres_dataset),
            device="cpu",
        )
        for i in range(2)
    ]
    other = train(
        BUNDLE,
        spheres_dataset,
        fold=0,
        epochs=3,
        output_dir=tmp_path / "seed1",
        overrides={**_overrides(spheres_dataset), "seed": 1},
        device="cpu",
    )
    a, b, c = (_weights(r / "last.pt") for r in (*runs, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed matters, so the check can fail


def test_budget_ends_the_run_early_and_its_resume_says_so(spheres_dataset, tmp_path, capsys):
    """A budget far too short: the BudgetKeeper ends the real trainer after the third epoch (the
    first it may judge), with the schedule decayed; a resume says the run has finished, and
    --epochs trains the planned epochs without the budget."""
    from medfcn.errors import UserError

    out = tmp_path / "run"
    overrides = {**_overrides(spheres_dataset), "budget_minutes": 1e-4, "val_interval": 1}
    train(BUNDLE, spheres_dataset, fold=0, epochs=4, output_dir=out, overrides=overrides, device="cpu")
    printed = capsys.readouterr().out
    assert "budget: training ends after epoch 3 instead of 4" in printed, printed
    assert "epoch 3/3" in printed and "epoch 4/" not in printed
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert _epoch(out / "last.pt") == 3 and saved["trainer"]["max_epochs"] == 3
    assert saved["lr_scheduler"]["total_iters"] == 3
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)

    with pytest.raises(UserError, match=r"finished 3 epochs already, the last that fit its 0.0001-min budget"):
        train(BUNDLE, output_dir=out, resume=True, device="cpu")
    before = _weights(out / "last.pt")
    train(BUNDLE, output_dir=out, resume=True, epochs=4, device="cpu")
    printed = capsys.readouterr().out
    assert "budget: --set epochs 4 trains every epoch; the 0.0001-min budget no longer" in printed, printed
    assert "epoch 4/4" in printed and _epoch(out / "last.pt") == 4
    after = _weights(out / "last.pt")  # epoch 4 trained at a rate again, not at the decayed 0
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
