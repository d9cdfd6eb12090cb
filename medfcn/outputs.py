"""Outputs that never destroy inputs: output folders that hold no input, one writer per output
folder at a time, clean exits on SIGTERM, and file names that are not valid UTF-8.

- :func:`refuse_outputs_over_inputs`: an output folder that is, or holds, an input (``--out``
  given as the scans' own folder) would let ``--overwrite`` replace scans by masks.
- :func:`output_lock`: an exclusive ``flock`` on a hidden file in the output folder, so that a
  second run into the same folder refuses at once instead of interleaving tables or checkpoints.
  The kernel releases the lock when its process dies (even by SIGKILL); a lock file left behind
  then is only an empty, hidden name that the next run reuses.
- :func:`exit_on_sigterm`: SIGTERM unwinds like Ctrl-C, so every temporary file is removed.
- :func:`path_text`: a path as text for tables and the terminal, also when its bytes are not
  UTF-8 (an old Latin-1 export: ``b"scan_\\xe9.nii.gz"``).
- :func:`plural`: a count and its noun for messages, ``1 epoch`` but ``2 epochs``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from medfcn.errors import UserError
from medfcn.io import writable_dir

try:  # POSIX only; elsewhere runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "LAUNCHED_ENV",
    "LOCK_NAME",
    "exit_on_sigterm",
    "is_utf8",
    "output_lock",
    "path_text",
    "plural",
    "refuse_non_utf8",
    "refuse_output_over",
    "refuse_outputs_over_inputs",
]

# Set in the processes `--nproc-per-node` starts (medfcn.distributed.launch), which say nothing when
# the launcher stops them: it says which process failed.
LAUNCHED_ENV = "MEDFCN_LAUNCHED"
# Hidden, so that folder listings (``medfcn.io.nifti_files``) never take it for a scan or mask.
LOCK_NAME = ".medfcn.lock"


def is_utf8(path: str | os.PathLike) -> bool:
    """Whether the bytes of ``path`` are valid UTF-8 (Python holds other bytes as surrogates)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def plural(count: float, noun: str, spec: str = "g") -> str:
    """``count`` formatted with ``spec`` and ``noun``, with an "s" unless the number reads 1:
    ``plural(1, "epoch")`` is ``1 epoch``, ``plural(3, "case")`` ``3 cases``,
    ``plural(1.04, "minute", ".1f")`` ``1.0 minutes``."""
    number = format(count, spec)
    return f"{number} {noun}" if number == "1" else f"{number} {noun}s"


def path_text(path: str | os.PathLike) -> str:
    """``path`` (or a message naming files) as text for tables, JSON and the terminal.

    UTF-8 text is returned as it is. In any other name each byte that is not UTF-8 is
    written ``\\xNN`` (Python's ``backslashreplace``): ``b"scan_\\xe9.nii.gz"`` gives the text
    ``scan_\\xe9.nii.gz`` (a backslash, an x, two hex digits), and
    ``codecs.escape_decode(text.encode())[0]`` gives the bytes back (unless the name also holds a
    literal backslash).
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def refuse_non_utf8(path: str | os.PathLike, names: Iterable[str] = ()) -> None:
    """UserError when ``path``, or one of ``names`` in the folder ``path``, is not UTF-8.

    SimpleITK (GDCM for DICOM) converts file names to UTF-8 and aborts the whole process, with
    no message of ours and no cleanup, on one that is not: refuse before it is called.
    """
    for name in [path, *(Path(path) / n for n in names)]:
        if not is_utf8(name):
            raise UserError(
                f"{path_text(name)}: file name is not valid UTF-8 (an old Latin-1 export?), which SimpleITK (the "
                "DICOM, NRRD and MetaImage reader) cannot open; rename it in UTF-8, "
                "e.g. `convmv -f latin1 -t utf8 -r --notest FOLDER`."
            )


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, as spelt (made absolute, ``..`` removed)
    or with symbolic links followed."""
    for item, place in (
        (Path(os.path.abspath(path)), Path(os.path.abspath(folder))),
        (Path(path).resolve(), Path(folder).resolve()),
    ):
        if item == place or place in item.parents:
            return True
    return False


def refuse_output_over(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], option: str, what: str) -> None:
    """UserError when the output ``out`` is one of ``inputs`` or a folder holding one.

    Paths are compared as spelt and resolved (symbolic links followed), so another spelling of
    the same place is caught too. ``what`` names the inputs in the message (e.g. "scan").
    """
    for item in inputs:
        if _inside(item, out):
            raise UserError(
                f"{option} {path_text(out)}: is or holds the {what} {path_text(item)}; outputs go outside the "
                f"inputs, so that --overwrite can never replace one: choose another {option}."
            )


