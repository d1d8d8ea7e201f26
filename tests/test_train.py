"""Training runs end to end: run directories read back, resume, interruption, DDP, gsa eval, errors."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_data import make_cifar100, make_image_folder
from typer.testing import CliRunner

from gsa_cli import load_preset
from gsa_cli.cli.app import app
from gsa_cli.data import Batch
from gsa_cli.errors import ConfigError
from gsa_cli.results import METRIC_COLUMNS, EpochMetrics, RunDir
from gsa_cli.runtime import Precision
from gsa_cli.train.checkpoint import Checkpoint, TrainedWith
from gsa_cli.train.evaluate import EvalOptions, evaluate_checkpoint
from gsa_cli.train.loop import TrainingStoppedError, recalibrate_batch_norm
from gsa_cli.train.run import TrainOptions, train

REPO = Path(__file__).resolve().parent.parent
TIMING = ("images_per_s", "epoch_time_s")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # stable and fast on a shared 2-core machine


class Quiet:
    """A reporter that keeps messages and can act at the end of an epoch."""

    def __init__(self, at_epoch_end: Any = None, at_update: Any = None) -> None:
        self.messages: list[str] = []
        self.rows: list[EpochMetrics] = []
        self.at_epoch_end = at_epoch_end
        self.at_update = at_update

    def start(self, phase: str, epoch: int, total: int, done: int) -> None:
        self.phase, self.epoch = phase, epoch

    def update(self, done: int, stats: dict[str, float]) -> None:
        if self.at_update is not None and self.phase == "train":
            self.at_update(self.epoch, done)

    def finish(self) -> None:
        pass

    def message(self, text: str) -> None:
        self.messages.append(text)

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None:
        self.rows.append(row)
        if self.at_epoch_end is not None:
            self.at_epoch_end(row)


def smoke(epochs: int = 3, *extra: str):
    return load_preset("smoke", overrides=[f"recipe.epochs={epochs}", "recipe.warmup_epochs=1", *extra])


def cpu(out: Path, **kwargs: Any) -> TrainOptions:
    return TrainOptions(out=out, device="cpu", **kwargs)


def read_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def without_timing(rows: list[EpochMetrics]) -> list[tuple[float | str, ...]]:
    """The rows without their timings; NaN as "nan" so that two NaNs in the same place compare equal
    (a smoke GSA net can score a NaN validation loss after a few updates: see the README's caveat)."""

    def comparable(value: float) -> float | str:
        return "nan" if math.isnan(value) else value

    return [tuple(comparable(getattr(r, c)) for c in METRIC_COLUMNS if c not in TIMING) for r in rows]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------
# One epoch on each on-disk format; the run directory read back.


def test_one_epoch_on_an_image_folder_through_the_cli(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--preset", "smoke", "--set", "data.dataset=imagenet", "--set", "data.num_classes=3",
         "--batch-size", "6", "--data", str(data), "--out", str(out), "--device", "cpu", "--workers", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.output
    rows = read_rows(out)
    assert len(rows) == 1
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert int(rows[0]["epoch"]) == 1
    assert 0.0 <= float(rows[0]["val_top1"]) <= 100.0
    # 6 validation images: top-1 is a multiple of 1/6.
    assert float(rows[0]["val_top1"]) * 6 / 100 == pytest.approx(round(float(rows[0]["val_top1"]) * 6 / 100))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["dataset"] == "imagenet"
    assert summary["epochs_done"] == 1
    assert summary["final_top1"] == float(rows[0]["val_top1"])
    assert summary["parameters"] > 0
    from gsa_cli import build_model, load_preset
    from gsa_cli.bench.macs import count_macs

    counted = count_macs(build_model(load_preset("smoke", overrides=["data.num_classes=3"])), img_size=16)
    assert summary["gmacs"] == pytest.approx(counted.total / 1e9)
    files = {p.name for p in out.iterdir()}
    assert files == {"config.yaml", "metrics.csv", "summary.json", "last.pt", "best.pt", ".lock"}
    assert (out / ".lock").read_text().strip() == str(os.getpid())  # the run's writer, released
    # The saved config loads back to the same config (under the file's own name).
    settings = ["data.dataset=imagenet", "data.num_classes=3", "recipe.batch_size=6"]
    expected = load_preset("smoke", overrides=settings)
    assert load_preset(out / "config.yaml", model=None) == replace(expected, name="config")


def test_one_epoch_on_a_cifar100_folder(tmp_path: Path) -> None:
    data = make_cifar100(tmp_path / "data")
    config = load_preset("smoke", overrides=["data.dataset=cifar100", "data.num_classes=100"])
    summary = train(config, cpu(tmp_path / "run", data=str(data)), reporter=Quiet())
    assert summary.status == "finished"
    assert summary.epochs_done == 1
    assert len(RunDir(tmp_path / "run").read_metrics()) == 1
    assert (
        Checkpoint.load(tmp_path / "run" / "last.pt").step == 40 // 16
    )  # 40 training images, full batches of 16


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_every_recipe_option_at_once_trains_and_evaluates(tmp_path: Path, precision: Precision) -> None:
    config = smoke(
        1,
        "recipe.optimizer=adamw",
        "recipe.lr=0.001",
        "recipe.label_smoothing=0.1",
        "recipe.mixup_alpha=0.2",
        "recipe.cutmix_alpha=1.0",
        "recipe.randaugment=true",
        "recipe.grad_clip=1.0",
        "recipe.ema_decay=0.99",
    )
    out = tmp_path / "run"
    summary = train(config, cpu(out, precision=precision, channels_last=True), reporter=Quiet())
    assert summary.status == "finished"
    assert summary.precision == precision.value
    assert summary.channels_last
    row = RunDir(out).read_metrics()[0]
    assert math.isfinite(row.train_loss)
    checkpoint = Checkpoint.load(out / "last.pt")
    assert checkpoint.options == TrainedWith(precision=precision, channels_last=True)
    assert bool(checkpoint.scaler) == (precision is Precision.FP16)  # a gradient scaler for fp16 only
    report = evaluate_checkpoint(out, EvalOptions(device="cpu"), reporter=Quiet())
    assert report.precision == precision.value
    assert report.top1 == row.val_top1 == report.recorded_top1


def test_sync_bn_on_cpu_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA devices"):
        train(smoke(1), cpu(tmp_path / "run", sync_bn=True), reporter=Quiet())


# ---------------------------------------------------------------------------------------------------
# Resume.


def test_a_run_stopped_after_an_epoch_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    config = smoke(3)
    whole = train(config, cpu(tmp_path / "whole"), reporter=Quiet())
    assert whole.status == "finished"

    def interrupt(row: EpochMetrics) -> None:
        if row.epoch == 1:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would: the handler asks the loop to stop

    with pytest.raises(TrainingStoppedError, match=r"stopped by SIGINT .* --resume") as stopped:
        train(config, cpu(tmp_path / "parts"), reporter=Quiet(at_epoch_end=interrupt))
    assert stopped.value.exit_code == 128 + signal.SIGINT
    stopped_summary = json.loads((tmp_path / "parts" / "summary.json").read_text())
    assert (stopped_summary["epochs_done"], stopped_summary["status"]) == (1, "interrupted")

    reporter = Quiet()
    resumed = train(None, TrainOptions(resume=tmp_path / "parts", device="cpu"), reporter=reporter)
    assert reporter.messages[0].startswith(f"resuming {tmp_path / 'parts'} after epoch 1 of 3")
    first = RunDir(tmp_path / "whole").read_metrics()
    second = RunDir(tmp_path / "parts").read_metrics()
    assert [r.epoch for r in second] == [1, 2, 3]
    assert without_timing(second) == without_timing(first)
    assert (resumed.best_top1, resumed.final_top1) == (whole.best_top1, whole.final_top1)
    a = Checkpoint.load(tmp_path / "whole" / "last.pt")
    b = Checkpoint.load(tmp_path / "parts" / "last.pt")
    assert a.step == b.step == 3 * 4
    for key, value in a.model.items():
        assert torch.equal(value, b.model[key]), key


def test_a_run_stopped_part_way_through_an_epoch_resumes_there(tmp_path: Path) -> None:
    config = smoke(2)

    def interrupt(epoch: int, done: int) -> None:
        if (epoch, done) == (2, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStoppedError, match="stopped by SIGTERM at epoch 2") as stopped:
        train(config, cpu(tmp_path / "run"), reporter=Quiet(at_update=interrupt))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    checkpoint = Checkpoint.load(tmp_path / "run" / "last.pt")
    assert (checkpoint.epoch, checkpoint.batches_done, checkpoint.step) == (1, 1, 5)
    assert checkpoint.partial is not None
    assert checkpoint.partial.count == 16.0  # the one batch of epoch 2 already trained on
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"

    summary = train(None, TrainOptions(resume=tmp_path / "run", device="cpu"), reporter=Quiet())
    assert summary.status == "finished"
    assert [r.epoch for r in RunDir(tmp_path / "run").read_metrics()] == [1, 2]
    assert Checkpoint.load(tmp_path / "run" / "last.pt").step == 8  # 4 updates per epoch, none twice


def test_a_run_killed_between_checkpoints_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "gsa_cli", "train", "--preset", "smoke", "--epochs", "30",
               "--out", str(out), "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").is_file() or len(read_rows(out)) < 1:
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, "no epoch finished in two minutes"
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL: no handler runs, whatever was being written is abandoned
        process.wait()
    assert process.returncode == -signal.SIGKILL
    done = Checkpoint.load(out / "last.pt").epoch
    assert done >= 1
    assert (out / ".lock").read_text().strip() == str(process.pid)  # the lock died with its process
    summary = train(None, TrainOptions(resume=out, device="cpu"), reporter=Quiet())
    assert summary.status == "finished"
    assert [r.epoch for r in RunDir(out).read_metrics()] == list(range(1, 31))
    assert Checkpoint.load(out / "last.pt").step == 30 * 4
    assert not [path.name for path in out.iterdir() if path.suffix == ".tmp"]  # what the kill left is gone


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gsa_cli.train.loop as engine

    real = engine.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > 4 + 2 + 1 else loss  # epoch 1: 4 train + 2 val

    monkeypatch.setattr(engine.F, "cross_entropy", poisoned)
    message = r"loss is no longer finite at epoch 2.*last good checkpoint"
    with pytest.raises(TrainingStoppedError, match=message):
        train(smoke(2), cpu(tmp_path / "run"), reporter=Quiet())
    checkpoint = Checkpoint.load(tmp_path / "run" / "last.pt")
    assert (checkpoint.epoch, checkpoint.step) == (1, 4)
    assert all(torch.isfinite(v).all() for v in checkpoint.model.values() if v.is_floating_point())
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------------------------------
# Distributed.


def test_two_process_gloo_run_matches_a_single_process_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "gsa_cli", "train", "--preset", "smoke", "--epochs", "2",
               "--nproc", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["status"] == "finished"
    checkpoint = Checkpoint.load(out / "last.pt")
    assert checkpoint.step == 2 * 2  # 64 images over 2 ranks of batch 16: 2 updates an epoch
    assert len(checkpoint.rng) == 2  # each rank's own random state
    # Validation was sharded over the ranks and reduced; one process over all 32 images agrees.
    report = evaluate_checkpoint(out / "last.pt", EvalOptions(device="cpu"), reporter=Quiet())
    assert report.images == 32
    assert report.top1 == summary["final_top1"] == report.recorded_top1


def test_two_process_run_skips_a_step_whose_batch_is_unreadable_on_one_rank(tmp_path: Path) -> None:
    # 14 of 18 images unreadable, 2 per batch: some steps have a good batch on one rank only. That
    # rank must not step alone (its gradient all-reduce would wait forever for the other).
    data = make_image_folder(tmp_path / "data")
    images = sorted((data / "train").rglob("*.JPEG"))
    for image in images[:14]:
        image.write_bytes(b"GIF89a garbage")
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "gsa_cli", "train", "--preset", "smoke", "--data", str(data),
               "--set", "data.dataset=imagenet", "--set", "data.num_classes=3",
               "--set", "recipe.batch_size=2", "--workers", "0", "--nproc", "2", "--device", "cpu",
               "--on-corrupt", "skip", "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # The bug is a hang. SIGTERM lets torchrun's agent stop its ranks; SIGKILL if it cannot.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        pytest.fail("the two ranks hung: one stepped while the other skipped its unreadable batch")
    assert process.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["world_size"]) == ("finished", 2)
    # Fewer updates than batches: the steps with an unreadable batch on either rank were skipped.
    assert 0 < Checkpoint.load(out / "last.pt").step < len(images) // 2 // 2


