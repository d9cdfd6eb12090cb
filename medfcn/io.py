"""File input/output: atomic writes, writable output folders, safe checkpoint loading.

A rename within one folder is atomic on POSIX, so a reader (or a crash) sees the old file or
the complete new one, never a half-written mask, table or checkpoint. Checkpoints are read
with ``torch.load(..., weights_only=True)``: tensors and plain containers only, no pickled code.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from medfcn.errors import UserError, find_user_error, innermost_cause

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A write that fails for want of space: a full disk, a full quota, a file system (re)mounted
# read-only. The user can fix these, so they are one line, not a traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
DISK_FULL_FIX = "free space or choose another --out/--output"

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: the CLI's help stays light
    import torch

__all__ = [
    "file_sha256",
    "atomic_named_path",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_text",
    "checkpoint_reason",
    "csv_text",
    "disk_full_error",
    "load_state",
    "load_weights",
    "nifti_files",
    "read_checkpoint",
    "refuse_full_disk",
    "refuse_existing",
    "replace_folder",
    "writable_dir",
]


def nifti_files(folder: str | os.PathLike, suffixes: tuple[str, ...] = NIFTI_SUFFIXES) -> list[Path]:
    """The NIfTI files directly in ``folder``, sorted; ``.nii``/``.nii.gz`` in any letter case
    (or the lower-case ``suffixes`` given, e.g. ``medfcn.formats.SCAN_SUFFIXES``).

    Hidden names are skipped: macOS's AppleDouble ``._case.nii.gz`` (in MSD tarballs) and our
    own ``.<name>.tmp`` files are no images and would otherwise fail a whole batch.

    Raises:
        UserError: a file is a symbolic link whose target is missing.
    """
    found = sorted(
        p for p in Path(folder).iterdir() if p.name.lower().endswith(suffixes) and not p.name.startswith(".")
    )
    for path in found:
        if not path.exists():  # a link whose target is gone
            raise UserError(f"{path}: links to {os.readlink(path)}, which is missing; restore it or remove the link.")
    return found


def writable_dir(folder: str | os.PathLike, fix: str = "choose another output folder") -> Path:
    """Create ``folder`` if needed and check that a file can be created in it.

    Raises:
        UserError: naming the folder, the system's reason (or that it is a file), and ``fix``.
    """
    folder = Path(folder)
    os.unlink(_temp_file(folder, ".medfcn-write-test-", "", fix))
    return folder


def _temp_file(folder: Path, prefix: str, suffix: str, fix: str) -> str:
    """Create ``folder`` if needed and an empty temporary file in it; return the file's path.

    Raises:
        UserError: the folder cannot be created or written, or is a file (naming it, the
            reason and ``fix``).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except OSError as err:
        # the folder itself, or a folder above it, may be an existing file
        blocking = next((f for f in (folder, *folder.parents) if f.exists() and not f.is_dir()), None)
        if blocking is not None:
            raise UserError(f"{blocking}: is a file, not a folder; {fix}.") from err
        raise UserError(f"{folder}: output folder not writable ({err.strerror or err}); {fix}.") from err
    os.close(fd)
    return path


def refuse_existing(
    paths: Iterable[str | os.PathLike],
    overwrite: bool,
    fix: str = "pass --overwrite to replace it, or choose another output",
) -> None:
    """UserError for the first of ``paths`` that exists, unless ``overwrite``.

    ``fix`` completes the message ``<path>: already exists; <fix>.``; commands whose output
    path is fixed (export) leave out "choose another output".
    """
    if overwrite:
        return
    for path in map(Path, paths):
        if path.exists():
            raise UserError(f"{path}: already exists; {fix}.")


