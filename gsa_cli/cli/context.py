"""What the commands share beyond their options: whether ``--debug`` was given, and which options a
user gave on the command line (as opposed to their defaults)."""

from __future__ import annotations

import typer

# Set by the root callback; read by the error handler and by the launcher (workers get --debug too).
STATE = {"debug": False}


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the option ``name`` (its Python name) was given rather than left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def flags(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` given on the command line, spelled as flags."""
    return ["--" + name.replace("_", "-").replace("overrides", "set") for name in names if given(ctx, name)]
