"""The ``gsa`` command line: thin commands that parse, call one library function and render.

``main()`` is the console script: it turns the project's errors into one red line and an exit code
(2 for usage and configuration errors, 1 for failures at run time); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from typer.core import TyperGroup

from gsa_cli.errors import GsaError

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
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Model kind: gsa (GSA-ResNet) or conv (its ResNet twin).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a preset value, e.g. --set model.heads=4 (repeatable)."),
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


def main() -> None:
    """Entry point of the ``gsa`` console script."""
    app()
