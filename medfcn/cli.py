"""The ``medfcn`` command: a thin Typer layer over :mod:`medfcn.training` and friends.

User mistakes (:class:`medfcn.errors.UserError`) print one line ``medfcn: error: ...`` and exit
with code 2; ``--debug`` (or ``MEDFCN_DEBUG=1``) shows the full traceback instead. Anything else
is a bug and keeps its traceback. A doubtful input that is still processed
(:class:`medfcn.errors.InputWarning`) prints one line ``medfcn: warning: ...``.

Each command imports what it runs (torch, MONAI, nibabel) inside its function: ``medfcn --help``
and every ``medfcn COMMAND --help`` load none of them and answer at once.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, get_args

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from medfcn.errors import PEER_LOST_STATUS, FailedOnAnotherRank, InputWarning, UserError, find_user_error
from medfcn.notices import quiet_library_notices
from medfcn.outputs import exit_on_sigterm, path_text, plural

# The commands in the order of a project's work, as `medfcn --help` lists them.
WORKFLOW = ("plan", "folds", "train", "package", "infer", "report", "evaluate", "export")


def _untyped_flags(params: list) -> list:
    """``params`` with every flag (``--resume``, ``--help``) shown without a type: it takes no
    value, and Typer's help would print ``<bool>`` after it."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


def reflow(text: str) -> str:
    """``text`` with each paragraph (blocks between blank lines) on one line, for the terminal to
    wrap at its own width."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.strip().split("\n\n"))


class _Group(TyperGroup):
    """``medfcn``: its commands listed in :data:`WORKFLOW` order, its flags without ``<bool>``."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(super().list_commands(ctx), key=lambda n: WORKFLOW.index(n) if n in WORKFLOW else len(WORKFLOW))

    def get_params(self, ctx) -> list:
        return _untyped_flags(super().get_params(ctx))


class _ItemsArgument(TyperArgument):
    """An argument taking one value or more (``INPUTS...``), typed in the help by its items:
    ``<path>``, not Typer's ``<list[Path]>``."""

    def display_type_rich(self, ctx) -> str | None:
        (item,) = get_args(self.type_descriptor.annotation)  # list[Path] -> Path
        return f"<{item.__name__.lower()}>"


class _Command(TyperCommand):
    """A command whose help reads as what to type: ``medfcn infer [OPTIONS] BUNDLE INPUTS...``
    (Typer writes ``{bundle} {inputs}...``), flags without ``<bool>``, items' types."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.help:  # Typer keeps a docstring's line breaks and rich wraps again: ragged at 80 columns
            self.help = reflow(self.help)
        for param in self.params:  # Typer makes the parameters itself: no way to choose their class
            if isinstance(param, TyperArgument) and param.nargs != 1:
                param.__class__ = _ItemsArgument

    def get_params(self, ctx) -> list:
        return _untyped_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.name.upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


app = typer.Typer(
    name="medfcn",
    cls=_Group,
    help="Medical image segmentation with fully convolutional networks (MONAI bundles).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def _user_errors(command):
    """Run ``command``; a user error becomes one line on stderr and exit code 2, and an
    :class:`~medfcn.errors.InputWarning` one line ``medfcn: warning: ...``."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with quiet_library_notices(), warnings.catch_warnings():
                warnings.simplefilter("always", InputWarning)  # one per input, also for repeats
                other = warnings.showwarning

                def show(message, category, *rest, **kw):
                    if issubclass(category, InputWarning):
                        typer.echo(f"medfcn: warning: {path_text(str(message))}", err=True)
                    else:  # library warnings keep their usual form
                        other(message, category, *rest, **kw)

                warnings.showwarning = show
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:
            user_error = find_user_error(err)
            if _state["debug"]:
                raise
            if user_error is None:
                _end_process_of_several(err)
                raise
            if isinstance(user_error, FailedOnAnotherRank):  # another process of the job says why
                _outlive_the_process_that_says_why()
                raise typer.Exit(PEER_LOST_STATUS) from None
            typer.echo(f"medfcn: error: {path_text(str(user_error))}", err=True)  # \xNN for non-UTF-8 names
            raise typer.Exit(2) from None

    return wrapper


# How long a process of several that fails because another one did waits before it exits: the
# launcher stops it as soon as the one that says why has exited, seconds at most
_QUIET_EXIT_GRACE_S = 60.0


