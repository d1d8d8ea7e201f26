"""Evaluating a checkpoint on its validation split: what ``gsa eval`` calls.

The result is written to ``eval.json`` beside the checkpoint. When that folder is a run directory (it
holds a ``summary.json``), the checkpoint must be that run's: its start and what it trained (preset,
model, data set) must be the ones ``summary.json`` records, else the evaluation is refused in one line
before anything is computed, so that a ``best.pt`` copied from another run never writes its numbers
into this one's ``eval.json``. A checkpoint file outside any run directory is evaluated, and its
``eval.json`` written beside it. (Two runs of one config started in the same second are not told
apart: the summary records its start to the second.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gsa_cli.config import Config
from gsa_cli.data import (
    DATA_ENV,
    CorruptFiles,
    OnCorrupt,
    ShardSampler,
    build_datasets,
    data_root,
    held_in_memory,
    loader_workers,
    make_loader,
)
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.models import build_model
from gsa_cli.results import EvalReport, RunDir, now_iso
from gsa_cli.runtime import device_name, resolve_device
from gsa_cli.train.checkpoint import Checkpoint, config_from_checkpoint, resolve_checkpoint
from gsa_cli.train.integrity import load_weights
from gsa_cli.train.loop import Reporter, evaluate


@dataclass(frozen=True)
class EvalOptions:
    data: str | None = None
    device: str = "auto"
    ema: bool = True  # use the EMA weights when the checkpoint has them
    batch_size: int | None = None  # default: the run's
    workers: int | None = None
    on_corrupt: OnCorrupt = OnCorrupt.FAIL


def evaluate_checkpoint(target: Path, options: EvalOptions, *, reporter: Reporter) -> EvalReport:
    """Evaluate a run's checkpoint on its validation split and write ``eval.json`` beside it.

    The evaluation repeats the one training made for the same weights (the same transform, batch
    size, precision and layout), so on the same device its top-1 is the recorded one exactly.

    Raises:
        GsaError: for an unreadable, corrupt or refused checkpoint, one whose weights do not fit its
            config, one in a run directory that is not its run's, or missing data.
        EvalNotSavedError: if ``eval.json`` cannot be written (its folder read-only or full, or another
            process writing the run directory); it carries the result.
    """
    path = resolve_checkpoint(target)
    checkpoint = Checkpoint.load(path)
    config = config_from_checkpoint(checkpoint, path)
    check_owner(checkpoint, config, path)
    device = resolve_device(options.device)
    precision, channels_last = checkpoint.options.precision, checkpoint.options.channels_last
    batch_size = options.batch_size or config.recipe.batch_size
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")

    root = data_root(options.data or os.environ.get(DATA_ENV) or None, config.data)
    _, val_set = build_datasets(config, root, augment=False)
    loader = make_loader(
        val_set,
        ShardSampler(len(val_set), rank=0, world_size=1),  # type: ignore[arg-type]
        batch_size=batch_size,
        workers=loader_workers(options.workers, root, world_size=1, in_memory=held_in_memory(config.data)),
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    model = build_model(config)
    ema = checkpoint.ema if options.ema else None
    use_ema = ema is not None
    load_weights(model, ema if ema is not None else checkpoint.model, path, "ema" if use_ema else "model")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    corrupt = CorruptFiles(options.on_corrupt, reporter.message)
    totals = evaluate(
        model,
        loader,
        device=device,
        precision=precision,
        channels_last=channels_last,
        check=corrupt.check,
        reporter=reporter,
        epoch=checkpoint.epoch,
    )
    stats = totals.stats()
    # Training recorded the accuracy of the EMA weights when there were some.
    recorded = checkpoint.val_top1 if use_ema or checkpoint.ema is None else None
    report = EvalReport(
        checkpoint=str(path),
        weights="ema" if use_ema else "model",
        epoch=checkpoint.epoch,
        top1=stats["top1"],
        top5=stats["top5"],
        loss=stats["loss"],
        images=int(stats["images"]),
        images_per_s=stats["images"] / max(stats["seconds"], 1e-9),
        recorded_top1=recorded,
        device=device_name(device),
        precision=precision.value,
        batch_size=batch_size,
        torch_version=torch.__version__,
        created=now_iso(),
    )
    _save(report, RunDir(path.parent))
    return report


def check_owner(checkpoint: Checkpoint, config: Config, path: Path) -> None:
    """Refuse a checkpoint inside a run directory that is not that run's (see the module's docstring).

    Raises:
        GsaError: naming the checkpoint, the run directory and the first thing that differs.
    """
    run = RunDir(path.parent)
    if not run.summary.is_file():
        return  # not a run directory: eval.json goes beside the file
    summary = run.read_summary()
    facts = {  # summary.json's key: (in words, the checkpoint's value)
        "started": ("start", checkpoint.started),
        "preset": ("preset", checkpoint.preset),
        "model_kind": ("model", config.model.kind.value),
        "dataset": ("data set", config.data.dataset.value),
    }
    for key, (what, own) in facts.items():
        recorded = summary.get(key)
        if recorded is not None and recorded != own:
            raise GsaError(
                f"{path}: not the checkpoint of the run in {run.path}: its run's {what} is {own}, "
                f"{run.summary.name} says {recorded}; evaluate it in its own run directory, or copy "
                "it out of this one"
            )


class EvalNotSavedError(GsaError):
    """An evaluation whose ``eval.json`` could not be written: ``report`` is its result."""

    def __init__(self, message: str, report: EvalReport) -> None:
        super().__init__(message)
        self.report = report


def _save(report: EvalReport, run: RunDir) -> None:
    """Write ``eval.json`` (holding the lock of a run directory, as its writers do); if it cannot be
    written, raise with the result, so that the caller can still show it."""
    try:
        lock = run.claim(new=False) if run.summary.is_file() else None
        try:
            run.write_eval(report)
        finally:
            if lock is not None:
                lock.release()
    except GsaError as err:
        where = "" if str(err).startswith(str(run.eval)) else f"{run.eval}: not written: "
        raise EvalNotSavedError(f"{where}{err}; the result above is not saved", report) from None
