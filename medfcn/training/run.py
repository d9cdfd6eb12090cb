"""The last stage, and the entry point: :func:`train` resolves the settings, runs the pre-flight
checks, then runs the config's ``initialize``/``run``/``finalize`` expressions with the one
parser the checks used, as ``python -m monai.bundle run`` would (MONAI's ``ConfigWorkflow``
would parse the config again and drop the network already built).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import logging.config
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointLoader

from medfcn import distributed
from medfcn.bundle import MULTI_GPU_FILE, RUN_FILE, bundle_files
from medfcn.data.profile import RUN_PROFILE, write_run_profile
from medfcn.errors import UserError
from medfcn.inferers import cpu_bf16_supported
from medfcn.io import refuse_full_disk
from medfcn.notices import engine_exception_echo_dropped, quiet_library_notices
from medfcn.outputs import output_lock, plural
from medfcn.settings import check_bundle_json
from medfcn.training.handlers import Resume
from medfcn.training.labels import dataset_labels
from medfcn.training.preflight import Preflight, preflight
from medfcn.training.settings import RunSettings, resolve_settings, write_run_record
from medfcn.training.split import SPLIT_FILE, run_made_split, write_split

__all__ = ["train"]


def train(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    fold: int | None = None,
    epochs: int | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    folds_file: str | os.PathLike | None = None,
    device: str | None = None,
    option_names: Mapping[str, str] | None = None,
    notify: Callable[[str], None] = print,
    cache: str | None = None,
) -> Path:
    """Train with ``bundle/configs/train.json``; return the run's output folder.

    Args:
        bundle: the bundle folder.
        dataset_dir: folder with the MSD ``dataset.json``; default: the config's
            (``$MEDFCN_DATA/Task04_Hippocampus`` for the hippocampus bundle).
        fold: validation fold of the bundle's split (``-1``: train on all cases).
        epochs: number of epochs (total, counting epochs done before a resume).
        output_dir: where checkpoints (``last.pt``, ``best_model.pt``) and TensorBoard
            events go; default: the config's.
        resume: continue from ``output_dir/last.pt``: weights, optimizer, scheduler, epoch,
            and the data, split and overrides the run started with (``output_dir/medfcn_run.json``).
        overrides: more config entries to override, e.g. ``{"batch_size": 4}``; transfer
            learning: ``{"pretrained_encoder": "runs/a/best_model.pt", "freeze_encoder": True}``.
        folds_file: the fold split (``medfcn folds`` writes one); default: the config's.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: the config's (CUDA when
            present). Not part of the run's settings: a resume computes where its own
            ``device`` (or the default) says, on this machine or another. Not accepted in
            ``overrides``, where it would escape the check.
        option_names: how the caller spells the settings in messages, config key -> option
            (the CLI: ``{"epochs": "--epochs", "dataset_dir": "--data", ...}``); default:
            ``--set KEY``, the config's own names.
        cache: where the preprocessed cases are kept, ``"ram"``, ``"disk"`` (files under
            ``output_dir/cache``) or ``"none"`` (:mod:`medfcn.data.cache`); default: the
            config's. A resume may change it.
        notify: called with each line that tells what the run decided for the user, once the
            checks have passed: the classes and modality taken from ``dataset.json``, the split
            made in the run folder (``split: 5 folds of 80 cases of DIR written to
            RUN/folds.json (...); training fold 0``); default: printed, as the epochs are.

    Raises:
        UserError: missing data or split (a given one; the bundle's is replaced by one made
            for the run, but not for a dataset of one case), labels in ``dataset.json`` that are
            not 0..N with 0 the background, unknown fold or config entry, a device this machine
            lacks (or one given as an override), a patch or class list the network cannot
            train on, nothing to resume, a resume with other settings, or an output folder
            that already holds a run (resume it or choose another folder).
    """
    options = {"dataset_dir": dataset_dir, "folds_file": folds_file, "fold": fold, "epochs": epochs, "cache": cache}
    options["output_dir"] = output_dir
    with distributed.said_once_per_node():  # every process of a node reads the same files here
        files = training_files(bundle)
        device = distributed.process_device(device)
        run = resolve_settings(files, options, overrides or {}, device, resume, option_names)
    with _process_group(run):
        # before the network is built: out_channels follows num_classes
        labels, checked = distributed.agreed(lambda: (dataset_labels(run), preflight(run)))
        logging_file = files["logging_file"] if files["logging_file"].is_file() else None
        out = Path(run.get("output_dir"))
        main = distributed.is_main()
        try:
            # two trainers would interleave last.pt; the processes of one run write through rank 0 alone
            with output_lock(out, "medfcn train", "--output") if main else contextlib.nullcontext():
                notices = _notices(run, labels) if main else []
                _run(run, checked, logging_file, notices, notify if main else _silent)
        finally:
            if distributed.launched():
                _release_built_objects(run)
    return out


def _release_built_objects(run: RunSettings) -> None:
    """Drop what the run's config built (network, DDP wrapper, engines) and collect it now. The
    DDP model holds the gloo backend, whose worker threads must be joined while the interpreter
    is whole: released at its shutdown instead, their last tensors can abort the process
    ("terminate called without an active exception", seen on a rank of a 2-process run)."""
    run.parser.ref_resolver.reset()
    gc.collect()


def _notices(run: RunSettings, labels: str) -> list[str]:
    """The lines that tell what the run decided (empty ones are not said)."""
    notices = [_processes_notice(run), labels, planned_device_notice(run), _precision_notice(run)]
    return [*notices, _cache_notice(run), *run.notices]


def training_files(bundle: str | os.PathLike) -> dict[str, Any]:
    """:func:`~medfcn.bundle.bundle_files` of the bundle's ``train.json``, with its
    ``configs/multi_gpu_train.json`` merged last in a process of several (torchrun).

    Raises:
        UserError: as ``bundle_files``; a bundle without ``multi_gpu_train.json`` in a process of several.
    """
    files = bundle_files(bundle, "train.json")
    if not distributed.launched():
        return files
    multi = Path(bundle) / "configs" / MULTI_GPU_FILE
    if not multi.is_file():
        raise UserError(
            f"{multi}: missing, so this bundle trains in one process only (it predates multi-process training); "
            "train without torchrun or --nproc-per-node, or plan or package the bundle again."
        )
    files["config_files"] = [*files["config_files"], multi]
    check_bundle_json(files["config_files"], files["meta_file"])
    return files


def _process_group(run: RunSettings) -> contextlib.AbstractContextManager:
    """:func:`medfcn.distributed.process_group` on the run's ``device``, with its
    ``collective_timeout_minutes`` (in a process of several)."""
    if not distributed.launched():
        return contextlib.nullcontext()
    return distributed.process_group(run.get("device"), run.get("collective_timeout_minutes"))


def _processes_notice(run: RunSettings) -> str:
    """``processes: ...`` in a process of several: how many, on which devices, and the
    effective batch (every process trains on ``batch_size`` patches a step; the gradients are
    averaged); empty otherwise."""
    n = distributed.world_size()
    if n == 1:
        return ""
    batch = int(run.get("batch_size"))
    device = torch.device(run.get("device"))
    where = "one GPU each" if device.type == "cuda" else f"cpu, {plural(torch.get_num_threads(), 'thread')} each"
    return (
        f"processes: {n} ({where}); effective batch {n} x {batch} = {n * batch} patches per step, at the configured "
        f"learning rate {run.get('learning_rate')} ({run.option('learning_rate')} changes it)"
    )


def _silent(line: str) -> None:
    """Where the lines of the ranks other than 0 go: nowhere (rank 0 says them)."""


def planned_device_notice(run: RunSettings) -> str:
    """``device: ...`` where the run's bundle was planned (its ``configs/plan.json``) on another
    kind of device than the run's (CUDA, CPU): its epochs were fitted to the time budget there,
    so the run lasts longer or shorter; empty otherwise (no plan, the same kind)."""
    plan_file = Path(run.get("bundle_root")) / "configs" / "plan.json"
    try:
        planned = torch.device(str(json.loads(plan_file.read_text(encoding="utf-8"))["device"])).type
        device = torch.device(run.parser.get_parsed_content("device", default="cpu")).type
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):  # no plan, or none that says
        return ""
    if planned == device:
        return ""
    return (
        f"device: the bundle's epochs were planned for {planned} ({plan_file}); this run trains on {device}, "
        "so its duration will differ from the plan's"
    )


def _precision_notice(run: RunSettings) -> str:
    """:func:`precision_notice` for the run's ``device`` and ``bf16`` entries."""
    device = run.parser.get_parsed_content("device", default="cpu")
    return precision_notice(torch.device(device).type, bool(run.parser.get_parsed_content("bf16", default=False)))


