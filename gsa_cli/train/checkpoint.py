"""The checkpoint of a run: what is saved, why, and how it is read back.

A run writes ``last.pt`` after every epoch (and where a signal stopped it) and copies it to ``best.pt``
after its best epoch. Each is one torch file holding a dict in the format ``gsa-checkpoint/1``, and
:class:`Checkpoint` is that dict's one typed view; nothing else in the package reads its keys. It
holds, so that ``gsa train --resume`` continues exactly where the run left off and ``gsa eval``
repeats the run's own evaluation:

- **what was trained**: the preset's name and the resolved config as YAML. The config itself, not a
  reference to its preset, so that a preset edited later changes neither a resumed run nor its
  evaluation.
- **the weights**: the model's state dict and, when the recipe keeps one, the EMA's (the weights the
  run evaluated, and ``gsa eval``'s default).
- **the recipe's state**: optimizer, learning-rate schedule and gradient scaler (empty unless fp16),
  so that the next update is the one an uninterrupted run would have made.
- **where the run stands**: epochs finished; batches done of the next one and their running sums
  (``partial``), when a signal stopped it part-way, so that the epoch's metrics still cover the whole
  epoch; optimizer updates; the best epoch so far; the top-1 of the weights just evaluated (EMA
  when there is one), which ``gsa eval`` compares its own against.
- **every rank's random state** (Python's, torch's CPU and CUDA generators), restored on resume.
  Augmentation, batch mixing and loader seeds do not draw from them: each is keyed to the run's seed
  and where the run stands (:mod:`gsa_cli.train.streams`), so a resumed run draws what an
  uninterrupted one draws, whatever its loader workers.
- **how it computed**: precision and memory layout, which change the numbers, so a resume and an
  evaluation use the ones the run trained with (a resume given others is refused, as is one on another
  world size or on other data: ``train_images`` and ``data``, the data's fingerprint); and its wall time
  and start, so that the run's summary counts all of its sessions (``gsa eval`` also checks that a
  checkpoint in a run directory is that run's by its start).
- **the run's record**: every finished epoch's row of ``metrics.csv`` (``metrics``), from which, with
  the best epoch, wall time and start above, ``metrics.csv`` and ``summary.json`` are written again.

The end of an epoch is one commit, and ``last.pt`` is its commit point. The run
(:mod:`gsa_cli.train.run`, rank 0, holding the run directory's lock) writes, each file atomically (a
temporary file, then one rename, so that each is either old or new, never half):

1. ``last.pt``, holding the epoch's row with the earlier ones and the best epoch so far. Once it is
   renamed into place the epoch is committed; before that, it never happened (a resume trains it
   again, from the previous ``last.pt``, to the same numbers).
2. then :func:`publish`, which writes what follows from ``last.pt``: ``best.pt`` (a byte copy of
   ``last.pt``) when the epoch just committed is the best so far, ``metrics.csv`` from its rows, and
   ``summary.json`` from the run's record.

A kill can land between any two of these writes. ``gsa train --resume`` therefore begins with
:func:`publish` from the ``last.pt`` it found (after removing the temporary files a kill left), which
is harmless when everything had been written and completes the commit when not. Every later write of
``last.pt`` happens after that, so ``best.pt`` is always the epoch ``last.pt`` (and the summary) calls
best, ``metrics.csv`` holds each committed epoch exactly once, and ``summary.json`` agrees with both.
(``best.pt`` needs copying only when ``last.pt`` ends the best epoch itself: any later ``last.pt``
was written after that epoch's commit completed.) A ``last.pt`` saved part-way through an epoch (a
signal) commits no epoch: its rows are those of the epochs before.

A write that fails (a full disk, a read-only folder) stops the run with one line naming the file; the
files already there are intact, and ``summary.json`` says ``failed`` where it can still be written.

Reading a file is safe and strict. :meth:`Checkpoint.load` uses ``torch.load(weights_only=True)``:
tensors and plain containers only, never code. Then every key is checked: a missing or ill-typed
one is refused with one line that names the file and the key, never a ``KeyError`` later on. Keys
the record does not know are ignored. The keys and their value types are the format: changing them
means a new format name, so that files written by earlier versions keep loading. ``metrics`` was
added to ``gsa-checkpoint/1`` as an optional key (earlier readers ignore it): a file without it
resumes with the rows of its run's ``metrics.csv``, as before. ``train_images`` was added the same
way: a file without it resumes without the check of the data's size. ``data`` (the data's fingerprint,
:class:`~gsa_cli.train.integrity.DataFingerprint`) too: a file without it resumes with the check of the
size alone. And ``sha256``, the checksum of every other key's value
(:func:`~gsa_cli.train.integrity.payload_digest`): a file whose contents do not match it is refused as
corrupt in one line, by ``gsa eval`` and by a resume alike (a resume never falls back to another
file); a file without it (written before it) is read unchecked. These optional keys keep the format
``gsa-checkpoint/1``: earlier readers ignore them, and this one reads the files they wrote.
"""

