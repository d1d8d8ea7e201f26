"""report/ is torch-free: importing every one of its modules (and the records it reads) leaves torch
out of sys.modules, so that `gsa compare RUN_DIR...` starts fast."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import gsa_cli.report

ROOT = Path(__file__).resolve().parent.parent


def _report_modules() -> list[str]:
    return [f"gsa_cli.report.{info.name}" for info in pkgutil.iter_modules(gsa_cli.report.__path__)]


def test_report_modules_are_found() -> None:
    # The check below can only pass for the right reason if it imports the modules that exist.
    assert {"gsa_cli.report.compare", "gsa_cli.report.files", "gsa_cli.report.profile"} <= set(
        _report_modules()
    )


def test_importing_report_choices_and_results_does_not_import_torch() -> None:
    modules = [*_report_modules(), "gsa_cli.choices", "gsa_cli.results"]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.'))\n"
        "assert not loaded, f'torch was imported: {loaded[:5]}'\n"
        "print(len(sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_check_sees_torch_when_it_is_imported() -> None:
    # The same subprocess check fails for a module that does import torch (bench/ does).
    code = "import sys, gsa_cli.bench.profile\nassert 'torch' not in sys.modules\n"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
