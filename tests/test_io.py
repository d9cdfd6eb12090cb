"""medfcn.io: atomic writes leave the old file or the complete new one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medfcn.errors import UserError
from medfcn.io import (
    atomic_path,
    atomic_torch_save,
    atomic_write_text,
    load_weights,
    refuse_existing,
    replace_folder,
    writable_dir,
)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, suffix=".nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def _bundle(folder, text):
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "a.json").write_text(text)


@pytest.mark.parametrize("stage", ["assembly", "rename"])
def test_failed_folder_replace_keeps_old_folder_and_leaves_no_temp(tmp_path, monkeypatch, stage):
    out = tmp_path / "bundle"
    _bundle(out, "old")
    if stage == "rename":  # the new folder's rename fails after the old one was moved aside
        real_replace = os.replace

        def fail_into_out(src, dst):
            if Path(dst) == out and Path(src).name.endswith(".tmp"):
                raise OSError("rename failed")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", fail_into_out)
    with pytest.raises((RuntimeError, OSError)):
        with replace_folder(out) as tmp:
            assert tmp.parent == tmp_path and not any(tmp.iterdir())
            _bundle(tmp, "new")
            if stage == "assembly":
                raise RuntimeError("failed mid-assembly")
    assert (out / "configs" / "a.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_folder_replace_replaces_as_a_whole(tmp_path):
    out = tmp_path / "bundle"
    with replace_folder(out) as tmp:  # a new folder
        _bundle(tmp, "first")
    (out / "stale.txt").write_text("from the first")
    with replace_folder(out) as tmp:
        _bundle(tmp, "second")
    assert (out / "configs" / "a.json").read_text() == "second" and not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert out.stat().st_mode & 0o777 == 0o755


def test_successful_writes_replace(tmp_path):
    atomic_write_text("a", tmp_path / "t.txt")
    atomic_write_text("b", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "b"
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "sub" / "c.pt")
    assert torch.equal(torch.load(tmp_path / "sub" / "c.pt", weights_only=True)["w"], torch.ones(2))


def test_output_folder_that_is_a_file(tmp_path):
    """--out naming an existing file says so, not "not writable (File exists)"; the file is kept."""
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    with pytest.raises(UserError, match=r"afile: is a file, not a folder; choose another --out\.$"):
        writable_dir(blocker, fix="choose another --out")
    assert blocker.read_text() == "keep me"
    with pytest.raises(UserError, match=r"afile: is a file, not a folder"):  # a file above it is named
        writable_dir(blocker / "sub" / "deeper")
    assert writable_dir(tmp_path / "new" / "dir").is_dir()


def test_sigkill_during_writes_leaves_old_or_new_complete_file(tmp_path):
    """A process rewriting a 40 MB checkpoint in a loop is killed at random moments: the target
    is always a complete, loadable checkpoint (or absent before the first rename)."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "last.pt"
    code = (
        "import sys, torch; from medfcn.io import atomic_torch_save\n"
        "i = 0\n"
        "while True:\n"
        "    atomic_torch_save({'step': i, 'w': torch.full((10_000_000,), float(i))}, sys.argv[1]); i += 1\n"
    )
    for delay in (0.0, 0.07, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
        deadline = time.time() + 120
        while not target.exists() and time.time() < deadline:  # wait out the interpreter start-up
            time.sleep(0.01)
        time.sleep(delay)  # then kill at different points of the write/rename cycle
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(target, weights_only=True)
        assert torch.all(ckpt["w"] == float(ckpt["step"]))  # complete and self-consistent
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.") for name in leftovers)  # only hidden temp files of killed writes


def test_refuse_existing_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "b.txt").write_text("kept")
    refuse_existing([tmp_path / "a.txt"], overwrite=False)
    refuse_existing([tmp_path / "b.txt"], overwrite=True)
    with pytest.raises(UserError, match=r"b.txt: already exists; pass --overwrite to replace it, or choose another"):
        refuse_existing([tmp_path / "a.txt", tmp_path / "b.txt"], overwrite=False)
    with pytest.raises(UserError) as err:
        refuse_existing([tmp_path / "b.txt"], overwrite=False, fix="pass --overwrite to replace it")
    assert str(err.value) == f"{tmp_path / 'b.txt'}: already exists; pass --overwrite to replace it."


@pytest.mark.parametrize(
    "content, reason",
    [
        ("truncated", "(PytorchStreamReader failed reading zip archive: failed finding central directory)"),
        ("pickled module", "(holds more than tensors, or is no checkpoint: Unsupported global: GLOBAL torch.nn"),
        ("text", "(holds more than tensors, or is no checkpoint: Unsupported operand"),
    ],
)
def test_unreadable_checkpoints_get_one_short_reason(tmp_path, content, reason):
    """PyTorch's messages run to a paragraph, advising weights_only=False (which would run the
    file's code): the error keeps the sentence that says what is wrong, on one line."""
    path = tmp_path / "model.pt"
    network = torch.nn.Linear(2, 2)
    if content == "text":
        path.write_text("garbage\n")
    else:
        torch.save(network if content == "pickled module" else network.state_dict(), path)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError) as err:
        load_weights(network, path)
    message = str(err.value)
    assert reason in message and "\n" not in message
    assert "weights_only" not in message and len(message) < 400