from __future__ import annotations

import pickle
import random
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from gsa_cli.config import Config
from gsa_cli.errors import GsaError
from gsa_cli.presets import load_yaml_text, resolve_config
from gsa_cli.results import METRIC_COLUMNS, EpochMetrics, RunDir, RunSummary, atomic_write
from gsa_cli.runtime import Precision
from gsa_cli.train.distributed import World
from gsa_cli.train.integrity import CHECKSUM_KEY, DataFingerprint, payload_digest

CHECKPOINT_FORMAT = "gsa-checkpoint/1"

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------------
# The record and its parts.


@dataclass(frozen=True)
class Best:
    """The best epoch so far by validation top-1 (all None before the first epoch ends)."""

    top1: float | None = None
    top5: float | None = None
    epoch: int | None = None


@dataclass(frozen=True)
class PartialEpoch:
    """The running sums of an epoch stopped part-way, summed over ranks (the loop's ``Totals``)."""

    loss_sum: float
    top1: float  # correct counts
    top5: float
    count: float
    seconds: float


@dataclass(frozen=True)
class TrainedWith:
    """The numerics the run trained with, which a resume and an evaluation keep."""

    precision: Precision
    channels_last: bool


@dataclass(frozen=True, eq=False)
class RngState:
    """One rank's random generators: Python's ``random``, torch's CPU and CUDA generators."""

    python: tuple[Any, ...]  # random.getstate(): (version, internal state, gauss)
    torch: Tensor
    cuda: tuple[Tensor, ...]  # one per device; empty without CUDA


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A run's checkpoint: the fields of a ``gsa-checkpoint/1`` file (see the module's docstring)."""

    preset: str
    config_yaml: str
    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int  # epochs finished
    batches_done: int  # of the next epoch, when stopped part-way
    partial: PartialEpoch | None  # that epoch's sums so far
    step: int  # optimizer updates done
    best: Best
    val_top1: float | None  # of the weights evaluated last (the EMA's when there is one)
    rng: tuple[RngState, ...]  # in rank order
    world_size: int
    options: TrainedWith
    wall_time_s: float  # of every session so far
    started: str  # ISO time of the run's first session
    metrics: tuple[EpochMetrics, ...] | None = None  # the finished epochs' rows (None: in metrics.csv)
    train_images: int | None = None  # in the training set (None: not recorded)
    data: DataFingerprint | None = None  # what it trained on (None: not recorded)

    def to_dict(self) -> dict[str, Any]:
        """The file's dict: plain values only, as ``torch.load(weights_only=True)`` reads them."""
        payload: dict[str, Any] = {"format": CHECKPOINT_FORMAT}
        payload.update({field.name: getattr(self, field.name) for field in fields(self)})
        payload["partial"] = _plain(self.partial) if self.partial is not None else None
        payload["best"] = _plain(self.best)
        payload["rng"] = [
            {"python": state.python, "torch": state.torch, "cuda": list(state.cuda)} for state in self.rng
        ]
        payload["options"] = {
            "precision": self.options.precision.value,
            "channels_last": self.options.channels_last,
        }
        if self.train_images is None:
            del payload["train_images"]
        if self.data is None:
            del payload["data"]
        else:
            names = self.data.class_names
            payload["data"] = {**asdict(self.data), "class_names": None if names is None else list(names)}
        if self.metrics is None:
            del payload["metrics"]
        else:
            payload["metrics"] = [asdict(row) for row in self.metrics]
        payload[CHECKSUM_KEY] = payload_digest(payload)  # last: of every key above
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any], path: Path) -> Checkpoint:
        """The record of a checkpoint file's dict.

        Raises:
            GsaError: naming ``path`` and the first key that is missing or of the wrong type.
        """
        read = _Reader(payload, path)
        partial = read.optional("partial", dict, "a dict")
        return cls(
            preset=read.take("preset", str, "a string"),
            config_yaml=read.take("config_yaml", str, "a string"),
            model=read.state_dict("model"),
            ema=read.state_dict("ema") if read.optional("ema", dict, "a dict") is not None else None,
            optimizer=read.take("optimizer", dict, "a dict"),
            scheduler=read.take("scheduler", dict, "a dict"),
            scaler=read.take("scaler", dict, "a dict"),
            epoch=read.integer("epoch"),
            batches_done=read.integer("batches_done"),
            partial=None if partial is None else _partial(read.nested("partial")),
            step=read.integer("step"),
            best=_best(read.nested("best")),
            val_top1=read.optional_number("val_top1"),
            rng=_rng(read),
            world_size=read.integer("world_size"),
            options=_trained_with(read.nested("options")),
            wall_time_s=read.number("wall_time_s"),
            started=read.take("started", str, "a string"),
            metrics=_metrics(read) if "metrics" in payload else None,
            train_images=read.integer("train_images") if "train_images" in payload else None,
            data=_fingerprint(read.nested("data")) if "data" in payload else None,
        )

    def save(self, path: Path) -> None:
        """Write the file atomically: to a temporary file beside ``path``, then renamed over it.

        Raises:
            WriteError: naming ``path`` and the problem (a full disk, a read-only folder); the file
                that was there is intact.
        """
        payload = self.to_dict()
        atomic_write(path, lambda file: torch.save(payload, file))

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Read a checkpoint with ``weights_only=True``: tensors and plain data, never code.

        Raises:
            GsaError: for a missing file, one that carries Python objects (refused, not run), one that
                is truncated, corrupt or not a gsa checkpoint, or one whose keys are missing or
                ill-typed.
        """
        payload = _read_file(path)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise GsaError(f"{path}: not a gsa checkpoint (expected one written by gsa train)")
        checksum = payload.get(CHECKSUM_KEY)
        if checksum is not None and checksum != payload_digest(payload):  # none: written before it
            raise GsaError(
                f"{path}: corrupt: its contents do not match the checksum saved in it (damaged on disk "
                "or in a copy); nothing was loaded from it: use an intact copy"
            )
        return cls.from_dict(payload, path)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint file atomically (``best.pt`` is the best epoch's ``last.pt``, byte for byte)."""

    def copy(file: Any) -> None:
        with source.open("rb") as original:
            shutil.copyfileobj(original, file)

    atomic_write(target, copy)