def _outlive_the_process_that_says_why() -> None:
    """Wait a moment before exiting quietly: the launcher stops every process once one exits
    with an error, and the one that says why must be the first (its status is the job's). The
    launcher's SIGTERM then ends this one silently."""
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(_QUIET_EXIT_GRACE_S)


def _end_process_of_several(err: Exception) -> None:
    """In a process of several (torchrun), a failure caused by a collective (another process
    died, or one hung past the timeout) ends it with one line or none
    (:func:`medfcn.distributed.collective_failure`), not a traceback; others are left to raise."""
    if "torch.distributed" not in sys.modules:  # nothing distributed ran
        return
    from medfcn.distributed import collective_failure

    ended = collective_failure(err)
    if ended is None:
        return
    status, line = ended
    if line:
        typer.echo(f"medfcn: error: {line}", err=True)
    raise typer.Exit(status) from None


def version() -> str:
    """medfcn's version: the installed package's, else (a source tree on the path, not
    installed) ``medfcn.__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("medfcn")
    except PackageNotFoundError:
        from medfcn import __version__

        return __version__


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"medfcn {version()}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks, also for user errors.")] = False,
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train FCNs from MONAI bundles, run them on scans, evaluate masks."""
    _state["debug"] = debug or os.environ.get("MEDFCN_DEBUG", "") not in ("", "0")


def _parse_overrides(pairs: list[str], option: str = "--set") -> dict:
    """``["batch_size=4", "network_def#fusion=concat"]`` -> config overrides (JSON values).

    ``option`` names the command-line option in the error message; a value that starts like
    JSON but is none (``[40,56``) is a user error (:func:`medfcn.settings.parse_value`)."""
    from medfcn.settings import parse_value

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{option} takes KEY=VALUE, got {pair!r}.")
        out[key] = parse_value(key, value, option)
    return out


# How `medfcn train` spells the settings it takes as options (config key -> flag), for the
# library's messages ("--epochs 0: must be ...", "this run started with --data ...").
TRAIN_OPTION_NAMES = {
    "dataset_dir": "--data",
    "fold": "--fold",
    "folds_file": "--folds",
    "epochs": "--epochs",
    "pretrained_encoder": "--encoder",
    "freeze_encoder": "--freeze-encoder",
    "output_dir": "--output",
    "cache": "--cache",
}


# `medfcn train`'s options, declared apart so that its signature reads as the list of them
_TrainData = Annotated[
    Path | None,
    typer.Option("--data", help="Dataset folder with an MSD dataset.json.", show_default="$MEDFCN_DATA/<task>"),
]
_TrainFold = Annotated[
    int | None,
    typer.Option(help="Validation fold of the bundle's split (-1: all cases).", show_default="the bundle's fold"),
]
_TrainFolds = Annotated[
    Path | None,
    typer.Option(
        "--folds",
        help="Fold split JSON for --data (`medfcn folds` writes one).",
        show_default="the bundle's; where it names other cases, a 5-fold split of --data made in --output",
    ),
]
_TrainEpochs = Annotated[int | None, typer.Option(help="Number of epochs.", show_default="the bundle's epochs")]
_TrainOutput = Annotated[Path | None, typer.Option("--output", help="Run folder: checkpoints and TensorBoard events.")]
_TrainResume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue the run in --output from last.pt, with the data and --set it started with."
    ),
]
_TrainEncoder = Annotated[
    Path | None, typer.Option("--encoder", help="Initialise the encoder from this FCN checkpoint.")
]
_TrainFreezeEncoder = Annotated[
    bool, typer.Option("--freeze-encoder", help="Keep the encoder fixed; only the decoder trains.")
]
_TrainCache = Annotated[
    str | None,
    typer.Option(
        "--cache",
        help="ram: preprocessed cases in memory; disk: in files under RUN/cache (memory stays flat, a resume "
        "reuses them); none: read each time (set num_workers).",
        show_default="the bundle's, ram",
    ),
]
_TrainSet = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="<key=value>", help="Override a config entry, KEY=VALUE (JSON), repeatable."),
]
_TrainDevice = Annotated[
    str | None,
    typer.Option(help="cpu, cuda, cuda:1, mps...; a resume may change it.", show_default="CUDA if present"),
]
_Processes = Annotated[
    int | None,
    typer.Option(
        "--nproc-per-node",
        help="Run in N processes on this machine (one GPU each, or an equal share of the CPU threads), started "
        "by torch's launcher as torchrun does; for several machines use torchrun (docs/multi-gpu.md).",
        show_default="1",
    ),
]


