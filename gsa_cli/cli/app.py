"""The ``gsa`` command line: thin commands that parse, call one library function and render.

``main()`` is the console script: it turns the project's errors into one red line and an exit code
(2 for usage and configuration errors, 1 for failures at run time); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table
from typer.core import TyperGroup

from gsa_cli.choices import Accuracy, MacCounter, Mode, OutputFormat
from gsa_cli.errors import ConfigError, DeprecatedKeyWarning, GsaError

if TYPE_CHECKING:
    from gsa_cli.bench.profile import ProfileSettings
    from gsa_cli.results import EvalReport, RunSummary

console = Console()
error_console = Console(stderr=True)
_state = {"debug": False}


class _Group(TyperGroup):
    """The root command group: converts the project's errors into one red line and an exit code."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click since 0.23)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except GsaError as err:
            if _state["debug"]:
                raise
            error_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None


app = typer.Typer(
    name="gsa",
    cls=_Group,
    help="Train and benchmark Global Self-Attention Networks against convolutional baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
presets_app = typer.Typer(
    help="List the presets, or show one resolved.", invoke_without_command=True, no_args_is_help=False
)
app.add_typer(presets_app, name="presets")

# Options shared by several commands, declared once.
PresetArg = Annotated[str, typer.Argument(help="A preset name (see `gsa presets`) or a path to a YAML file.")]
PresetOpt = Annotated[
    str, typer.Option("--preset", "-p", help="A preset name (see `gsa presets`) or a path to a YAML file.")
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model kind: gsa (GSA-ResNet), conv (its ResNet twin) or full (dense global attention).",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a preset value, e.g. --set model.heads=4 (repeatable)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionOpt = Annotated[
    PrecisionChoice, typer.Option("--precision", help="fp32, or bf16/fp16 autocast with fp32 weights.")
]
BatchSizesOpt = Annotated[
    str | None,
    typer.Option(
        "--batch-size", "-b", help="Batch sizes, comma-separated (default: 64 on a GPU, 4 on the CPU)."
    ),
]
ImgSizesOpt = Annotated[
    str | None,
    typer.Option("--img-size", help="Image sizes in pixels, comma-separated (default: the preset's)."),
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
    Path | None, typer.Option("--out", "-o", help="Also write the results to FILE (.csv, .json or .md).")
]


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


def _profile_settings(
    device: str,
    precision: PrecisionChoice,
    batch_size: str | None,
    img_size: str | None,
    mode: Mode,
    channels_last: bool,
    compile: bool,
    warmup: int | None,
    iters: int | None,
    counter: MacCounter,
) -> ProfileSettings:
    """The settings of ``gsa profile`` and of ``gsa compare`` on model kinds, from their options."""
    from gsa_cli.bench.profile import ProfileSettings
    from gsa_cli.runtime import Precision

    return ProfileSettings(
        device=device,
        precision=Precision(precision.value),
        batch_sizes=parse_sizes(batch_size, "--batch-size"),
        img_sizes=parse_sizes(img_size, "--img-size"),
        mode=mode,
        channels_last=channels_last,
        compile=compile,
        warmup=warmup,
        iters=iters,
        counter=counter,
    )


DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", envvar="GSA_DATA", help="Data folder (ImageFolder or cifar-100-python); env GSA_DATA."
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", help="Loader processes per rank (default: 0 for in-memory data, else up to 8)."
    ),
]


class CorruptChoice(str, Enum):
    fail = "fail"
    skip = "skip"


CorruptOpt = Annotated[
    CorruptChoice,
    typer.Option("--on-corrupt", help="An unreadable image file: fail naming it, or skip it with a warning."),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
) -> None:
    _state["debug"] = debug


@presets_app.callback()
def presets_list(ctx: typer.Context) -> None:
    """List every preset with its data set and the parameter counts of its conv and GSA models."""
    if ctx.invoked_subcommand is not None:
        return
    from gsa_cli.presets import preset_summaries

    table = Table(title="Presets")
    for column in ("preset", "data set", "image", "conv params", "gsa params", "description"):
        table.add_column(column, justify="right" if column.endswith("params") else "left")
    for row in preset_summaries():
        table.add_row(
            row.name,
            row.dataset,
            f"{row.img_size} px",
            f"{row.conv_params:,}",
            f"{row.gsa_params:,}",
            row.description,
        )
    console.print(table)
    console.print("Parameter counts are computed from the models the presets build (all parameters).")


@presets_app.command("show")
def presets_show(
    preset: PresetArg,
    model: ModelOpt = "gsa",
    overrides: SetOpt = None,
) -> None:
    """Print a preset resolved and validated, as YAML that loads back to the same config."""
    from gsa_cli.config import config_to_yaml
    from gsa_cli.presets import load_preset

    config = load_preset(preset, model=model, overrides=overrides or ())
    text = config_to_yaml(config)
    if console.is_terminal:
        console.print(Syntax(text, "yaml", background_color="default"))
    else:
        sys.stdout.write(text)


