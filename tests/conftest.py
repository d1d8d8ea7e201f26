"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from gsa_cli.models import gsa_native


@pytest.fixture(scope="session")
def kernel() -> gsa_native.KernelState:
    """The native GSA kernel, built once per test session (or found in the cache); where it cannot be
    built here, the tests that use it are skipped with the reason."""
    state = gsa_native.build()
    if state.error is not None:
        pytest.skip(f"the native kernel does not build here: {state.error}")
    return state
