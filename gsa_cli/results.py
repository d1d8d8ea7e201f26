"""Run directories and the records in them: read and written here, without torch.

A run directory holds everything one ``gsa train`` produced::

    config.yaml     the resolved config (loads back with ``load_preset(path, model=None)``)
    metrics.csv     one row per finished epoch (columns: ``METRIC_COLUMNS``)
    summary.json    best and final accuracy, parameters, wall time, device, versions, status
    eval.json       written by ``gsa eval``
    last.pt         the checkpoint after the latest epoch (or at an interruption)
    best.pt         the checkpoint of the epoch with the best validation top-1

:func:`read_run` reads a whole run back and checks it (``gsa compare``), naming a half-written one.

Every file is written atomically (a temporary file ``.NAME.RANDOM.tmp`` in the same folder, then
``os.replace``), so a crash leaves either the previous version or the new one, never half a file; a
failed write removes its temporary file, and the next process to lock the folder removes those a kill
left. A write that fails (a full disk, a read-only folder) raises :class:`WriteError`, one line naming
the file and what is wrong. Checkpoints are torch files, written by :mod:`gsa_cli.train.checkpoint`
through :func:`atomic_write`.

A process that writes a run directory holds its lock (:meth:`RunDir.claim`): ``fcntl.flock`` on the
file ``.lock`` inside it, which holds the writer's pid. The OS releases it when the process ends,
however it ends; a second writer is refused with one line naming that pid.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.yamlio import load_yaml_text

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
LOCK_FILE = ".lock"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, EVAL_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT)


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
    init: str | None = None  # the weights a warm start began from (--init; the run's init.json), or None
    gsa_impl: str | None = None  # what its GSA modules ran: "native", "gemm" or "reference"; None: none


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


_WRITE_PROBLEMS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def describe(err: OSError) -> str:
    """What an OSError means, in words (the disk, the folder), for a one-line message."""
    known = _WRITE_PROBLEMS.get(err.errno or 0)
    return known or (err.strerror or str(err) or type(err).__name__)


class WriteError(GsaError):
    """A file that could not be written; its previous version, if any, is intact."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(f"{path}: could not write it: {describe(err)}")
        self.path, self.errno = path, err.errno


def _temporary(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file beside ``path``, open for writing (its mode as the umask makes it)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with contextlib.suppress(FileExistsError):
            return tmp, tmp.open("xb")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` atomically: ``write(file)`` fills a temporary file, synced, then renamed over it.

    Raises:
        WriteError: if the folder or the disk refuses it (the temporary file is removed; ``path`` is as
            it was).
    """
    tmp: Path | None = None
    try:
        tmp, file = _temporary(path)
        with file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise WriteError(path, err) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


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
    """A new, empty folder ``runs/<preset>-<model>-<YYYYmmdd-HHMMSS>``, created here.

    Created exclusively: when another run took the name (one started in the same second), the next
    free one of ``...-2``, ``...-3``, ... is taken, so that no two runs ever share a default folder.

    Raises:
        WriteError: if ``root`` cannot be written.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{preset}-{model_kind}-{stamp}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 10_000):
            path = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                return path
    except OSError as err:
        raise WriteError(root, err) from None
    raise GsaError(f"{root}: no free run name {base.name}-N left; give --out")


class RunLock:
    """A process's exclusive use of a run directory: ``fcntl.flock`` on its ``.lock`` file.

    Held until :meth:`release` (or until the process ends, however it ends: the OS releases it).
    :meth:`abandon` also removes the folders the claim made, when nothing else was written in them.
    """

    def __init__(self, folder: Path, handle: int, made: tuple[Path, ...]) -> None:
        self.folder, self.handle, self.made = folder, handle, made

    @classmethod
    def take(cls, folder: Path, made: tuple[Path, ...] = ()) -> RunLock:
        """Lock ``folder`` (which exists) for this process, and write its pid into the lock file.

        Raises:
            GsaError: naming the holder's pid if another process holds it, or the folder if it cannot
                be locked.
        """
        for _ in range(100):  # until the file locked is the one in the folder (abandon removes it)
            handle = _flock(folder)
            if handle is not None:
                os.ftruncate(handle, 0)
                os.write(handle, f"{os.getpid()}\n".encode())
                return cls(folder, handle, made)
        raise GsaError(f"{folder}: cannot lock this run directory (its lock file keeps changing)")

    def release(self) -> None:
        """Let another process write the folder (the lock file stays)."""
        if self.handle >= 0:
            os.close(self.handle)
            self.handle = -1

    def abandon(self) -> None:
        """Release the folder and, if this process wrote nothing in it, remove what the claim made."""
        with contextlib.suppress(OSError):
            if self.handle >= 0 and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
                (self.folder / LOCK_FILE).unlink()  # while held: a taker that opened it sees it change
                for folder in self.made:  # the deepest first
                    folder.rmdir()
        self.release()


def _flock(folder: Path) -> int | None:
    """The folder's lock file, opened and locked; None if it was replaced meanwhile."""
    path = folder / LOCK_FILE
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise GsaError(f"{folder}: cannot lock this run directory ({describe(err)})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(handle), os.stat(path)):
            return handle
    except BlockingIOError:
        holder = os.pread(handle, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(handle)
        raise GsaError(
            f"{folder}: another gsa process (pid {holder}) is writing this run directory; "
            "wait for it to end, or write elsewhere"
        ) from None
    except FileNotFoundError:
        pass
    os.close(handle)
    return None


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
        """Make the folder for a new run, refusing one that already holds a run (see :meth:`claim`)."""
        self.claim(new=True).release()

    def claim(self, *, new: bool, made: bool = False) -> RunLock:
        """Lock the run directory for this process, and remove the temporary files a kill left.

        Args:
            new: A new run: create the folder (and its parents) and refuse one that holds a run.
            made: The folder was just made for this run (``default_run_dir``): abandoning the claim
                removes it.

        Raises:
            GsaError: if another process holds the lock (naming its pid), or for a folder that cannot
                be created or locked, or (``new``) that holds a run.
        """
        created = [self.path] if made else []
        if new:
            if self.path.exists() and not self.path.is_dir():
                raise GsaError(f"--out {self.path}: exists and is not a folder")
            created = [p for p in (self.path, *self.path.parents) if not p.exists()] or created
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise GsaError(f"--out {self.path}: cannot create the folder ({describe(err)})") from None
        lock = RunLock.take(self.path, tuple(created))
        for stale in (path for name in RUN_FILES for path in self.path.glob(f".{name}.*.tmp")):
            with contextlib.suppress(OSError):
                stale.unlink()
        if new and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            lock.release()
            raise GsaError(
                f"--out {self.path}: the folder is not empty; continue that run with "
                f"--resume {self.path}, or choose another --out"
            )
        return lock

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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
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
        text = run.config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GsaError(f"{run.config}: unreadable ({err})") from None
    config = load_yaml_text(text, str(run.config), error=GsaError)
    if not isinstance(config, dict):
        raise GsaError(f"{run.config}: expected a mapping of config sections")
    evaluation = run.read_eval() if run.eval.is_file() else None
    return RunRecord(path, summary, metrics, evaluation, config)
