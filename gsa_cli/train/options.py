"""How (not what) a run trains: :class:`TrainOptions`, and which of them a resumed run must keep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gsa_cli.data import OnCorrupt
from gsa_cli.runtime import Precision


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
