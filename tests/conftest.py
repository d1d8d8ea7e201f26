"""Fixtures shared by the test modules."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from gsa_cli.models import gsa_native

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def load_benchmark() -> Callable[[str], ModuleType]:
    """Import a script of ``benchmarks/`` by its name: they are run by path, not installed."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def kernel() -> gsa_native.KernelState:
    """The native GSA kernel, built once per test session (or found in the cache); where it cannot be
    built here, the tests that use it are skipped with the reason."""
    state = gsa_native.build()
    if state.error is not None:
        pytest.skip(f"the native kernel does not build here: {state.error}")
    return state
