"""Timers and gauges: steps timed after warm-up, medians and spreads, peak memory, dense peaks."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from gsa_cli.bench import timers
from gsa_cli.bench.timers import Timing, dense_peak, time_steps
from gsa_cli.runtime import Precision


def test_time_steps_warms_up_then_times_each_step() -> None:
    calls: list[float] = []

    def step() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.01)

    latencies = time_steps(step, device=torch.device("cpu"), warmup=2, iters=3)
    assert len(calls) == 5
    assert len(latencies) == 3
    assert all(0.01 <= t < 0.5 for t in latencies)


def test_timing_median_and_interquartile_range() -> None:
    timing = Timing([0.005, 0.001, 0.003, 0.002, 0.004], peak_mib=1.0)
    assert timing.median_ms == pytest.approx(3.0)
    assert timing.iqr_ms == pytest.approx(2.0)  # quartiles 2 ms and 4 ms


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_peak_memory_sees_a_tensor_allocated_in_the_block() -> None:
    with timers.peak_memory(torch.device("cpu")) as peak:
        at_start = timers._read_status_kib("VmRSS")  # after the gauge has released what it could
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
        del block
    assert at_start is not None
    assert peak[0] >= at_start / 1024 + 60
    # glibc may have served the block from free heap pages rather than a mapping of its own, and then
    # keeps it after the free: hand free pages back before reading the resident set.
    timers._release_cpu_memory()
    after = timers._read_status_kib("VmRSS")
    assert after is not None
    assert peak[0] > after / 1024 + 30  # the block's tensor is gone, its peak is not


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", Precision.BF16, True, (989.5, "bf16")),
        ("NVIDIA H100 80GB HBM3", Precision.FP32, True, (494.5, "tf32")),
        ("NVIDIA H100 80GB HBM3", Precision.FP32, False, (67.0, "fp32")),
        ("NVIDIA H100 PCIe", Precision.FP16, True, (756.5, "fp16")),
        ("NVIDIA H200", Precision.BF16, True, (989.5, "bf16")),
        ("NVIDIA H100 NVL", Precision.BF16, True, None),
        ("NVIDIA A100-SXM4-80GB", Precision.BF16, True, (312.0, "bf16")),
        ("NVIDIA L4", Precision.BF16, True, (121.0, "bf16")),
        ("NVIDIA L40S", Precision.BF16, True, None),
        ("NVIDIA GeForce RTX 4090", Precision.FP16, True, (165.2, "fp16")),
        ("Tesla T4", Precision.FP16, True, None),
    ],
)
def test_dense_peaks(name: str, precision: Precision, tf32: bool, expected: tuple[float, str] | None) -> None:
    assert dense_peak(name, precision, tf32=tf32) == expected


@pytest.mark.skipif(timers._cpu_wait_us() is None, reason="no Linux pressure stall information")
def test_cpu_wait_is_a_share_of_the_wall_time() -> None:
    with timers.cpu_wait() as waited:
        time.sleep(0.05)
    assert len(waited) == 1
    assert 0 <= waited[0] <= 100
