"""The checkpoint record: its file format, the files it refuses, and the random state it carries."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from gsa_cli import build_model, load_preset
from gsa_cli.config import config_to_yaml
from gsa_cli.errors import GsaError
from gsa_cli.results import EpochMetrics, RunDir
from gsa_cli.runtime import Precision
from gsa_cli.train.checkpoint import (
    CHECKPOINT_FORMAT,
    Best,
    Checkpoint,
    PartialEpoch,
    TrainedWith,
    capture_rng,
    config_from_checkpoint,
    restore_rng,
)
from gsa_cli.train.distributed import World
from gsa_cli.train.integrity import payload_digest
from gsa_cli.train.loop import SilentReporter
from gsa_cli.train.recipe import ModelEma, build_optimizer, build_schedule, param_groups
from gsa_cli.train.run import TrainOptions, train


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # stable and fast on a shared 2-core machine


def old_format_payload(**changes: Any) -> dict[str, Any]:
    """A checkpoint dict exactly as ``checkpoint()`` in ``train/run.py`` built it before the record
    existed (a smoke run stopped after one batch of its first epoch, with an EMA), with ``changes``."""
    config = load_preset("smoke", overrides=["recipe.ema_decay=0.9"])
    model = build_model(config)
    optimizer = build_optimizer(param_groups(model, weight_decay=0.1, no_decay=model.no_weight_decay()),
                                config.recipe)  # fmt: skip
    scheduler = build_schedule(optimizer, config.recipe, steps_per_epoch=4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    payload = {
        "preset": config.name,
        "config_yaml": config_to_yaml(config),
        "model": model.state_dict(),
        "ema": ModelEma(model, 0.9).module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": 0,
        "batches_done": 1,
        "partial": {"loss_sum": 36.8, "top1": 2.0, "top5": 9.0, "count": 16.0, "seconds": 0.25},
        "step": 1,
        "best": {"top1": None, "top5": None, "epoch": None},
        "val_top1": None,
        "rng": [
            {
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
        ],
        "world_size": 1,
        "options": {"precision": "fp32", "channels_last": False},
        "wall_time_s": 1.5,
        "started": "2024-01-02T03:04:05+00:00",
    }
    payload.update(changes)
    return payload


ROW = {"epoch": 1, "lr": 0.05, "train_loss": 2.3, "train_top1": 12.5, "val_loss": float("nan"),
       "val_top1": 9.375, "val_top5": 50.0, "images_per_s": 300.0, "epoch_time_s": 0.2}  # fmt: skip


def write_old(path: Path, payload: dict[str, Any]) -> Path:
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, path)  # as save_checkpoint() wrote it
    return path


def test_a_checkpoint_written_before_the_record_loads_into_its_fields(tmp_path: Path) -> None:
    payload = old_format_payload()
    checkpoint = Checkpoint.load(write_old(tmp_path / "last.pt", payload))
    assert (checkpoint.preset, checkpoint.config_yaml) == (payload["preset"], payload["config_yaml"])
    assert (checkpoint.epoch, checkpoint.batches_done, checkpoint.step) == (0, 1, 1)
    assert checkpoint.partial == PartialEpoch(loss_sum=36.8, top1=2.0, top5=9.0, count=16.0, seconds=0.25)
    assert checkpoint.best == Best()
    assert checkpoint.val_top1 is None
    assert checkpoint.options == TrainedWith(precision=Precision.FP32, channels_last=False)
    assert (checkpoint.world_size, checkpoint.wall_time_s) == (1, 1.5)
    assert checkpoint.started == payload["started"]
    assert checkpoint.model.keys() == payload["model"].keys()
    assert all(torch.equal(checkpoint.model[k], v) for k, v in payload["model"].items())
    assert checkpoint.ema is not None
    assert checkpoint.optimizer["param_groups"] == payload["optimizer"]["param_groups"]
    assert len(checkpoint.rng) == 1
    assert torch.equal(checkpoint.rng[0].torch, payload["rng"][0]["torch"])
    config = config_from_checkpoint(checkpoint, tmp_path / "last.pt")
    assert config == load_preset("smoke", overrides=["recipe.ema_decay=0.9"])
    assert checkpoint.metrics is None  # its rows are in the run's metrics.csv


def test_the_record_writes_the_same_keys_and_value_types_as_before(tmp_path: Path) -> None:
    payload = old_format_payload()
    written = Checkpoint.load(write_old(tmp_path / "old.pt", payload))
    written.save(tmp_path / "new.pt")
    again = torch.load(tmp_path / "new.pt", weights_only=True)
    old = {"format": CHECKPOINT_FORMAT, **payload}
    assert list(again) == [*old, "sha256"]  # and the checksum of them all (an optional key)
    assert again["sha256"] == payload_digest(again)
    for key, value in old.items():
        assert type(again[key]) is type(value), key
    for key in ("partial", "best", "options"):
        assert again[key] == old[key], key
    assert list(again["rng"][0]) == ["python", "torch", "cuda"]
    assert again["rng"][0]["python"] == old["rng"][0]["python"]
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file is gone


def test_a_run_stopped_by_the_earlier_code_resumes(tmp_path: Path) -> None:
    payload = old_format_payload()
    run = RunDir(tmp_path / "run")
    run.create()
    run.write_config(payload["config_yaml"])
    write_old(run.last, payload)
    summary = train(None, TrainOptions(resume=run.path, device="cpu"), reporter=SilentReporter())
    assert (summary.status, summary.epochs_done) == ("finished", 1)
    finished = Checkpoint.load(run.last)
    assert (finished.epoch, finished.batches_done, finished.partial) == (1, 0, None)
    assert finished.step == 4  # the one update before the stop, and the epoch's 3 others
    assert finished.best.epoch == 1


@pytest.mark.parametrize(
    ("changes", "key", "problem"),
    [
        ({"step": None}, "step", "should be an integer, got None"),
        ({"epoch": "3"}, "epoch", "should be an integer, got str"),
        ({"epoch": True}, "epoch", "should be an integer, got bool"),
        ({"model": [1, 2]}, "model", "should be a dict, got list"),
        ({"model": {"w": 1.0}}, "model.w", "should be a tensor, got float"),
        ({"best": {"top1": "high", "top5": None, "epoch": None}}, "best.top1", "should be a number"),
        ({"best": {"top1": 1.0, "top5": 2.0}}, "best.epoch", "is missing"),
        ({"partial": {"count": 1.0}}, "partial.loss_sum", "is missing"),
        ({"options": {"precision": "fp64", "channels_last": False}}, "options.precision", "one of"),
        ({"options": {"precision": "bf16", "channels_last": 1}}, "options.channels_last", "true or false"),
        ({"rng": [{"python": (), "torch": torch.zeros(1), "cuda": []}]}, "rng[0].python", "3 values"),
        ({"rng": {}}, "rng", "should be a list, got dict"),
        ({"wall_time_s": None}, "wall_time_s", "should be a number, got None"),
        ({"started": 0}, "started", "should be a string, got int"),
        ({"metrics": "rows"}, "metrics", "should be a list, got str"),
        ({"metrics": [None]}, "metrics[0]", "should be a dict, got None"),
        ({"metrics": [{**ROW, "lr": "high"}], "epoch": 1}, "metrics[0].lr", "should be a number, got str"),
        (
            {"metrics": [{k: v for k, v in ROW.items() if k != "val_top5"}], "epoch": 1},
            "metrics[0].val_top5",
            "is missing",
        ),
        ({"metrics": [ROW]}, "metrics", "should hold the rows of epochs 1 to 0, in order"),
        ({"metrics": [ROW, ROW], "epoch": 2}, "metrics", "should hold the rows of epochs 1 to 2, in order"),
    ],
)
def test_an_ill_typed_key_is_refused_in_one_line_naming_the_file_and_key(
    tmp_path: Path, changes: dict[str, Any], key: str, problem: str
) -> None:
    path = write_old(tmp_path / "bad.pt", old_format_payload(**changes))
    with pytest.raises(GsaError) as refused:
        Checkpoint.load(path)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not a usable gsa checkpoint: {key} ")
    assert problem in message


@pytest.mark.parametrize("key", ["preset", "config_yaml", "ema", "scaler", "partial", "rng", "options"])
def test_a_missing_key_is_refused_in_one_line_naming_the_file_and_key(tmp_path: Path, key: str) -> None:
    payload = old_format_payload()
    del payload[key]
    path = write_old(tmp_path / "short.pt", payload)
    with pytest.raises(
        GsaError, match=r"^[^\n]*short\.pt: not a usable gsa checkpoint: (\S+) is missing$"
    ) as e:
        Checkpoint.load(path)
    assert str(e.value).endswith(f": {key} is missing")


def test_the_finished_epochs_rows_are_saved_and_read_back(tmp_path: Path) -> None:
    second = {**ROW, "epoch": 2, "val_top1": 12.5, "val_loss": 2.0}
    path = write_old(tmp_path / "last.pt", old_format_payload(epoch=2, metrics=[ROW, second]))
    checkpoint = Checkpoint.load(path)
    assert checkpoint.metrics is not None
    assert [row.epoch for row in checkpoint.metrics] == [1, 2]
    assert checkpoint.metrics[1] == EpochMetrics(**second)
    assert math.isnan(checkpoint.metrics[0].val_loss)  # a NaN loss is a value like any other
    checkpoint.save(tmp_path / "again.pt")
    assert torch.load(tmp_path / "again.pt", weights_only=True)["metrics"][1] == second


def test_keys_the_record_does_not_know_are_ignored(tmp_path: Path) -> None:
    path = write_old(tmp_path / "more.pt", old_format_payload(notes="from a later version"))
    assert Checkpoint.load(path).step == 1


class _Payload:
    """A class a weights-only load must refuse to construct."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this ran",))


