"""What a training run records beside its checkpoints: ``summary.json``, and writes that fail cleanly.

The summary follows from the run's record (its finished epochs' rows, its best epoch, its wall time
and start: what ``last.pt`` holds, see :mod:`gsa_cli.train.checkpoint`) and from what does not change
during a run (:class:`RunFacts`: its config, size, device, numerics, versions). :func:`write_or_stop`
runs one of the run's writes and turns a file that cannot be written (a full disk, a read-only
folder) into one line that names it, after marking the summary failed where it still can be.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision

from gsa_cli.config import Config
from gsa_cli.errors import GsaError
from gsa_cli.results import EpochMetrics, RunDir, RunSummary, WriteError, git_revision, now_iso
from gsa_cli.runtime import Precision
from gsa_cli.train.checkpoint import Best


@functools.cache
def _versions() -> dict[str, str | None]:
    return {
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "git_revision": git_revision(),
    }


@dataclass(frozen=True)
class RunFacts:
    """What a run's summary says that does not change while it trains."""

    run_dir: RunDir
    config: Config
    parameters: int
    gmacs: float | None  # None: not counted
    device: str  # in words
    world_size: int
    precision: Precision
    channels_last: bool
    compiled: bool
    init: str | None = None  # the warm start's source (see gsa_cli.train.warmstart)
    gsa_impl: str | None = None  # what the GSA modules run (gsa_cli.models.gsa_native.model_implementation)


def summarise(
    facts: RunFacts,
    rows: Sequence[EpochMetrics],
    best: Best,
    *,
    status: str,
    wall_time_s: float,
    started: str,
) -> RunSummary:
    """``summary.json``'s record of a run whose finished epochs are ``rows``."""
    config = facts.config
    final = rows[-1] if rows else None
    speeds = [row.images_per_s for row in rows]
    return RunSummary(
        status=status,
        run_dir=str(facts.run_dir.path),
        preset=config.name,
        model_kind=config.model.kind.value,
        dataset=config.data.dataset.value,
        epochs=config.recipe.epochs,
        epochs_done=len(rows),
        best_top1=best.top1,
        best_top5=best.top5,
        best_epoch=best.epoch,
        final_top1=final.val_top1 if final else None,
        final_top5=final.val_top5 if final else None,
        final_val_loss=final.val_loss if final else None,
        parameters=facts.parameters,
        gmacs=facts.gmacs,
        wall_time_s=round(wall_time_s, 3),
        images_per_s=sum(speeds) / len(speeds) if speeds else None,
        device=facts.device,
        world_size=facts.world_size,
        precision=facts.precision.value,
        batch_size=config.recipe.batch_size,
        channels_last=facts.channels_last,
        compiled=facts.compiled,
        started=started,
        updated=now_iso(),
        init=facts.init,
        gsa_impl=facts.gsa_impl,
        **_versions(),  # type: ignore[arg-type]
    )


def write_or_stop(run_dir: RunDir, write: Callable[[], object], failed: Callable[[], RunSummary]) -> None:
    """Run ``write``; if a file cannot be written, write ``failed()`` as ``summary.json`` where it still
    can be, and stop the run in one line.

    Raises:
        GsaError: naming the file and what is wrong (the files written before are intact), and how to
            continue once it can be written.
    """
    try:
        write()
    except WriteError as err:
        with contextlib.suppress(GsaError):
            run_dir.write_summary(failed())
        then = f"; continue with gsa train --resume {run_dir.path} once it can be written"
        resumable = run_dir.last.is_file()
        raise GsaError(
            f"{err}; the run stopped, the files written before intact{then if resumable else ''}"
        ) from None
