"""Distributed data parallel: joining a torchrun job, reducing across ranks, launching workers.

A process started by torchrun (``torchrun --nproc_per_node N -m gsa_cli train ...``, or by
``gsa train --nproc N`` through :func:`launch`) finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment; :func:`setup` joins the process group (NCCL on CUDA, gloo on CPU) and picks the device.
Without those variables everything here is a no-op for a single process.

The launcher and its workers live and die together. :func:`launch` runs torchrun's agent in the
launching process, which starts each worker as its child (``subprocess.Popen`` from the main thread, in
a session of its own). A SIGTERM or SIGINT to the launcher is forwarded by the agent to every worker;
the workers stop at their next step and save (:mod:`gsa_cli.train.loop`), the agent waits for them, and
the launcher exits with ``128 + signum`` and one line. A launcher killed outright (SIGKILL) cannot
forward anything, so each worker asks the kernel, early in its start-up, to send it SIGTERM when its
parent dies (:func:`die_with_launcher`: Linux's ``PR_SET_PDEATHSIG``); it then stops as if signalled.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.results import LAST_CHECKPOINT, RunLock
from gsa_cli.runtime import resolve_device

LAUNCHER_PID = "GSA_LAUNCHER_PID"  # set by launch() for its workers: the pid they must not outlive
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_flags_group: dist.ProcessGroup | None = None  # the group for all_ranks; None: the default one


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or ``gsa train --nproc``)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Whether this process is rank 0 of its job (or not in a job at all)."""
    return os.environ.get("RANK", "0") == "0"


def setup(device_spec: str) -> tuple[World, torch.device]:
    """Join the torchrun job when there is one and resolve this process's device.

    Args:
        device_spec: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; under torchrun a CUDA device becomes
            ``cuda:LOCAL_RANK``.
    """
    if not in_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(), resolve_device(device_spec)
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {world.local_rank} has no GPU: this node has {torch.cuda.device_count()}"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        global _flags_group
        # Host-side flags go through gloo, so that agreeing on one never waits for the GPU.
        group = dist.new_group(backend="gloo") if backend != "gloo" else None
        _flags_group = group if isinstance(group, dist.ProcessGroup) else None
    return world, device