def refuse_outputs_over_inputs(out: Path, scans: Iterable[Path], targets: Iterable[Path]) -> None:
    """UserError when the output folder ``out`` is or holds an input scan (a NIfTI file or a
    DICOM series folder), or a mask target resolves (through a link) to an input.

    Masks are named after their scans, so with ``--overwrite`` an ``--out`` equal to the scans'
    folder would replace each scan by its mask.
    """
    scans = list(scans)
    refuse_output_over(out, scans, "--out", "input")
    inputs = {scan.resolve(): scan for scan in scans}
    for target in targets:
        if target.resolve() in inputs:
            raise UserError(
                f"{path_text(target)}: resolves to the input {path_text(inputs[target.resolve()])}, which the mask "
                "would replace; choose another --out."
            )


def _lock_holder(lock_file: Path) -> str:
    """What the lock file says about its holder (``"medfcn infer (pid 123)"``), or a guess."""
    try:
        pid, _, command = lock_file.read_text().strip().partition(" ")
        return f"{command} (pid {int(pid)})"
    except (OSError, ValueError):  # just created and not yet written, or not ours
        return "medfcn run"


def _open_lock_file(lock_file: Path) -> int:
    """A descriptor of ``lock_file``, created if missing (mode 0666 less the umask); read-only
    where the file is another user's (left by their killed run): ``flock`` needs no write access."""
    try:
        return os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(lock_file, os.O_RDONLY)


def _acquire(lock_file: Path, command: str, option: str, folder: Path) -> int:
    """Open ``lock_file`` and lock it exclusively without waiting; return its descriptor.

    A run that releases and unlinks the file between our ``open`` and ``flock`` leaves us a
    lock on a name no longer in the folder: then try again on the new file.
    """
    while True:
        fd = _open_lock_file(lock_file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(lock_file)
            raise UserError(
                f"{path_text(folder)}: another {holder} is writing here; wait for it or choose another {option}."
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                with contextlib.suppress(OSError):  # read-only: another user's file; the lock holds without the note
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()} {command}\n".encode())
                return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str, option: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on the output ``folder`` for ``command`` (e.g. "medfcn infer").

    Creates ``folder`` (checking it is writable, as :func:`medfcn.io.writable_dir`); on exit
    removes the lock file, and the folders it created if they are still empty, so a run that
    refused leaves nothing behind.

    Raises:
        UserError: another process holds the lock (naming its pid and command), or the folder
            cannot be created or written.
    """
    folder = Path(folder)
    created = [f for f in (folder, *folder.parents) if not f.exists()]  # deepest first
    writable_dir(folder, fix=f"choose another {option}")
    lock_file = folder / LOCK_NAME
    fd = _acquire(lock_file, command, option, folder) if fcntl else None
    try:
        yield folder
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):  # before the unlock: a run that opened it retries on a new file
                lock_file.unlink()
            os.close(fd)
        for empty in created:
            with contextlib.suppress(OSError):  # not empty: the run wrote there (or another one did)
                os.rmdir(empty)


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM: unwinds like Ctrl-C, exit status 143 (128 + 15)."""


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind the program as Ctrl-C does, exiting with status 143 (128 + 15).

    The default action kills the process where it stands, leaving the hidden temporary files of
    :func:`medfcn.io.atomic_path` behind; :class:`Terminated` runs every ``finally`` and context
    manager on the way out. Later SIGTERMs are ignored while that cleanup runs (SIGKILL is not).
    Forked children (data-loader workers) inherit the handler; they die as before.

    Python swallows an exception raised inside a ``__del__`` or a weakref callback ("Exception
    ignored in ..."): had the signal arrived there (nibabel has such finalizers), the run would
    carry on and finish with exit 0. ``sys.unraisablehook`` sees that and sends the signal again
    a moment later, to land in ordinary code.
    """
    main_pid = os.getpid()
    other_hook = sys.unraisablehook
    told = []

    def terminate(signum, frame):
        if os.getpid() != main_pid:  # a worker: its parent cleans up
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # no second exit in the middle of the cleanup
        # a process medfcn's launcher started: stopped by it, which says why (medfcn.distributed.launch)
        if not told and os.environ.get(LAUNCHED_ENV) != "1":  # os.write, not print: the signal may arrive in one
            os.write(sys.stderr.fileno(), b"medfcn: terminated (SIGTERM); removing unfinished output.\n")
            told.append(True)
        raise Terminated(128 + signal.SIGTERM)

    def retry_if_swallowed(unraisable):
        if isinstance(unraisable.exc_value, Terminated):
            signal.signal(signal.SIGTERM, terminate)
            # from another thread, a moment later: a signal sent from here would be handled, and
            # swallowed again, inside this hook
            again = threading.Timer(0.01, os.kill, (main_pid, signal.SIGTERM))
            again.daemon = True
            again.start()
        else:
            other_hook(unraisable)

    signal.signal(signal.SIGTERM, terminate)
    sys.unraisablehook = retry_if_swallowed
