"""Several processes on one job, started by ``torchrun`` (or ``medfcn ... --nproc-per-node N``,
which starts them through the same launcher, :mod:`torch.distributed.run`).

Each process is a *rank* of a :mod:`torch.distributed` process group: NCCL with one GPU per
process (``cuda:LOCAL_RANK``) where CUDA is present, gloo on the CPU, so the whole path runs on a
machine without a GPU. Rank 0 (the *main* rank) alone writes files and prints progress; a user
error on any rank before the work starts (:func:`agreed`) ends every rank, the first failing one
saying why in one line. Collectives time out (``collective_timeout_minutes``) instead of hanging
on a rank that died outside ``torchrun``'s watch.

Config expressions reach this module as ``medfcn.distributed`` after ``$import medfcn``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from medfcn.errors import PEER_LOST_STATUS, FailedOnAnotherRank, UserError, find_user_error
from medfcn.notices import logger_level
from medfcn.outputs import LAUNCHED_ENV, plural

__all__ = [
    "PEER_LOST_STATUS",
    "FailedOnAnotherRank",
    "collective_failure",
    "agreed",
    "barrier",
    "broadcast",
    "end",
    "gather",
    "init",
    "is_main",
    "launch",
    "launched",
    "local_device",
    "local_rank",
    "main_rank_only",
    "process_device",
    "process_group",
    "rank",
    "said_once_per_node",
    "share",
    "summary_writer",
    "weights_digest",
    "world_size",
]

T = TypeVar("T")

# The exit statuses of a process that said why it failed: a user error (2), scans that failed
# with `medfcn infer --continue-on-error` (3)
_SAID_WHY = (2, 3)
# how a collective library says that the other end of a connection went away
_LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed")


def launched() -> bool:
    """Whether this process is one of several a launcher started (``WORLD_SIZE`` above 1, as
    ``torchrun`` sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's global rank: the process group's, else the launcher's (``RANK``, also
    before the group is joined and after it is left); 0 without a launcher."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes of the group; 1 outside one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes the job's files and prints its progress (rank 0)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def process_device(device: str | None) -> str | None:
    """``--device`` (None: the bundle's) as one process of several takes it, checked: ``cuda``
    becomes ``cuda:LOCAL_RANK``; unchanged without a launcher.

    Raises:
        UserError: a numbered GPU (``cuda:1``): every process would compute on that one; more
            processes on this machine than GPUs where they compute on CUDA (every process of the
            node says so, so that its first one says it)."""
    if not launched():
        return device
    _check_local_gpus(device)
    if device is None or torch.device(device).type != "cuda":
        return device
    if torch.device(device).index is not None:
        raise UserError(
            f"--device {device}: with several processes each takes cuda:LOCAL_RANK; give --device cuda "
            "(choose the GPUs with CUDA_VISIBLE_DEVICES)."
        )
    return f"cuda:{local_rank()}"


def _check_local_gpus(device: str | None) -> None:
    """UserError where the processes of this machine compute on CUDA (``device`` cuda, or None
    where CUDA is present) and outnumber its GPUs (``LOCAL_WORLD_SIZE``)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return
    count = torch.cuda.device_count()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank() + 1)))
    if processes > count:
        raise UserError(
            f"--nproc-per-node {processes}: this machine has {plural(count, 'GPU')}, one per process; start at most "
            f"{count}, or give --device cpu."
        )


def init(device: torch.device | str, timeout_minutes: float = 10.0) -> None:
    """Join the launcher's process group (once; later calls do nothing): NCCL on CUDA (this
    process on ``device``), gloo on the CPU. A collective that waits longer than
    ``timeout_minutes`` for a rank fails instead of hanging."""
    if not launched() or dist.is_initialized():
        return
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=float(timeout_minutes))
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device if backend == "nccl" else None)


@contextlib.contextmanager
def process_group(device: torch.device | str, timeout_minutes: float = 10.0) -> Iterator[None]:
    """In a process of several: the process group joined for the block (:func:`init`) and left
    after it; nothing otherwise."""
    if not launched():
        yield
        return
    init(device, timeout_minutes)
    try:
        yield
    finally:
        end()


def share(count: int) -> list[int]:
    """The numbers of the items (of ``count``) this process takes: MONAI's ``partition_dataset``,
    without padding (rank r of N takes r, r + N, ...: equal shares within one item, in input
    order); all of them outside a process group."""
    if world_size() == 1:
        return list(range(count))
    if count < world_size():  # fewer items than processes, which partition_dataset refuses: one each
        return [rank()] if rank() < count else []
    from monai.data import partition_dataset

    return list(partition_dataset(list(range(count)), num_partitions=world_size(), even_divisible=False)[rank()])


def end() -> None:
    """Leave the process group, if joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if world_size() > 1:
        dist.barrier()


