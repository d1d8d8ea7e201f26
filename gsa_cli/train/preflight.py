"""What a run checks before it starts: its options, its optional packages, and the CPU it will share.

:func:`prepare` runs first in :func:`gsa_cli.train.run.train`, before any folder is made or any data
read: options that cannot work together, a tracker or ``--init timm`` whose package is missing, an
``--init`` path that is not there, each refused in one line; then torch's threads are set.

:func:`warn_if_cpu_busy` looks, once the start has succeeded (a start that fails says only why), at
the CPU a run on it will share. torch's default is one thread
per core, and its parallel operators wait for their slowest thread at every step: a core that other
work keeps busy slows all of them, often many times over (a run that takes minutes on an idle machine
can take an hour). It measures, over :data:`WINDOW_S` while this process sleeps, how many of the cores
this process may run on were busy (``/proc/stat``: their time not idle, whoever used it), or where
there is no ``/proc/stat`` the one-minute load average; if fewer cores are free than torch has
threads, it warns once with the number measured and the ``--threads`` that fits. Only when the run is
on the CPU and its threads were not given. Pressure stall information (``/proc/pressure/cpu``) is not
used: it counts time that tasks *waited* for a core, which stays near zero while another job keeps
exactly the cores busy, and rises only once this run's threads join in.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gsa_cli.errors import BusyCpuWarning, ConfigError
from gsa_cli.train.options import TrainOptions
from gsa_cli.train.trackers import check_trackers
from gsa_cli.train.warmstart import check_init

WINDOW_S = 0.25  # the CPU is watched this long at the start
PROC_STAT = Path("/proc/stat")


def prepare(options: TrainOptions) -> None:
    """Refuse options that cannot work (:func:`check_options`), before anything starts; set torch's
    threads when given."""
    check_options(options)
    if options.threads is not None:
        torch.set_num_threads(options.threads)


def check_options(options: TrainOptions) -> None:
    """Refuse options that cannot work, or need a package that is not installed.

    Raises:
        ConfigError: for ``--threads`` below 1, ``--init`` with ``--resume``, or a missing package.
        GsaError: for an ``--init`` path that is not there.
    """
    if options.threads is not None and options.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {options.threads}")
    if options.init is not None and options.resume is not None:
        raise ConfigError(
            "--init starts a new run from weights, --resume continues a run from its own checkpoint: "
            "drop --init"
        )
    check_trackers(options.log)
    check_init(options.init)


# ---------------------------------------------------------------------------------------------------
# A CPU busy with other work.


@dataclass(frozen=True)
class CpuReading:
    """How busy the CPU was at the start: ``busy`` cores' worth of ``cores``, measured by ``source``."""

    busy: float
    cores: int
    source: str


def _cpu_times(text: str, cpus: set[int]) -> tuple[int, int]:
    """Busy and total clock ticks of the CPUs ``cpus`` in the text of ``/proc/stat``."""
    busy = total = 0
    for line in text.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def measure_cpu(
    window_s: float = WINDOW_S, *, stat: Path = PROC_STAT, sleep: Callable[[float], None] = time.sleep
) -> CpuReading | None:
    """How many of this process's cores were busy over ``window_s`` (this process asleep); None
    where neither ``/proc/stat`` nor a load average can be read."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        busy_before, total_before = _cpu_times(stat.read_text(), cpus)
        sleep(window_s)
        busy_after, total_after = _cpu_times(stat.read_text(), cpus)
    except (OSError, ValueError):
        try:
            return CpuReading(busy=os.getloadavg()[0], cores=len(cpus), source="the load average")
        except OSError:
            return None
    ticks = total_after - total_before
    if ticks <= 0:
        return None
    return CpuReading(
        busy=len(cpus) * (busy_after - busy_before) / ticks, cores=len(cpus), source="/proc/stat"
    )


def busy_cpu_message(reading: CpuReading, threads: int) -> str | None:
    """The warning for ``threads`` torch threads on a CPU as busy as ``reading``; None when enough
    cores are free for them."""
    free = max(1, math.floor(reading.cores - reading.busy + 0.5))
    if free >= threads:
        return None
    return (
        f"the CPU is busy with other work: {reading.busy:.1f} of {reading.cores} cores were in use at the "
        f"start ({reading.source}), and torch's {threads} threads wait for their slowest at every step "
        f"(a run can be many times slower); train with --threads {free}"
    )


def warn_if_cpu_busy(
    device: torch.device,
    options: TrainOptions,
    *,
    measure: Callable[[], CpuReading | None] | None = None,
) -> None:
    """Warn (:class:`BusyCpuWarning`) when a run on the CPU with torch's default threads starts on a
    CPU that other work keeps busy (see the module)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or options.threads is not None or threads < 2:
        return
    reading = (measure or measure_cpu)()
    message = busy_cpu_message(reading, threads) if reading is not None else None
    if message is not None:
        warnings.warn(message, BusyCpuWarning, stacklevel=2)