@app.command(cls=_Command)
@_user_errors
def train(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder, e.g. bundles/hippocampus_fcn.")],
    data: _TrainData = None,
    fold: _TrainFold = None,
    folds: _TrainFolds = None,
    epochs: _TrainEpochs = None,
    output: _TrainOutput = None,
    resume: _TrainResume = False,
    encoder: _TrainEncoder = None,
    freeze_encoder: _TrainFreezeEncoder = False,
    cache: _TrainCache = None,
    set_: _TrainSet = None,
    device: _TrainDevice = None,
    nproc_per_node: _Processes = None,
    *,
    ctx: typer.Context,
) -> None:
    """Train the bundle's network (its configs/train.json) on an MSD-style dataset.

    Classes and modality follow --data's dataset.json where they differ from the bundle's (unless --set gives
    them); a dataset the bundle's split does not fit gets a 5-fold split in the output folder. Both are said in
    one line and recorded for --resume and `medfcn package`.

    Prints one line per epoch (loss, validation Dice, speed, ETA); writes last.pt (to resume),
    best_model.pt (the moving-average weights of the best validation) and TensorBoard events to the output folder:
    `tensorboard --logdir OUTPUT`.
    """
    from medfcn import distributed
    from medfcn.training import best_validation
    from medfcn.training import train as run_training

    overrides = _parse_overrides(set_ or [])  # in the process that starts the others too: said once
    if nproc_per_node is not None:
        _start_processes(ctx, nproc_per_node)
        return
    out = run_training(
        bundle,
        dataset_dir=data,
        fold=fold,
        folds_file=folds,
        epochs=epochs,
        output_dir=output,
        resume=resume,
        device=device,
        overrides={
            **overrides,
            **({"pretrained_encoder": str(encoder)} if encoder else {}),
            **({"freeze_encoder": True} if freeze_encoder else {}),
        },
        option_names=TRAIN_OPTION_NAMES,
        notify=typer.echo,
        cache=cache,
    )
    if not distributed.is_main():  # rank 0 says it
        return
    typer.echo(f"done: checkpoints and TensorBoard events in {out}")
    best = best_validation(out)
    if best is not None:
        classes = "".join(f", {name} {dice:.4f}" for name, dice in best.per_class.items())
        typer.echo(f"best validation Dice: mean {best.mean:.4f}{classes} (epoch {best.epoch})")
    typer.echo(f"next: medfcn package {out} --out <bundle>")


def _start_processes(ctx: typer.Context, nproc: int) -> None:
    """Run the command of ``ctx`` again, as given but for ``--nproc-per-node``, in ``nproc``
    processes started by torch's launcher (:func:`medfcn.distributed.launch`)."""
    from medfcn import distributed

    if distributed.launched():
        raise UserError("--nproc-per-node: this process is already one of several (torchrun); give one or the other.")
    distributed.launch(nproc, [*(["--debug"] if _state["debug"] else []), *command_line(ctx, drop="nproc_per_node")])


def command_line(ctx: typer.Context, drop: str = "") -> list[str]:
    """The arguments of ``ctx``'s command as the command line gave them (the command's name, the
    options given, not the defaults, as ``--opt=value``, then ``--`` and its arguments, so that an
    input named like an option stays an input), less the option named ``drop``."""
    options, arguments = [], []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name == drop or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if param.param_type_name == "argument":
            arguments += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            options += [f"{param.opts[0]}={v}" for v in values]
    return [ctx.info_name, *options, "--", *arguments]


# `medfcn plan`'s options, declared apart so that its signature reads as the list of them
_PlanBudget = Annotated[float, typer.Option("--budget-minutes", help="Training time to plan for on --device, minutes.")]
_PlanDevice = Annotated[
    str | None,
    typer.Option(
        help="cpu, cuda, cuda:1, mps...: where the probe times training steps.", show_default="CUDA if present"
    ),
]
_PlanDims = Annotated[
    int | None, typer.Option("--dims", help="2 or 3: force a 2D or 3D network.", show_default="chosen from the data")
]


