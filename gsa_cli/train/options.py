"""How (not what) a run trains: :class:`TrainOptions`, and which of them a resumed run must keep.

A resume continues the run as it trained. Its config is the checkpoint's (the command line refuses
``--batch-size``, ``--set`` and the like with ``--resume``); what changes the numbers beside it is
checked here against the checkpoint and refused in one line naming the setting, the run's value and
the given one: the world size (each rank's share of an epoch and the schedule's steps), precision and
memory layout (given on resume they must be the run's; not given, the run's are used), and the data
(its fingerprint: kind, classes, the sizes of both splits and a content hash of each, see
:mod:`gsa_cli.train.integrity`; a checkpoint written before the fingerprint is checked by its number of
training images alone). Device, loader workers, threads and ``--compile`` may change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gsa_cli.data import OnCorrupt
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.runtime import Precision
from gsa_cli.train.checkpoint import Checkpoint
from gsa_cli.train.integrity import DataFingerprint


@dataclass(frozen=True)
class TrainOptions:
    """How (not what) to train: where, on which device, in which precision.

    Args (fields):
        out: The run directory; default ``runs/<preset>-<model>-<timestamp>``.
        resume: A run directory to continue from its ``last.pt`` (its config, not a new one).
        data: The data folder; default the ``GSA_DATA`` environment variable.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: fp32, or bf16 / fp16 autocast (fp16 with a gradient scaler); None: fp32, or on
            resume the run's.
        channels_last: Train in the channels-last memory layout; None: no, or on resume the run's.
        compile: ``torch.compile`` the model for training.
        workers: Loader processes per rank; None: 0 for in-memory data sets, else up to 8.
        threads: CPU threads for torch's operators; None: torch's default (one per core).
        sync_bn: Synchronise BatchNorm statistics across ranks.
        on_corrupt: Fail on an unreadable image (default), or skip it with a warning.
        log: Experiment trackers to log to: ``tensorboard``, ``wandb`` (see
            :mod:`gsa_cli.train.trackers`); none by default.
        init: Weights a new run starts from: ``torchvision``, ``timm``, or a checkpoint or state-dict
            file (see :mod:`gsa_cli.train.warmstart`); None: its random initialisation.
    """

    out: Path | None = None
    resume: Path | None = None
    data: str | None = None
    device: str = "auto"
    precision: Precision | None = None
    channels_last: bool | None = None
    compile: bool = False
    workers: int | None = None
    threads: int | None = None
    sync_bn: bool = False
    on_corrupt: OnCorrupt = OnCorrupt.FAIL
    log: tuple[str, ...] = ()
    init: str | None = None


def numerics(options: TrainOptions, resumed: Checkpoint | None) -> tuple[Precision, bool]:
    """The precision and layout to train in: the options' (fp32 and the default layout when not given),
    or a resumed run's own.

    Raises:
        ConfigError: for a resume given a precision or layout other than the run's.
    """
    if resumed is None:
        return options.precision or Precision.FP32, bool(options.channels_last)
    run = resumed.options
    if options.precision is not None and options.precision is not run.precision:
        raise ConfigError(
            f"--precision: the run trained in {run.precision.value}, this resume asks for "
            f"{options.precision.value}; resume without --precision (a run keeps its numerics)"
        )
    if options.channels_last is not None and options.channels_last != run.channels_last:
        raise ConfigError(
            f"--channels-last: the run trained with {str(run.channels_last).lower()}, this resume asks "
            f"for {str(options.channels_last).lower()}; resume without --channels-last/--no-channels-last"
        )
    return run.precision, run.channels_last


def check_resume(resumed: Checkpoint, *, world_size: int, data: DataFingerprint, root: Path | None) -> None:
    """Refuse a resume on another number of processes or other data than the run's.

    Args:
        data: The fingerprint of the data this resume reads, from ``root`` (None: held in memory).

    Raises:
        GsaError: for another world size.
        ConfigError: for other data, naming the first difference (checkpoints that predate the
            fingerprint are checked by their number of training images; older ones not at all).
    """
    if resumed.world_size != world_size:
        raise GsaError(
            f"world size: the run trained on {resumed.world_size} process(es), this resume has "
            f"{world_size}; resume with --nproc {resumed.world_size} (the shards and the schedule "
            "depend on it)"
        )
    source = f"--data {root}" if root is not None else f"the {data.dataset} data here"
    if resumed.data is not None:
        change = resumed.data.changed(data, source)
    elif resumed.train_images is not None and resumed.train_images != data.train_images:
        change = (
            f"the run trained on {resumed.train_images} training images, {source} has {data.train_images}"
        )
    else:
        change = None
    if change is not None:
        raise ConfigError(f"data: {change}; resume with the run's data")
