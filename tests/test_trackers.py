"""Experiment tracking (``gsa train --log``): TensorBoard's event files and W&B's offline run read back.

Smoke runs: 64 training images in batches of 16, so 4 optimizer steps an epoch, and on the CPU the
loop reads its sums after every step, so every step is logged. W&B runs offline into the run
directory (no network, no account); its ``.wandb`` file is read record by record below.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import one_error_line
from typer.testing import CliRunner

from gsa_cli import load_preset
from gsa_cli.cli.app import app
from gsa_cli.errors import ConfigError
from gsa_cli.results import METRIC_COLUMNS, RunDir
from gsa_cli.train.checkpoint import Checkpoint
from gsa_cli.train.loop import TrainingStoppedError
from gsa_cli.train.run import TrainOptions, train
from gsa_cli.train.trackers import WANDB_ID_FILE, tracker_names

EPOCH_TAGS = [f"epoch/{name}" for name in METRIC_COLUMNS if name != "epoch"]
STEP_TAGS = ["train/loss", "train/top1", "train/lr", "train/images_per_s"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # stable and fast on a shared 2-core machine


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B's own folders in the test's tmp, and no WANDB_MODE: gsa's default (offline) applies."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


class Quiet:
    """A reporter that keeps messages; ``stop_at`` (epoch, batch) sends SIGTERM there, as a scheduler."""

    def __init__(self, stop_at: tuple[int, int] | None = None) -> None:
        self.messages: list[str] = []
        self.stop_at = stop_at
        self.where = (0, "")

    def start(self, phase: str, epoch: int, total: int, done: int) -> None:
        self.where = (epoch, phase)

    def update(self, done: int, stats: dict[str, float]) -> None:
        if self.where[1] == "train" and (self.where[0], done) == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def finish(self) -> None:
        pass

    def message(self, text: str) -> None:
        self.messages.append(text)

    def epoch_end(self, *args: Any) -> None:
        pass


def smoke(epochs: int = 3):
    return load_preset("smoke", overrides=[f"recipe.epochs={epochs}", "recipe.warmup_epochs=1"])


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard folder as (step, value) pairs, as TensorBoard shows them
    (events that a later session's purge step hides are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def texts(folder: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
    }


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B ``.wandb`` file: a LevelDB log (32 KiB blocks of chunks, each a 7-byte
    header: CRC, length, type 1 whole / 2 first / 3 middle / 4 last) of ``Record`` protobufs, after a
    7-byte file header."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, records, pending, at = path.read_bytes(), [], b"", 7
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        if kind == 0:
            break
        pending += data[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """The rows a W&B run file logged: each with its ``_step`` and values."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def offline_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*"))


# ---------------------------------------------------------------------------------------------------
# TensorBoard.


def test_tensorboard_logs_every_step_every_epoch_the_config_and_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "-p", "smoke", "--epochs", "3", "--set", "recipe.warmup_epochs=1", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--log", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    logged = scalars(out / "tb")
    for tag in STEP_TAGS:
        assert [step for step, _ in logged[tag]] == list(range(1, 13)), tag
    for tag in EPOCH_TAGS:
        assert [step for step, _ in logged[tag]] == [4, 8, 12], tag
    rows = RunDir(out).read_metrics()
    for name in ("val_top1", "train_loss", "lr"):
        assert [value for _, value in logged[f"epoch/{name}"]] == pytest.approx(
            [getattr(r, name) for r in rows]
        )
    # Each step's loss is its batch's (16 images each): an epoch's four average to its training loss.
    losses = [value for _, value in logged["train/loss"]]
    for epoch, row in enumerate(rows):
        assert sum(losses[4 * epoch : 4 * epoch + 4]) / 4 == pytest.approx(row.train_loss, rel=1e-5)
    assert logged["train/lr"][-1] == (12, pytest.approx(0.0, abs=1e-9))  # the cosine ends at zero
    assert logged["train/lr"][3][1] == pytest.approx(0.05)  # the warm-up's last step reaches the peak
    summary = json.loads((out / "summary.json").read_text())
    assert logged["summary/best_top1"] == [(12, pytest.approx(summary["best_top1"]))]
    shown = texts(out / "tb")
    assert "recipe:" in shown["config/text_summary"]
    assert '"status": "finished"' in shown["summary/text_summary"]


