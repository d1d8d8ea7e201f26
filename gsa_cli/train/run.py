"""A training run, wired from a config: data, model, recipe, run directory.

:func:`train` is what ``gsa train`` calls (``gsa eval`` calls :mod:`gsa_cli.train.evaluate`); it works the
same from a notebook. It knows nothing of GSA (the model names its own parameters kept out of weight
decay, ``model.no_weight_decay()``); the loops themselves live in :mod:`gsa_cli.train.loop`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torchvision
import yaml
from torch import nn

from gsa_cli.bench.macs import count_gmacs
from gsa_cli.config import Config, config_to_yaml
from gsa_cli.data import (
    CorruptFiles,
    OnCorrupt,
    ShardSampler,
    TrainSampler,
    build_datasets,
    data_root,
    make_loader,
)
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.models import build_model
from gsa_cli.presets import resolve_config
from gsa_cli.results import (
    EpochMetrics,
    RunDir,
    RunSummary,
    default_run_dir,
    git_revision,
    now_iso,
)
from gsa_cli.runtime import Precision, device_name, seed_everything
from gsa_cli.train import distributed
from gsa_cli.train.loop import (
    ModelEma,
    Reporter,
    Totals,
    Trainer,
    TrainingStoppedError,
    build_optimizer,
    load_checkpoint,
    param_groups,
    save_checkpoint,
    warmup_cosine,
)

DATA_ENV = "GSA_DATA"


class RunReporter(Reporter, Protocol):
    """A :class:`~gsa_cli.train.loop.Reporter` that also hears about each finished epoch."""

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None: ...


class _Silent:
    """The reporter of every rank but the first."""

    def start(self, phase: str, epoch: int, total: int, done: int) -> None:
        pass

    def update(self, done: int, stats: dict[str, float]) -> None:
        pass

    def finish(self) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None:
        pass


@dataclass(frozen=True)
class TrainOptions:
    """How (not what) to train: where, on which device, in which precision.

    Args (fields):
        out: The run directory; default ``runs/<preset>-<model>-<timestamp>``.
        resume: A run directory to continue from its ``last.pt`` (its config, not a new one).
        data: The data folder; default the ``GSA_DATA`` environment variable.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: fp32, or bf16 / fp16 autocast (fp16 with a gradient scaler).
        channels_last: Train in the channels-last memory layout.
        compile: ``torch.compile`` the model for training.
        workers: Loader processes per rank; None: 0 for in-memory data sets, else up to 8.
        threads: CPU threads for torch's operators; None: torch's default (one per core).
        sync_bn: Synchronise BatchNorm statistics across ranks.
        on_corrupt: Fail on an unreadable image (default), or skip it with a warning.
    """

    out: Path | None = None
    resume: Path | None = None
    data: str | None = None
    device: str = "auto"
    precision: Precision = Precision.FP32
    channels_last: bool = False
    compile: bool = False
    workers: int | None = None
    threads: int | None = None
    sync_bn: bool = False
    on_corrupt: OnCorrupt = OnCorrupt.FAIL


# ---------------------------------------------------------------------------------------------------
# Pieces.


def config_from_checkpoint(payload: dict[str, Any], source: Path) -> Config:
    raw = yaml.safe_load(str(payload["config_yaml"]))
    return resolve_config(raw, name=str(payload["preset"]), source=f"{source} (its saved config)")


def loader_workers(requested: int | None, root: Path | None, world: distributed.World) -> int:
    if requested is not None:
        if requested < 0:
            raise ConfigError(f"--workers must not be negative, got {requested}")
        return requested
    if root is None:  # digits and synthetic live in memory
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def _batch_transform(config: Config) -> Any:
    recipe, classes = config.recipe, config.data.num_classes
    from torchvision.transforms import v2

    choices: list[Any] = []
    if recipe.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=recipe.mixup_alpha, num_classes=classes))
    if recipe.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=recipe.cutmix_alpha, num_classes=classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng(world: distributed.World) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (on every rank)."""
    state = _rng_state()
    if not world.distributed:
        return [state]
    states: list[Any] = [None] * world.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _on_main(world: distributed.World, action: Any) -> None:
    """Run ``action()`` on rank 0; a GsaError it raises is raised on every rank."""
    problem = None
    if world.is_main:
        try:
            action()
        except GsaError as err:
            problem = str(err)
    problem = distributed.broadcast(problem)
    if problem is not None:
        raise GsaError(problem)


@functools.cache
def _versions() -> dict[str, str | None]:
    return {
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "git_revision": git_revision(),
    }


# ---------------------------------------------------------------------------------------------------
# Training.


def train(config: Config | None, options: TrainOptions, *, reporter: RunReporter) -> RunSummary:
    """Train ``config`` (or continue ``options.resume``) and return the run's summary.

    Writes the run directory (rank 0 only): ``config.yaml``, ``metrics.csv`` and ``summary.json``,
    ``last.pt`` after every epoch and ``best.pt``. SIGINT/SIGTERM stop at the next step, save
    ``last.pt`` there (resumable) and raise :class:`TrainingStoppedError`.

    Raises:
        ConfigError: for options or data that do not fit the config.
        GsaError: for missing data, unreadable files or checkpoints, a non-finite loss, a signal.
    """
    if options.threads is not None:
        if options.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {options.threads}")
        torch.set_num_threads(options.threads)
    world, device = distributed.setup(options.device)
    try:
        return _train(config, options, world, device, reporter if world.is_main else _Silent())
    finally:
        distributed.teardown()


