"""A resumed run equals an uninterrupted one on augmented data (issue 13, item 4).

A small ``digits`` net trained with its padded random crop, RandAugment, MixUp and CutMix; stopped by a
signal part-way through an epoch or at its end, then resumed: the rows of ``metrics.csv`` (without
timings) and the final weights must be those of the run that never stopped. On one process, and on
two processes under a CPU process group.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_train import Quiet, without_timing

from gsa_cli import load_preset
from gsa_cli.config import Config
from gsa_cli.results import RunDir
from gsa_cli.train.checkpoint import Checkpoint
from gsa_cli.train.distributed import end_worker
from gsa_cli.train.loop import TrainingStoppedError
from gsa_cli.train.run import TrainOptions, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_digits(folder: Path, **recipe: Any) -> Path:
    """The digits preset with a small net at 8 px, every augmentation and batch mixing on."""
    preset = yaml.safe_load((REPO / "presets" / "digits.yaml").read_text())
    preset["data"].update(img_size=8)
    preset["model"].update(depth=None, layers=[1, 1, 1, 1], width=8, heads=2)
    mixing = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "randaugment": True}
    preset["recipe"].update(
        {"epochs": 2, "warmup_epochs": 1, "batch_size": 128, "lr": 0.02, **mixing, **recipe}
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tinydigits.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def assert_same_run(run: Path, reference: Path) -> None:
    rows, expected = RunDir(run).read_metrics(), RunDir(reference).read_metrics()
    assert [row.epoch for row in rows] == [row.epoch for row in expected]
    assert without_timing(rows) == without_timing(expected)
    a, b = Checkpoint.load(run / "last.pt"), Checkpoint.load(reference / "last.pt")
    assert a.step == b.step
    for key, value in b.model.items():
        assert torch.equal(a.model[key], value), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    torch.set_num_threads(1)  # before the function-scoped fixture that does the same
    folder = tmp_path_factory.mktemp("whole")
    config = load_preset(tiny_digits(folder))
    train(config, TrainOptions(out=folder / "run", device="cpu"), reporter=Quiet())
    return config, folder / "run"


def test_a_digits_run_stopped_mid_epoch_resumes_to_the_same_run(
    tmp_path: Path, uninterrupted: tuple[Config, Path]
) -> None:
    config, whole = uninterrupted

    def interrupt(epoch: int, done: int) -> None:
        if (epoch, done) == (2, 3):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStoppedError, match="stopped by SIGTERM at epoch 2"):
        train(config, TrainOptions(out=tmp_path / "run", device="cpu"), reporter=Quiet(at_update=interrupt))
    assert Checkpoint.load(tmp_path / "run" / "last.pt").batches_done == 3
    train(None, TrainOptions(resume=tmp_path / "run", device="cpu"), reporter=Quiet())
    assert_same_run(tmp_path / "run", whole)


def test_a_digits_run_stopped_at_an_epoch_end_resumes_to_the_same_run(
    tmp_path: Path, uninterrupted: tuple[Config, Path]
) -> None:
    config, whole = uninterrupted

    def interrupt(row: Any) -> None:
        if row.epoch == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingStoppedError, match="stopped by SIGINT"):
        train(
            config, TrainOptions(out=tmp_path / "run", device="cpu"), reporter=Quiet(at_epoch_end=interrupt)
        )
    assert Checkpoint.load(tmp_path / "run" / "last.pt").batches_done == 0
    # Resumed with loader processes, which the first session had none of: the same augmentations.
    train(None, TrainOptions(resume=tmp_path / "run", device="cpu", workers=2), reporter=Quiet())
    assert_same_run(tmp_path / "run", whole)


# ---------------------------------------------------------------------------------------------------
# Two processes (gloo), each a rank of the job as torchrun would start it.


def _rank(rank: int, port: int, preset: str | None, out: str, resume: bool, stop_at: int | None) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)

    def interrupt(epoch: int, done: int) -> None:
        if (epoch, done) == (2, stop_at):
            os.kill(os.getpid(), signal.SIGTERM)

    reporter = Quiet(at_update=interrupt if stop_at is not None else None)
    code = 0
    try:  # each rank ends as a torchrun worker of `gsa` does (end_worker says why)
        if resume:
            train(None, TrainOptions(resume=Path(out), device="cpu"), reporter=reporter)
        else:
            assert preset is not None
            train(load_preset(preset), TrainOptions(out=Path(out), device="cpu"), reporter=reporter)
    except TrainingStoppedError:
        code = 143
    except BaseException:
        traceback.print_exc()
        code = 1
    end_worker(code)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _two_ranks(
    preset: Path | None, out: Path, *, resume: bool = False, stop_at: int | None = None
) -> list[int]:
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    ranks = [
        context.Process(
            target=_rank, args=(rank, port, str(preset) if preset else None, str(out), resume, stop_at)
        )
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    codes = [process.exitcode for process in ranks]
    for process in ranks:
        if process.is_alive():
            process.kill()
    return [code if code is not None else -1 for code in codes]


def test_a_two_process_digits_run_stopped_mid_epoch_resumes_to_the_same_run(tmp_path: Path) -> None:
    preset = tiny_digits(tmp_path, batch_size=64)  # each rank its half, in batches of 64
    assert _two_ranks(preset, tmp_path / "whole") == [0, 0]
    assert _two_ranks(preset, tmp_path / "run", stop_at=4) == [143, 143]
    assert Checkpoint.load(tmp_path / "run" / "last.pt").batches_done == 4
    assert _two_ranks(None, tmp_path / "run", resume=True) == [0, 0]
    assert_same_run(tmp_path / "run", tmp_path / "whole")
