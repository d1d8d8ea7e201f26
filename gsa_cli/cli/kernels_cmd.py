"""``gsa kernels``: build the native GSA kernel ahead of time and report its state.

A cluster job runs it once before launching its workers, so that they load the cached build instead of
compiling on first use (concurrent first builds are safe, only slower to start). It prints the kernel's
state, the instruction set it runs with, the compiler, the build's cache folder and how long the build
took; a build that fails prints the same, then one line with the compiler's first error and where its
full output is, and exits 1 (GSA modules then run the gemm implementation).
"""

from __future__ import annotations

from rich.text import Text

from gsa_cli.cli import render
from gsa_cli.errors import GsaError


def kernels_command() -> None:
    """Build the native GSA kernel (or load it from the cache) and report its state."""
    from gsa_cli.models import gsa_native

    with render.status("native GSA kernel: building or loading from the cache"):
        state = gsa_native.build()
    if state.status == "loaded" and state.build_seconds is not None:
        when = "built now" if state.built_here else "found in the cache; built"
        status = f"{state.status} ({when} in {state.build_seconds:.1f} s)"
    else:
        status = state.status
    lines = [
        ("native GSA kernel", status),
        ("instruction set", state.variant or "-"),
        ("compiler", state.compiler),
        ("cache", str(state.directory)),
    ]
    width = max(len(label) for label, _ in lines) + 2
    for label, value in lines:
        render.console.print(Text.assemble((f"{label}:".ljust(width), "bold"), value), soft_wrap=True)
    if state.error is not None:
        where = f"; the full output is in {state.log}" if state.log else ""
        raise GsaError(f"the native GSA kernel did not build: {state.error}{where}; GSA modules run 'gemm'")