# ---------------------------------------------------------------------------------------------------
# gsa eval.


def test_eval_reproduces_the_recorded_top1_and_writes_eval_json(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(smoke(2, "recipe.ema_decay=0.9"), cpu(out), reporter=Quiet())
    result = CliRunner().invoke(app, ["eval", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert report["weights"] == "ema"
    assert report["top1"] == summary["best_top1"] == report["recorded_top1"]
    assert report["checkpoint"] == str(out / "best.pt")
    assert report["images"] == 32
    assert f"{report['top1']:.2f}" in result.output

    result = CliRunner().invoke(app, ["eval", str(out / "last.pt"), "--no-ema", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["weights"] == "model"
    assert report["recorded_top1"] is None  # training recorded the EMA's accuracy, not these weights'


# ---------------------------------------------------------------------------------------------------
# Errors: one line, the right exit code.


def _error(result: Any) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_preset_value_is_exit_2_naming_the_key(tmp_path: Path) -> None:
    args = ["train", "--preset", "smoke", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--set", "model.heads=3"])
    assert result.exit_code == 2
    assert "--set model.heads=3: model.heads: 3 heads do not divide" in _error(result)
    result = CliRunner().invoke(app, ["train", "--preset", "smoke", "--lr", "-1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "recipe.lr: must be positive" in _error(result)
    result = CliRunner().invoke(app, ["train", "--preset", "nope"])
    assert result.exit_code == 2
    assert "unknown preset 'nope'" in _error(result)


def test_bad_data_path_is_one_line_naming_the_layout(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--preset", "cifar26", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1
    assert "no such folder (expected ROOT/cifar-100-python/{train,test,meta}" in _error(result)


def test_a_batch_too_small_for_batch_norm_is_one_line_naming_the_keys(tmp_path: Path) -> None:
    # The ImageNet stem at 32 px ends in 1x1 maps: batch norm cannot train on one image there.
    args = ["train", "--preset", "smoke", "--set", "model.stem=imagenet", "--set", "data.img_size=32",
            "--device", "cpu", "--epochs", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--batch-size", "1"])
    assert result.exit_code == 1
    assert _error(result) == (
        "error: batch norm cannot train on a batch of 1 image(s) of 32x32 px: a 1x1 feature map leaves it "
        "one value per channel; raise recipe.batch_size or data.img_size"
    )
    assert (tmp_path / "run" / "config.yaml").is_file()  # what was written stays


def test_corrupt_image_in_training_is_one_line_naming_the_file(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    bad = data / "train" / "n00000002" / "img_3.JPEG"
    bad.write_bytes(b"GIF89a garbage")
    args = ["train", "--preset", "smoke", "--set", "data.dataset=imagenet", "--set", "data.num_classes=3",
            "--data", str(data), "--device", "cpu", "--workers", "1"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 1
    line = _error(result)
    assert str(bad) in line
    assert "--on-corrupt skip" in line
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--on-corrupt", "skip"])
    assert result.exit_code == 0, result.output
    assert f"skipping unreadable image {bad}" in result.output


def test_corrupt_or_code_carrying_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "last.pt"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "not a readable checkpoint" in _error(result)

    class Trap:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    torch.save({"format": "gsa-checkpoint/1", "trap": Trap()}, tmp_path / "best.pt")
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 1
    assert "refused: the file carries Python objects or code" in _error(result)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "empty"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "no such checkpoint" in _error(result)


def test_resume_refuses_new_settings_and_out_refuses_an_old_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--epochs", "5"])
    assert result.exit_code == 2
    assert "--resume continues a run as it was configured; drop --epochs" in _error(result)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.csv").write_text("x")
    result = CliRunner().invoke(app, ["train", "--preset", "smoke", "--out", str(tmp_path / "old")])
    assert result.exit_code == 1
    assert "the folder is not empty; continue that run with --resume" in _error(result)


def test_precise_bn_keeps_a_short_gsa_run_evaluation_sane(tmp_path: Path) -> None:
    """After a few updates a GSA net's running BN statistics lag its weights (the README's caveat);
    the precise-BN pass sets them from training batches, and the evaluation stays near ln 10."""
    summary = train(smoke(1, "recipe.precise_bn_batches=3"), cpu(tmp_path / "precise"), reporter=Quiet())
    assert summary.final_val_loss is not None
    assert summary.final_val_loss < 5.0  # cross-entropy over 10 classes starts near ln 10 = 2.3


def test_precise_bn_statistics_are_the_plain_average_of_the_batch_statistics() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    batches = [
        Batch(torch.randn(5, 3, 6, 6) * (i + 1) + i, torch.zeros(5, dtype=torch.long), []) for i in range(3)
    ]
    model.eval()
    used = recalibrate_batch_norm(
        model, batches, 2, device=torch.device("cpu"), precision=Precision.FP32, channels_last=False,
        check=lambda batch: True,
    )  # fmt: skip
    assert used == 2
    with torch.no_grad():
        features = [model[0](batch.images) for batch in batches[:2]]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features])
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in features])
    norm = model[1]
    torch.testing.assert_close(norm.running_mean, means.mean(0))
    torch.testing.assert_close(norm.running_var, variances.mean(0))
    assert norm.momentum == 0.1  # restored
    assert not model.training  # mode restored


def test_precise_bn_batches_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match=r"recipe\.precise_bn_batches: must be 0 \(off\)"):
        smoke(1, "recipe.precise_bn_batches=-1")
