"""The benchmark's baselines compute what the module computes, so its ratios compare like with like."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gsa", ROOT / "benchmarks" / "bench_gsa.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gsa"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("onehot", [False, True], ids=["einsum", "onehot"])
@pytest.mark.parametrize("span", [3, 9], ids=["span 3", "global"])
def test_einsum_baselines_match_the_module(onehot: bool, span: int) -> None:
    bench = _load_benchmark()
    torch.manual_seed(0)
    baseline = bench.EinsumGSA(8, 2, span, onehot=onehot).double().eval()
    with torch.no_grad():
        baseline.reference.bn.running_mean.uniform_(-1, 1)
        baseline.reference.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(baseline(x), baseline.reference(x))
