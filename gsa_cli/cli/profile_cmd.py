"""``gsa profile``: parameters, multiply-adds, throughput and memory of one model on this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gsa_cli.choices import MacCounter, Mode, OutputFormat, Precision
from gsa_cli.cli import render
from gsa_cli.cli.options import (
    BatchSizesOpt,
    ChannelsLastOpt,
    CompileOpt,
    CounterOpt,
    DetailOpt,
    DeviceOpt,
    FormatOpt,
    ImgSizesOpt,
    ItersOpt,
    ModelOpt,
    ModeOpt,
    OutOpt,
    PrecisionOpt,
    PresetOpt,
    SetOpt,
    WarmupOpt,
    WideOpt,
    check_writable,
    parse_sizes,
)

if TYPE_CHECKING:
    from gsa_cli.bench.profile import ProfileSettings


def profile_settings(
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
    wide: WideOpt = False,
) -> None:
    """Parameters, multiply-adds, throughput and peak memory of a model on this machine.

    One row per image size and batch size. MACs count a multiply-add once (fvcore's convention),
    at batch 1 in eval mode. Throughput is the median over the timed iterations.
    """
    from gsa_cli.bench.profile import profile
    from gsa_cli.presets import load_preset
    from gsa_cli.report.tables import format_for_path

    config = load_preset(preset, model=model, overrides=overrides or ())
    settings = profile_settings(
        device, precision, batch_size, img_size, mode, channels_last, compile, warmup, iters, counter
    )
    if out is not None:
        format_for_path(out)  # refuse a bad suffix or an unwritable path before measuring
        check_writable(out, "--out", folder=False)
    with render.status("profiling") as progress:
        result = profile(config, settings, progress=progress)
    render.profile(result, preset=config.name, fmt=fmt, out=out, wide=wide)
    if detail:
        render.profile_detail(result, kind=config.model.kind.value, fmt=fmt)
