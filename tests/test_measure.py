"""Timers and gauges: steps timed after warm-up, medians and spreads, peak memory, dense peaks."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from gsa_cli.bench import timers
from gsa_cli.bench.timers import MemoryReading, Timing, dense_peak, time_steps
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
    timing = Timing([0.005, 0.001, 0.003, 0.002, 0.004], MemoryReading(1.0))
    assert timing.median_ms == pytest.approx(3.0)
    assert timing.iqr_ms == pytest.approx(2.0)  # quartiles 2 ms and 4 ms


def _hold(mib: int) -> None:
    """Allocate and write ``mib`` MiB, then free them (as a profiled model's memory is, on return)."""
    block = torch.ones(mib * 2**20 // 4)
    assert block.sum().item() == mib * 2**20 // 4  # every page touched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_memory_above_the_baseline_is_the_block_s_own() -> None:
    with timers.peak_memory(torch.device("cpu")) as small:
        _hold(32)
    with timers.peak_memory(torch.device("cpu")) as large:
        _hold(96)
    (small_reading,), (large_reading,) = small, large
    for reading, mib in ((small_reading, 32), (large_reading, 96)):
        assert reading.peak_mib is not None
        assert reading.baseline_mib is not None
        assert reading.process_mib is not None
        # The tensor's bytes, plus little else: not the ~500 MiB of interpreter and torch around it.
        assert mib - 1 <= reading.peak_mib < mib + 24
        assert reading.baseline_mib > 100  # the process holds Python and torch
        assert reading.process_mib == pytest.approx(reading.baseline_mib + reading.peak_mib, abs=0.01)
    assert large_reading.peak_mib - small_reading.peak_mib == pytest.approx(64, abs=12)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_memory_one_time_set_up_stays_in_the_baseline() -> None:
    kept: list[torch.Tensor] = []
    with timers.peak_memory(torch.device("cpu")) as reading:
        kept.append(torch.ones(48 * 2**20 // 4))  # outlives the block, as a library cache would
    (memory,) = reading
    assert memory.peak_mib is not None
    assert memory.peak_mib < 16  # held before and after alike: part of the baseline, not the block's
    del kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_label_names_the_method() -> None:
    label = timers.memory_label(torch.device("cpu"))
    assert label == "peak RSS above the process without the model (Linux VmHWM)"


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
