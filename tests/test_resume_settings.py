"""A resume keeps what the run trained with, or refuses in one line (issue 13, item 9).

World size, precision, memory layout and data change the numbers (and the world size the schedule):
a resume given other ones is refused naming the setting, the run's value and the given one; for data,
the first difference of its fingerprint (kind, classes, split sizes, content). Batch size
and the rest of the config are the checkpoint's: the command line refuses them on resume.
"""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_data import make_image_folder
from PIL import Image
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


def test_a_resume_on_other_data_of_the_same_size_is_refused_naming_what_changed(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    config = smoke(2, "data.dataset=imagenet", "data.num_classes=3", "recipe.batch_size=6")
    out = stopped_run(tmp_path / "run", config, data=str(data))

    def variant(name: str) -> Path:
        return Path(shutil.copytree(data, tmp_path / name))

    renamed_class = variant("classes")  # the same images, one class folder named otherwise
    for split in ("train", "val"):
        (renamed_class / split / "n00000002").rename(renamed_class / split / "zebra")
    renamed_file = variant("files")  # one training image under another name
    (renamed_file / "train/n00000001/img_0.JPEG").rename(renamed_file / "train/n00000001/img_9.JPEG")
    redrawn = variant("pixels")  # the same names, other pixels (every file: the fixed few among them)
    for image in sorted((redrawn / "train").rglob("*.JPEG")):
        Image.new("RGB", (24, 20), (7, 7, 7)).save(image, quality=90)
    fewer_val = variant("val")
    next((fewer_val / "val").rglob("*.JPEG")).unlink()
    expected = {
        renamed_class: "--data {} has other classes than the run: classes the run did not have: zebra; "
        "lacks: n00000002",
        renamed_file: "the training images of --data {} differ from the run's",
        redrawn: "the training images of --data {} differ from the run's",
        fewer_val: "the run validated on 6 images, --data {} has 5",
    }
    for root, message in expected.items():
        with pytest.raises(ConfigError) as refused:
            resume(out, data=str(root))
        assert str(refused.value).startswith(f"data: {message.format(root)}")
        assert str(refused.value).endswith("; resume with the run's data")
    assert Checkpoint.load(out / "last.pt").epoch == 1  # nothing trained, nothing lost
    # A checkpoint written before the fingerprint is checked by its training-set size alone.
    replace(Checkpoint.load(out / "last.pt"), data=None).save(out / "last.pt")
    assert resume(out, data=str(redrawn)).status == "finished"
