"""medfcn.io: atomic writes leave the old file or the complete new one."""

from __future__ import annotations

import pytest
import torch

from medfcn.io import atomic_path, atomic_torch_save, atomic_write_text


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


def test_successful_writes_replace(tmp_path):
    atomic_write_text("a", tmp_path / "t.txt")
    atomic_write_text("b", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "b"
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "sub" / "c.pt")
    assert torch.equal(torch.load(tmp_path / "sub" / "c.pt", weights_only=True)["w"], torch.ones(2))
