"""``gsa train``: a new run from a preset, a resumed run, or this node's workers under torchrun."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from gsa_cli.choices import OnCorrupt, Precision
from gsa_cli.cli import render
from gsa_cli.cli.context import STATE, flags, given
from gsa_cli.cli.options import (
    CorruptOpt,
    DataOpt,
    DeviceOpt,
    EpochsOpt,
    InitOpt,
    LogOpt,
    LrOpt,
    ModelOpt,
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    RdzvEndpointOpt,
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
    WorkersOpt,
    check_launch,
)
from gsa_cli.errors import ConfigError

if TYPE_CHECKING:
    from gsa_cli.config import Config

# Options of `gsa train` that only the launching process uses; workers do not see them.
_LAUNCH_ONLY = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")
# Options that choose what to train, which a resumed run takes from its checkpoint instead.
_RUN_DEFINING = ("preset", "model", "overrides", "epochs", "batch_size", "lr", "init")


def _train_config(ctx: typer.Context, resume: Path | None, out: Path | None) -> Config | None:
    """The config a new run trains (the preset with the options applied); None for a resumed run.

    Raises:
        ConfigError: for a resumed run given options that would redefine it, or a bad preset.
    """
    if resume is not None:
        clashing = flags(ctx, _RUN_DEFINING)
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
    args = ["--debug"] if STATE["debug"] else []
    args.append("train")
    for param in ctx.command.params:
        name = param.name or ""
        if name in _LAUNCH_ONLY or name == "out" or not given(ctx, name):
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
        made=config is not None and out is None,  # the default folder made above: removed if left empty
    )


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
    log: LogOpt = None,
    init: InitOpt = None,
    nproc: NprocOpt = 1,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    rdzv_endpoint: RdzvEndpointOpt = None,
) -> None:
    """Train a preset's model and write a run directory (config, metrics, summary, checkpoints)."""
    from gsa_cli.cli.progress import reporter_for
    from gsa_cli.train.distributed import die_with_launcher, in_torchrun, is_main_process
    from gsa_cli.train.preflight import check_options
    from gsa_cli.train.run import TrainOptions, train
    from gsa_cli.train.trackers import tracker_names

    die_with_launcher()  # a worker: stop when the launcher is killed (a no-op outside torchrun)
    check_launch(nproc, nnodes, node_rank)
    config = _train_config(ctx, resume, out)
    options = TrainOptions(
        out=out,
        resume=resume,
        data=data,
        device=device,
        # Not given: fp32 and the default layout, or a resumed run's own (given, they must be its own).
        precision=precision if given(ctx, "precision") else None,
        channels_last=channels_last if given(ctx, "channels_last") else None,
        compile=compile_model,
        workers=workers,
        threads=threads,
        sync_bn=sync_bn,
        on_corrupt=on_corrupt,
        log=tracker_names(log or ()),
        init=init,
    )
    if (nproc > 1 or nnodes > 1) and not in_torchrun():
        check_options(options)  # once, here, rather than in every worker
        _launch(ctx, config, out)
        return
    summary = train(config, options, reporter=reporter_for(render.console), show_init=render.warm_start)
    if is_main_process():
        render.run_summary(summary)