def _cache_notice(run: RunSettings) -> str:
    """:func:`cache_notice` for the run's ``cache`` and ``num_workers`` (none: a bundle without the setting)."""
    if "cache" not in run.parser:
        return ""
    return cache_notice(run.get("cache"), int(run.get("num_workers")), run.option("num_workers"))


def cache_notice(cache: str, num_workers: int, workers_option: str = "--set num_workers") -> str:
    """``cache: ...`` where nothing is cached (``none``) and no worker process loads the cases:
    each one is then read and preprocessed in the training process, between steps; empty otherwise."""
    if cache != "none" or num_workers > 0:
        return ""
    return (
        "cache: none with no worker process: every case is read and preprocessed between training steps; "
        f"{workers_option}=N does it in N processes beside the training"
    )


def precision_notice(device_type: str, bf16: bool) -> str:
    """``precision: ...`` where the bundle asks for bf16 autocast (``bf16``) on a CPU that has
    no native bfloat16 (no AVX-512 BF16 or AMX): the run computes in float32 (emulated bfloat16
    is slower still), slower than on a CPU that has it, where a shipped bundle's epochs may have
    been planned; empty otherwise."""
    if not bf16 or device_type != "cpu" or cpu_bf16_supported():
        return ""
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"precision: bf16 is set, but this CPU ({capability}) has no native bfloat16 (AVX-512 BF16 or AMX): "
        "training in float32"
    )