@app.command(cls=_Command)
@_user_errors
def plan(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder with an MSD dataset.json, imagesTr, labelsTr.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to create, e.g. bundles/left_atrium_fcn.")],
    budget_minutes: _PlanBudget = 60.0,
    device: _PlanDevice = None,
    dims: _PlanDims = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle folder.")] = False,
) -> None:
    """Configure a bundle from a dataset and the training time you have on this machine.

    Reads every case once (the fingerprint), decides the voxel size, normalisation, 2D or 3D, patch,
    network and pooling per axis, and, from a short timed probe of training steps on --device, the batch
    size and epochs that fit --budget-minutes. Writes a bundle that `medfcn train` takes; its
    docs/README.md says why each choice was made.
    """
    import json

    from medfcn.planning.run import plan_bundle

    bundle = plan_bundle(
        dataset, out, budget_minutes=budget_minutes, device=device, dims=dims, overwrite=overwrite, progress=typer.echo
    )
    decided = json.loads((bundle / "configs" / "plan.json").read_text())
    for line in plan_summary(decided):
        typer.echo(line)
    typer.echo(f"wrote bundle {bundle}; next: medfcn train {bundle} --data {dataset}")


def plan_summary(decided: dict) -> list[str]:
    """The key decisions of a plan (``configs/plan.json``), in a few lines."""
    return [
        f"spacing {decided['pixdim']} mm, {decided['dims']}D, patch {decided['patch_size']} voxels",
        f"network: features {decided['features']}, pooling per scale {decided['strides']}, "
        f"deep supervision {decided['deep_supervision']}",
        f"batch {decided['batch_size']}, {plural(decided['epochs'], 'epoch')}: planned "
        f"{plural(decided['planned_minutes'], 'minute', '.1f')} of training for a budget of "
        f"{decided['budget_minutes']:g} on {decided['device']}",
    ]


@app.command(cls=_Command)
@_user_errors
def package(
    run: Annotated[Path, typer.Argument(help="A `medfcn train` output folder (medfcn_run.json, best_model.pt).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to create, e.g. bundles/spleen_fcn.")],
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="The bundle the run trained (default: as recorded in the run).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="best (best validation epoch) or last (last epoch); moving averages. Default: best, or last "
            "for a --fold -1 run (its validation cases were trained on).",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle folder.")] = False,
) -> None:
    """Make a MONAI bundle of a training run: its options in the configs, its weights in models/model.pt.

    The new bundle runs with `medfcn infer OUT ...` and `python -m monai.bundle run`, and retrains the same
    recipe with `medfcn train OUT`.
    """
    from medfcn.package import package_run

    path = package_run(run, out, bundle=bundle, weights=weights, overwrite=overwrite)
    typer.echo(f"wrote bundle {path}: `medfcn infer {path} SCANS --out MASKS`")


