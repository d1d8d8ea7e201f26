"""The ``gsa`` command line: thin commands that parse, call one library function and render.

The options are declared in :mod:`gsa_cli.cli.options`, the output in :mod:`gsa_cli.cli.render`, the
progress of a run in :mod:`gsa_cli.cli.progress`. ``main()`` is the console script: it turns the
project's errors into one red line and an exit code (2 for usage and configuration errors, 1 for
failures at run time); ``--debug`` shows the traceback. Commands import the library when they run, so
that ``gsa --help`` and ``gsa compare RUN_DIR...`` start without torch.
"""

from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

from gsa_cli.choices import Accuracy, MacCounter, Mode, OnCorrupt, OutputFormat, Precision
from gsa_cli.cli import render
from gsa_cli.cli.options import (
    AccuracyOpt,
    BatchSizesOpt,
    ByOpt,
    ChannelsLastOpt,
    CompareTargetsArg,
    CompileOpt,
    CorruptOpt,
    CounterOpt,
    DataOpt,
    DebugOpt,
    DetailOpt,
    DeviceOpt,
    EmaOpt,
    EpochsOpt,
    EvalBatchSizeOpt,
    EvalTargetArg,
    FormatOpt,
    ImgSizesOpt,
    ItersOpt,
    LrOpt,
    ModelOpt,
    ModeOpt,
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    OutOpt,
    PrecisionOpt,
    PresetArg,
    PresetOpt,
    RdzvEndpointOpt,
    ReportDirOpt,
    ResumeOpt,
    RunDirOpt,
    SetOpt,
    SyncBnOpt,
    ThreadsOpt,
    TrainBatchSizeOpt,
    TrainChannelsLastOpt,
    TrainCompileOpt,
    TrainPrecisionOpt,
    TrainPresetOpt,
    WarmupOpt,
    WorkersOpt,
    at_least,
    check_launch,
    check_writable,
    parse_sizes,
    split_inputs,
)
from gsa_cli.errors import ConfigError, DeprecatedKeyWarning, GsaError

if TYPE_CHECKING:
    from gsa_cli.bench.profile import ProfileSettings
    from gsa_cli.config import Config
    from gsa_cli.report.compare import Comparison
    from gsa_cli.results import RunRecord

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
            if not (err.exit_code > 128 and _worker_of_launcher()):  # a signal: the launcher says it once
                render.notice("error", str(err))
            raise typer.Exit(err.exit_code) from None


def _worker_of_launcher() -> bool:
    from gsa_cli.train.distributed import launched_by_gsa  # torch is loaded: a run was stopped

    return launched_by_gsa()


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


@app.callback()
def _root(debug: DebugOpt = False) -> None:
    _state["debug"] = debug


# ---------------------------------------------------------------------------------------------------
# gsa presets.


@presets_app.callback()
def presets_list(ctx: typer.Context) -> None:
    """List every preset with its data set and the parameter counts of its conv and GSA models."""
    if ctx.invoked_subcommand is not None:
        return
    from gsa_cli.bench.params import preset_summaries

    render.presets(preset_summaries())


@presets_app.command("show")
def presets_show(preset: PresetArg, model: ModelOpt = "gsa", overrides: SetOpt = None) -> None:
    """Print a preset resolved and validated, as YAML that loads back to the same config."""
    from gsa_cli.config import config_to_yaml
    from gsa_cli.presets import load_preset

    render.yaml_text(config_to_yaml(load_preset(preset, model=model, overrides=overrides or ())))


# ---------------------------------------------------------------------------------------------------
# gsa train and gsa eval.