def publish(run: RunDir, checkpoint: Checkpoint, summary: RunSummary) -> None:
    """Write what follows from the committed ``last.pt`` (``checkpoint``): ``best.pt`` if it ends the
    best epoch, ``metrics.csv`` from its rows (when it has them), ``summary.json``. Repeatable.

    Raises:
        WriteError: for the first file that could not be written.
    """
    at_best = checkpoint.best.epoch == checkpoint.epoch > 0 and checkpoint.batches_done == 0
    if at_best:
        copy_checkpoint(run.last, run.best)
    if checkpoint.metrics is not None:
        run.write_metrics(list(checkpoint.metrics))
    run.write_summary(summary)


def config_from_checkpoint(checkpoint: Checkpoint, source: Path) -> Config:
    """The config a checkpoint was trained with, checked as a preset is (``source`` names the file).

    Raises:
        ConfigError: if the saved config no longer resolves.
        GsaError: if it is not YAML.
    """
    # Read with the presets' bounds: a checkpoint is data from wherever it came from.
    raw = load_yaml_text(checkpoint.config_yaml, f"{source} (its saved config)", error=GsaError)
    return resolve_config(raw, name=checkpoint.preset, source=f"{source} (its saved config)")


# ---------------------------------------------------------------------------------------------------
# Random state.


def _rng_state() -> RngState:
    return RngState(
        python=random.getstate(),
        torch=torch.get_rng_state(),
        cuda=tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else (),
    )


def capture_rng(world: World) -> tuple[RngState, ...]:
    """Every rank's random state, in rank order, on every rank (a collective under DDP)."""
    state = _rng_state()
    if not world.distributed:
        return (state,)
    states: list[Any] = [None] * world.world_size
    torch.distributed.all_gather_object(states, state)
    return tuple(states)


def restore_rng(state: RngState) -> None:
    """Set this process's generators to ``state`` (CUDA's only where there is CUDA)."""
    version, internal, gauss = state.python
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state.torch)
    if state.cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state.cuda))