@contextlib.contextmanager
def replace_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out``; on success it replaces ``out`` as a whole.

    The new folder is renamed into place after the old ``out`` (if any) is renamed aside, and
    the old one is deleted only then. On any failure, while assembling or renaming, the old
    ``out`` is back where it was and the temporary folders are removed: a reader sees the old
    folder or the complete new one (for an instant, none between the two renames).
    """
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the bundle from other users
        _rename_over(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_over(tmp: Path, out: Path) -> None:
    """Rename the folder ``tmp`` onto ``out``; an existing ``out`` is put back if that fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    aside = old / out.name
    try:
        os.replace(out, aside)
        os.replace(tmp, out)
    finally:
        # interrupted (Ctrl-C, SIGTERM) or failed between the renames: the old folder goes back;
        # it is deleted only once a folder stands at ``out`` again
        if not out.exists() and aside.exists():
            os.replace(aside, out)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_named_path(target: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_path` for writers that name what they write after the file: a path with
    ``target``'s own name in a hidden temporary folder beside it (``torch.jit.save`` and
    ``torch.export.save`` name their archive's inner folder after the file, which would
    otherwise carry the temporary name into the export for good)."""
    target = Path(target)
    folder = Path(_temp_file(target.parent, f".{target.name}.", ".tmpdir", "choose another output folder"))
    folder.unlink()
    folder.mkdir()
    try:
        with atomic_path(target, tmp_path=folder / target.name) as tmp:
            yield tmp
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "", tmp_path: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    ``suffix`` is kept on the temporary name (e.g. ``.nii.gz``) for writers that choose the
    format by extension. The data is flushed to disk (fsync) before the rename, so the new
    file is complete even after a power loss. On error the temporary file is removed and
    ``target`` is untouched. ``tmp_path``: the temporary path to use (on ``target``'s file
    system), instead of a new one.
    """
    target = Path(target)
    if tmp_path is None:
        tmp_path = Path(_temp_file(target.parent, f".{target.name}.", f".tmp{suffix}", "choose another output folder"))
    try:
        yield tmp_path
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    except OSError as err:
        full = disk_full_error(err, target)
        if full is None:
            raise
        raise full from err
    finally:
        tmp_path.unlink(missing_ok=True)


def disk_full_error(
    err: BaseException, path: str | os.PathLike | None = None, folder: str | os.PathLike | None = None
) -> UserError | None:
    """A one-line UserError for a write that failed for want of space (:data:`DISK_FULL`)
    somewhere in ``err``'s cause chain, naming ``path``, else the file the system names, else
    ``folder`` (a file object's write names no file); None for any other error."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            name = path or err.filename or folder or "an output file"
            return UserError(f"{name}: cannot be written ({os.strerror(err.errno)}); {DISK_FULL_FIX}.")
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def refuse_full_disk(folder: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk met inside the block into one UserError naming the file (or ``folder``).

    Also for writes of other threads: TensorBoard's event writer writes from its own thread,
    whose error Python would print as a traceback and the writer re-raises only at its next
    event (never at ``close``); here it is silenced and raised when the block ends. A UserError
    already in an error's chain (``atomic_path`` names its target) is left as it is.
    """
    failed: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if disk_full_error(args.exc_value) is None:
            previous(args)
        else:
            failed.append(args.exc_value)

    threading.excepthook = hook
    try:
        yield
    except Exception as err:
        full = None if find_user_error(err) else disk_full_error(err, folder=folder)
        if full is None:
            raise
        _join_failed_writers(err)
        raise full from err
    finally:
        threading.excepthook = previous
    if failed:
        raise disk_full_error(failed[0], folder=folder) from failed[0]


def _join_failed_writers(err: BaseException) -> None:
    """Wait for the writer threads that failed with an error of ``err``'s chain (TensorBoard's
    keeps it as ``exception``) to end, so that their error reaches our hook, not stderr."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and any(getattr(thread, "exception", None) is e for e in chain):
            thread.join(timeout=5)


def atomic_torch_save(obj, target: str | os.PathLike) -> None:
    """``torch.save`` to ``target`` atomically.

    Serialised in memory first: PyTorch's own file writer reports a full disk as a
    RuntimeError without the system's error number; Python's reports it as an OSError, which
    ``atomic_path`` turns into one line.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(text: str, target: str | os.PathLike) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def checkpoint_reason(err: BaseException) -> str:
    """One line on why ``torch.load`` or ``load_state_dict`` failed, for a user error.

    PyTorch's own messages run to several sentences of advice, some of it wrong for us (to
    load with ``weights_only=False``, which runs whatever code the file holds): keep the first
    sentence that says what is wrong, and say what a weights-only load refused.
    """
    err = innermost_cause(err)
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = _first_sentence(text.split(marker, 1)[1])
        return f"holds more than tensors, or is no checkpoint: {detail}; medfcn reads state dicts only"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]  # the header names only the class; the next line says what differs
    return _first_sentence(lines[0]) if lines else type(err).__name__


def _first_sentence(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    # "...archive: failed finding central directory. This is an internal miniz error. ..."
    return line.split(". ", 1)[0].rstrip(".")[:300]


def read_checkpoint(path: str | os.PathLike, fix: str = "replace the file") -> object:
    """The contents of a ``torch.save``-d file, read on the CPU with ``weights_only=True``.

    Raises:
        UserError: the file is unreadable or holds more than tensors and plain containers,
            naming ``path``, the reason in one line and ``fix``.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({checkpoint_reason(err)}); {fix}.") from err


def csv_text(rows: list[dict], columns: Iterable[str] = ()) -> str:
    """``rows`` as CSV text with a header line: every key of the rows, in order of first
    appearance (a row without one gets an empty cell), or ``columns`` when there are no rows."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)) or list(columns))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def load_weights(network: torch.nn.Module, path: str | os.PathLike, key: str | None = None) -> torch.nn.Module:
    """Load the state dict in ``path`` into ``network`` (strictly: every key, every shape).

    Args:
        network: the module to fill; its parameters keep their device.
        path: a ``torch.save``-d state dict, or a training checkpoint when ``key`` is given.
        key: the checkpoint entry that holds the weights (``"network"`` in ``last.pt``).

    Raises:
        UserError: the file is not a readable checkpoint, lacks ``key``, or holds weights of
            another architecture or shape.
    """
    return load_state(network, read_checkpoint(path), path, key)


def load_state(
    network: torch.nn.Module, state: object, path: str | os.PathLike, key: str | None = None
) -> torch.nn.Module:
    """Load ``state``, the contents of ``path`` already read (:func:`read_checkpoint`), into
    ``network`` as :func:`load_weights` does: for a caller that reads the file once and uses it
    for more than the weights (a resume's ``last.pt``).

    Raises:
        UserError: ``state`` lacks ``key``, or holds weights of another architecture or shape.
    """
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            raise UserError(f"{path}: no {key!r} entry; not a medfcn training checkpoint.")
        state = state[key]
    try:
        network.load_state_dict(state)
    except Exception as err:
        raise UserError(
            f"{path}: does not fit the bundle's network_def ({checkpoint_reason(err)}); "
            "use weights trained with this bundle's network."
        ) from err
    return network