# Options of `gsa train` that only the launching process uses; workers do not see them.
_LAUNCH_ONLY = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")
# Options that choose what to train, which a resumed run takes from its checkpoint instead.
_RUN_DEFINING = ("preset", "model", "overrides", "epochs", "batch_size", "lr")


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _flags(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` given on the command line, spelled as flags."""
    return ["--" + name.replace("_", "-").replace("overrides", "set") for name in names if _given(ctx, name)]


def _train_config(ctx: typer.Context, resume: Path | None, out: Path | None) -> Config | None:
    """The config a new run trains (the preset with the options applied); None for a resumed run.

    Raises:
        ConfigError: for a resumed run given options that would redefine it, or a bad preset.
    """
    if resume is not None:
        clashing = _flags(ctx, _RUN_DEFINING)
        if clashing or out is not None:
            raise ConfigError(
                f"--resume continues a run as it was configured; drop {', '.join(clashing) or '--out'} "
                "(start a new run to change them)"
            )
        return None
    from gsa_cli.presets import load_preset

    settings = list(ctx.params["overrides"] or ())
    for key in ("epochs", "batch_size", "lr"):
        if ctx.params[key] is not None:
            settings.append(f"recipe.{key}={ctx.params[key]}")
    return load_preset(ctx.params["preset"], model=ctx.params["model"], overrides=settings)


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


def _launch(ctx: typer.Context, config: Config | None, out: Path | None) -> None:
    """Start this node's `gsa train` workers under torchrun, all writing to one run directory."""
    from gsa_cli.results import default_run_dir
    from gsa_cli.train.distributed import launch

    # Every worker must write to the same run directory: choose it here, once.
    target = None if config is None else out or default_run_dir(config.name, config.model.kind.value)
    params = ctx.params
    launch(
        _worker_args(ctx, target),
        nproc=params["nproc"],
        nnodes=params["nnodes"],
        node_rank=params["node_rank"],
        rdzv_endpoint=params["rdzv_endpoint"],
        run_dir=target or params["resume"],
    )


@app.command("train")
def train_command(
    ctx: typer.Context,
    preset: TrainPresetOpt = "digits",
    model: ModelOpt = "gsa",
    overrides: SetOpt = None,
    epochs: EpochsOpt = None,
    batch_size: TrainBatchSizeOpt = None,
    lr: LrOpt = None,
    data: DataOpt = None,
    out: RunDirOpt = None,
    resume: ResumeOpt = None,
    device: DeviceOpt = "auto",
    precision: TrainPrecisionOpt = Precision.FP32,
    channels_last: TrainChannelsLastOpt = False,
    compile_model: TrainCompileOpt = False,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    sync_bn: SyncBnOpt = False,
    on_corrupt: CorruptOpt = OnCorrupt.FAIL,
    nproc: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    rdzv_endpoint: RdzvEndpointOpt = None,
) -> None:
    """Train a preset's model and write a run directory (config, metrics, summary, checkpoints)."""
    from gsa_cli.cli.progress import reporter_for
    from gsa_cli.train.distributed import die_with_launcher, in_torchrun, is_main_process
    from gsa_cli.train.run import TrainOptions, train

    die_with_launcher()  # a worker: stop when the launcher is killed (a no-op outside torchrun)
    check_launch(nproc, nnodes, node_rank)
    config = _train_config(ctx, resume, out)
    if (nproc > 1 or nnodes > 1) and not in_torchrun():
        _launch(ctx, config, out)
        return
    options = TrainOptions(
        out=out,
        resume=resume,
        data=data,
        device=device,
        # Not given: fp32 and the default layout, or a resumed run's own (given, they must be its own).
        precision=precision if _given(ctx, "precision") else None,
        channels_last=channels_last if _given(ctx, "channels_last") else None,
        compile=compile_model,
        workers=workers,
        threads=threads,
        sync_bn=sync_bn,
        on_corrupt=on_corrupt,
    )
    summary = train(config, options, reporter=reporter_for(render.console))
    if is_main_process():
        render.run_summary(summary)


@app.command("eval")
def eval_command(
    target: EvalTargetArg,
    ema: EmaOpt = True,
    data: DataOpt = None,
    device: DeviceOpt = "auto",
    batch_size: EvalBatchSizeOpt = None,
    workers: WorkersOpt = None,
    on_corrupt: CorruptOpt = OnCorrupt.FAIL,
) -> None:
    """Evaluate a checkpoint on its validation split: top-1, top-5, loss, images/s; writes eval.json."""
    from gsa_cli.cli.progress import reporter_for
    from gsa_cli.train.evaluate import EvalOptions, evaluate_checkpoint

    at_least(batch_size, "--batch-size")
    options = EvalOptions(
        data=data, device=device, ema=ema, batch_size=batch_size, workers=workers, on_corrupt=on_corrupt
    )
    render.eval_report(evaluate_checkpoint(target, options, reporter=reporter_for(render.console)))


# ---------------------------------------------------------------------------------------------------
# gsa profile and gsa compare.


def _profile_settings(
    device: str,
    precision: Precision,
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

    return ProfileSettings(
        device=device,
        precision=precision,
        batch_sizes=parse_sizes(batch_size, "--batch-size"),
        img_sizes=parse_sizes(img_size, "--img-size"),
        mode=mode,
        channels_last=channels_last,
        compile=compile,
        warmup=warmup,
        iters=iters,
        counter=counter,
    )


@app.command("profile")
def profile_command(
    preset: PresetOpt = "imagenet50",
    model: ModelOpt = "gsa",
    batch_size: BatchSizesOpt = None,
    img_size: ImgSizesOpt = None,
    mode: ModeOpt = Mode.BOTH,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.FP32,
    channels_last: ChannelsLastOpt = False,
    compile: CompileOpt = False,
    warmup: WarmupOpt = None,
    iters: ItersOpt = None,
    fmt: FormatOpt = OutputFormat.TABLE,
    out: OutOpt = None,
    overrides: SetOpt = None,
    counter: CounterOpt = MacCounter.FVCORE,
    detail: DetailOpt = False,
) -> None:
    """Parameters, multiply-adds, throughput and peak memory of a model on this machine.

    One row per image size and batch size. MACs count a multiply-add once (fvcore's convention),
    at batch 1 in eval mode. Throughput is the median over the timed iterations.
    """
    from gsa_cli.bench.profile import profile
    from gsa_cli.presets import load_preset
    from gsa_cli.report.tables import format_for_path

    config = load_preset(preset, model=model, overrides=overrides or ())
    settings = _profile_settings(
        device, precision, batch_size, img_size, mode, channels_last, compile, warmup, iters, counter
    )
    if out is not None:
        format_for_path(out)  # refuse a bad suffix or an unwritable path before measuring
        check_writable(out, "--out", folder=False)
    with render.status("profiling") as progress:
        result = profile(config, settings, progress=progress)
    render.profile(result, preset=config.name, fmt=fmt, out=out)
    if detail:
        render.profile_detail(result, kind=config.model.kind.value, fmt=fmt)


# Options of `gsa compare` that only apply to model kinds, or only to run directories.
_KIND_ONLY = (
    "preset", "batch_size", "img_size", "mode", "device", "precision", "channels_last", "compile",
    "warmup", "iters", "overrides", "counter",
)  # fmt: skip
_RUN_ONLY = ("by", "accuracy")


def _kind_configs(kinds: tuple[str, ...], preset: str, overrides: list[str] | None) -> list[Config]:
    """One config of the preset per model kind named."""
    from gsa_cli.presets import load_preset

    if any(text.partition("=")[0].strip() == "model.kind" for text in overrides or ()):
        raise ConfigError("--set model.kind: name the model kinds as arguments instead (conv vs gsa)")
    return [load_preset(preset, model=kind, overrides=overrides or ()) for kind in kinds]


def _compare_kinds(configs: list[Config], settings: ProfileSettings) -> Comparison:
    """Profile each kind's config in turn and set the rows side by side."""
    from gsa_cli.bench.profile import profile_kinds
    from gsa_cli.report.compare import compare_kinds

    with render.status("profiling") as progress:
        rows = profile_kinds(configs, settings, progress=progress)
    return compare_kinds(rows, preset=configs[0].name, description=configs[0].description)


def count_run_gmacs(record: RunRecord) -> float | None:
    """The GMACs of a run whose ``summary.json`` predates them, counted from its ``config.yaml``.

    What ``gsa compare`` passes to :func:`gsa_cli.report.compare.compare_runs`: it builds the model, so
    it imports torch, and only runs that lack the number call it.
    """
    from gsa_cli.bench.macs import count_gmacs
    from gsa_cli.models import build_model
    from gsa_cli.presets import load_preset
    from gsa_cli.results import CONFIG_FILE

    config = load_preset(record.path / CONFIG_FILE, model=None)
    return count_gmacs(build_model(config), img_size=config.data.img_size, channels=config.data.channels)


@app.command("compare")
def compare_command(
    ctx: typer.Context,
    targets: CompareTargetsArg,
    preset: PresetOpt = "imagenet50",
    batch_size: BatchSizesOpt = None,
    img_size: ImgSizesOpt = None,
    mode: ModeOpt = Mode.BOTH,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.FP32,
    channels_last: ChannelsLastOpt = False,
    compile: CompileOpt = False,
    warmup: WarmupOpt = None,
    iters: ItersOpt = None,
    overrides: SetOpt = None,
    counter: CounterOpt = MacCounter.FVCORE,
    by: ByOpt = None,
    accuracy: AccuracyOpt = Accuracy.BEST,
    fmt: FormatOpt = OutputFormat.TABLE,
    out: ReportDirOpt = None,
) -> None:
    """Model kinds profiled side by side, or finished runs with their accuracy; ratios to the first.

    `gsa compare conv vs gsa` profiles each kind of a preset under the same settings, one after
    another. `gsa compare RUN_DIR...` reads runs written by `gsa train`.
    """
    from gsa_cli.report.compare import compare_runs

    inputs = split_inputs(targets)
    check_writable(out, "--out", folder=True)
    if inputs.kinds:
        if misplaced := _flags(ctx, _RUN_ONLY):
            raise ConfigError(f"{', '.join(misplaced)}: for run directories, not model kinds")
        configs = _kind_configs(inputs.kinds, preset, overrides)
        settings = _profile_settings(
            device, precision, batch_size, img_size, mode, channels_last, compile, warmup, iters, counter
        )
        comparison = _compare_kinds(configs, settings)
    else:
        if misplaced := _flags(ctx, _KIND_ONLY):
            raise ConfigError(f"{', '.join(misplaced)}: for model kinds, not run directories")
        comparison = compare_runs(inputs.runs, by=by, accuracy=accuracy, count_gmacs=count_run_gmacs)
    render.comparison(comparison, fmt=fmt, out=out)


# ---------------------------------------------------------------------------------------------------
# Warnings and the entry point.


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
        render.notice("warning", str(message))
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main() -> None:
    """Entry point of the ``gsa`` console script."""
    app()
