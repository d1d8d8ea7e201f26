"""``gsa compare``: model kinds profiled side by side, or finished runs with their accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from gsa_cli.choices import Accuracy, MacCounter, Mode, OutputFormat, Precision
from gsa_cli.cli import render
from gsa_cli.cli.context import flags
from gsa_cli.cli.options import (
    AccuracyOpt,
    BatchSizesOpt,
    ByOpt,
    ChannelsLastOpt,
    CompareTargetsArg,
    CompileOpt,
    CounterOpt,
    DeviceOpt,
    FormatOpt,
    ImgSizesOpt,
    ItersOpt,
    ModeOpt,
    PrecisionOpt,
    PresetOpt,
    ReportDirOpt,
    SetOpt,
    WarmupOpt,
    WideOpt,
    check_writable,
    split_inputs,
)
from gsa_cli.cli.profile_cmd import profile_settings
from gsa_cli.errors import ConfigError

if TYPE_CHECKING:
    from gsa_cli.bench.profile import ProfileSettings
    from gsa_cli.config import Config
    from gsa_cli.report.compare import Comparison
    from gsa_cli.results import RunRecord

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
    wide: WideOpt = False,
) -> None:
    """Model kinds profiled side by side, or finished runs with their accuracy; ratios to the first.

    `gsa compare conv vs gsa` profiles each kind of a preset under the same settings, one after
    another. `gsa compare RUN_DIR...` reads runs written by `gsa train`.
    """
    from gsa_cli.report.compare import compare_runs

    inputs = split_inputs(targets)
    check_writable(out, "--out", folder=True)
    if inputs.kinds:
        if misplaced := flags(ctx, _RUN_ONLY):
            raise ConfigError(f"{', '.join(misplaced)}: for run directories, not model kinds")
        configs = _kind_configs(inputs.kinds, preset, overrides)
        settings = profile_settings(
            device, precision, batch_size, img_size, mode, channels_last, compile, warmup, iters, counter
        )
        comparison = _compare_kinds(configs, settings)
    else:
        if misplaced := flags(ctx, _KIND_ONLY):
            raise ConfigError(f"{', '.join(misplaced)}: for model kinds, not run directories")
        comparison = compare_runs(inputs.runs, by=by, accuracy=accuracy, count_gmacs=count_run_gmacs)
    render.comparison(comparison, fmt=fmt, out=out, wide=wide)
