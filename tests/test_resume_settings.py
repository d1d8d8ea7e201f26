"""A resume keeps what the run trained with, or refuses in one line (issue 13, item 9).

World size, precision, memory layout and data change the numbers (and the world size the schedule):
a resume given other ones is refused naming the setting, the run's value and the given one. Batch size
and the rest of the config are the checkpoint's: the command line refuses them on resume.
"""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_data import make_image_folder
from test_train import Quiet, _error, smoke
from typer.testing import CliRunner

from gsa_cli.cli.app import app
from gsa_cli.config import Config
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.runtime import Precision
from gsa_cli.train.checkpoint import Checkpoint
from gsa_cli.train.loop import TrainingStoppedError
from gsa_cli.train.run import TrainOptions, train


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def stopped_run(out: Path, config: Config | None = None, **options: Any) -> Path:
    """A run of ``config`` (smoke, 2 epochs) stopped after its first epoch."""

    def interrupt(row: Any) -> None:
        if row.epoch == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingStoppedError):
        train(config or smoke(2), TrainOptions(out=out, device="cpu", **options), reporter=Quiet(interrupt))
    return out


def resume(out: Path, **options: Any) -> Any:
    return train(None, TrainOptions(resume=out, device="cpu", **options), reporter=Quiet())


def test_a_resume_on_another_number_of_processes_is_refused(tmp_path: Path) -> None:
    out = stopped_run(tmp_path / "run")
    checkpoint = Checkpoint.load(out / "last.pt")
    # As a 2-process run would have saved it: its world size, each rank's random state.
    replace(checkpoint, world_size=2, rng=checkpoint.rng * 2).save(out / "last.pt")
    with pytest.raises(GsaError, match=r"world size: the run trained on 2 process\(es\), this resume has 1"):
        resume(out)
    assert Checkpoint.load(out / "last.pt").epoch == 1  # nothing trained, nothing lost


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"precision": Precision.BF16}, "--precision: the run trained in fp32, this resume asks for bf16"),
        ({"channels_last": True}, "--channels-last: the run trained with false, this resume asks for true"),
    ],
)
def test_a_resume_in_other_numerics_is_refused(tmp_path: Path, given: dict[str, Any], message: str) -> None:
    out = stopped_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        resume(out, **given)
    # The run's own values, given again, are accepted.
    assert resume(out, precision=Precision.FP32, channels_last=False).status == "finished"


def test_the_cli_resumes_in_the_run_s_precision_unless_told_another(tmp_path: Path) -> None:
    out = stopped_run(tmp_path / "run", precision=Precision.BF16, channels_last=True)
    result = CliRunner().invoke(
        app, ["train", "--resume", str(out), "--device", "cpu", "--precision", "fp32"]
    )
    assert result.exit_code == 2
    assert "--precision: the run trained in bf16, this resume asks for fp32" in _error(result)
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["precision"], summary["channels_last"]) == ("finished", "bf16", True)


def test_a_resume_on_other_data_is_refused(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    config = smoke(2, "data.dataset=imagenet", "data.num_classes=3", "recipe.batch_size=6")
    out = stopped_run(tmp_path / "run", config, data=str(data))
    train_images = sorted((data / "train").rglob("*.JPEG"))
    train_images[0].unlink()
    count = len(train_images)
    message = rf"data: the run trained on {count} training images, --data .* has {count - 1}"
    with pytest.raises(ConfigError, match=message):
        resume(out, data=str(data))


def test_a_resume_refuses_a_new_batch_size_or_setting_on_the_command_line(tmp_path: Path) -> None:
    for flags in (["--batch-size", "8"], ["--set", "recipe.seed=1"]):
        result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), *flags])
        assert result.exit_code == 2
        assert f"--resume continues a run as it was configured; drop {flags[0]}" in _error(result)
