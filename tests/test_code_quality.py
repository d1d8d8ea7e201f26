"""ruff and mypy, as configured in pyproject.toml, are clean: CI fails otherwise."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff check", "ruff format", "mypy"],
)
def test_tool_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# The layers of shared/design/LAYOUT.md, read from the source: every import, lazy ones included.

PACKAGE = ROOT / "gsa_cli"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500

# What each layer may import from gsa_cli (prefixes of dotted module names). Everything may import
# gsa_cli.errors. A module not listed here (the top-level foundations) is checked by FOUNDATIONS.
LAYERS: dict[str, tuple[str, ...]] = {
    "gsa_cli.cli": (
        "gsa_cli.cli",
        "gsa_cli.train",
        "gsa_cli.bench",
        "gsa_cli.report",
        "gsa_cli.models",
        "gsa_cli.presets",
        "gsa_cli.config",
        "gsa_cli.choices",
        "gsa_cli.results",
        "gsa_cli.runtime",
        "gsa_cli.data",
    ),
    # A run records its model's multiply-adds: train/ uses bench/macs.py's counter, nothing else of bench/.
    "gsa_cli.train": (
        "gsa_cli.train",
        "gsa_cli.bench.macs",
        "gsa_cli.models",
        "gsa_cli.data",
        "gsa_cli.config",
        "gsa_cli.presets",
        "gsa_cli.results",
        "gsa_cli.runtime",
        "gsa_cli.choices",
    ),
    "gsa_cli.bench": (
        "gsa_cli.bench",
        "gsa_cli.models",
        "gsa_cli.data",
        "gsa_cli.config",
        "gsa_cli.presets",
        "gsa_cli.results",
        "gsa_cli.runtime",
        "gsa_cli.choices",
    ),
    "gsa_cli.report": ("gsa_cli.report", "gsa_cli.results", "gsa_cli.choices"),
    "gsa_cli.models": ("gsa_cli.models",),
    # The timm entry points (an optional extra): presets' model configs, built by models/.
    "gsa_cli.timm": ("gsa_cli.timm", "gsa_cli.models", "gsa_cli.presets", "gsa_cli.config", "gsa_cli.data"),
}
# The foundations import no layer above them.
FOUNDATIONS: dict[str, tuple[str, ...]] = {
    "gsa_cli.choices": (),
    "gsa_cli.yamlio": (),
    "gsa_cli.config": ("gsa_cli.choices", "gsa_cli.yamlio"),
    "gsa_cli.results": ("gsa_cli.choices", "gsa_cli.yamlio"),
    "gsa_cli.runtime": ("gsa_cli.choices",),
    "gsa_cli.longrange": ("gsa_cli.config",),
    "gsa_cli.cifar": ("gsa_cli.config", "gsa_cli.choices"),
    "gsa_cli.fashion": (),
    "gsa_cli.transforms": ("gsa_cli.config",),
    "gsa_cli.presets": ("gsa_cli.config", "gsa_cli.longrange", "gsa_cli.yamlio"),
    "gsa_cli.data": (
        "gsa_cli.config",
        "gsa_cli.choices",
        "gsa_cli.longrange",
        "gsa_cli.cifar",
        "gsa_cli.fashion",
        "gsa_cli.transforms",
    ),
}
# Sideways reaches the layers' prefixes would allow but the layout forbids.
FORBIDDEN: tuple[tuple[str, str], ...] = (
    ("gsa_cli.train.evaluate", "gsa_cli.train.run"),  # evaluation does not import the training run
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every gsa_cli module ``name`` imports (``from gsa_cli import x`` is the facade, ``gsa_cli``,
    unless ``x`` is a subpackage or module)."""
    modules = _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                parts = package.split(".")
                base = ".".join(part for part in [*parts[: len(parts) - node.level + 1], base] if part)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                imported.add(full if full in modules else base)
    return {module for module in imported if module == "gsa_cli" or module.startswith("gsa_cli.")}


def _allowed(target: str, prefixes: tuple[str, ...]) -> bool:
    return target == "gsa_cli.errors" or any(
        target == prefix or target.startswith(prefix + ".") for prefix in prefixes
    )


def _rules(name: str) -> tuple[str, ...] | None:
    for layer, prefixes in LAYERS.items():
        if name == layer or name.startswith(layer + "."):
            if name == "gsa_cli.models":  # models/__init__.py builds from a config
                return (*prefixes, "gsa_cli.config")
            return prefixes
    return FOUNDATIONS.get(name)


def test_the_import_graph_follows_the_layers() -> None:
    wrong = []
    for name, path in _modules().items():
        rules = _rules(name)
        if rules is None:
            continue  # gsa_cli (the facade), gsa_cli.__main__, gsa_cli.errors
        for target in sorted(_imports(name, path)):
            if not _allowed(target, rules) or (name, target) in FORBIDDEN:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_is_placed_in_a_layer() -> None:
    unplaced = [name for name in _modules() if _rules(name) is None]
    assert sorted(unplaced) == ["gsa_cli", "gsa_cli.__main__", "gsa_cli.errors"]


def test_the_graph_check_sees_a_wrong_arrow() -> None:
    # The check itself can fail: a report module importing torch-side code is caught.
    assert not _allowed("gsa_cli.bench.profile", LAYERS["gsa_cli.report"])
    assert not _allowed("gsa_cli", LAYERS["gsa_cli.report"])  # the package facade
    assert _allowed("gsa_cli.results", LAYERS["gsa_cli.report"])


def _long_functions(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_function_over_80_lines_and_no_module_over_500() -> None:
    problems = []
    for path in _modules().values():
        problems += _long_functions(path)
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not problems, "\n".join(problems)


def test_the_paper_file_stays_short() -> None:
    lines = len((PACKAGE / "models" / "gsa.py").read_text().splitlines())
    assert lines <= 235, f"gsa_cli/models/gsa.py has {lines} lines: keep the paper readable"
