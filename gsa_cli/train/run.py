"""A training run, wired from a config: data, model, recipe, run directory.

:func:`train` is what ``gsa train`` calls (``gsa eval`` calls :mod:`gsa_cli.train.evaluate`); it works the
same from a notebook. A run is a :class:`_Run` whose phases are its methods: open the run directory (or
the checkpoint to resume), build the data, build the model and the recipe, resume, then per epoch
train, evaluate, save and summarise, and stop on a signal. It knows nothing of GSA (the model names its
own parameters kept out of weight decay, ``model.no_weight_decay()``); the loops live in
:mod:`gsa_cli.train.loop`, the recipe's parts in :mod:`gsa_cli.train.recipe`, the checkpoint in
:mod:`gsa_cli.train.checkpoint`, the data phase in :mod:`gsa_cli.train.loaders`, the checks before a
start in :mod:`gsa_cli.train.preflight`, warm starts (``--init``) in :mod:`gsa_cli.train.warmstart`
and experiment tracking (``--log``) behind :mod:`gsa_cli.train.trackers`'s interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from gsa_cli.bench.macs import count_gmacs
from gsa_cli.config import Config, config_to_yaml
from gsa_cli.data import OnCorrupt
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.models import build_model
from gsa_cli.models.gsa_native import model_implementation
from gsa_cli.results import EpochMetrics, RunDir, RunLock, RunSummary, WriteError, default_run_dir, now_iso
from gsa_cli.runtime import Precision, device_name, seed_everything
from gsa_cli.train import distributed, preflight, warmstart
from gsa_cli.train.checkpoint import (
    Best,
    Checkpoint,
    PartialEpoch,
    TrainedWith,
    capture_rng,
    config_from_checkpoint,
    publish,
    restore_rng,
)
from gsa_cli.train.integrity import load_state, load_weights
from gsa_cli.train.loaders import RunData, run_data
from gsa_cli.train.loop import (
    EpochOutcome,
    RunReporter,
    SilentReporter,
    Totals,
    Trainer,
    TrainingStoppedError,
)
from gsa_cli.train.options import TrainOptions, check_resume, numerics
from gsa_cli.train.recipe import ModelEma, batch_mixing, build_optimizer, build_schedule, param_groups
from gsa_cli.train.record import RunFacts, summarise, write_or_stop
from gsa_cli.train.streams import LOADER, MIXING, stream_seed
from gsa_cli.train.trackers import Tracking, tracked
from gsa_cli.train.warmstart import WarmStart

__all__ = ["RunReporter", "TrainOptions", "TrainingStoppedError", "train"]


# ---------------------------------------------------------------------------------------------------
# Training.


def train(
    config: Config | None,
    options: TrainOptions,
    *,
    reporter: RunReporter,
    show_init: Callable[[WarmStart], None] | None = None,
) -> RunSummary:
    """Train ``config`` (or continue ``options.resume``) and return the run's summary.

    Writes the run directory (rank 0 only, holding its lock throughout): ``config.yaml``,
    ``metrics.csv`` and ``summary.json``, ``last.pt`` after every epoch and ``best.pt`` (the commit of
    :mod:`gsa_cli.train.checkpoint`). SIGINT/SIGTERM stop at the next step, save ``last.pt`` there
    (resumable) and raise :class:`TrainingStoppedError`. A start that fails before writing anything
    leaves no folder behind. ``show_init`` shows a warm start's report (default: the reporter's lines).

    Raises:
        ConfigError: for options or data that do not fit the config.
        GsaError: for missing data, unreadable files or checkpoints, a run directory another process
            is writing, a file that cannot be written, a non-finite loss, a signal.
    """
    preflight.prepare(options)  # options, packages, threads: refused before anything starts
    world, device = distributed.setup(options.device)
    try:
        shown = show_init or (lambda report: report.tell(reporter.message))
        run = _Run(config, options, world, device, reporter if world.is_main else SilentReporter(), shown)
        try:
            if world.is_main:  # once the start succeeded: a CPU that other work keeps busy
                preflight.warn_if_cpu_busy(device, options)
            with run.tracking:
                return run.run()
        finally:
            if run.lock is not None:
                run.lock.release()
    finally:
        distributed.teardown()


class _Run:
    """One run on this rank: built phase by phase in ``__init__``, then :meth:`run` epoch by epoch.

    Where the run stands lives in attributes that the phases update (``epoch``, ``batches_done``,
    ``carried``, ``best``, ``rows``), so that the summary and the checkpoint always read the current
    values.
    """

    # Set by the phases of __init__, in this order.
    config: Config
    run_dir: RunDir
    precision: Precision
    channels_last: bool
    data: RunData  # this rank's loaders, and what the data is
    model: nn.Module
    no_decay: set[str]
    warm: WarmStart | None  # the warm start's report (--init)
    facts: RunFacts  # what the summary says that does not change
    ema: ModelEma | None
    trainer: Trainer

    def __init__(
        self,
        config: Config | None,
        options: TrainOptions,
        world: distributed.World,
        device: torch.device,
        reporter: RunReporter,
        show_init: Callable[[WarmStart], None],
    ) -> None:
        self.options, self.world, self.device, self.reporter = options, world, device, reporter
        self.show_init = show_init
        self.lock: RunLock | None = None  # rank 0's hold on the run directory
        self.tracking = Tracking()
        try:
            resumed = self._open(config)
            self.data = run_data(self.config, options, world, device, self.reporter.message)
            if resumed is not None:
                check_resume(
                    resumed,
                    world_size=world.world_size,
                    data=self.data.fingerprint,
                    root=self.data.root,
                )
            forward = self._build_model()
            self._build_trainer(forward)
            self.epoch, self.batches_done = 0, 0  # epochs finished; batches done of the next one
            self.carried: Totals | None = None  # the sums of those batches
            self.best = Best()
            self.rows: list[EpochMetrics] = []
            self.wall_before, self.started = 0.0, now_iso()
            self.session_start = time.perf_counter()
            if resumed is not None:
                self._resume(resumed)
            self.tracking, self.reporter = tracked(  # rank 0's trackers (--log), and its reporter logging
                self.reporter,
                options.log if world.is_main else (),
                self.run_dir.path,
                self.config,
                resume_step=self.trainer.step if resumed is not None else None,
                step=lambda: self.trainer.step,
                carried=lambda: self.carried,
            )
            if resumed is None:
                distributed.on_main(world, self._record_start)
        except BaseException:
            self.tracking.close(failed=True)
            if self.lock is not None:
                self.lock.abandon()  # and the folder too, if this start wrote nothing in it
            raise

    # -- Phases of a new run. ------------------------------------------------------------------------

    def _open(self, config: Config | None) -> Checkpoint | None:
        """The config and the run directory: a new one, or the one to resume (whose checkpoint is
        returned; its config and numerics replace the options')."""
        if self.options.resume is not None:
            self.run_dir = RunDir(Path(self.options.resume))
            if self.run_dir.last.is_file():  # else the load below says what is missing
                distributed.on_main(self.world, functools.partial(self._claim, self.run_dir.path))
            resumed = Checkpoint.load(self.run_dir.last)
            self.config = config_from_checkpoint(resumed, self.run_dir.last)
            self.precision, self.channels_last = numerics(self.options, resumed)
            return resumed
        if config is None:
            raise ConfigError("give a config to train, or a run directory to resume")
        self.config = config
        self.precision, self.channels_last = numerics(self.options, None)
        distributed.on_main(self.world, functools.partial(self._claim, self.options.out))
        main_dir = str(self.run_dir.path) if self.world.is_main else ""
        self.run_dir = RunDir(Path(distributed.broadcast(main_dir)))
        return None

    def _claim(self, out: Path | None) -> None:
        """Lock the run directory (rank 0): the one to resume, or a new one: ``out`` or a new default
        folder (removed again, with the folders made for it, if the start fails before writing)."""
        if self.options.resume is None:
            config = self.config
            self.run_dir = RunDir(Path(out or default_run_dir(config.name, config.model.kind.value)))
        self.lock = self.run_dir.claim(new=self.options.resume is None, made=out is None)

    def _build_model(self) -> Any:
        """The model (the same initial weights on every rank), its size, and what the loop calls:
        the model, or its DDP or compiled wrapper. Then each rank its own augmentation stream."""
        config, world, device, options = self.config, self.world, self.device, self.options
        seed_everything(config.recipe.seed)
        model = build_model(config)
        self.warm = warmstart.warm_start(model, options.init, config.model) if options.init else None
        if self.warm is not None and world.is_main:
            self.show_init(self.warm)
        self.no_decay = model.no_weight_decay()  # its names outlive the wrappers and conversions below
        data = config.data
        self.facts = RunFacts(
            run_dir=self.run_dir,
            config=config,
            parameters=sum(p.numel() for p in model.parameters()),
            gmacs=count_gmacs(model, img_size=data.img_size, channels=data.channels)
            if world.is_main
            else None,
            device=device_name(device),
            world_size=world.world_size,
            precision=self.precision,
            channels_last=self.channels_last,
            compiled=options.compile,
            init=self.warm.source if self.warm else warmstart.recorded_source(self.run_dir.path),
            gsa_impl=model_implementation(model, device),
        )
        if options.sync_bn and device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices: torch's SyncBatchNorm does not run on the CPU")
        if options.sync_bn and world.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        forward: Any = model
        if world.distributed:
            forward = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if options.compile:
            forward = torch.compile(forward)
        seed_everything(config.recipe.seed + world.rank)
        return forward

    def _build_trainer(self, forward: Any) -> None:
        """The recipe's parts (optimizer, schedule, scaler, EMA, mixing) and the loop's trainer."""
        recipe, model, device = self.config.recipe, self.model, self.device
        no_decay = self.no_decay
        optimizer = build_optimizer(
            param_groups(model, weight_decay=recipe.weight_decay, no_decay=no_decay), recipe
        )
        self.ema = ModelEma(model, recipe.ema_decay) if recipe.ema_decay is not None else None
        self.trainer = Trainer(
            model=model,
            forward=forward,
            optimizer=optimizer,
            scheduler=build_schedule(
                optimizer, recipe, steps_per_epoch=len(self.data.train_loader), warn=self.world.is_main
            ),
            scaler=torch.amp.GradScaler(device.type, enabled=self.precision is Precision.FP16),
            ema=self.ema,
            device=device,
            precision=self.precision,
            label_smoothing=recipe.label_smoothing,
            grad_clip=recipe.grad_clip,
            channels_last=self.channels_last,
            check=self.data.corrupt.check,
            # Only skipping can leave a rank without a batch; failing stops the run on that rank.
            agree=distributed.all_ranks if self.options.on_corrupt is OnCorrupt.SKIP else (lambda keep: keep),
            batch_transform=batch_mixing(recipe, num_classes=self.config.data.num_classes),
            seed=stream_seed(MIXING, recipe.seed, self.world.rank),
            sync_every=1 if device.type == "cpu" else 10,
        )

    def _record_start(self) -> None:
        """A new run's first files (rank 0): its config, and its warm start's report."""
        self.run_dir.write_config(config_to_yaml(self.config))
        if self.warm is not None:
            warmstart.write_record(self.run_dir.path, self.warm)

    # -- Resuming. -----------------------------------------------------------------------------------

    def _resume(self, checkpoint: Checkpoint) -> None:
        """Continue where ``checkpoint`` left off: weights, recipe state, progress, random state."""
        trainer, world = self.trainer, self.world
        load_weights(self.model, checkpoint.model, self.run_dir.last, "model")
        load_state(trainer.optimizer, checkpoint.optimizer, self.run_dir.last, "optimizer")
        load_state(trainer.scheduler, checkpoint.scheduler, self.run_dir.last, "scheduler")
        load_state(trainer.scaler, checkpoint.scaler, self.run_dir.last, "scaler")
        if self.ema is not None:
            if checkpoint.ema is None:
                raise GsaError(
                    f"{self.run_dir.last}: not a usable gsa checkpoint: ema is None, but its recipe has one"
                )
            load_weights(self.ema.module, checkpoint.ema, self.run_dir.last, "ema")
        trainer.step = checkpoint.step
        self.epoch, self.batches_done = checkpoint.epoch, checkpoint.batches_done
        if checkpoint.partial is not None:
            # Saved summed over ranks: rank 0 carries the counts, every rank its time.
            partial = Totals(**dataclasses.asdict(checkpoint.partial))
            self.carried = partial if world.is_main else Totals(seconds=partial.seconds)
        self.best = checkpoint.best
        self.wall_before, self.started = checkpoint.wall_time_s, checkpoint.started
        if len(checkpoint.rng) == world.world_size:
            restore_rng(checkpoint.rng[world.rank])
        # A checkpoint from before it kept the rows has them in metrics.csv.
        self.rows = list(checkpoint.metrics or self.run_dir.read_metrics()[: self.epoch])
        # Complete the commit of last.pt, which a kill may have cut short (see the checkpoint module).
        self._write(lambda: publish(self.run_dir, checkpoint, self._summary(self._status())))
        where = f"epoch {self.epoch} of {self.config.recipe.epochs}"
        where += f", batch {self.batches_done}" if self.batches_done else ""
        self.reporter.message(f"resuming {self.run_dir.path} after {where}")

    # -- Epochs. -------------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Train the remaining epochs; the summary of the finished run.

        Raises:
            TrainingStoppedError: on a signal (``last.pt`` saved where it stopped) or a loss that is no
                longer finite (``last.pt`` left at the last good epoch; the summary says ``failed``).
        """
        with self.trainer.stop:
            try:
                while self.epoch < self.config.recipe.epochs:
                    self._epoch()
            except TrainingStoppedError as err:
                if err.exit_code == 1 and self.world.is_main:  # a non-finite loss: last.pt stays as it was
                    with contextlib.suppress(GsaError):
                        self.run_dir.write_summary(self._summary("failed"))
                raise
        summary = self._summary("finished")
        self.tracking.log_summary(self.trainer.step, dataclasses.asdict(summary))
        return summary

    def _epoch(self) -> None:
        """Train the next epoch (or the rest of it), evaluate, save, report; stop if signalled."""
        recipe = self.config.recipe
        self.data.sampler.set_epoch(self.epoch)
        self.data.loader_seeds.manual_seed(stream_seed(LOADER, recipe.seed, self.world.rank, self.epoch))
        self.data.sampler.start = self.batches_done * recipe.batch_size
        outcome = self.trainer.train_epoch(
            self.data.train_loader,
            epoch=self.epoch + 1,
            reporter=self.reporter,
            carried=self.carried,
            batches_done=self.batches_done,
        )
        self.data.sampler.start, self.carried = 0, None
        if not outcome.finished:
            self._stop_part_way(outcome)
        row = self._validate(outcome)
        self.epoch, self.batches_done = self.epoch + 1, 0
        is_best = self._save_epoch(row)
        self.reporter.epoch_end(row, recipe.epochs, is_best)
        if self.epoch < recipe.epochs and self.trainer.stop_requested():
            summary = self._summary("interrupted")  # the epoch's commit said "running"
            self._write(lambda: self.run_dir.write_summary(summary))
            raise self._stopped()

    def _validate(self, outcome: EpochOutcome) -> EpochMetrics:
        """Evaluate the weights (the EMA's when there is one) after the epoch; the epoch's row."""
        recipe = self.config.recipe
        train_stats = outcome.totals.reduced(self.device).stats()
        evaluated = self.ema.module if self.ema else self.model
        if recipe.precise_bn_batches:
            self.trainer.recalibrate_batch_norm(evaluated, self.data.train_loader, recipe.precise_bn_batches)
        val = self.trainer.evaluate(
            evaluated, self.data.val_loader, epoch=self.epoch + 1, reporter=self.reporter
        )
        val_stats = val.stats()
        return EpochMetrics(
            epoch=self.epoch + 1,
            lr=outcome.lr,
            train_loss=train_stats["loss"],
            train_top1=train_stats["top1"],
            val_loss=val_stats["loss"],
            val_top1=val_stats["top1"],
            val_top5=val_stats["top5"],
            images_per_s=train_stats["images"] / max(outcome.totals.seconds, 1e-9),
            epoch_time_s=outcome.totals.seconds + val.seconds,
        )

    # -- Saving. -------------------------------------------------------------------------------------

    def _save_epoch(self, row: EpochMetrics) -> bool:
        """Commit a finished epoch: ``last.pt``, then what follows from it (``best.pt`` when it is the
        best so far, metrics, summary; see the checkpoint module). Returns whether it is the best."""
        before = self.rows, self.best
        self.rows = [*self.rows, row]
        is_best = self.best.top1 is None or row.val_top1 > self.best.top1
        if is_best:
            self.best = Best(top1=row.val_top1, top5=row.val_top5, epoch=self.epoch)
        checkpoint = self._checkpoint(None, 0, row.val_top1)  # on every rank: it gathers their RNGs

        def commit() -> None:
            try:
                checkpoint.save(self.run_dir.last)
            except WriteError:
                self.rows, self.best = before  # not committed: the failed summary says so
                raise
            publish(self.run_dir, checkpoint, self._summary(self._status()))

        self._write(commit)
        return is_best

    def _status(self) -> str:
        done = self.epoch == self.config.recipe.epochs and not self.batches_done
        return "finished" if done else "running"

    def _write(self, action: Callable[[], object]) -> None:
        """Write on rank 0, its failure raised on every rank (see :func:`write_or_stop`)."""
        failed = functools.partial(self._summary, "failed")
        distributed.on_main(self.world, functools.partial(write_or_stop, self.run_dir, action, failed))

    def _checkpoint(self, partial: Totals | None, batches_done: int, val_top1: float | None) -> Checkpoint:
        """The run as it stands (a collective: every rank's random state is gathered)."""
        trainer = self.trainer
        return Checkpoint(
            preset=self.config.name,
            config_yaml=config_to_yaml(self.config),
            model=self.model.state_dict(),
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            optimizer=trainer.optimizer.state_dict(),
            scheduler=trainer.scheduler.state_dict(),
            scaler=trainer.scaler.state_dict(),
            epoch=self.epoch,
            batches_done=batches_done,
            partial=PartialEpoch(**dataclasses.asdict(partial)) if partial is not None else None,
            step=trainer.step,
            best=self.best,
            val_top1=val_top1,
            rng=capture_rng(self.world),
            world_size=self.world.world_size,
            options=TrainedWith(self.precision, self.channels_last),
            wall_time_s=self._wall_time(),
            started=self.started,
            metrics=tuple(self.rows),
            train_images=self.data.fingerprint.train_images,
            data=self.data.fingerprint,
        )

    def _wall_time(self) -> float:
        """Seconds of every session of the run, this one up to now."""
        return self.wall_before + time.perf_counter() - self.session_start

    def _summary(self, status: str) -> RunSummary:
        """``summary.json``'s record of the run as it stands."""
        return summarise(
            self.facts,
            self.rows,
            self.best,
            status=status,
            wall_time_s=self._wall_time(),
            started=self.started,
        )

    # -- Stopping. -----------------------------------------------------------------------------------

    def _stop_part_way(self, outcome: EpochOutcome) -> NoReturn:
        """A signal stopped the epoch: save ``last.pt`` there (resumable) and raise."""
        partial = outcome.totals.reduced(self.device)
        checkpoint = self._checkpoint(partial, outcome.batches_done, None)

        def save() -> None:
            checkpoint.save(self.run_dir.last)
            self.run_dir.write_summary(self._summary("interrupted"))

        self._write(save)
        raise self._stopped()

    def _stopped(self) -> TrainingStoppedError:
        """The error of a run stopped by a signal, with the shell's exit code for it."""
        signum = self.trainer.stop.signum or signal.SIGINT
        error = TrainingStoppedError(
            f"stopped by {signal.Signals(signum).name} at epoch {self.epoch + 1}, step {self.trainer.step}; "
            f"the checkpoint is saved: continue with gsa train --resume {self.run_dir.path}"
        )
        error.exit_code = 128 + signum
        return error