@app.command(cls=_Command)
@_user_errors
def folds(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder with an MSD dataset.json.")],
    out: Annotated[Path, typer.Option("--out", help="JSON file to write, e.g. datasets/<Task>/folds.json.")],
    n_folds: Annotated[int, typer.Option(help="Number of folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Shuffle seed.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Write a deterministic k-fold split of an MSD dataset (case names only, no images)."""
    from medfcn.data.datasets import write_folds

    split = write_folds(dataset, out, n_folds=n_folds, seed=seed, overwrite=overwrite)
    sizes = ", ".join(str(len(f)) for f in split["folds"])
    typer.echo(f"wrote {out}: {n_folds} folds of {sizes} cases")


# `medfcn infer`'s longer options, declared apart so that its signature reads as the list of them
_InferTta = Annotated[
    bool,
    typer.Option("--tta", help="Average with input flipped as the model trained (3D bundle: left-right, 2x time)."),
]
_InferMaskFormat = Annotated[
    str, typer.Option(help="nifti (<case>.nii.gz), nrrd, mha, or input: NRRD/MetaImage scans keep their format.")
]
_InferUncertainty = Annotated[
    bool,
    typer.Option(
        "--uncertainty",
        help="Also write <case>_uncertainty.nii.gz (entropy of the class probabilities, 0..1) and an uncertainty "
        "score per scan in volumes.csv. With --tta the flips' softmax are averaged (not their logits), and the "
        "mask is the argmax of that mean.",
    ),
]
_InferProbabilities = Annotated[
    bool,
    typer.Option(
        "--probabilities",
        help="Also write <case>_probabilities.nii.gz: the class probabilities, 4D, channel last (with --tta: as "
        "--uncertainty averages them).",
    ),
]
_InferLargestComponent = Annotated[
    bool,
    typer.Option("--largest-component", help="Keep only the largest connected component of each label."),
]
_InferDicomSeg = Annotated[
    bool,
    typer.Option(
        "--dicom-seg",
        help="Also write <case>_seg.dcm, a DICOM Segmentation of each DICOM series input (needs the dicom extra: "
        "pip install -e '.[dicom]').",
    ),
]
_InferBackend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="torch, or onnxruntime: run the bundle's models/model.onnx (medfcn export --format onnx) on the CPU.",
    ),
]
_InferModels = Annotated[
    list[Path] | None,
    typer.Option(
        "--models",
        metavar="<path>",
        help="Another bundle to ensemble with BUNDLE (repeat for more): the mask is the argmax of their mean class "
        "probabilities on the scan's grid, --uncertainty the entropy of that mean. Same class names needed.",
        show_default=False,
    ),
]
_InferReport = Annotated[
    bool,
    typer.Option("--report", help="Also write report.html: a QC page of every scan, flagged ones first."),
]
_InferContinueOnError = Annotated[
    bool,
    typer.Option(
        "--continue-on-error",
        help="List a bad scan in failures.csv and segment the others (exit code 3 if any failed).",
    ),
]


@app.command(cls=_Command)
@_user_errors
def infer(
    bundle: Annotated[
        Path, typer.Argument(help="Bundle folder: configs/common.json, inference.json, models/model.pt.")
    ],
    inputs: Annotated[list[Path], typer.Argument(help="NIfTI, NRRD, MetaImage files or folders; DICOM series.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for masks and volumes.csv/json.")],
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, mps...", show_default="CUDA if present")
    ] = None,
    sw_batch_size: Annotated[
        int | None, typer.Option(help="Sliding-window batch size.", show_default="the bundle's sw_batch_size")
    ] = None,
    overlap: Annotated[
        float | None, typer.Option(help="Sliding-window overlap, 0..1.", show_default="the bundle's overlap")
    ] = None,
    tta: _InferTta = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing masks and volume tables.")] = False,
    mask_format: _InferMaskFormat = "nifti",
    continue_on_error: _InferContinueOnError = False,
    uncertainty: _InferUncertainty = False,
    probabilities: _InferProbabilities = False,
    largest_component: _InferLargestComponent = False,
    dicom_seg: _InferDicomSeg = False,
    report: _InferReport = False,
    backend: _InferBackend = "torch",
    models: _InferModels = None,
    nproc_per_node: _Processes = None,
    *,
    ctx: typer.Context,
) -> None:
    """Segment scans with a bundle; one uint8 mask per scan in the scan's own geometry.

    Inputs: NIfTI, NRRD, MetaImage files, folders of them, DICOM series folders. Masks are named
    after the input (file name or DICOM folder name) and overlay the scan in 3D Slicer or
    ITK-SNAP as they are. Also writes the volume of each label in mm3. Exit code 0: all scans
    segmented; 2: an error, nothing written; 3 (--continue-on-error): some scans failed, listed
    in failures.csv, the others written.
    """
    from medfcn import distributed
    from medfcn.infer import Extras
    from medfcn.infer import infer as run_inference

    if nproc_per_node is not None:
        _start_processes(ctx, nproc_per_node)
        return
    if report:  # before the scans are segmented, like every other output that exists
        from medfcn.report import check_report_target

        with distributed.said_once_per_node():  # one line, not one per process
            check_report_target(out, overwrite)
    rows = run_inference(
        bundle,
        inputs,
        out,
        device=device,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        tta=tta,
        overwrite=overwrite,
        progress=typer.echo,
        mask_format=mask_format,
        continue_on_error=continue_on_error,
        extras=Extras(uncertainty, probabilities, largest_component, dicom_seg),
        backend=backend,
        models=models or (),
    )
    if not distributed.is_main():  # rank 0 says it for every process
        return
    typer.echo(f"done: {plural(len(rows), 'mask')} and volumes.csv in {out}")
    report_failed = report and not _write_report_after_inference(out, bundle, overwrite)
    if rows.failures:
        _report_failures(rows.failures, out / "failures.csv")
    if report_failed:
        raise typer.Exit(2)


