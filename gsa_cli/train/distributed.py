"""Distributed data parallel: joining a torchrun job, reducing across ranks, launching workers.

A process started by torchrun (``torchrun --nproc_per_node N -m gsa_cli train ...``, or by
``gsa train --nproc N`` through :func:`launch`) finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment; :func:`setup` joins the process group (NCCL on CUDA, gloo on CPU) and picks the device.
Without those variables everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.runtime import resolve_device


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


def launch(
    worker_args: Sequence[str],
    *,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> None:
    """Run ``python -m gsa_cli WORKER_ARGS`` in ``nproc`` processes per node through torchrun.

    One node with no rendezvous endpoint runs standalone (a free local port); several nodes meet at
    ``rdzv_endpoint`` (``host:port``), each started with its own ``node_rank``.

    Raises:
        GsaError: when a worker fails (its own message is printed above by the worker).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"--nproc and --nnodes must be at least 1, got {nproc} and {nnodes}")
    flags = [f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == 1 and rdzv_endpoint is None:
        flags.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ConfigError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        flags += [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    args = get_args_parser().parse_args([*flags, "--module", "gsa_cli", *worker_args])
    try:
        run(args)
    except ChildFailedError as err:
        failures = ", ".join(
            f"rank {rank} exited with code {failure.exitcode}"
            for rank, failure in sorted(err.failures.items())
        )
        error = GsaError(f"distributed training failed: {failures} (its message is above)")
        codes = [failure.exitcode for failure in err.failures.values() if 0 < failure.exitcode < 256]
        error.exit_code = codes[0] if codes else 1  # a worker's own code: 2 for config, 130 for a signal
        raise error from None
