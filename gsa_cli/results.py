"""Run directories and the records in them: read and written here, without torch.

A run directory holds everything one ``gsa train`` produced::

    config.yaml     the resolved config (loads back with ``load_preset(path, model=None)``)
    metrics.csv     one row per finished epoch (columns: ``METRIC_COLUMNS``)
    summary.json    best and final accuracy, parameters, wall time, device, versions, status
    eval.json       written by ``gsa eval``
    last.pt         the checkpoint after the latest epoch (or at an interruption)
    best.pt         the checkpoint of the epoch with the best validation top-1

:func:`read_run` reads a whole run back and checks it (``gsa compare``), naming a half-written one.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so a
crash leaves either the previous version or the new one, never half a file. Checkpoints themselves
are torch files and are written by :mod:`gsa_cli.train.checkpoint` through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from gsa_cli.errors import ConfigError, GsaError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


@dataclass(frozen=True)
class EpochMetrics:
    """One row of ``metrics.csv``: accuracies in percent, ``lr`` at the epoch's last step."""

    epoch: int  # 1-based
    lr: float
    train_loss: float
    train_top1: float
    val_loss: float
    val_top1: float
    val_top5: float
    images_per_s: float  # training images per second of training time (all ranks together)
    epoch_time_s: float  # training plus validation


METRIC_COLUMNS = tuple(f.name for f in fields(EpochMetrics))


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: what a run is and what it reached. Accuracies in percent."""

    status: str  # "running", "finished", "interrupted" or "failed"
    run_dir: str
    preset: str
    model_kind: str
    dataset: str
    epochs: int  # planned
    epochs_done: int
    best_top1: float | None
    best_top5: float | None
    best_epoch: int | None
    final_top1: float | None
    final_top5: float | None
    final_val_loss: float | None
    parameters: int
    gmacs: float | None  # multiply-adds of one image, in G: fvcore, batch 1, eval mode (None: not counted)
    wall_time_s: float  # training time summed over sessions (a resumed run adds up)
    images_per_s: float | None  # mean training throughput over the epochs done
    device: str
    world_size: int
    precision: str
    batch_size: int  # per process
    channels_last: bool
    compiled: bool
    torch_version: str
    torchvision_version: str
    git_revision: str | None
    started: str  # ISO 8601, local time
    updated: str


@dataclass(frozen=True)
class EvalReport:
    """``eval.json``: one evaluation of a checkpoint on the validation split."""

    checkpoint: str
    weights: str  # "ema" or "model"
    epoch: int
    top1: float
    top5: float
    loss: float
    images: int
    images_per_s: float
    recorded_top1: float | None  # what training recorded for these weights, when it did
    device: str
    precision: str
    batch_size: int
    torch_version: str
    created: str


# ---------------------------------------------------------------------------------------------------
# Atomic writes.


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Facts about the environment.


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def git_revision() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has local changes), or None outside git."""
    where = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{revision}-dirty" if status else revision or None


def default_run_dir(preset: str, model_kind: str, *, root: Path = Path("runs")) -> Path:
    """``runs/<preset>-<model>-<YYYYmmdd-HHMMSS>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{preset}-{model_kind}-{stamp}"


# ---------------------------------------------------------------------------------------------------
# The run directory.


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory, and the reading and writing of its records."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def eval(self) -> Path:
        return self.path / EVAL_FILE

    @property
    def last(self) -> Path:
        return self.path / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.path / BEST_CHECKPOINT

    def create(self) -> None:
        """Make the folder for a new run, refusing one that already holds a run.

        Raises:
            GsaError: if the folder exists and is not empty.
        """
        if self.path.exists() and not self.path.is_dir():
            raise GsaError(f"--out {self.path}: exists and is not a folder")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise GsaError(
                f"--out {self.path}: the folder is not empty; continue that run with "
                f"--resume {self.path}, or choose another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.config, yaml_text)

    def write_metrics(self, rows: list[EpochMetrics]) -> None:
        """Write all rows (rewritten whole each epoch, so a resumed run never duplicates one)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(METRIC_COLUMNS)
        for row in rows:
            writer.writerow([repr(getattr(row, name)) for name in METRIC_COLUMNS])
        atomic_write_text(self.metrics, buffer.getvalue())

    def read_metrics(self) -> list[EpochMetrics]:
        """The rows of ``metrics.csv``; an empty list when the file does not exist yet.

        Raises:
            GsaError: if the file's header or values are not what this module writes.
        """
        if not self.metrics.is_file():
            return []
        with self.metrics.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != METRIC_COLUMNS:
                raise GsaError(f"{self.metrics}: expected the columns {', '.join(METRIC_COLUMNS)}")
            try:
                return [
                    EpochMetrics(int(raw["epoch"]), *(float(raw[name]) for name in METRIC_COLUMNS[1:]))
                    for raw in reader
                ]
            except (TypeError, ValueError) as err:
                raise GsaError(f"{self.metrics}: malformed row ({err})") from None

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_text(self.summary, json.dumps(asdict(summary), indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` as a mapping (readers may meet fields written by later versions)."""
        return _read_json(self.summary)

    def write_eval(self, report: EvalReport) -> None:
        atomic_write_text(self.eval, json.dumps(asdict(report), indent=2) + "\n")

    def read_eval(self) -> dict[str, Any]:
        return _read_json(self.eval)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GsaError(f"{path}: missing (is this a run directory written by gsa train?)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise GsaError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise GsaError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------
# A whole run, read back and checked (``gsa compare``).

# Fields of summary.json that a reader of finished epochs relies on.
SUMMARY_FIELDS = ("model_kind", "epochs", "epochs_done", "best_top1", "final_top1", "parameters")


@dataclass(frozen=True)
class RunRecord:
    """A run directory's records, read and checked."""

    path: Path
    summary: dict[str, Any]
    metrics: list[EpochMetrics]
    evaluation: dict[str, Any] | None
    config: dict[str, Any]


def read_run(path: Path) -> RunRecord:
    """Read a run directory written by ``gsa train``.

    Raises:
        ConfigError: if ``path`` is not a folder.
        GsaError: naming the folder, if it is not a run directory or is half-written (a record missing,
            unreadable or inconsistent with the others).
    """
    run = RunDir(path)
    if not path.is_dir():
        what = "a file" if path.exists() else "no such folder"
        raise ConfigError(f"{path}: not a run directory ({what})")
    needed = (run.config, run.metrics, run.summary)
    missing = [file.name for file in needed if not file.is_file()]
    if len(missing) == len(needed):
        raise GsaError(f"{path}: not a run directory (no {', '.join(missing)}: written by gsa train)")
    if missing:
        raise GsaError(
            f"{path}: half-written run directory: {', '.join(missing)} missing "
            "(gsa train writes metrics.csv and summary.json after each epoch)"
        )
    summary = run.read_summary()
    absent = [name for name in SUMMARY_FIELDS if name not in summary]
    if absent:
        raise GsaError(f"{run.summary}: half-written or not from gsa train: no {', '.join(absent)}")
    metrics = run.read_metrics()
    if len(metrics) != summary["epochs_done"]:
        raise GsaError(
            f"{path}: half-written run directory: {SUMMARY_FILE} says {summary['epochs_done']} epochs done, "
            f"{METRICS_FILE} has {len(metrics)}"
        )
    try:
        config = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise GsaError(f"{run.config}: unreadable ({err})") from None
    if not isinstance(config, dict):
        raise GsaError(f"{run.config}: expected a mapping of config sections")
    evaluation = run.read_eval() if run.eval.is_file() else None
    return RunRecord(path, summary, metrics, evaluation, config)