def teardown() -> None:
    global _flags_group
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the flags' one included
    _flags_group = None


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all ranks (in place, and returned); unchanged with one process."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` is true on every rank (every rank gets the same answer).

    A host-side collective (gloo): it does not synchronise the GPU. Every rank must call it at the
    same point, as with any collective.
    """
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=_flags_group)
    return bool(value.item())


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main(world: World, action: Callable[[], object]) -> None:
    """Run ``action()`` on rank 0 only; a GsaError it raises is raised on every rank."""
    problem = None
    if world.is_main:
        try:
            action()
        except GsaError as err:
            problem = str(err)
    problem = broadcast(problem)
    if problem is not None:
        raise GsaError(problem)


def end_worker(code: int) -> NoReturn:
    """End a worker of a multi-process job the way :mod:`multiprocessing` ends its children: other
    threads joined, exit handlers run and streams flushed, then ``os._exit(code)``.

    Python's own finalisation is skipped on purpose. gloo's worker threads outlive
    ``destroy_process_group`` (DDP's reducer keeps the group alive) and may still be letting go of the
    last collective, whose tensors need the interpreter to be freed; during finalisation the
    interpreter ends such a thread and the process aborts ("terminate called without an active
    exception": one stopped two-process run in about 15 on the 2-core CPU, from a core dump). Any code
    that runs ranks in its own processes (tests, a user's script calling ``train``) should end them so.
    """
    for thread in threading.enumerate():  # what the interpreter waits for before its exit handlers
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def launched_by_gsa() -> bool:
    """Whether this process is a worker of :func:`launch` (which reports the run's end itself)."""
    return LAUNCHER_PID in os.environ


def die_with_launcher() -> None:
    """Have the kernel send this worker SIGTERM when its launcher dies (Linux; elsewhere a no-op).

    Call it early in a worker's start-up. The death signal belongs to the parent that started this
    process: torchrun's agent, in :func:`launch` the launching ``gsa train`` itself. If that parent
    has already gone (it died before the request was made), the worker stops at once.
    """
    if not in_torchrun() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not permitted here: the worker then outlives a killed launcher, as before
    expected = os.environ.get(LAUNCHER_PID)
    if expected is not None and expected.isdigit() and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


def check_endpoint(endpoint: str) -> None:
    """Refuse a rendezvous endpoint that is not ``HOST:PORT`` with a port from 1 to 65535.

    Raises:
        ConfigError: naming the endpoint.
    """
    host, _, port = endpoint.strip().rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--rdzv-endpoint {endpoint}: expected HOST:PORT with a port from 1 to 65535, e.g. node0:29500"
        )


def launch(
    worker_args: Sequence[str],
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    run_dir: Path | None = None,
    made: bool = False,
) -> None:
    """Run ``python -m gsa_cli WORKER_ARGS`` in ``nproc`` processes per node through torchrun.

    One node with no rendezvous endpoint runs standalone (a free local port); several nodes meet at
    ``rdzv_endpoint`` (``host:port``), each started with its own ``node_rank``. A SIGTERM or SIGINT
    stops every worker (see the module's note).

    Args:
        run_dir: The run directory the workers write, named in the message of a stopped run.
        made: ``run_dir`` was made for this launch (a default run folder): if the workers fail or stop
            having written nothing in it, it is removed, as a single process's failed start leaves none.

    Raises:
        ConfigError: for a count below 1 or a malformed endpoint, before any worker starts.
        GsaError: when a worker fails (its own message is printed above by the worker), or a signal
            stopped the run (exit code ``128 + signum``).
    """
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"--nproc and --nnodes must be at least 1, got {nproc} and {nnodes}")
    flags = [f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == 1 and rdzv_endpoint is None:
        flags.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ConfigError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        check_endpoint(rdzv_endpoint)
        flags += [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    _quiet_agent()
    parser = get_args_parser()
    parser.allow_abbrev = False  # a worker's --log is not an abbreviation of torchrun's --log-dir
    args = parser.parse_args([*flags, "--module", "gsa_cli", *worker_args])
    os.environ[LAUNCHER_PID] = str(os.getpid())
    problem: GsaError | None = None
    finished = False
    try:
        run(args)
        finished = True
    except SignalException as err:
        problem = _stopped(int(err.sigval), run_dir)
    except ChildFailedError as err:
        problem = _failed({rank: failure.exitcode for rank, failure in err.failures.items()}, run_dir)
    finally:
        os.environ.pop(LAUNCHER_PID, None)
        if made and run_dir is not None and not finished:
            _remove_if_unused(run_dir)
    # The agent is garbage now that the error and its traceback are gone. Collect it here, in the main
    # thread: a stopped agent leaves its rendezvous heartbeat timer running, and a collection that
    # happens to run in that timer's own thread fails to join it ("cannot join current thread").
    gc.collect()
    if problem is not None:
        raise problem


def _remove_if_unused(folder: Path) -> None:
    """Remove ``folder`` if nothing but (at most) its lock file is in it and no process holds it."""
    with contextlib.suppress(GsaError, OSError):
        RunLock.take(folder, made=(folder,)).abandon()


def _quiet_agent() -> None:
    """Keep torchrun's agent to its errors: its warnings as it stops the workers are not for a user."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _stopped(signum: int, run_dir: Path | None) -> GsaError:
    """The launcher's one line for a run stopped by a signal, with the shell's exit code for it."""
    name = signal.Signals(signum).name
    if run_dir is not None and (run_dir / LAST_CHECKPOINT).is_file():
        text = f"stopped by {name}; every worker has stopped: continue with gsa train --resume {run_dir}"
    else:
        text = f"stopped by {name} before the first checkpoint; every worker has stopped"
    error = GsaError(text)
    error.exit_code = 128 + signum
    return error


def _signal_of(code: int) -> int | None:
    """The signal behind a worker's exit code: killed by it (negative), or stopped on it (128 + n)."""
    number = -code if code < 0 else code - 128 if code > 128 else 0
    return number if number in signal.valid_signals() else None


def _failed(codes: Mapping[int, int], run_dir: Path | None) -> GsaError:
    """The launcher's one line for workers that failed (their own message, if any, is above)."""
    signals = {_signal_of(code) for code in codes.values()}
    if len(signals) == 1 and None not in signals:  # every failed rank stopped on one signal
        return _stopped(signals.pop() or 0, run_dir)

    def what(code: int) -> str:
        number = _signal_of(code)
        return f"exited with code {code}" if number is None else f"ended by {signal.Signals(number).name}"

    failures = ", ".join(f"rank {rank} {what(code)}" for rank, code in sorted(codes.items()))
    own = [code for _, code in sorted(codes.items()) if 0 < code < 128]  # a worker's own: 2 for config
    error = GsaError(f"distributed training failed: {failures}" + (" (its message is above)" if own else ""))
    error.exit_code = own[0] if own else 1
    return error