def _write_report_after_inference(out: Path, bundle: Path, overwrite: bool) -> bool:
    """``infer --report``'s page, once the masks are written: True when written; else its error
    in one line (saying the masks are there), so that failed scans are still listed after it."""
    from medfcn.errors import UserError
    from medfcn.report import write_report

    try:
        typer.echo(f"QC report: {write_report(out, bundle=bundle, overwrite=overwrite)}")
    except UserError as err:
        typer.echo(f"medfcn: error: QC report not written: {err} (the masks and volumes.csv are written)", err=True)
        return False
    return True


def _report_failures(failures: list[dict], table: Path) -> None:
    """One line per failed scan on stderr, then exit code 3 (some scans failed, not all-or-nothing's 2)."""
    typer.echo(f"medfcn: {plural(len(failures), 'scan')} failed, listed in {table}:", err=True)
    for failure in failures:
        typer.echo(f"medfcn: failed: {failure['input']}: {failure['reason']}", err=True)
    raise typer.Exit(3)


@app.command(cls=_Command)
@_user_errors
def evaluate(
    pred_dir: Annotated[Path, typer.Argument(help="Folder of predicted masks (NIfTI).")],
    label_dir: Annotated[Path, typer.Argument(help="Folder of reference labels with the same file names.")],
    labels: Annotated[
        list[int] | None,
        typer.Option(
            "--labels",
            metavar="<int>",
            help="Label value to score, repeatable: --labels 1 --labels 2.",
            show_default="all present",
        ),
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Name labels 1, 2, ... by this bundle's class_names.")
    ] = None,
    class_names: Annotated[
        str | None,
        typer.Option(
            "--class-names", metavar="<names>", help="Names of labels 1, 2, ..., comma-separated: anterior,posterior."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder to write metrics.csv and metrics.json to (without it: the table only)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing metrics.csv/json.")] = False,
) -> None:
    """Dice per label and mean, HD95 in mm, per case and summarised (mean, std, median, n scored).

    A label in only one of prediction and reference scores Dice 0 and no HD95 (counted below
    the table); a label in neither is not scored. Labels present in both masks without any
    voxel in common are counted below the table too. Labels are named after --bundle's classes
    or --class-names; the per-case table is written only with --out.
    """
    from medfcn.evaluate import evaluate_folders, label_names

    names = label_names(bundle, class_names)
    rows, summary = evaluate_folders(
        pred_dir, label_dir, labels=labels or None, out_dir=out, overwrite=overwrite, class_names=names
    )
    _print_metrics(f"{len(rows)} cases: {pred_dir} vs {label_dir}", summary, names)
    _print_unscored(summary, names)
    if out is None:
        typer.echo("per-case metrics: not written (--out FOLDER writes metrics.csv and metrics.json)")
    else:
        typer.echo(f"per-case metrics: {out / 'metrics.csv'}")


def _metric_label(metric: str, names: dict[int, str]) -> str:
    """``dice_1`` -> ``dice_1 (anterior)`` when label 1 has a name; other metrics as they are."""
    kind, _, label = metric.rpartition("_")
    return (
        f"{metric} ({names[int(label)]})"
        if kind in ("dice", "hd95") and label.isdigit() and int(label) in names
        else metric
    )


def _print_metrics(title: str, summary: dict, names: dict[int, str]) -> None:
    """The summary as a table: one row per metric (labels named), mean, std, median, n scored."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("metric", "mean", "std", "median", "n"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, stats in summary.items():
        cells = (f"{stats[key]:.4f}" for key in ("mean", "std", "median"))
        table.add_row(_metric_label(metric, names), *cells, str(stats["n"]))
    Console().print(table)


def _print_unscored(summary: dict, names: dict[int, str]) -> None:
    """One line per label with cases left out of its HD95 or without a voxel in common."""
    for metric, stats in summary.items():
        if stats.get("not_scored"):
            k = metric.removeprefix("hd95_")
            dice = summary[f"dice_{k}"]
            typer.echo(
                f"{_metric_label(metric, names)}: {plural(stats['not_scored'], 'case')} not scored (label missing from "
                f"prediction or reference: {dice['missed']} missed, {dice['false_positive']} false positive); "
                f"dice_{k} is 0 there."
            )
        if stats.get("no_overlap"):
            typer.echo(
                f"{_metric_label(metric, names)}: {plural(stats['no_overlap'], 'case')} where prediction and "
                "reference both hold the label in no voxel in common (Dice 0): a structure in the wrong place or "
                "under another label."
            )


@app.command(cls=_Command)
@_user_errors
def report(
    out_dir: Annotated[Path, typer.Argument(help="A medfcn infer output folder (volumes.json and the masks).")],
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", help="The bundle that segmented the scans: volume and voxel-size flags."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report.html.")] = False,
) -> None:
    """Write OUT_DIR/report.html: a QC page with a three-plane view, volumes, uncertainty and flags per scan.

    Flags: a missing label, a volume outside the training volumes' 1-99 % (--bundle), a voxel
    size unlike training (--bundle), an uncertainty far above the batch's. Self-contained (images
    embedded); flagged scans first; sortable by any column.
    """
    from medfcn.report import write_report

    path = write_report(out_dir, bundle=bundle, overwrite=overwrite, progress=typer.echo)
    typer.echo(f"wrote {path}")


@app.command(cls=_Command)
@_user_errors
def export(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="torchscript (models/model.ts), exported (torch.export: models/model.pt2), onnx (models/model.onnx).",
        ),
    ] = "torchscript",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export of that format.")] = False,
) -> None:
    """Export models/model.pt for deployment, checked against the state dict before it is written.

    onnx: dynamic batch and spatial axes, checked with onnxruntime (needs the onnx extra); run it
    with medfcn infer --backend onnxruntime. exported: a torch.export program taking windows of
    the bundle's patch size. torchscript: deprecated in torch 2.13. The bundle's metadata.json
    lists the onnx and exported files and how to load them.
    """
    from medfcn.export import export_bundle

    path, diff = export_bundle(bundle, format, overwrite=overwrite)
    typer.echo(f"wrote {path} (max |difference| vs state dict: {diff:.1e})")


def empty_argument(args: list[str]) -> str | None:
    """The one-line error for the first empty argument in ``args`` (``''``, ``--out=``), else None.

    Typer turns ``''`` into ``Path('.')``, so ``--out ''`` wrote masks into the current folder
    and an empty input segmented it; no medfcn argument means anything when empty.
    """
    for k, arg in enumerate(args):
        option, sep, value = arg.partition("=")
        if sep and option.startswith("--") and not value:
            return f"{option}=: an empty value; give one (e.g. a folder for --out), or leave the option out."
        if not arg:
            where = f"{args[k - 1]} ''" if k and args[k - 1].startswith("--") else f"'' (argument {k + 1})"
            return f"{where}: an empty argument (a path would mean the current folder); give a value, or leave it out."
    return None


# Typer's (vendored click's) base class of command-line errors; Typer does not export it
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def command_line_error(err: Exception) -> str:
    """One line for a command-line error Typer found (an option value of the wrong type, an
    unknown option, a missing argument), instead of its usage text and error box."""
    ctx = getattr(err, "ctx", None)
    hint = f"; see {ctx.command_path} --help" if ctx is not None else ""
    return " ".join(err.format_message().split()).rstrip(".") + hint + "."


def main() -> None:
    """Console entry point: every user error is one line and exit code 2 (command-line errors
    too); SIGTERM unwinds like Ctrl-C, so no temporary file stays behind."""
    exit_on_sigterm()
    empty = empty_argument(sys.argv[1:])
    if empty:
        typer.echo(f"medfcn: error: {empty}", err=True)
        raise SystemExit(2)
    command = typer.main.get_command(app)
    try:  # not standalone: Typer's errors come here instead of being printed as a box
        code = command.main(args=sys.argv[1:], prog_name="medfcn", standalone_mode=False)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        raise SystemExit(1) from None
    except _CLICK_ERROR as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `medfcn` alone: the help, as before
            if err.format_message().strip():  # with rich, Typer has printed it already
                typer.echo(err.format_message().rstrip())
        else:
            typer.echo(f"medfcn: error: {command_line_error(err)}", err=True)
        raise SystemExit(err.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)  # an Exit's code, or 0 after a command


if __name__ == "__main__":
    main()