def _run(
    run: RunSettings, checked: Preflight, logging_file: Path | None, notices: list, notify: Callable[[str], None]
) -> None:
    """Run the config's expressions; a new run that fails leaves nothing to resume behind."""
    out = Path(run.get("output_dir"))
    if logging_file is not None:  # as MONAI's runner sets up logging
        logging.config.fileConfig(str(logging_file), disable_existing_loggers=False)
    if not distributed.is_main():  # rank 0 says what the run does; the others, only their failure
        logging.getLogger().setLevel(logging.ERROR)
    main = distributed.is_main()
    try:
        with refuse_full_disk(out), _run_scope(run.get("bundle_root")):  # checkpoints, records, TensorBoard
            if checked.checkpoint is not None:
                distributed.agreed(lambda: _hand_over_checkpoint(run, checked.checkpoint))
            # rank 0 writes the run folder's files (the split the others read too) before any rank starts
            distributed.agreed(lambda: _prepare_run_folder(run, checked, notices, notify) if main else None)
            _evaluate(run, "run")
            _evaluate(run, "finalize")
    except BaseException:
        if not run.resume and main:
            _forget_failed_run(out, made_split=checked.split is not None and checked.split.written)
        raise


def _prepare_run_folder(run: RunSettings, checked: Preflight, notices: list, notify: Callable[[str], None]) -> None:
    """Write the split the run made, say the run's notices, write its record and profile."""
    if checked.split is not None:
        write_split(checked.split)
        notices = [*notices, checked.split.notice(run.get("dataset_dir"), run.get("fold"))]
    for line in filter(None, notices):
        notify(line)
    made = checked.split is not None or (run.resume and run_made_split(run))
    write_run_record(run, made)  # after the set-up: a resume failing there keeps its record
    _write_profile(run, checked.train_cases)


def _evaluate(run: RunSettings, key: str) -> None:
    """Evaluate the config's expression list ``key`` (``run``, ``finalize``), if present.
    (``initialize``, the seeding, ran before the network was built: see preflight.)"""
    if key in run.parser:
        run.get(key)


def _hand_over_checkpoint(run: RunSettings, checkpoint: dict) -> None:
    """Give the config's :class:`~medfcn.training.handlers.Resume` handler the ``last.pt`` the
    checks read, so the file is read once (another ``CheckpointLoader`` reads it itself).

    Raises:
        UserError: the config's ``train#handlers`` load no checkpoint: the run would start again
            at epoch 1 over ``last.pt`` instead of continuing it."""
    handlers = run.get("train#handlers") if "train#handlers" in run.parser else []
    loaders = [h for h in handlers if isinstance(h, CheckpointLoader)]
    if not loaders:
        raise UserError(
            f"{run.config_file}: train#handlers has no medfcn.training.handlers.Resume (or CheckpointLoader) "
            "to continue last.pt; add one as the bundle's train.json does, or start a new run with another --output."
        )
    for handler in loaders:
        if isinstance(handler, Resume):
            handler.checkpoint = checkpoint


_ENGINE_LOGGERS = [f"ignite.engine.engine.{name}" for name in ("SupervisedTrainer", "SupervisedEvaluator")]


@contextlib.contextmanager
def _run_scope(bundle_root: str) -> Iterator[None]:
    """For the length of the run: ignite's echo of the exception that ends it dropped, the library
    notices a user can do nothing about silenced (:func:`medfcn.notices.quiet_library_notices`:
    the deprecation of the AMP scaler MONAI's trainer uses, ...), and the bundle folder
    importable (its ``scripts``), as in ``python -m monai.bundle run``."""
    sys.path.insert(1, str(bundle_root))
    try:
        with engine_exception_echo_dropped(_ENGINE_LOGGERS), quiet_library_notices():
            yield
    finally:
        with contextlib.suppress(ValueError):  # the entry inserted above, not an earlier one
            del sys.path[sys.path.index(str(bundle_root), 1)]


def _write_profile(run: RunSettings, cases: list[dict]) -> None:
    """Record the profile of the cases the run trains on (``max_cases`` applied, as the config's
    datalists do) for ``medfcn package``; a new run replaces one a failed run left behind."""
    max_cases = run.parser.get_parsed_content("max_cases", default=None)
    trained = cases[:max_cases] if max_cases else cases
    source = f"training cases of fold {run.get('fold')} of {run.get('folds_file')}, {run.get('dataset_dir')}"
    write_run_profile(run.get("output_dir"), trained, run.get("class_names"), source, replace=not run.resume)


def _forget_failed_run(out: Path, made_split: bool) -> None:
    """A new run that failed before its first checkpoint has nothing to resume or package:
    remove its record (RUN_FILE), training-data profile and the split it made (the output folder
    itself goes when :func:`medfcn.outputs.output_lock` created it and it is left empty)."""
    if (out / "last.pt").exists():
        return
    for name in (RUN_FILE, RUN_PROFILE, *([SPLIT_FILE] if made_split else [])):
        (out / name).unlink(missing_ok=True)
