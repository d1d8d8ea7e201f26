"""The ``gsa`` command line: thin commands that parse, call one library function and render.

Each command lives in its own module (``train_cmd``, ``eval_cmd``, ``profile_cmd``, ``compare_cmd``)
and is registered here. The options are declared in :mod:`gsa_cli.cli.options`, the output in
:mod:`gsa_cli.cli.render`, the progress of a run in :mod:`gsa_cli.cli.progress`. ``main()`` is the
console script: it turns the project's errors into one red line and an exit code (2 for usage and
configuration errors, 1 for failures at run time); ``--debug`` shows the traceback. Commands import
the library when they run, so that ``gsa --help`` and ``gsa compare RUN_DIR...`` start without torch.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from gsa_cli.cli import compare_cmd, eval_cmd, export_cmd, kernels_cmd, profile_cmd, render, train_cmd
from gsa_cli.cli.context import STATE
from gsa_cli.cli.options import DebugOpt, ModelOpt, PresetArg, SetOpt, VersionOpt
from gsa_cli.errors import DeprecatedKeyWarning, GsaError, GsaWarning


class _Group(TyperGroup):
    """The root command group: converts the project's errors into one red line and an exit code, and
    shows boolean flags in help as flags (typer's rich help gives every flag a ``<bool>`` type)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _flags_as_flags(params)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _commands_flags_as_flags(command, ctx)
        return command

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click since 0.23)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except GsaError as err:
            if STATE["debug"]:
                raise
            if not (err.exit_code > 128 and _worker_of_launcher()):  # a signal: the launcher says it once
                render.notice("error", str(err))
            raise typer.Exit(err.exit_code) from None


def _flags_as_flags(params: list[Any]) -> None:
    """No type shown for an option that takes no value (``--compile``, ``--help``): an empty metavar."""
    for param in params:
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            param.metavar = ""


def _commands_flags_as_flags(command: Any, ctx: Any) -> None:
    """:func:`_flags_as_flags` for a command and, for a group (``gsa presets``), its subcommands."""
    _flags_as_flags(command.get_params(ctx))
    for subcommand in getattr(command, "commands", {}).values():
        _commands_flags_as_flags(subcommand, ctx)


def _worker_of_launcher() -> bool:
    from gsa_cli.train.distributed import launched_by_gsa  # torch is loaded: a run was stopped

    return launched_by_gsa()


app = typer.Typer(
    name="gsa",
    cls=_Group,
    help="Train and benchmark Global Self-Attention Networks against convolutional baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
presets_app = typer.Typer(
    help="List the presets, or show one resolved.", invoke_without_command=True, no_args_is_help=False
)
app.add_typer(presets_app, name="presets")


@app.callback()
def _root(debug: DebugOpt = False, version: VersionOpt = False) -> None:
    STATE["debug"] = debug


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
# The commands, one module each, registered in the order `gsa --help` lists them.

app.command("train")(train_cmd.train_command)
app.command("eval")(eval_cmd.eval_command)
app.command("export")(export_cmd.export_command)
app.command("profile")(profile_cmd.profile_command)
app.command("compare")(compare_cmd.compare_command)
app.command("kernels")(kernels_cmd.kernels_command)


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
    """Our own warnings (a renamed preset key, a schedule that cannot complete, a busy CPU) as one yellow
    line; any other as Python shows it."""
    if issubclass(category, DeprecatedKeyWarning | GsaWarning):
        render.notice("warning", str(message))
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main() -> None:
    """Entry point of the ``gsa`` console script."""
    if _data_parallel_worker():
        _run_and_exit_as_worker()
    app()


def _data_parallel_worker() -> bool:
    """Whether this process is one of several of a torchrun job (read from the environment: no torch)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return "LOCAL_RANK" in os.environ and size.isdigit() and int(size) > 1


def _run_and_exit_as_worker() -> NoReturn:
    """Run the command, then end the process as :func:`gsa_cli.train.distributed.end_worker` does (why:
    there), with the command's exit code."""
    code = 0
    try:
        app()
    except SystemExit as stop:
        code = _exit_status(stop.code)
    except BaseException:  # what Python would print for an uncaught error, then its exit status
        traceback.print_exc()
        code = 1
    from gsa_cli.train.distributed import end_worker  # torch is loaded by now; not before the command

    end_worker(code)


def _exit_status(code: object) -> int:
    """The process exit status for ``SystemExit(code)``, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