def gather(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` outside a group."""
    if world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (its own outside a group): one decision for all, such as
    the epoch a time budget ends the run on, which each rank's own clock would set apart."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(work: Callable[[], T]) -> T:
    """``work()`` on every rank, then a check that it raised no :class:`UserError` anywhere.

    Raises:
        UserError: this rank's, where it is the first rank that failed (prefixed ``rank N: ``
            on a rank other than 0); :class:`FailedOnAnotherRank` on the other ranks, so that
            the job says why once.
    """
    try:
        result, message = work(), None
    except Exception as err:  # a UserError, or one MONAI's config engine wrapped
        error = find_user_error(err)
        if error is None:
            raise
        result, message = None, str(error)
    messages = gather(message)
    failed = [r for r, m in enumerate(messages) if m is not None]
    if not failed:
        return result
    first = failed[0]
    if rank() != first:
        raise FailedOnAnotherRank(f"rank {first}: {messages[first]}")
    if first == 0:
        raise error
    raise UserError(f"rank {first}: {message}") from error


def collective_failure(err: BaseException) -> tuple[int, str] | None:
    """How a failure of a process of several ends it, where a collective caused it: (exit status,
    one line to say; empty for none): a collective that timed out says so (status 2); one whose
    other end went away (another process died first) says nothing (:data:`PEER_LOST_STATUS`: the
    launcher names the process that died). None for any other failure (a collective's own error
    included: it keeps its traceback), or outside a launcher."""
    if not launched():
        return None
    seen: BaseException | None = err
    while seen is not None:
        text = str(seen).lower()
        collective = isinstance(seen, dist.DistError) or "gloo" in text or "nccl" in text
        if collective and ("timed out" in text or "timeout" in text):
            return 2, (
                f"rank {rank()}: a collective waited longer than collective_timeout_minutes for another process "
                "(stopped or hung); the job stopped. Resume with --resume, with --set collective_timeout_minutes=M "
                "for a longer wait."
            )
        if isinstance(seen, dist.DistNetworkError) or any(marker in text for marker in _LOST_PEER):
            return PEER_LOST_STATUS, ""
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def said_once_per_node() -> Iterator[None]:
    """For work before the process group is joined, which every process of a node does alike (the
    same command on the same files): a :class:`UserError` is said by the node's first process
    (``LOCAL_RANK`` 0) alone; the others raise :class:`FailedOnAnotherRank`."""
    try:
        yield
    except FailedOnAnotherRank:
        raise
    except UserError as err:
        if launched() and local_rank() != 0:
            raise FailedOnAnotherRank(str(err)) from err
        raise


def main_rank_only(handlers: Sequence[Any]) -> list:
    """``handlers`` of an engine, less those that write files or print (a class attribute
    ``main_rank_only``, or MONAI's TensorBoard, stats and checkpoint writers) on every rank
    but the main one."""
    if is_main():
        return list(handlers)
    from monai.handlers import CheckpointSaver, StatsHandler
    from monai.handlers.tensorboard_handlers import TensorBoardHandler

    writers = (CheckpointSaver, StatsHandler, TensorBoardHandler)
    return [h for h in handlers if not (getattr(h, "main_rank_only", False) or isinstance(h, writers))]


class _NoSummaryWriter:
    """A SummaryWriter that writes nothing: the TensorBoard events of the ranks other than 0."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def summary_writer(log_dir: str, **kwargs: Any):
    """A TensorBoard ``SummaryWriter`` of ``log_dir`` on the main rank; one that writes nothing on
    the others (the handlers given it are built on every rank before :func:`main_rank_only`
    drops them, and MONAI's would open a writer of their own when given none)."""
    if not is_main():
        return _NoSummaryWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir, **kwargs)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of ``module``'s state dict (names, dtypes, shapes and values, on the CPU): equal on
    every rank of a data-parallel run whose processes stayed in step."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def threads_per_process(nproc: int, cores: int | None = None) -> int:
    """The CPU threads each of ``nproc`` processes of one node gets: the cores shared, at least 1."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // max(1, nproc))


def _quiet_launcher() -> contextlib.AbstractContextManager:
    """torch's launcher logs its rendezvous, the workers it signals and a report of the failure;
    the command says the one line that matters instead."""
    return logger_level("torch.distributed.elastic", logging.CRITICAL)


def launch(nproc: int, args: list[str], module: str = "medfcn") -> None:
    """Run ``python -m {module} {args}`` in ``nproc`` processes on this node through torch's own
    launcher (as ``torchrun --standalone --nproc-per-node N -m medfcn ...``), each with an equal
    share of the CPU threads unless ``OMP_NUM_THREADS`` is set.

    Raises:
        UserError: ``nproc`` below 1.
        SystemExit: a process failed: exit 2 where it said why itself (a user error), else a
            one-line message naming the rank and how it ended, and its exit status.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise UserError(f"--nproc-per-node {nproc}: give 1 or more processes.")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    os.environ[LAUNCHED_ENV] = "1"
    launcher_args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", module, *args])
    try:
        with _quiet_launcher():
            run(launcher_args)
    except ChildFailedError as err:
        raise SystemExit(_failure_status(err)) from None
    except SignalException as err:  # the launcher was stopped (Ctrl-C, kill): it stopped the processes
        name = signal.Signals(err.sigval).name
        print(f"medfcn: terminated ({name}); the processes were stopped.", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(err.sigval)) from None


def _failure_status(err) -> int:
    """The exit status of a job one of whose processes failed, after saying in one line which and
    how, unless it said so itself (:data:`_SAID_WHY`: a user error or a collective that timed out,
    scans that failed).
    The process that failed is the first of those the failure of another did not stop: the
    launcher stops the others with SIGTERM, and a collective that lost its other end ends a
    process with :data:`PEER_LOST_STATUS`."""
    failures = err.failures  # rank -> ProcessFailure; the timestamps count whole seconds
    stopped = (PEER_LOST_STATUS, -signal.SIGTERM, 128 + signal.SIGTERM)
    first = sorted((f.exitcode in stopped, f.timestamp, r) for r, f in failures.items())
    if first[0][0] and failures[first[0][2]].exitcode == PEER_LOST_STATUS:
        print("medfcn: error: the processes lost contact with each other; the job stopped.", file=sys.stderr)
        return PEER_LOST_STATUS
    failed_rank = first[0][2]
    code = failures[failed_rank].exitcode
    if code in _SAID_WHY:
        return code
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how, status = f"was killed by {name}", 128 - code
    else:
        how, status = f"exited with status {code}", code
    print(f"medfcn: error: rank {failed_rank} {how}; the other processes were stopped.", file=sys.stderr, flush=True)
    return status
