"""Experiment tracking: TensorBoard and Weights & Biases behind the one small interface a run calls.

The run (:mod:`gsa_cli.train.run`) knows neither. It opens a :class:`Tracking` for the trackers named
in ``TrainOptions.log`` (none by default) with :func:`open_tracking`, wraps its reporter in a
:class:`TrackedReporter`, which logs what the loop and the run report, hands it the summary at the
end, and closes it. Both integrations are optional extras, imported only when named:
:func:`check_trackers` refuses a missing one in one line before anything starts. Only the main process
logs (the run opens no tracker on the other ranks).

What is logged, the same for each tracker, against the optimizer step:

- **per step**, each time the loop reads its running sums (every update on the CPU, every 10 on a
  GPU): ``train/loss`` and ``train/top1`` over the updates since the last reading, ``train/lr``, and
  ``train/images_per_s`` (this process's).
- **per epoch**, at the step that ends it: ``epoch/<column>`` for each column of ``metrics.csv``.
- **the config** at the start (TensorBoard: the text ``config``; W&B: the run's config) and **the
  summary** of a finished run (TensorBoard: the text ``summary`` and the hparams of the config with
  ``summary/best_top1`` and the like; W&B: the run's summary).

Where: TensorBoard writes ``RUN/tb/`` (``tensorboard --logdir runs`` shows every run). W&B writes
``RUN/wandb/``, in the mode ``WANDB_MODE`` names and ``offline`` when it names none, so that a run never
needs a network or an account (``wandb sync RUN/wandb/offline-run-*`` uploads it later); its project
is ``WANDB_PROJECT`` or ``gsa``, its name the run directory's.

A resumed run (``--resume ... --log ...``) continues its logs from its checkpoint's step.
TensorBoard writes into the same folder with ``purge_step`` one past that step: whatever the
interrupted session logged after its last checkpoint (a kill between checkpoints) is dropped when the
logs are read, never shown twice. W&B continues the same run (its id is kept in
``RUN/wandb/gsa-run-id``); online, W&B itself ignores steps below the ones it has (with a warning of
its own); offline, each session is its own folder, and ``wandb sync`` uploads them in order.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from gsa_cli.config import Config, config_to_dict, config_to_yaml
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.results import METRIC_COLUMNS, EpochMetrics, atomic_write_text
from gsa_cli.train.loop import RunReporter, Totals

# Each tracker: the module it needs and the extra that installs it.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
TENSORBOARD_DIR = "tb"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "gsa-run-id"  # in WANDB_DIR: the W&B run a resumed run continues
SUMMARY_METRICS = ("best_top1", "best_top5", "final_top1", "final_top5", "final_val_loss", "images_per_s")


def tracker_names(values: Iterable[str]) -> tuple[str, ...]:
    """The trackers named by ``--log`` values (repeated, or comma-separated), each once, in order.

    Raises:
        ConfigError: for a name that is not a tracker.
    """
    names: list[str] = []
    for value in values:
        for name in (part.strip().lower() for part in value.split(",")):
            if name and name not in TRACKERS:
                raise ConfigError(
                    f"--log: unknown tracker {name!r}; choose {' or '.join(TRACKERS)} "
                    "(repeat --log, or separate them with commas)"
                )
            if name and name not in names:
                names.append(name)
    return tuple(names)


def check_trackers(names: Sequence[str]) -> None:
    """Refuse, before anything starts, a tracker whose package is not installed.

    Raises:
        ConfigError: naming the tracker and the extra that installs it.
    """
    for name in tracker_names(names):
        module, extra = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"--log {name} needs the {module} package: pip install 'gsa-cli[{extra}]'"
            ) from None


# ---------------------------------------------------------------------------------------------------
# The interface, and the trackers of a run as one.


class Tracker(Protocol):
    """One experiment tracker, as a run uses it."""

    def log_step(self, step: int, values: Mapping[str, float]) -> None: ...

    def log_epoch(self, step: int, epoch: int, values: Mapping[str, float]) -> None: ...

    def log_summary(self, step: int, summary: Mapping[str, Any]) -> None: ...

    def close(self, *, failed: bool) -> None: ...


class Tracking:
    """The trackers of one run (none, one or several) as one; a context manager that closes them."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_step(step, values)

    def log_epoch(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(step, epoch, values)

    def log_summary(self, step: int, summary: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_summary(step, summary)

    def close(self, *, failed: bool = False) -> None:
        """Close every tracker (once: later calls do nothing)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed=failed)

    def __enter__(self) -> Tracking:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close(failed=error is not None)


def open_tracking(
    names: Sequence[str],
    run_dir: Path,
    *,
    config: Mapping[str, Any],
    config_yaml: str,
    resume_step: int | None,
    message: Callable[[str], None],
) -> Tracking:
    """Open the trackers ``names`` for the run in ``run_dir`` (``resume_step``: the step a resumed run
    continues from; None for a new run). ``config`` is the resolved config as plain data. When one
    cannot start, those opened are closed, and a new run's tracker folders removed (so that its failed
    start leaves no folder behind).

    Raises:
        GsaError: when a tracker cannot start (W&B's own errors, in one line).
    """
    tracking = Tracking()
    try:
        for name in tracker_names(names):
            if name == "tensorboard":
                tracker: Tracker = TensorBoardTracker(
                    run_dir / TENSORBOARD_DIR, config=config, config_yaml=config_yaml, resume_step=resume_step
                )
            else:
                tracker = WandbTracker(run_dir, config=config, message=message)
            tracking.trackers.append(tracker)
    except BaseException:
        tracking.close(failed=True)
        if resume_step is None:
            for folder in (TENSORBOARD_DIR, WANDB_DIR):
                shutil.rmtree(run_dir / folder, ignore_errors=True)
        raise
    return tracking


def tracked(
    reporter: RunReporter,
    names: Sequence[str],
    run_dir: Path,
    config: Config,
    *,
    resume_step: int | None,
    step: Callable[[], int],
    carried: Callable[[], Totals | None],
) -> tuple[Tracking, TrackedReporter]:
    """The trackers ``names`` opened for a run (:func:`open_tracking`), and ``reporter`` logging to them
    (:class:`TrackedReporter`); no names, no trackers.

    Raises:
        GsaError: when a tracker cannot start.
    """
    tracking = Tracking()
    if names:
        tracking = open_tracking(
            names,
            run_dir,
            config=config_to_dict(config),
            config_yaml=config_to_yaml(config),
            resume_step=resume_step,
            message=reporter.message,
        )
    return tracking, TrackedReporter(reporter, tracking, step=step, carried=carried)


# ---------------------------------------------------------------------------------------------------
# What the loop reports, logged.


class TrackedReporter:
    """A run reporter that passes everything on to ``reporter`` and logs the training steps' running
    sums (as the values of the updates since the last reading) and each finished epoch's row.

    ``step`` gives the optimizer step the values belong to, ``carried`` the sums an epoch resumed part
    of the way through starts from (the loop's running sums include them; the values logged do not).
    """

    def __init__(
        self,
        reporter: RunReporter,
        tracking: Tracking,
        *,
        step: Callable[[], int],
        carried: Callable[[], Totals | None],
    ) -> None:
        self.reporter, self.tracking, self.step, self.carried = reporter, tracking, step, carried
        self.phase = ""
        self.previous = (0.0, 0.0, 0.0, 0.0)  # images, summed loss, top-1 in percent times images, seconds

    def start(self, phase: str, epoch: int, total: int, done: int) -> None:
        self.phase = phase
        carried = self.carried() if done else None
        self.previous = (0.0, 0.0, 0.0, 0.0)
        if carried is not None:
            self.previous = (carried.count, carried.loss_sum, 100.0 * carried.top1, carried.seconds)
        self.reporter.start(phase, epoch, total, done)

    def update(self, done: int, stats: dict[str, float]) -> None:
        self.reporter.update(done, stats)
        if self.phase != "train" or not stats:
            return
        images = stats["images"]
        now = (images, stats["loss"] * images, stats["top1"] * images, stats["seconds"])
        before, self.previous = self.previous, now
        if images <= before[0]:
            return
        count = images - before[0]
        self.tracking.log_step(
            self.step(),
            {
                "train/loss": (now[1] - before[1]) / count,
                "train/top1": (now[2] - before[2]) / count,
                "train/lr": stats["lr"],
                "train/images_per_s": count / max(now[3] - before[3], 1e-9),
            },
        )

    def finish(self) -> None:
        self.reporter.finish()

    def message(self, text: str) -> None:
        self.reporter.message(text)

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None:
        self.reporter.epoch_end(row, epochs, best)
        values = {name: float(getattr(row, name)) for name in METRIC_COLUMNS if name != "epoch"}
        self.tracking.log_epoch(self.step(), row.epoch, values)


# ---------------------------------------------------------------------------------------------------
# TensorBoard.


def _preformatted(text: str) -> str:
    """``text`` as a Markdown code block (TensorBoard's text plugin renders Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as TensorBoard hparams: dotted keys, numbers, strings and booleans (others as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flat_hparams(value, f"{name}.")
        else:
            flat[name] = value if isinstance(value, bool | int | float | str) else json.dumps(value)
    return flat


class TensorBoardTracker:
    """Scalars, the config and the summary in a TensorBoard log folder (``torch.utils.tensorboard``)."""

    def __init__(
        self, folder: Path, *, config: Mapping[str, Any], config_yaml: str, resume_step: int | None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(folder), purge_step=purge)
        self.hparams = flat_hparams(config)
        if resume_step is None:
            self.writer.add_text("config", _preformatted(config_yaml), global_step=0)

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"epoch/{name}", value, step)

    def log_summary(self, step: int, summary: Mapping[str, Any]) -> None:
        self.writer.add_text("summary", _preformatted(json.dumps(dict(summary), indent=2)), global_step=step)
        metrics = {
            f"summary/{name}": float(summary[name])
            for name in SUMMARY_METRICS
            if summary.get(name) is not None
        }
        self.writer.add_hparams(self.hparams, metrics, run_name=".", global_step=step)

    def close(self, *, failed: bool) -> None:
        del failed  # TensorBoard has no run status
        self.writer.close()


# ---------------------------------------------------------------------------------------------------
# Weights & Biases.


class WandbTracker:
    """A W&B run in the run directory: offline unless ``WANDB_MODE`` says otherwise; the run of an
    earlier session of it continued (see the module)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        config: Mapping[str, Any],
        message: Callable[[str], None],
    ) -> None:
        import wandb

        id_file = run_dir / WANDB_DIR / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
        mode = os.environ.get("WANDB_MODE") or "offline"
        (run_dir / WANDB_DIR).mkdir(exist_ok=True)  # wandb's own folder; it falls back to /tmp without it
        try:
            self.run = wandb.init(
                dir=str(run_dir),
                project=os.environ.get("WANDB_PROJECT") or "gsa",
                name=run_dir.name,
                id=run_id,
                resume="allow" if run_id else None,
                config=dict(config),
                mode=mode,  # type: ignore[arg-type]
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as err:  # W&B's errors (a bad mode, no login online, no network) in one line
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise GsaError(f"--log wandb: W&B could not start a run ({reason}); WANDB_MODE={mode}") from None
        if run_id is None:
            atomic_write_text(id_file, self.run.id + "\n")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")
        if mode == "offline":
            folder = Path(self.run.dir).parent
            message(f"wandb: offline run {self.run.id} in {folder}; upload it with: wandb sync {folder}")

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_epoch(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        self.run.log(
            {"epoch": epoch, **{f"epoch/{name}": value for name, value in values.items()}}, step=step
        )

    def log_summary(self, step: int, summary: Mapping[str, Any]) -> None:
        del step  # W&B's summary has no step
        self.run.summary.update(dict(summary))

    def close(self, *, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