# ---------------------------------------------------------------------------------------------------
# Reading the file and checking its keys.


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise GsaError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():  # a class or function to import and call
            raise GsaError(
                f"{path}: refused: the file carries Python objects or code, and checkpoints are only "
                "loaded as plain tensors and data (weights_only); do not load files you do not trust"
            ) from None
        raise GsaError(f"{path}: not a readable checkpoint (corrupt or not a torch file)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GsaError(f"{path}: not a readable checkpoint (truncated or corrupt: {reason})") from None
    except (KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError):
        # What the legacy (non-zip) reader raises on bytes that are no pickle at all: a text file.
        raise GsaError(f"{path}: not a readable checkpoint (not a torch file: a text file?)") from None


class _Reader:
    """Typed reads of one dict of a checkpoint file; ``prefix`` dots the key of a nested dict."""

    def __init__(self, payload: Mapping[str, Any], path: Path, prefix: str = "") -> None:
        self.payload = payload
        self.path = path
        self.prefix = prefix

    def error(self, key: str, problem: str) -> GsaError:
        return GsaError(f"{self.path}: not a usable gsa checkpoint: {self.prefix}{key} {problem}")

    def value(self, key: str) -> Any:
        if key not in self.payload:
            raise self.error(key, "is missing")
        return self.payload[key]

    def optional(self, key: str, kind: type[_T], expected: str) -> _T | None:
        value = self.value(key)
        if value is not None and not isinstance(value, kind):
            raise self.error(key, f"should be {expected} or None, got {type(value).__name__}")
        return value

    def take(self, key: str, kind: type[_T], expected: str) -> _T:
        value = self.value(key)
        if not isinstance(value, kind):
            raise self.error(key, f"should be {expected}, got {type(value).__name__}")
        return value

    def integer(self, key: str) -> int:
        value = self.value(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"should be an integer, got {_kind(value)}")
        return value

    def optional_integer(self, key: str) -> int | None:
        return None if self.value(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        value = self.value(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(key, f"should be a number, got {_kind(value)}")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self.value(key) is None else self.number(key)

    def nested(self, key: str) -> _Reader:
        return _Reader(self.take(key, dict, "a dict"), self.path, f"{self.prefix}{key}.")

    def state_dict(self, key: str) -> dict[str, Tensor]:
        state = self.take(key, dict, "a dict")
        for name, value in state.items():
            if not isinstance(value, Tensor):
                raise self.error(f"{key}.{name}", f"should be a tensor, got {_kind(value)}")
        return state


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _plain(record: Best | PartialEpoch) -> dict[str, Any]:
    return {field.name: getattr(record, field.name) for field in fields(record)}


def _best(read: _Reader) -> Best:
    return Best(
        top1=read.optional_number("top1"),
        top5=read.optional_number("top5"),
        epoch=read.optional_integer("epoch"),
    )


def _partial(read: _Reader) -> PartialEpoch:
    sums = {field.name: read.number(field.name) for field in fields(PartialEpoch)}
    return PartialEpoch(**sums)


def _trained_with(read: _Reader) -> TrainedWith:
    precision = read.take("precision", str, "a string")
    if precision not in {p.value for p in Precision}:
        choices = ", ".join(p.value for p in Precision)
        raise read.error("precision", f"should be one of {choices}, got {precision!r}")
    return TrainedWith(Precision(precision), read.take("channels_last", bool, "true or false"))


def _fingerprint(read: _Reader) -> DataFingerprint:
    names = read.optional("class_names", list, "a list")
    if names is not None and not all(isinstance(name, str) for name in names):
        raise read.error("class_names", "should be a list of strings")
    return DataFingerprint(
        dataset=read.take("dataset", str, "a string"),
        num_classes=read.integer("num_classes"),
        class_names=None if names is None else tuple(names),
        train_images=read.integer("train_images"),
        val_images=read.integer("val_images"),
        train_content=read.take("train_content", str, "a string"),
        val_content=read.take("val_content", str, "a string"),
    )


def _metrics(read: _Reader) -> tuple[EpochMetrics, ...]:
    rows = read.take("metrics", list, "a list")
    result = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise read.error(f"metrics[{index}]", f"should be a dict, got {_kind(row)}")
        row_read = _Reader(row, read.path, f"metrics[{index}].")
        values = [row_read.number(name) for name in METRIC_COLUMNS[1:]]
        result.append(EpochMetrics(row_read.integer("epoch"), *values))
    epoch = read.integer("epoch")
    if [row.epoch for row in result] != list(range(1, epoch + 1)):
        raise read.error("metrics", f"should hold the rows of epochs 1 to {epoch}, in order")
    return tuple(result)


def _rng(read: _Reader) -> tuple[RngState, ...]:
    states = read.take("rng", list, "a list")
    result = []
    for rank, state in enumerate(states):
        if not isinstance(state, dict):
            raise read.error(f"rng[{rank}]", f"should be a dict, got {_kind(state)}")
        rank_read = _Reader(state, read.path, f"rng[{rank}].")
        python = rank_read.value("python")
        if not isinstance(python, tuple | list) or len(python) != 3:
            raise rank_read.error("python", "should be the 3 values of random.getstate()")
        cuda = rank_read.take("cuda", list, "a list")
        if not all(isinstance(generator, Tensor) for generator in cuda):
            raise rank_read.error("cuda", "should be a list of tensors")
        result.append(RngState(tuple(python), rank_read.take("torch", Tensor, "a tensor"), tuple(cuda)))
    return tuple(result)


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