def test_a_resumed_run_continues_its_logs_without_a_step_twice(tmp_path: Path, wandb_home: None) -> None:
    whole = tmp_path / "whole"
    train(smoke(), TrainOptions(out=whole, device="cpu", log=("tensorboard",)), reporter=Quiet())
    out = tmp_path / "run"
    options = TrainOptions(out=out, device="cpu", log=("tensorboard", "wandb"))
    with pytest.raises(TrainingStoppedError):
        train(smoke(), options, reporter=Quiet(stop_at=(2, 2)))
    assert Checkpoint.load(out / "last.pt").step == 6  # stopped after batch 2 of epoch 2
    # As if a kill had cut the session short after logging two steps past its checkpoint:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tb")) as late:
        for step in (7, 8):
            late.add_scalar("train/loss", 99.0, step)

    resumed = TrainOptions(resume=out, device="cpu", log=("tensorboard", "wandb"))
    assert train(None, resumed, reporter=Quiet()).status == "finished"
    logged, reference = scalars(out / "tb"), scalars(whole / "tb")
    for tag in STEP_TAGS:
        assert [step for step, _ in logged[tag]] == list(range(1, 13)), tag
    for tag in EPOCH_TAGS:
        assert [step for step, _ in logged[tag]] == [4, 8, 12], tag
    for tag in ("train/loss", "train/top1", "train/lr", *EPOCH_TAGS[:6]):  # not the timings
        assert [v for _, v in logged[tag]] == pytest.approx(
            [v for _, v in reference[tag]],
            rel=1e-5,
            nan_ok=True,  # a smoke GSA net may score a NaN loss
        ), tag

    # W&B: both sessions are the one run, each step logged by one of them, once.
    run_id = (out / "wandb" / WANDB_ID_FILE).read_text().strip()
    sessions = offline_runs(out)
    assert [path.name.rsplit("-", 1)[1] for path in sessions] == [run_id, run_id]
    steps = [[row["_step"] for row in wandb_history(s / f"run-{run_id}.wandb")] for s in sessions]
    assert steps == [list(range(1, 7)), list(range(7, 13))]


# ---------------------------------------------------------------------------------------------------
# Weights & Biases.


def test_wandb_runs_offline_by_default_with_config_steps_epochs_and_summary(
    tmp_path: Path, wandb_home: None
) -> None:
    out = tmp_path / "run"
    reporter = Quiet()
    summary = train(smoke(2), TrainOptions(out=out, device="cpu", log=("wandb",)), reporter=reporter)
    (session,) = offline_runs(out)
    run_id = (out / "wandb" / WANDB_ID_FILE).read_text().strip()
    assert session.name.endswith(f"-{run_id}")
    assert (
        reporter.messages[0]
        == f"wandb: offline run {run_id} in {session}; upload it with: wandb sync {session}"
    )
    records = wandb_records(session / f"run-{run_id}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("gsa", "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["recipe"]["epochs"] == 2
    assert config["model"]["kind"] == "gsa"
    rows = wandb_history(session / f"run-{run_id}.wandb")
    assert [row["_step"] for row in rows] == list(range(1, 9))
    assert [(row["_step"], row["epoch"]) for row in rows if "epoch" in row] == [(4, 1), (8, 2)]
    assert all(set(STEP_TAGS) <= set(row) for row in rows)
    assert rows[-1]["epoch/val_top1"] == pytest.approx(summary.final_top1)
    final = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            final |= {
                item.key or "/".join(item.nested_key): item.value_json for item in record.summary.update
            }
    assert json.loads(final["best_top1"]) == pytest.approx(summary.best_top1)
    assert json.loads(final["status"]) == "finished"
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


def test_wandb_that_cannot_start_is_one_line_and_leaves_no_folder(
    tmp_path: Path, wandb_home: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "nonsense")
    out = tmp_path / "new" / "run"
    args = ["train", "-p", "smoke", "--device", "cpu", "--threads", "1", "--log", "tensorboard,wandb"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 1
    assert one_error_line(result).startswith("error: --log wandb: W&B could not start a run (")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------
# Choosing trackers, and missing packages.


def test_log_takes_repeated_and_comma_separated_names_each_once() -> None:
    assert tracker_names(["tensorboard,wandb", " TensorBoard ", "wandb"]) == ("tensorboard", "wandb")
    assert tracker_names([]) == ()
    with pytest.raises(ConfigError, match=r"unknown tracker 'mlflow'; choose tensorboard or wandb"):
        tracker_names(["tensorboard,mlflow"])


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: str
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # as if the package were not installed
    out = tmp_path / "run"
    args = ["train", "-p", "smoke", "--device", "cpu", "--log", tracker, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert one_error_line(result) == (
        f"error: --log {tracker} needs the {tracker} package: pip install 'gsa-cli[{tracker}]'"
    )
    assert not out.exists()


def test_an_unknown_tracker_is_one_line() -> None:
    result = CliRunner().invoke(app, ["train", "-p", "smoke", "--log", "mlflow"])
    assert result.exit_code == 2
    assert "unknown tracker 'mlflow'" in one_error_line(result)


def test_tracker_files_follow_the_umask(tmp_path: Path) -> None:
    mask = os.umask(0o027)
    try:
        out = tmp_path / "run"
        train(
            load_preset("smoke"), TrainOptions(out=out, device="cpu", log=("tensorboard",)), reporter=Quiet()
        )
    finally:
        os.umask(mask)
    written = list((out / "tb").iterdir())
    assert written
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o640, path


@pytest.mark.slow  # two processes under torchrun: about ten seconds
def test_only_the_main_process_logs_under_ddp(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "gsa_cli", "train", "--preset", "smoke", "--epochs", "2", "--nproc", "2",
               "--device", "cpu", "--log", "tensorboard", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    writers = {
        path.name.split(".")[-2] for path in (out / "tb").iterdir()
    }  # events.out.tfevents.T.HOST.PID.N
    assert len(writers) == 1  # one process wrote them
    logged = scalars(out / "tb")
    assert [step for step, _ in logged["train/loss"]] == [1, 2, 3, 4]  # 2 updates an epoch on 2 ranks
    assert [step for step, _ in logged["epoch/val_top1"]] == [2, 4]