# Options of `gsa train` that only the launching process uses; workers do not see them.
_LAUNCH_ONLY = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")
# Options that choose what to train, which a resumed run takes from its checkpoint instead.
_RUN_DEFINING = ("preset", "model", "overrides", "epochs", "batch_size", "lr")


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _worker_args(ctx: typer.Context, out: Path | None) -> list[str]:
    """The `gsa train` arguments each worker gets: those given here, less the launch options."""
    args = ["--debug"] if _state["debug"] else []
    args.append("train")
    for param in ctx.command.params:
        name = param.name or ""
        if name in _LAUNCH_ONLY or name == "out" or not _given(ctx, name):
            continue
        value = ctx.params[name]
        flag = param.opts[0]
        if isinstance(value, bool):
            args.append(flag if value else param.secondary_opts[0])
        elif isinstance(value, list | tuple):
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, value.value if isinstance(value, Enum) else str(value)]
    return args if out is None else [*args, "--out", str(out)]


def _render_summary(summary: RunSummary) -> None:
    table = Table(title=f"{summary.preset} / {summary.model_kind}: {summary.run_dir}")
    for column in ("best top-1", "at epoch", "final top-1", "final top-5", "parameters", "wall time"):
        table.add_column(column, justify="right")

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}%"

    table.add_row(
        percent(summary.best_top1),
        f"{summary.best_epoch}/{summary.epochs}",
        percent(summary.final_top1),
        percent(summary.final_top5),
        f"{summary.parameters:,}",
        f"{summary.wall_time_s:.1f} s",
    )
    console.print(table)


