"""Timers and gauges: timed steps with device synchronisation, peak memory, and GPUs' dense peaks.

The primitives behind ``gsa profile`` (and any benchmark that wants the same honesty):

* :func:`time_steps` runs warm-up steps, then times each step to the end of its device work: CUDA
  events on a GPU (each step synchronised), ``time.perf_counter`` after a synchronisation elsewhere.
* :func:`peak_memory` measures the memory a model costs, above a baseline taken before it is built:
  ``torch.cuda.max_memory_allocated`` less what was allocated before, on a GPU; on the CPU the
  process's peak resident set size during the block (Linux ``VmHWM``, reset first through
  ``/proc/self/clear_refs``) less the resident set without the model, and the whole process's peak
  as its own number. :func:`memory_label` says which of these a number is.
* :func:`cpu_wait` measures how much a block competed for the CPUs with other work (Linux PSI): a
  timing taken on a busy machine says so.
* :func:`dense_peak` looks up a GPU's datasheet peak for a precision, for "% of peak".
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gsa_cli.runtime import Precision, synchronize

# Dense (no structured sparsity) peaks in TFLOP/s: fp32 on CUDA cores; tf32, bf16 and fp16 on tensor cores
# with fp32 accumulation. NVIDIA's H100, H200, A100 and L4 datasheets print the tensor-core figures with
# sparsity, twice these (H100 SXM bf16: 1,979 -> 989.5); the RTX 4090's come from the Ada architecture
# whitepaper. The first pattern that matches the device name wins; None: a variant not tabulated.
DENSE_PEAKS: list[tuple[str, dict[str, float] | None]] = [
    (r"NVL", None),  # H100 NVL / H200 NVL: other clocks and power than the SXM parts
    (r"H100.*PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}),
    (r"H200", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),  # SXM
    (r"H100", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),  # SXM
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    (r"RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
]


def dense_peak(name: str, precision: Precision, *, tf32: bool) -> tuple[float, str] | None:
    """The dense peak (TFLOP/s) of a device for a precision and its math mode, or ``None`` if unknown.

    Args:
        name: The device's name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        precision: The autocast precision; fp32 uses the tf32 peak when ``tf32`` is allowed.
        tf32: Whether fp32 convolutions and matmuls may use tf32 tensor cores.
    """
    math_mode = precision.value
    if precision is Precision.FP32 and tf32:
        math_mode = "tf32"
    for pattern, peaks in DENSE_PEAKS:
        if re.search(pattern, name):
            return None if peaks is None else (peaks[math_mode], math_mode)
    return None


# ---------------------------------------------------------------------------------------------------
# Timing and memory.


@dataclass(frozen=True)
class MemoryReading:
    """The memory a block cost, in MiB (MiB = 2**20 bytes); ``None`` where it could not be measured.

    Attributes:
        peak_mib: The peak above the baseline: what the model built in the block, its inputs and its
            steps held at most (weights, activations; gradients and optimizer state for training).
        baseline_mib: The process without the model: on the CPU the larger of the resident set before
            the block and after it (once the block's model is gone, so that one-time library set-up that
            its first step triggered counts in the baseline, not in the model's memory); on a GPU what
            was allocated before the block.
        process_mib: The whole process's peak resident set during the block (CPU only): interpreter,
            libraries and model together.
    """

    peak_mib: float | None
    baseline_mib: float | None = None
    process_mib: float | None = None


@dataclass(frozen=True)
class Timing:
    """Seconds per timed step, the memory around them and the CPU contention (%, or None)."""

    latencies_s: list[float]
    memory: MemoryReading
    cpu_wait_pct: float | None = None

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.latencies_s)

    @property
    def iqr_ms(self) -> float:
        if len(self.latencies_s) < 2:
            return 0.0
        quartiles = statistics.quantiles(self.latencies_s, n=4, method="inclusive")
        return 1e3 * (quartiles[2] - quartiles[0])


def _read_status_kib(field_name: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux 4.0+); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return _read_status_kib("VmHWM") is not None


def _release_cpu_memory() -> None:
    """Free what can be freed, and hand glibc's free pages back, so that an earlier peak does not linger."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_label(device: torch.device) -> str:
    """What the peak memory columns measure on ``device`` (the caption and the files say it)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the model"
    if _reset_peak_rss():
        return "peak RSS above the process without the model (Linux VmHWM)"
    return "process peak RSS since start (ru_maxrss), no baseline on this system"


def _cpu_rss_mib() -> float | None:
    """The resident set now, in MiB, after handing back what can be freed."""
    _release_cpu_memory()
    kib = _read_status_kib("VmRSS")
    return None if kib is None else kib / 1024


def _max_rss_mib() -> float:
    """The process's peak resident set since it started (``getrusage``), in MiB."""
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, else KiB


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[MemoryReading]]:
    """Yield a list that holds, after the block, the block's :class:`MemoryReading`.

    Build the model inside the block, in a function that returns before the block ends: on the CPU
    the baseline is also read once the model is gone, so that what its first step set up for good
    (library pages, thread pools, kernel caches) is not taken for the model's memory. Where the peak
    cannot be reset (no Linux ``/proc``), only the process's peak since start is known.
    """
    result: list[MemoryReading] = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
        yield result
        peak = torch.cuda.max_memory_allocated(device)
        result.append(MemoryReading((peak - allocated) / 2**20, allocated / 2**20))
        return
    before = _cpu_rss_mib()
    resettable = _reset_peak_rss()
    yield result
    if not resettable or before is None:
        result.append(MemoryReading(None, None, _max_rss_mib()))
        return
    peak_kib = _read_status_kib("VmHWM")
    after = _cpu_rss_mib()
    process = before if peak_kib is None else peak_kib / 1024
    baseline = before if after is None else max(before, after)
    result.append(MemoryReading(max(0.0, process - baseline), baseline, process))


def _cpu_wait_us() -> int | None:
    """Linux PSI: microseconds, since boot, during which some runnable task waited for a CPU."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/pressure/cpu").read_text(encoding="ascii").splitlines():
            if line.startswith("some "):
                return int(line.rsplit("total=", 1)[1])
    return None


@contextlib.contextmanager
def cpu_wait() -> Iterator[list[float]]:
    """Yield a list that holds, after the block, the share (%) of its wall time during which some task
    on this machine waited for a CPU (Linux pressure stall information); stays empty where PSI is
    absent. Near 0: the timing had the CPUs to itself; tens of %: it competed with other work."""
    result: list[float] = []
    began_us, began = _cpu_wait_us(), time.perf_counter()
    yield result
    ended_us, wall = _cpu_wait_us(), time.perf_counter() - began
    if began_us is not None and ended_us is not None and wall > 0:
        result.append(min(100.0, 100 * (ended_us - began_us) / 1e6 / wall))


def time_steps(step: Callable[[], object], *, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Run ``step`` ``warmup`` times, then time ``iters`` runs; return each run's seconds.

    Every timed run ends with a device synchronisation; on a GPU it is timed with CUDA events.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    latencies = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            latencies.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            step()
            synchronize(device)
            latencies.append(time.perf_counter() - began)
    return latencies


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )
