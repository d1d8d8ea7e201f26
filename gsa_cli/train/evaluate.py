"""Evaluating a checkpoint on its validation split: what ``gsa eval`` calls."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

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
from gsa_cli.train.checkpoint import Checkpoint, config_from_checkpoint
from gsa_cli.train.loop import Reporter, evaluate


@dataclass(frozen=True)
class EvalOptions:
    data: str | None = None
    device: str = "auto"
    ema: bool = True  # use the EMA weights when the checkpoint has them
    batch_size: int | None = None  # default: the run's
    workers: int | None = None
    on_corrupt: OnCorrupt = OnCorrupt.FAIL


def resolve_checkpoint(target: Path) -> Path:
    """A checkpoint file, or a run directory's ``best.pt`` (else its ``last.pt``).

    Raises:
        GsaError: if ``target`` is neither.
    """
    if target.is_dir():
        run = RunDir(target)
        for candidate in (run.best, run.last):
            if candidate.is_file():
                return candidate
        raise GsaError(
            f"{target}: no best.pt or last.pt here; give a run directory of gsa train or a .pt file"
        )
    if not target.exists():
        raise GsaError(f"{target}: no such run directory or checkpoint")
    return target


def evaluate_checkpoint(target: Path, options: EvalOptions, *, reporter: Reporter) -> EvalReport:
    """Evaluate a run's checkpoint on its validation split and write ``eval.json`` beside it.

    The evaluation repeats the one training made for the same weights (the same transform, batch
    size, precision and layout), so on the same device its top-1 is the recorded one exactly.

    Raises:
        GsaError: for an unreadable or refused checkpoint, or missing data.
        EvalNotSavedError: if ``eval.json`` cannot be written (its folder read-only or full, or another
            process writing the run directory); the result is reported first, and carried.
    """
    path = resolve_checkpoint(target)
    checkpoint = Checkpoint.load(path)
    config = config_from_checkpoint(checkpoint, path)
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
    model.load_state_dict(ema if ema is not None else checkpoint.model)
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
    _save(report, RunDir(path.parent), reporter)
    return report


class EvalNotSavedError(GsaError):
    """An evaluation whose ``eval.json`` could not be written: ``report`` is its result."""

    def __init__(self, message: str, report: EvalReport) -> None:
        super().__init__(message)
        self.report = report


def _save(report: EvalReport, run: RunDir, reporter: Reporter) -> None:
    """Write ``eval.json`` (holding the lock of a run directory, as its writers do); if it cannot be
    written, report the result in one line and raise, so that the evaluation is not lost."""
    try:
        lock = run.claim(new=False) if run.summary.is_file() else None
        try:
            run.write_eval(report)
        finally:
            if lock is not None:
                lock.release()
    except GsaError as err:
        reporter.message(
            f"top-1 {report.top1:.2f}%, top-5 {report.top5:.2f}%, loss {report.loss:.4f} "
            f"on {report.images:,} images ({report.weights} weights, epoch {report.epoch})"
        )
        where = "" if str(err).startswith(str(run.eval)) else f"{run.eval}: not written: "
        raise EvalNotSavedError(f"{where}{err}; the result above is not saved", report) from None
