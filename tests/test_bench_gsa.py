"""The benchmark's baselines compute what the module computes, so its ratios compare like with like."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import torch

from gsa_cli.models import GlobalSelfAttention2d

ROOT = Path(__file__).resolve().parent.parent
Loader = Callable[[str], ModuleType]  # the conftest fixture load_benchmark


@pytest.mark.parametrize("span", [3, 9], ids=["span 3", "global"])
def test_onehot_baseline_matches_the_module(span: int, load_benchmark: Loader) -> None:
    bench = load_benchmark("bench_gsa")
    torch.manual_seed(0)
    baseline = bench.OneHotGSA(8, 2, span).double().eval()
    with torch.no_grad():
        baseline.reference.bn.running_mean.uniform_(-1, 1)
        baseline.reference.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(baseline(x), baseline.reference(x))


def test_einsum_baseline_is_the_module_reference_and_gsa_its_default(load_benchmark: Loader) -> None:
    bench = load_benchmark("bench_gsa")
    einsum, gsa = bench.build("einsum", 8, 7, 2), bench.build("gsa", 8, 7, 2)
    assert isinstance(einsum, GlobalSelfAttention2d)
    assert isinstance(gsa, GlobalSelfAttention2d)
    assert (einsum.implementation, gsa.implementation) == ("reference", "auto")
    assert einsum.span == gsa.span == 7


def test_benchmark_runs_every_implementation_under_bf16_autocast_channels_last(tmp_path: Path) -> None:
    out = tmp_path / "bench.csv"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gsa.py"), "--stages", "4", "--batch", "1"]
    command += ["--iters", "1", "--warmup", "0", "--repeats", "1", "--precision", "bf16", "--channels-last"]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True, timeout=300)

    table = pd.read_csv(out).set_index("impl")
    assert list(table.index) == ["gsa", "einsum", "onehot", "conv3x3", "qkv1x1", "dense"]
    assert "error" not in table
    assert (table["precision"] == "bf16").all()
    assert table["channels_last"].all()
    assert (table["out_dtype"] == "bfloat16").all()  # the workers ran under autocast
    assert (table[["fwd_ms", "fwd_bwd_ms", "peak_mem_mib"]] > 0).all().all()
    assert table.loc["einsum", "fwd_bwd_ms_vs_einsum"] == 1.0
    assert "cpu_wait_pct" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_stops_at_once_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    script = ROOT / "benchmarks" / "gpu_runs.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(script), str(out)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1]
        == "benchmarks/gpu_runs.sh: no CUDA device here; run it on a GPU machine"
    )
    assert not out.exists()


def test_step_profile_reports_wall_busy_time_and_operators() -> None:
    script = ROOT / "benchmarks" / "gpu_step_profile.py"
    args = [
        "--preset",
        "digits",
        "--model",
        "gsa",
        "--batch",
        "2",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--top",
        "2",
    ]
    result = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("digits gsa, batch 2, CPU, bf16 False, channels-last False: wall ")
    assert "ms/step, device-busy " in lines[0]
    assert lines[0].endswith(" 0 launches/step")
    assert lines[1] == "  by own CPU time (ms/step, calls/step):"
    assert len(lines) == 4  # the title and two operators (once: on the CPU host time is device time)