def _train(
    config: Config | None,
    options: TrainOptions,
    world: distributed.World,
    device: torch.device,
    reporter: RunReporter,
) -> RunSummary:
    resumed: dict[str, Any] | None = None
    precision, channels_last = options.precision, options.channels_last
    if options.resume is not None:
        run_dir = RunDir(options.resume)
        resumed = load_checkpoint(run_dir.last)
        config = config_from_checkpoint(resumed, run_dir.last)
        precision = Precision(resumed["options"]["precision"])
        channels_last = bool(resumed["options"]["channels_last"])
    else:
        if config is None:
            raise ConfigError("give a config to train, or a run directory to resume")
        out = options.out or default_run_dir(config.name, config.model.kind.value)
        run_dir = RunDir(Path(distributed.broadcast(str(out))))
        _on_main(world, run_dir.create)
    recipe = config.recipe

    # Data.
    root = data_root(options.data or os.environ.get(DATA_ENV) or None, config.data)
    train_set, val_set = build_datasets(config, root)
    corrupt = CorruptFiles(options.on_corrupt, reporter.message)
    workers = loader_workers(options.workers, root, world)
    sampler = TrainSampler(train_set, rank=world.rank, world_size=world.world_size, seed=recipe.seed)
    if sampler.num_samples < 2:
        raise ConfigError(
            f"{sampler.total_size} training images are too few to train on {world.world_size} rank(s)"
        )
    train_loader = make_loader(
        train_set,
        sampler,
        batch_size=recipe.batch_size,
        workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=sampler.num_samples >= recipe.batch_size,  # no ragged last batch, if a full one exists
    )
    val_loader = make_loader(
        val_set,
        ShardSampler(len(val_set), rank=world.rank, world_size=world.world_size),  # type: ignore[arg-type]
        batch_size=recipe.batch_size,
        workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    steps_per_epoch = len(train_loader)

    # Model: the same initial weights on every rank; then each rank its own augmentation stream.
    seed_everything(recipe.seed)
    model = build_model(config)
    parameters = sum(p.numel() for p in model.parameters())
    gmacs = (
        count_gmacs(model, img_size=config.data.img_size, channels=config.data.channels)
        if world.is_main
        else None
    )
    if options.sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices: torch's SyncBatchNorm does not run on the CPU")
    if options.sync_bn and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward: Any = model
    if world.distributed:
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if options.compile:
        forward = torch.compile(forward)
    seed_everything(recipe.seed + world.rank)

    optimizer = build_optimizer(
        param_groups(model, weight_decay=recipe.weight_decay, no_decay=model.no_weight_decay()), recipe
    )
    total_steps = recipe.epochs * steps_per_epoch
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=precision is Precision.FP16)
    ema = ModelEma(model, recipe.ema_decay) if recipe.ema_decay is not None else None
    trainer = Trainer(
        model=model,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        ema=ema,
        device=device,
        precision=precision,
        label_smoothing=recipe.label_smoothing,
        grad_clip=recipe.grad_clip,
        channels_last=channels_last,
        check=corrupt.check,
        # Only skipping can leave a rank without a batch; failing stops the run on that rank.
        agree=distributed.all_ranks if options.on_corrupt is OnCorrupt.SKIP else (lambda keep: keep),
        batch_transform=_batch_transform(config),
        sync_every=1 if device.type == "cpu" else 10,
    )

    # Where we start: from scratch, or where the checkpoint left off.
    epoch, batches_done, carried = 0, 0, None
    best: dict[str, Any] = {"top1": None, "top5": None, "epoch": None}
    wall_before, started = 0.0, now_iso()
    rows: list[EpochMetrics] = []
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resumed["ema"])
        trainer.step = int(resumed["step"])
        epoch, batches_done = int(resumed["epoch"]), int(resumed["batches_done"])
        if resumed["partial"] is not None:
            # Saved summed over ranks: rank 0 carries the counts, every rank its time.
            partial = Totals(**resumed["partial"])
            carried = partial if world.is_main else Totals(seconds=partial.seconds)
        best = dict(resumed["best"])
        wall_before, started = float(resumed["wall_time_s"]), str(resumed["started"])
        rng = resumed["rng"]
        if len(rng) == world.world_size:
            _set_rng_state(rng[world.rank])
        rows = run_dir.read_metrics()[:epoch]
        done_msg = f"epoch {epoch} of {recipe.epochs}" + (f", batch {batches_done}" if batches_done else "")
        reporter.message(f"resuming {run_dir.path} after {done_msg}")
    else:
        _on_main(world, lambda: run_dir.write_config(config_to_yaml(config)))

    session_start = time.perf_counter()

    def wall_time() -> float:
        return wall_before + time.perf_counter() - session_start

    def summary(status: str) -> RunSummary:
        final = rows[-1] if rows else None
        speeds = [row.images_per_s for row in rows]
        return RunSummary(
            status=status,
            run_dir=str(run_dir.path),
            preset=config.name,
            model_kind=config.model.kind.value,
            dataset=config.data.dataset.value,
            epochs=recipe.epochs,
            epochs_done=len(rows),
            best_top1=best["top1"],
            best_top5=best["top5"],
            best_epoch=best["epoch"],
            final_top1=final.val_top1 if final else None,
            final_top5=final.val_top5 if final else None,
            final_val_loss=final.val_loss if final else None,
            parameters=parameters,
            gmacs=gmacs,
            wall_time_s=round(wall_time(), 3),
            images_per_s=sum(speeds) / len(speeds) if speeds else None,
            device=device_name(device),
            world_size=world.world_size,
            precision=precision.value,
            batch_size=recipe.batch_size,
            channels_last=channels_last,
            compiled=options.compile,
            started=started,
            updated=now_iso(),
            **_versions(),  # type: ignore[arg-type]
        )

    def checkpoint(partial: Totals | None, done: int, val_top1: float | None) -> dict[str, Any]:
        return {
            "preset": config.name,
            "config_yaml": config_to_yaml(config),
            "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,  # epochs finished
            "batches_done": done,  # of the next epoch, when stopped part-way
            "partial": dataclasses.asdict(partial) if partial is not None else None,
            "step": trainer.step,
            "best": best,
            "val_top1": val_top1,  # of the weights evaluated (EMA when there is one)
            "rng": _gather_rng(world),
            "world_size": world.world_size,
            "options": {"precision": precision.value, "channels_last": channels_last},
            "wall_time_s": wall_time(),
            "started": started,
        }

    def stopped(signum: int) -> TrainingStoppedError:
        error = TrainingStoppedError(
            f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {trainer.step}; "
            f"the checkpoint is saved: continue with gsa train --resume {run_dir.path}"
        )
        error.exit_code = 128 + signum
        return error

    with trainer.stop:
        try:
            while epoch < recipe.epochs:
                sampler.set_epoch(epoch)
                sampler.start = batches_done * recipe.batch_size
                outcome = trainer.train_epoch(
                    train_loader,
                    epoch=epoch + 1,
                    reporter=reporter,
                    carried=carried,
                    batches_done=batches_done,
                    distributed=world.distributed,
                )
                sampler.start, carried = 0, None
                if not outcome.finished:
                    partial = outcome.totals.reduced(device)
                    payload = checkpoint(partial, outcome.batches_done, None)
                    if world.is_main:
                        save_checkpoint(run_dir.last, payload)
                        run_dir.write_summary(summary("interrupted"))
                    raise stopped(trainer.stop.signum or signal.SIGINT)
                train_totals = outcome.totals.reduced(device)
                evaluated = ema.module if ema else model
                if recipe.precise_bn_batches:
                    trainer.recalibrate_batch_norm(evaluated, train_loader, recipe.precise_bn_batches)
                val = trainer.evaluate(evaluated, val_loader, epoch=epoch + 1, reporter=reporter)
                epoch, batches_done = epoch + 1, 0
                train_stats, val_stats = train_totals.stats(), val.stats()
                row = EpochMetrics(
                    epoch=epoch,
                    lr=outcome.lr,
                    train_loss=train_stats["loss"],
                    train_top1=train_stats["top1"],
                    val_loss=val_stats["loss"],
                    val_top1=val_stats["top1"],
                    val_top5=val_stats["top5"],
                    images_per_s=train_stats["images"] / max(outcome.totals.seconds, 1e-9),
                    epoch_time_s=outcome.totals.seconds + val.seconds,
                )
                rows.append(row)
                is_best = best["top1"] is None or row.val_top1 > best["top1"]
                if is_best:
                    best = {"top1": row.val_top1, "top5": row.val_top5, "epoch": epoch}
                payload = checkpoint(None, 0, row.val_top1)
                if world.is_main:
                    save_checkpoint(run_dir.last, payload)
                    if is_best:
                        _copy_atomic(run_dir.last, run_dir.best)
                    run_dir.write_metrics(rows)
                    status = "finished" if epoch == recipe.epochs else "running"
                    run_dir.write_summary(summary(status))
                reporter.epoch_end(row, recipe.epochs, is_best)
                if epoch < recipe.epochs and any_signal(trainer, device):
                    raise stopped(trainer.stop.signum or signal.SIGINT)
        except TrainingStoppedError as err:
            if err.exit_code == 1 and world.is_main:  # a non-finite loss: last.pt stays as it was
                run_dir.write_summary(summary("failed"))
            raise
    return summary("finished")


def any_signal(trainer: Trainer, device: torch.device) -> bool:
    return distributed.any_rank(trainer.stop.signum is not None, device)


def _copy_atomic(source: Path, target: Path) -> None:
    from gsa_cli.results import atomic_path

    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
