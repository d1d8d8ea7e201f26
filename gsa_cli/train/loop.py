"""The loops: one training step, one epoch, evaluation, BatchNorm recalibration, stop signals.

Nothing here knows about GSA, presets or the command line: a :class:`Trainer` takes a module, the
recipe's parts (:mod:`gsa_cli.train.recipe`) and loaders of :class:`~gsa_cli.data.Batch`, and reports
through a :class:`Reporter`. The run that wires them together is :mod:`gsa_cli.train.run`.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsa_cli.data import Batch
from gsa_cli.errors import GsaError
from gsa_cli.results import EpochMetrics
from gsa_cli.runtime import Precision, autocast, module_mode, synchronize, too_small_for_batch_norm
from gsa_cli.train.distributed import all_reduce_sum, any_rank
from gsa_cli.train.recipe import BatchTransform, ModelEma
from gsa_cli.train.streams import seeded, stream_seed

SYNC_EVERY = 10  # steps between reads of the running sums (a device sync) and stop checks


class Reporter(Protocol):
    """Where the loops report progress (a progress bar, log lines, or nothing)."""

    def start(self, phase: str, epoch: int, total: int, done: int) -> None: ...

    def update(self, done: int, stats: dict[str, float]) -> None: ...

    def finish(self) -> None: ...

    def message(self, text: str) -> None: ...


class RunReporter(Reporter, Protocol):
    """A :class:`Reporter` that also hears about each finished epoch of a run."""

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None: ...


class SilentReporter:
    """A run reporter that reports nothing (every rank's but the first)."""

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


class TrainingStoppedError(GsaError):
    """Training stopped before its last epoch: a signal, or a loss that is no longer finite."""


# ---------------------------------------------------------------------------------------------------
# Stopping on a signal.


class StopSignal:
    """While active, SIGINT and SIGTERM ask the loop to stop at the next step instead of killing it.

    A second signal of the same kind is not caught again: it interrupts at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------------
# Counting.


@dataclass
class Totals:
    """Running sums of one pass over data (on this rank until :meth:`reduced`)."""

    loss_sum: float = 0.0
    top1: float = 0.0  # correct counts
    top5: float = 0.0
    count: float = 0.0
    seconds: float = 0.0  # this session's share is added to what a resumed checkpoint carried

    def add(self, sums: Tensor, seconds: float) -> None:
        loss_sum, top1, top5, count = sums.tolist()
        self.loss_sum += loss_sum
        self.top1 += top1
        self.top5 += top5
        self.count += count
        self.seconds += seconds

    def reduced(self, device: torch.device) -> Totals:
        sums = torch.tensor([self.loss_sum, self.top1, self.top5, self.count], dtype=torch.float64)
        sums = all_reduce_sum(sums.to(device)).cpu()
        total = Totals()
        total.add(sums, self.seconds)
        return total

    def stats(self) -> dict[str, float]:
        count = max(self.count, 1.0)
        return {
            "loss": self.loss_sum / count,
            "top1": 100.0 * self.top1 / count,
            "top5": 100.0 * self.top5 / count,
            "images": self.count,
            "seconds": self.seconds,
        }


def batch_sums(logits: Tensor, target: Tensor, loss: Tensor) -> Tensor:
    """``[loss * n, correct top-1, correct top-5, n]`` of a batch, as float64 on its device.

    ``target`` holds class indices, or class probabilities (mixup), whose arg-max is the label.
    """
    labels = target.argmax(dim=1) if target.ndim == 2 else target
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    hits = top == labels[:, None]
    n = torch.tensor(float(labels.shape[0]), device=logits.device, dtype=torch.float64)
    return torch.stack(
        [loss.detach().double() * n, hits[:, :1].sum().double(), hits.any(dim=1).sum().double(), n]
    )


# ---------------------------------------------------------------------------------------------------
# The loops.


def images_to(images: Tensor, device: torch.device, *, channels_last: bool) -> Tensor:
    """A batch of images on ``device``, in channels-last layout when asked."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_forward(forward: nn.Module | Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """``forward(images)`` in train mode; batch norm's refusal of a batch too small for it becomes an
    error that says what to change."""
    try:
        return forward(images)
    except ValueError as err:
        if not too_small_for_batch_norm(err):
            raise
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        raise GsaError(
            f"batch norm cannot train on a batch of {batch} image(s) of {height}x{width} px: a 1x1 "
            "feature map leaves it one value per channel; raise recipe.batch_size or data.img_size"
        ) from err


@dataclass
class EpochOutcome:
    totals: Totals
    batches_done: int
    finished: bool  # False when a signal stopped it part-way
    lr: float


def _alone(keep: bool) -> bool:
    """One process: its own answer is everyone's."""
    return keep


class _Running:
    """An epoch in progress: its totals so far, the sums not yet read from the device, the clock."""

    def __init__(self, epoch: int, totals: Totals, total_batches: int, device: torch.device) -> None:
        self.epoch = epoch
        self.totals = totals
        self.total_batches = total_batches
        self.device = device
        self.pending = torch.zeros(4, dtype=torch.float64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=device)
        self.since = 0.0

    def restart_clock(self) -> float:
        """Seconds since the last restart (the device synchronised first)."""
        synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.since = now - self.since, now
        return elapsed


@dataclass
class Trainer:
    """One model's training state and the loops that advance it.

    Args (fields):
        model: The module whose weights are trained and saved (not wrapped).
        forward: What the loop calls: ``model``, or a DDP or compiled wrapper of it.
        optimizer / scheduler / scaler / ema: The recipe's state; the scheduler steps per update.
        check: Applies the unreadable-file policy to a batch; returns whether it has images.
        batch_transform: Mixup/CutMix on ``(images, labels)``, or None; update ``step`` draws its mixing
            from ``seed`` and ``step`` alone (see :mod:`gsa_cli.train.streams`).
        agree: Turns this rank's "use the batch" into every rank's (under DDP, a step whose batch is
            unreadable on one rank is skipped on all, or the others would wait for it forever).
    """

    model: nn.Module
    forward: nn.Module | Callable[[Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    device: torch.device
    precision: Precision
    label_smoothing: float
    grad_clip: float | None
    channels_last: bool
    check: Callable[[Batch], bool]
    batch_transform: BatchTransform | None = None
    agree: Callable[[bool], bool] = _alone
    step: int = 0  # optimizer updates done
    seed: int = 0  # of the batch mixing
    sync_every: int = SYNC_EVERY
    stop: StopSignal = field(default_factory=StopSignal)

    def _to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images = images_to(images, self.device, channels_last=self.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _step(self, images: Tensor, labels: Tensor, sums: Tensor, bad_loss: Tensor) -> None:
        """One update; adds the batch's counts to ``sums`` and a non-finite loss to ``bad_loss``."""
        if self.batch_transform is not None:
            with seeded(stream_seed(self.seed, self.step)):
                images, labels = self.batch_transform(images, labels)
        with autocast(self.device, self.precision):
            logits = train_forward(self.forward, images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        sums += batch_sums(logits.detach(), labels, loss)
        bad_loss |= ~torch.isfinite(loss.detach())

    def train_epoch(
        self,
        loader: Any,
        *,
        epoch: int,
        reporter: Reporter,
        carried: Totals | None = None,
        batches_done: int = 0,
    ) -> EpochOutcome:
        """Train one epoch (the rest of it, when resuming with ``batches_done`` and ``carried``).

        Every ``sync_every`` batches the running sums are read (a device sync), reported, and every
        rank is asked whether a signal arrived; if one did, the epoch stops there, unfinished.

        Raises:
            TrainingStoppedError: when the loss is no longer finite.
        """
        running = _Running(epoch, carried or Totals(), batches_done + len(loader), self.device)
        reporter.start("train", epoch, running.total_batches, batches_done)
        running.restart_clock()
        done = batches_done
        finished = True
        self.model.train()
        for batch in loader:
            done += 1  # counted even when skipped, so that every rank stops at the same step
            if self.agree(self.check(batch)):
                images, labels = self._to_device(batch.images, batch.labels)
                self._step(images, labels, running.pending, running.bad_loss)
            if done % self.sync_every == 0 and done < running.total_batches:
                self._flush(running, done, reporter)
                if self.stop_requested():
                    finished = False
                    break
        else:
            self._flush(running, done, reporter)
        reporter.finish()
        return EpochOutcome(running.totals, done, finished, self.optimizer.param_groups[0]["lr"])

    def stop_requested(self) -> bool:
        """Whether a stop signal reached any rank (a collective under DDP: every rank must ask)."""
        return any_rank(self.stop.signum is not None, self.device)

    def _flush(self, running: _Running, done: int, reporter: Reporter) -> None:
        """Add the pending sums to the epoch's totals and report them.

        Raises:
            TrainingStoppedError: when a loss since the last flush was not finite.
        """
        seconds = running.restart_clock()
        if bool(running.bad_loss):
            raise TrainingStoppedError(
                f"the training loss is no longer finite at epoch {running.epoch}, step {self.step}: "
                "stopped, keeping the last good checkpoint; lower the learning rate, set "
                "recipe.grad_clip, or use bf16 instead of fp16"
            )
        running.totals.add(running.pending.cpu(), seconds)
        running.pending.zero_()
        stats = running.totals.stats()
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        stats["images_per_s"] = stats["images"] / max(stats["seconds"], 1e-9)
        reporter.update(done, stats)

    @torch.no_grad()
    def recalibrate_batch_norm(self, model: nn.Module, loader: Any, batches: int) -> int:
        """Recompute ``model``'s BatchNorm statistics from training batches (see the function)."""
        return recalibrate_batch_norm(
            model,
            loader,
            batches,
            device=self.device,
            precision=self.precision,
            channels_last=self.channels_last,
            check=self.check,
            agree=self.agree,
        )

    def evaluate(self, model: nn.Module, loader: Any, *, epoch: int, reporter: Reporter) -> Totals:
        """Loss (plain cross-entropy), top-1 and top-5 of ``model`` over ``loader``, summed on all
        ranks."""
        return evaluate(
            model,
            loader,
            device=self.device,
            precision=self.precision,
            channels_last=self.channels_last,
            check=self.check,
            reporter=reporter,
            epoch=epoch,
        )


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    loader: Any,
    batches: int,
    *,
    device: torch.device,
    precision: Precision,
    channels_last: bool,
    check: Callable[[Batch], bool],
    agree: Callable[[bool], bool] = _alone,
) -> int:
    """Recompute every BatchNorm's running statistics from ``batches`` training batches.

    A "precise BN" pass: running means and variances are reset and set to the plain average of the
    batch statistics of ``batches`` batches, run in train mode without gradients, then averaged over
    ranks. Early in training the exponential running averages lag the weights; a GSA module, bilinear
    in its input, squares that scale error in every layer, so a short run's evaluation can blow up
    without this. Returns the number of batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return 0
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches of this pass
    used = 0
    try:
        with module_mode(model, training=True):
            for batch in loader:
                if used >= batches:
                    break
                if not agree(check(batch)):  # SyncBatchNorm's collectives need every rank
                    continue
                images = images_to(batch.images, device, channels_last=channels_last)
                with autocast(device, precision):
                    train_forward(model, images)
                used += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    ranks = all_reduce_sum(torch.ones((), device=device))
    for norm in norms:
        assert norm.running_mean is not None
        assert norm.running_var is not None
        all_reduce_sum(norm.running_mean).div_(ranks)
        all_reduce_sum(norm.running_var).div_(ranks)
    return used


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    precision: Precision,
    channels_last: bool,
    check: Callable[[Batch], bool],
    reporter: Reporter,
    epoch: int = 0,
) -> Totals:
    """Loss (plain cross-entropy), top-1 and top-5 counts of ``model`` over ``loader``, summed over
    all ranks; ``seconds`` is this rank's time (the device synchronised at both ends)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    reporter.start("val", epoch, len(loader), 0)
    synchronize(device)
    started = time.perf_counter()
    done = 0
    with module_mode(model, training=False):
        for batch in loader:
            done += 1
            if not check(batch):
                continue
            images = images_to(batch.images, device, channels_last=channels_last)
            labels = batch.labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images).float()
            loss = F.cross_entropy(logits, labels)
            sums += batch_sums(logits, labels, loss)
            reporter.update(done, {})
    synchronize(device)
    totals = Totals()
    totals.add(all_reduce_sum(sums).cpu(), time.perf_counter() - started)
    reporter.finish()
    return totals
