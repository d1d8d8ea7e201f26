"""The ``gsa`` command line: thin commands that parse, call one library function and render.

``main()`` is the console script: it turns the project's errors into one red line and an exit code
(2 for usage and configuration errors, 1 for failures at run time); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from typer.core import TyperGroup

from gsa_cli.choices import MacCounter, Mode, OutputFormat
from gsa_cli.errors import ConfigError, GsaError

console = Console()
error_console = Console(stderr=True)
_state = {"debug": False}


class _Group(TyperGroup):
    """The root command group: converts the project's errors into one red line and an exit code."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click since 0.23)
        try:
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


@app.command("profile")
def profile_command(
    preset: PresetOpt = "imagenet50",
    model: ModelOpt = "gsa",
    batch_size: BatchSizesOpt = None,
    img_size: ImgSizesOpt = None,
    mode: Annotated[
        Mode, typer.Option("--mode", help="Time inference, a training step, or both.")
    ] = Mode.BOTH,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = PrecisionChoice.fp32,
    channels_last: ChannelsLastOpt = False,
    compile: CompileOpt = False,
    warmup: Annotated[
        int | None, typer.Option("--warmup", help="Untimed iterations (default: 10 on a GPU, 2 on the CPU).")
    ] = None,
    iters: Annotated[
        int | None, typer.Option("--iters", help="Timed iterations (default: 40 on a GPU, 5 on the CPU).")
    ] = None,
    fmt: FormatOpt = OutputFormat.TABLE,
    out: OutOpt = None,
    overrides: SetOpt = None,
    counter: Annotated[
        MacCounter,
        typer.Option("--counter", help="Who counts the multiply-adds: fvcore or torch (FlopCounterMode)."),
    ] = MacCounter.FVCORE,
    detail: Annotated[
        bool, typer.Option("--detail", help="Also break the MACs down by module and operator.")
    ] = False,
) -> None:
    """Parameters, multiply-adds, throughput and peak memory of a model on this machine.

    One row per image size and batch size. MACs count a multiply-add once (fvcore's convention),
    at batch 1 in eval mode. Throughput is the median over the timed iterations.
    """
    from gsa_cli import tables
    from gsa_cli.presets import load_preset
    from gsa_cli.profile import (
        ProfileSettings,
        module_frame,
        operator_frame,
        profile,
        rows_frame,
        summary_frame,
    )
    from gsa_cli.runtime import Precision

    config = load_preset(preset, model=model, overrides=overrides or ())
    settings = ProfileSettings(
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


def main() -> None:
    """Entry point of the ``gsa`` console script."""
    app()
