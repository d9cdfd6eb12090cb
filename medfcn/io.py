"""Atomic file output: write to a temporary file in the target folder, then rename.

A rename within one folder is atomic on POSIX, so a reader (or a crash) sees the old file or
the complete new one, never a half-written mask, table or checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["atomic_path", "atomic_torch_save", "atomic_write_text"]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    ``suffix`` is kept on the temporary name (e.g. ``.nii.gz``) for writers that choose the
    format by extension. On error the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_torch_save(obj, target: str | os.PathLike) -> None:
    """``torch.save`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, target: str | os.PathLike) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)