@app.command("train")
def train_command(
    ctx: typer.Context,
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="A preset name (see `gsa presets`) or a YAML file.")
    ] = "digits",
    model: ModelOpt = "gsa",
    overrides: SetOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override recipe.epochs.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Override recipe.batch_size (per process).")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Override recipe.lr.")] = None,
    data: DataOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default: runs/PRESET-MODEL-TIMESTAMP).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this directory from its last.pt.")
    ] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        PrecisionChoice, typer.Option("--precision", help="fp32, or bf16/fp16 autocast (fp16 with a scaler).")
    ] = PrecisionChoice.fp32,
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="Channels-last memory layout.")
    ] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    workers: WorkersOpt = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads for torch (default: one per core).")
    ] = None,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm across processes.")] = False,
    on_corrupt: CorruptOpt = CorruptChoice.fail,
    nproc: Annotated[
        int, typer.Option("--nproc", help="Processes per node; above 1, launches DDP workers via torchrun.")
    ] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes of a multi-node job.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank (multi-node).")] = 0,
    rdzv_endpoint: Annotated[
        str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT where the nodes meet (multi-node).")
    ] = None,
) -> None:
    """Train a preset's model and write a run directory (config, metrics, summary, checkpoints)."""
    from gsa_cli.cli.progress import PlainReporter, RichReporter
    from gsa_cli.data import OnCorrupt
    from gsa_cli.presets import load_preset
    from gsa_cli.results import default_run_dir
    from gsa_cli.runtime import Precision
    from gsa_cli.train.distributed import in_torchrun, is_main_process, launch
    from gsa_cli.train.run import TrainOptions, train

    config = None
    if resume is not None:
        clashing = [name for name in _RUN_DEFINING if _given(ctx, name)]
        if clashing or out is not None:
            names = ", ".join("--" + n.replace("_", "-").replace("overrides", "set") for n in clashing)
            raise ConfigError(
                f"--resume continues a run as it was configured; drop {names or '--out'} "
                "(start a new run to change them)"
            )
    else:
        settings = list(overrides or ())
        for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
            if value is not None:
                settings.append(f"recipe.{key}={value}")
        config = load_preset(preset, model=model, overrides=settings)

    if (nproc > 1 or nnodes > 1) and not in_torchrun():
        # Every worker must write to the same run directory: choose it here, once.
        target = None if config is None else out or default_run_dir(config.name, config.model.kind.value)
        args = _worker_args(ctx, target)
        launch(args, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
        return

    options = TrainOptions(
        out=out,
        resume=resume,
        data=data,
        device=device,
        precision=Precision(precision.value),
        channels_last=channels_last,
        compile=compile_model,
        workers=workers,
        threads=threads,
        sync_bn=sync_bn,
        on_corrupt=OnCorrupt(on_corrupt.value),
    )
    reporter = RichReporter(console) if console.is_terminal else PlainReporter(console)
    summary = train(config, options, reporter=reporter)
    if is_main_process():
        _render_summary(summary)


@app.command("eval")
def eval_command(
    target: Annotated[Path, typer.Argument(help="A run directory (its best.pt) or a checkpoint file.")],
    ema: Annotated[
        bool, typer.Option("--ema/--no-ema", help="Use the EMA weights when the checkpoint has them.")
    ] = True,
    data: DataOpt = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Batch size (default: the run's).")
    ] = None,
    workers: WorkersOpt = None,
    on_corrupt: CorruptOpt = CorruptChoice.fail,
) -> None:
    """Evaluate a checkpoint on its validation split: top-1, top-5, loss, images/s; writes eval.json."""
    from gsa_cli.cli.progress import PlainReporter, RichReporter
    from gsa_cli.data import OnCorrupt
    from gsa_cli.train.evaluate import EvalOptions, evaluate_checkpoint

    options = EvalOptions(
        data=data,
        device=device,
        ema=ema,
        batch_size=batch_size,
        workers=workers,
        on_corrupt=OnCorrupt(on_corrupt.value),
    )
    reporter = RichReporter(console) if console.is_terminal else PlainReporter(console)
    _render_eval(evaluate_checkpoint(target, options, reporter=reporter))


def _render_eval(report: EvalReport) -> None:
    table = Table(title=f"{report.checkpoint} (epoch {report.epoch}, {report.weights} weights)")
    for column in ("top-1", "top-5", "loss", "images", "images/s", "recorded top-1"):
        table.add_column(column, justify="right")
    recorded = "-" if report.recorded_top1 is None else f"{report.recorded_top1:.2f}%"
    table.add_row(
        f"{report.top1:.2f}%",
        f"{report.top5:.2f}%",
        f"{report.loss:.4f}",
        f"{report.images:,}",
        f"{report.images_per_s:,.0f}",
        recorded,
    )
    console.print(table)
    console.print(f"{report.device}, {report.precision}, batch {report.batch_size}", highlight=False)


@app.command("profile")
def profile_command(
    preset: PresetOpt = "imagenet50",
    model: ModelOpt = "gsa",
    batch_size: BatchSizesOpt = None,
    img_size: ImgSizesOpt = None,
    mode: ModeOpt = Mode.BOTH,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = PrecisionChoice.fp32,
    channels_last: ChannelsLastOpt = False,
    compile: CompileOpt = False,
    warmup: WarmupOpt = None,
    iters: ItersOpt = None,
    fmt: FormatOpt = OutputFormat.TABLE,
    out: OutOpt = None,
    overrides: SetOpt = None,
    counter: CounterOpt = MacCounter.FVCORE,
    detail: Annotated[
        bool, typer.Option("--detail", help="Also break the MACs down by module and operator.")
    ] = False,
) -> None:
    """Parameters, multiply-adds, throughput and peak memory of a model on this machine.

    One row per image size and batch size. MACs count a multiply-add once (fvcore's convention),
    at batch 1 in eval mode. Throughput is the median over the timed iterations.
    """
    from gsa_cli.bench.profile import (
        module_frame,
        operator_frame,
        profile,
        rows_frame,
        summary_frame,
    )
    from gsa_cli.presets import load_preset
    from gsa_cli.report import tables

    config = load_preset(preset, model=model, overrides=overrides or ())
    settings = _profile_settings(
        device, precision, batch_size, img_size, mode, channels_last, compile, warmup, iters, counter
    )
    if out is not None:
        tables.format_for_path(out)  # refuse a bad suffix before measuring
    with error_console.status("profiling") as status:
        result = profile(config, settings, progress=status.update)
    frame = rows_frame(result.rows)
    summary, caption = summary_frame(frame)
    if out is not None:
        as_file = tables.format_for_path(out)
        tables.write(summary if as_file is OutputFormat.MD else frame, out, caption=caption)
        error_console.print(f"wrote {out}")
    if fmt is OutputFormat.TABLE:
        table = tables.rich_table(summary, title=f"gsa profile: {config.name}", caption=caption)
        # A terminal wraps the table to its width; a pipe or a log file gets it whole.
        (console if console.is_terminal else Console(width=250)).print(table)
    elif fmt is OutputFormat.MD:
        sys.stdout.write(tables.to_text(summary, fmt, caption=caption))
    else:
        sys.stdout.write(tables.to_text(frame, fmt))
    if detail:
        for size, count in result.counts.items():
            title = f"{config.model.kind.value} at {size} px, batch 1 ({count.counter.value})"
            modules = module_frame(count, result.module_params[size])
            operators = operator_frame(count)
            if fmt is OutputFormat.TABLE:
                console.print(tables.rich_table(modules, title=f"MACs by module: {title}"))
                console.print(tables.rich_table(operators, title=f"Counts by operator: {title}"))
            elif fmt is OutputFormat.MD:
                sys.stdout.write(f"\n### MACs by module: {title}\n\n" + tables.markdown(modules))
                sys.stdout.write(f"\n### Counts by operator: {title}\n\n" + tables.markdown(operators))
            else:
                error_console.print("--detail shows with --format table or md")
                break


# Options of `gsa compare` that only apply to model kinds, or only to run directories.
_KIND_ONLY = (
    "preset", "batch_size", "img_size", "mode", "device", "precision", "channels_last", "compile",
    "warmup", "iters", "overrides", "counter",
)  # fmt: skip
_RUN_ONLY = ("by", "accuracy")


def _flags(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    return ["--" + name.replace("_", "-").replace("overrides", "set") for name in names if _given(ctx, name)]


@app.command("compare")
def compare_command(
    ctx: typer.Context,
    targets: Annotated[
        list[str],
        typer.Argument(
            help="Model kinds (conv vs gsa; the word vs is optional) or run directories (globs too).",
            metavar="KIND|RUN_DIR",
            show_default=False,
        ),
    ],
    preset: PresetOpt = "imagenet50",
    batch_size: BatchSizesOpt = None,
    img_size: ImgSizesOpt = None,
    mode: ModeOpt = Mode.BOTH,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = PrecisionChoice.fp32,
    channels_last: ChannelsLastOpt = False,
    compile: CompileOpt = False,
    warmup: WarmupOpt = None,
    iters: ItersOpt = None,
    overrides: SetOpt = None,
    counter: CounterOpt = MacCounter.FVCORE,
    by: Annotated[
        str | None,
        typer.Option(
            "--by", help="Runs: also tabulate and plot top-1 against this config key, e.g. data.distance."
        ),
    ] = None,
    accuracy: Annotated[
        Accuracy,
        typer.Option(
            "--accuracy", help="Runs: which top-1 the plots and --by use (best or final epoch, or eval.json)."
        ),
    ] = Accuracy.BEST,
    fmt: FormatOpt = OutputFormat.TABLE,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write compare.csv, compare.json, compare.md and PNG plots to DIR."),
    ] = None,
) -> None:
    """Model kinds profiled side by side, or finished runs with their accuracy; ratios to the first.

    `gsa compare conv vs gsa` profiles each kind of a preset under the same settings, one after
    another. `gsa compare RUN_DIR...` reads runs written by `gsa train`.
    """
    from gsa_cli.report import tables
    from gsa_cli.report.compare import compare_kinds, compare_runs, split_inputs
    from gsa_cli.report.files import write_report

    inputs = split_inputs(targets)
    if inputs.kinds:
        if misplaced := _flags(ctx, _RUN_ONLY):
            raise ConfigError(f"{', '.join(misplaced)}: for run directories, not model kinds")
        from gsa_cli.presets import load_preset

        if any(text.partition("=")[0].strip() == "model.kind" for text in overrides or ()):
            raise ConfigError("--set model.kind: name the model kinds as arguments instead (conv vs gsa)")
        configs = [load_preset(preset, model=kind, overrides=overrides or ()) for kind in inputs.kinds]
        settings = _profile_settings(
            device, precision, batch_size, img_size, mode, channels_last, compile, warmup, iters, counter
        )
        with error_console.status("profiling") as status:
            comparison = compare_kinds(configs, settings, progress=status.update)
    else:
        if misplaced := _flags(ctx, _KIND_ONLY):
            raise ConfigError(f"{', '.join(misplaced)}: for model kinds, not run directories")
        comparison = compare_runs(inputs.runs, by=by, accuracy=accuracy)

    if out is not None:
        written = write_report(comparison, out)
        error_console.print(f"wrote {', '.join(path.name for path in written)} to {out}", highlight=False)
    if fmt is OutputFormat.TABLE:
        # A terminal wraps the tables to its width; a pipe or a log file gets them whole (ratios make
        # the table of kinds wide).
        screen = console if console.is_terminal else Console(width=400)
        for number, view in enumerate(comparison.views):
            title = comparison.title if number == 0 else view.heading
            screen.print(tables.rich_table(view.frame, title=title, caption=view.caption or None))
    elif fmt is OutputFormat.MD:
        for view in comparison.views:
            sys.stdout.write(f"\n### {view.heading}\n\n" + tables.markdown(view.frame, caption=view.caption))
    else:
        sys.stdout.write(tables.to_text(comparison.frame, fmt))


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Our own warnings (a renamed preset key) as one yellow line; any other as Python shows it."""
    if issubclass(category, DeprecatedKeyWarning):
        error_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main() -> None:
    """Entry point of the ``gsa`` console script."""
    app()
