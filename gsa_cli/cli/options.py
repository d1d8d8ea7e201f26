"""Every option and argument of the ``gsa`` commands, declared once as an ``Annotated`` alias, and the
parsers of the text they take (comma-separated sizes, ``gsa compare``'s kinds or run directories).

Where two commands word an option differently (``--precision`` of a training run mentions the gradient
scaler, that of a profile the fp32 weights), each wording is its own alias. The enums come from
:mod:`gsa_cli.choices`. Nothing here imports torch.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from gsa_cli.choices import Accuracy, ExportFormat, MacCounter, Mode, OnCorrupt, OutputFormat, Precision
from gsa_cli.config import ModelKind
from gsa_cli.errors import ConfigError

# ---------------------------------------------------------------------------------------------------
# Short flags follow timm's scripts where they mean the same: -b/--batch-size (one size to train or
# evaluate with; one or several to time), -j/--workers, -m/--model; and -p/--preset, -o/--out (where the
# results go), -f/--format, -h/--help throughout.


def _complete_preset(incomplete: str) -> list[str]:
    """Shell completion of a preset name (a path completes as the shell does it)."""
    from gsa_cli.presets import preset_names

    return [name for name in preset_names() if name.startswith(incomplete)]


def _complete_kind(incomplete: str) -> list[str]:
    return [kind.value for kind in ModelKind if kind.value.startswith(incomplete)]


def _print_version(value: bool) -> None:
    """``--version``: gsa-cli's version and torch's, read from the installed packages (torch not imported)."""
    if not value:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(
        f"gsa-cli {installed('gsa-cli')} (torch {installed('torch')}, Python {platform.python_version()})"
    )
    raise typer.Exit()


# ---------------------------------------------------------------------------------------------------
# Shared by several commands.

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
VersionOpt = Annotated[
    bool,
    typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print gsa-cli's and torch's versions."
    ),
]
PresetArg = Annotated[
    str,
    typer.Argument(
        help="A preset name (see `gsa presets`) or a path to a YAML file.",
        metavar="PRESET",
        autocompletion=_complete_preset,
    ),
]
PresetOpt = Annotated[
    str,
    typer.Option(
        "--preset",
        "-p",
        help="A preset name (see `gsa presets`) or a path to a YAML file.",
        metavar="<name|file>",
        autocompletion=_complete_preset,
    ),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model kind: gsa (GSA-ResNet), conv (its ResNet twin) or full (dense global attention).",
        metavar="<gsa|conv|full>",
        autocompletion=_complete_kind,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a preset value, e.g. --set model.heads=4 (repeatable).", metavar="<key=value>"
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", metavar="<auto|cpu|cuda:N>")
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        envvar="GSA_DATA",
        metavar="<dir>",
        help="Data folder (ImageFolder, cifar-100-python or Fashion-MNIST IDX files); env GSA_DATA.",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-j",
        help="Loader processes per rank (default: 0 for in-memory data, else up to 8).",
    ),
]
CorruptOpt = Annotated[
    OnCorrupt,
    typer.Option("--on-corrupt", help="An unreadable image file: fail naming it, or skip it with a warning."),
]

# ---------------------------------------------------------------------------------------------------
# gsa train.

TrainPresetOpt = Annotated[
    str, typer.Option("--preset", "-p", help="A preset name (see `gsa presets`) or a YAML file.")
]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="Override recipe.epochs.")]
TrainBatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", "-b", help="Override recipe.batch_size (per process).")
]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Override recipe.lr.")]
RunDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Run directory (default: a new folder in runs/ named after the preset, model and time).",
        metavar="<dir>",
    ),
]
ResumeOpt = Annotated[
    Path | None, typer.Option("--resume", help="Continue the run in this directory from its last.pt.")
]
TrainPrecisionOpt = Annotated[
    Precision, typer.Option("--precision", help="fp32, or bf16/fp16 autocast (fp16 with a scaler).")
]
TrainChannelsLastOpt = Annotated[bool, typer.Option("--channels-last", help="Channels-last memory layout.")]
TrainCompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for torch (default: one per core).")
]
SyncBnOpt = Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm across processes.")]
NprocOpt = Annotated[
    int, typer.Option("--nproc", help="Processes per node; above 1, launches DDP workers via torchrun.")
]
NnodesOpt = Annotated[int, typer.Option("--nnodes", help="Nodes of a multi-node job.")]
NodeRankOpt = Annotated[int, typer.Option("--node-rank", help="This node's rank (multi-node).")]
RdzvEndpointOpt = Annotated[
    str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT where the nodes meet (multi-node).")
]
# Experiment tracking (gsa_cli.train.trackers) and warm starts (gsa_cli.train.warmstart).
LogOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--log",
        metavar="<tensorboard|wandb>",
        help="Log to TensorBoard (RUN/tb) or W&B (RUN/wandb; offline unless WANDB_MODE is set): repeat "
        "or comma-separate.",
    ),
]
InitOpt = Annotated[
    str | None,
    typer.Option(
        "--init",
        metavar="<torchvision|timm|PATH>",
        help="Start from ImageNet weights (torchvision's or timm's ResNet) or a checkpoint, run directory "
        "or state-dict file; prints what loaded (not with --resume).",
    ),
]

# ---------------------------------------------------------------------------------------------------
# gsa eval.

EvalTargetArg = Annotated[Path, typer.Argument(help="A run directory (its best.pt) or a checkpoint file.")]
EmaOpt = Annotated[
    bool, typer.Option("--ema/--no-ema", help="Use the EMA weights when the checkpoint has them.")
]
EvalBatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", "-b", help="Batch size (default: the run's).")
]

# ---------------------------------------------------------------------------------------------------
# gsa export (its target is EvalTargetArg, its weights EmaOpt).

ExportFormatOpt = Annotated[
    ExportFormat,
    typer.Option(
        "--format", "-f", help="onnx (the dynamo exporter; needs gsa-cli[onnx]) or pt2 (torch.export)."
    ),
]
ExportOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", metavar="FILE", help="File to write (default: beside the checkpoint, e.g. best.onnx)."
    ),
]
ExportImgSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--img-size",
        metavar="PX",
        help="Image size of the exported input (default: the run's; larger makes GSA no longer global).",
    ),
]
ToleranceOpt = Annotated[
    float | None,
    typer.Option(
        "--tolerance",
        help="Largest difference from eager allowed, as a fraction of the largest logit (default: 1e-3).",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")]

# ---------------------------------------------------------------------------------------------------
# gsa profile and gsa compare of model kinds.

PrecisionOpt = Annotated[
    Precision, typer.Option("--precision", help="fp32, or bf16/fp16 autocast with fp32 weights.")
]
BatchSizesOpt = Annotated[
    str | None,
    typer.Option(
        "--batch-size",
        "-b",
        metavar="<n[,n...]>",
        help="Batch size, or several comma-separated (default: 64 on a GPU, 4 on the CPU).",
    ),
]
ImgSizesOpt = Annotated[
    str | None,
    typer.Option(
        "--img-size",
        metavar="<px[,px...]>",
        help="Image size in pixels, or several comma-separated (default: the preset's).",
    ),
]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last", help="Channels-last memory format.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="Time a torch.compile'd model.")]
ModeOpt = Annotated[Mode, typer.Option("--mode", help="Time inference, a training step, or both.")]
WarmupOpt = Annotated[
    int | None, typer.Option("--warmup", help="Untimed iterations (default: 10 on a GPU, 2 on the CPU).")
]
ItersOpt = Annotated[
    int | None, typer.Option("--iters", help="Timed iterations (default: 40 on a GPU, 5 on the CPU).")
]
CounterOpt = Annotated[
    MacCounter,
    typer.Option("--counter", help="Who counts the multiply-adds: fvcore or torch (FlopCounterMode)."),
]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="How to print the results.")]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Also write the results to FILE (.csv, .json or .md).", metavar="<file>"
    ),
]
DetailOpt = Annotated[bool, typer.Option("--detail", help="Also break the MACs down by module and operator.")]
WideOpt = Annotated[
    bool,
    typer.Option(
        "--wide",
        help="Show every column on the terminal (default: the key columns and those that fit its width).",
    ),
]

# ---------------------------------------------------------------------------------------------------
# gsa compare.

CompareTargetsArg = Annotated[
    list[str],
    typer.Argument(
        help="Model kinds (conv vs gsa; the word vs is optional) or run directories (globs too).",
        metavar="KIND|RUN_DIR",
        show_default=False,
    ),
]
ByOpt = Annotated[
    str | None,
    typer.Option(
        "--by",
        metavar="<key>",
        help="Runs: also tabulate and plot top-1 against this config key, e.g. data.distance.",
    ),
]
AccuracyOpt = Annotated[
    Accuracy,
    typer.Option(
        "--accuracy", help="Runs: which top-1 the plots and --by use (best or final epoch, or eval.json)."
    ),
]
ReportDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Write compare.csv, compare.json, compare.md and PNG plots to DIR.",
        metavar="<dir>",
    ),
]

# ---------------------------------------------------------------------------------------------------
# What the options' text says.


def parse_sizes(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"32,64,128"`` as ``(32, 64, 128)``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"{option} {text}: expected whole numbers separated by commas, e.g. 32,64"
        ) from None


def at_least(value: int | None, option: str, minimum: int = 1) -> None:
    """Refuse a count below ``minimum`` (``None``, the default, passes).

    Raises:
        ConfigError: naming the option and the value.
    """
    if value is not None and value < minimum:
        raise ConfigError(f"{option} {value}: must be at least {minimum}")


def check_launch(nproc: int, nnodes: int, node_rank: int) -> None:
    """Refuse process and node counts below 1 and a node rank outside the job, before anything starts.

    Raises:
        ConfigError: naming the option.
    """
    at_least(nproc, "--nproc")
    at_least(nnodes, "--nnodes")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank}: must be from 0 to {nnodes - 1} (--nnodes {nnodes})")


def _nearest_existing(path: Path) -> Path:
    return next((folder for folder in path.parents if folder.exists()), Path.cwd())


def check_writable(path: Path | None, option: str, *, folder: bool) -> None:
    """Refuse an ``--out`` that cannot be written, before the work whose results it would hold.

    Args:
        folder: Whether ``path`` names a folder to write files in (else a file).

    Raises:
        ConfigError: naming the path and what is in the way.
    """
    if path is None:
        return
    want = "a folder" if folder else "a file"
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{option} {path}: exists and is not {want}; name {want} to write")
    where = path if path.exists() else _nearest_existing(path)
    if not where.is_dir() and where != path:
        raise ConfigError(f"{option} {path}: {where} is a file, not a folder; choose another {option}")
    if not os.access(where, os.W_OK | (os.X_OK if where.is_dir() else 0)):
        raise ConfigError(f"{option} {path}: no permission to write in {where}; choose another {option}")


KINDS = tuple(kind.value for kind in ModelKind)
VS = "vs"  # `gsa compare conv vs gsa`: sugar, dropped


@dataclass(frozen=True)
class Inputs:
    """Model kinds or run directories (never both)."""

    kinds: tuple[str, ...] = ()
    runs: tuple[Path, ...] = ()


def split_inputs(words: Sequence[str]) -> Inputs:
    """Sort ``gsa compare``'s arguments into model kinds or run directories (globs expanded).

    A bare kind name (``gsa``, ``conv``, ``full``) is a kind; write ``./gsa`` for a folder of that name.
    An existing path is taken as it is, brackets and all; anything else with ``*?[`` is a glob.

    Raises:
        ConfigError: for no inputs, a mix of kinds and directories, a repeat, a glob matching no
            folder, or a word that is neither a kind nor an existing path.
    """
    words = [word for word in words if word.lower() != VS]
    if not words:
        raise ConfigError("nothing to compare: name model kinds (conv vs gsa) or run directories")
    kinds: list[str] = []
    runs: list[Path] = []
    for word in words:
        if word in KINDS:
            kinds.append(word)
        elif Path(word).exists():  # a folder named with brackets is that folder, not a pattern
            runs.append(Path(word))
        elif any(char in word for char in "*?["):
            matches = [Path(match) for match in sorted(glob.glob(word)) if Path(match).is_dir()]
            if not matches:
                raise ConfigError(f"{word}: matches no run directory")
            runs += matches
        else:
            raise ConfigError(
                f"{word}: neither a model kind ({', '.join(KINDS)}) nor an existing run directory"
            )
    if kinds and runs:
        raise ConfigError(
            f"compare model kinds or run directories, not both: got {', '.join(kinds)} "
            f"and {', '.join(map(str, runs))}"
        )
    for name, items in (("model kind", kinds), ("run directory", [str(run) for run in runs])):
        repeated = sorted({item for item in items if items.count(item) > 1})
        if repeated:
            raise ConfigError(f"{name} {', '.join(repeated)} named more than once")
    return Inputs(tuple(kinds), tuple(runs))