def test_unreadable_or_foreign_files_are_refused(tmp_path: Path) -> None:
    path = write_old(tmp_path / "last.pt", old_format_payload())

    code = tmp_path / "code.pt"
    torch.save({"format": "gsa-checkpoint/1", "x": _Payload()}, code)
    with pytest.raises(GsaError, match=r"code.pt: refused: the file carries Python objects or code"):
        Checkpoint.load(code)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GsaError, match=r"truncated.pt: not a readable checkpoint"):
        Checkpoint.load(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(pickle.dumps([1, 2]) + b"junk")
    with pytest.raises(GsaError, match=r"garbage.pt: not a (readable|gsa) checkpoint"):
        Checkpoint.load(garbage)

    for name, text in (("notes.pt", "hello\n"), ("config.pt", "model:\n  depth: 26\n"), ("empty.pt", "")):
        (tmp_path / name).write_text(text)  # a text file given as a checkpoint: one line, no KeyError
        with pytest.raises(GsaError, match=rf"{name}: not a readable checkpoint"):
            Checkpoint.load(tmp_path / name)

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(GsaError, match=r"other.pt: not a gsa checkpoint"):
        Checkpoint.load(other)

    with pytest.raises(GsaError, match=r"missing.pt: no such checkpoint"):
        Checkpoint.load(tmp_path / "missing.pt")


def test_the_random_state_is_captured_and_restored() -> None:
    (state,) = capture_rng(World())
    first = (random.random(), torch.rand(3))
    restore_rng(state)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])


def test_the_record_is_frozen(tmp_path: Path) -> None:
    checkpoint = Checkpoint.load(write_old(tmp_path / "last.pt", old_format_payload()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        checkpoint.step = 2  # type: ignore[misc]
