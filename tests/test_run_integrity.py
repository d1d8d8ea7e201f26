"""A run's directory is its own and survives any kill: the lock, the end-of-epoch commit, full disks.

The fault-injection test kills a run at every write of the end-of-epoch commit (each rename of a file
into the run directory, and just after the last one) and resumes it: each finished epoch is then in
``metrics.csv`` exactly once, ``summary.json`` agrees with it, ``best.pt`` is the epoch the summary
calls best, and the metrics are those of a run never killed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import gsa_cli.train.run as run_module
from gsa_cli import load_preset
from gsa_cli.cli.app import app
from gsa_cli.errors import GsaError
from gsa_cli.results import EpochMetrics, RunDir, RunSummary
from gsa_cli.train.checkpoint import Checkpoint
from gsa_cli.train.loop import SilentReporter, TrainingStoppedError
from gsa_cli.train.run import TrainOptions, train

REPO = Path(__file__).resolve().parent.parent
LOCK = ".lock"  # the lock file inside a run directory
RUN_FILES = {"config.yaml", "metrics.csv", "summary.json", "last.pt", "best.pt"}
REPLACE = os.replace
UNTIMED = ("epoch", "lr", "train_loss", "train_top1", "val_top1", "val_top5")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # stable and fast on a shared 2-core machine


def smoke(epochs: int, *extra: str) -> Any:
    return load_preset("smoke", overrides=[f"recipe.epochs={epochs}", "recipe.warmup_epochs=1", *extra])


def cpu(out: Path | None, **kwargs: Any) -> TrainOptions:
    return TrainOptions(out=out, device="cpu", **kwargs)


def resume(run: Path) -> Any:
    return train(None, TrainOptions(resume=run, device="cpu"), reporter=SilentReporter())


def error_line(result: Any) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines, result.output
    assert lines[-1].startswith("error: "), result.output
    assert not any(line.startswith("Traceback") for line in lines), result.output
    return lines[-1]


def untimed(rows: list[EpochMetrics]) -> list[tuple[float, ...]]:
    return [tuple(getattr(row, name) for name in UNTIMED) for row in rows]


def temporaries(run: Path) -> list[str]:
    return sorted(path.name for path in run.iterdir() if path.name.endswith(".tmp"))


def contents(run: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(run.iterdir())}


class Stop:
    """A reporter that raises SIGINT at the end of one epoch, as Ctrl-C would."""

    def __init__(self, epoch: int) -> None:
        self.at = epoch

    def start(self, phase: str, epoch: int, total: int, done: int) -> None: ...
    def update(self, done: int, stats: dict[str, float]) -> None: ...
    def finish(self) -> None: ...
    def message(self, text: str) -> None: ...

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None:
        if row.epoch == self.at:
            signal.raise_signal(signal.SIGINT)


def stopped_run(out: Path, epochs: int = 2, at: int = 1) -> Path:
    with pytest.raises(TrainingStoppedError):
        train(smoke(epochs), cpu(out), reporter=Stop(at))
    return out


@contextlib.contextmanager
def hold_lock(folder: Path) -> Iterator[int]:
    """Hold a run directory's lock from this process, as a running gsa train would."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield handle
    finally:
        os.close(handle)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------
# A run owns its directory.


def test_a_second_run_into_a_locked_out_is_one_line_naming_the_holder_and_writes_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    with hold_lock(out):
        result = CliRunner().invoke(app, ["train", "--preset", "smoke", "--device", "cpu", "--out", str(out)])
        assert result.exit_code == 1, result.output
        line = error_line(result)
        assert str(out) in line
        assert f"pid {os.getpid()}" in line
        assert sorted(path.name for path in out.iterdir()) == [LOCK]  # nothing written


def test_a_resume_of_a_run_still_being_written_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    out = stopped_run(tmp_path / "run")
    before = contents(out)
    with hold_lock(out):
        result = CliRunner().invoke(app, ["train", "--resume", str(out), "--device", "cpu"])
        assert result.exit_code == 1, result.output
        assert f"pid {os.getpid()}" in error_line(result)
    after = contents(out)
    assert {name: data for name, data in after.items() if name != LOCK} == {
        name: data for name, data in before.items() if name != LOCK
    }


def test_a_run_holds_its_lock_from_start_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    seen: list[str] = []

    class Probe(Stop):
        def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None:
            handle = os.open(out / LOCK, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(handle)
            seen.append((out / LOCK).read_text().strip())

    train(smoke(2), cpu(out), reporter=Probe(0))
    assert seen == [str(os.getpid())] * 2
    with hold_lock(out):  # released at the end
        pass


def test_a_two_process_run_into_a_locked_out_fails_on_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "gsa_cli", "train", "--preset", "smoke", "--nproc", "2",
               "--device", "cpu", "--out", str(out)]  # fmt: skip
    with hold_lock(out):
        result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout + result.stderr
    assert f"pid {os.getpid()}" in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(path.name for path in out.iterdir()) == [LOCK]


def test_default_named_runs_started_in_the_same_second_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gsa_cli.results as results

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime(2024, 5, 6, 7, 8, 9, tzinfo=tz)

    monkeypatch.setattr(results, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    summaries = [train(smoke(1, f"recipe.lr={lr}"), cpu(None), reporter=SilentReporter()) for lr in (1, 2, 3)]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 3
    assert sorted(Path(summary.run_dir).resolve() for summary in summaries) == [f.resolve() for f in folders]
    lrs = {load_preset(folder / "config.yaml", model=None).recipe.lr for folder in folders}
    assert lrs == {1.0, 2.0, 3.0}  # each folder holds one run's files only


# ---------------------------------------------------------------------------------------------------
# The end-of-epoch commit, killed at each of its writes.

COMMITTED = ("last.pt", "best.pt", "metrics.csv", "summary.json")


class Killed(BaseException):
    """A kill: nothing of the run's own handling runs (only ``finally`` clauses, and the OS releases
    the lock as it would for a killed process)."""


def kill_at_rename(
    monkeypatch: pytest.MonkeyPatch, run: Path, k: int | None, after: bool = False
) -> list[str]:
    """Count the renames of the commit's files into ``run``; at the ``k``-th, kill the run just before
    it (its temporary file left behind, as a kill leaves it) or, with ``after``, just after it."""
    real = os.replace
    renames: list[str] = []

    def replace(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        target = Path(target)
        if target.parent != run or target.name not in COMMITTED:
            return real(source, target, *args, **kwargs)
        renames.append(target.name)
        if len(renames) == k and not after:
            os.link(source, run / f".{target.name}.killed.tmp")
            raise Killed
        real(source, target, *args, **kwargs)
        if len(renames) == k and after:
            raise Killed
        return None

    monkeypatch.setattr(os, "replace", replace)
    return renames


def check_run(run: Path, reference: list[EpochMetrics], epochs: int, steps: int) -> None:
    """The invariants of a finished run directory."""
    rows = RunDir(run).read_metrics()
    assert [row.epoch for row in rows] == list(range(1, epochs + 1))
    assert untimed(rows) == untimed(reference)
    summary = json.loads((run / "summary.json").read_text())
    best = max(rows, key=lambda row: row.val_top1)  # the first of equals, as training keeps it
    assert (summary["status"], summary["epochs_done"]) == ("finished", epochs)
    assert (summary["best_epoch"], summary["best_top1"]) == (best.epoch, best.val_top1)
    assert summary["final_top1"] == rows[-1].val_top1
    kept = Checkpoint.load(run / "best.pt")
    assert (kept.epoch, kept.val_top1, kept.batches_done) == (best.epoch, best.val_top1, 0)
    last = Checkpoint.load(run / "last.pt")
    assert (last.epoch, last.step) == (epochs, steps)
    assert temporaries(run) == []


def test_a_kill_at_any_write_of_the_epoch_commit_resumes_to_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seed 3: epochs 1 and 2 are each the best so far, epoch 3 is not (best.pt is written, replaced,
    # then kept).
    config = smoke(3, "recipe.seed=3")
    monkeypatch.setattr(run_module, "count_gmacs", lambda *args, **kwargs: None)  # not what is tested here
    reference_dir = tmp_path / "reference"
    writes = kill_at_rename(monkeypatch, reference_dir, None)
    train(config, cpu(reference_dir), reporter=SilentReporter())
    reference = RunDir(reference_dir).read_metrics()
    check_run(reference_dir, reference, 3, 12)
    assert writes.count("last.pt") == 3  # the commit's writes, counted
    points = [(k, False) for k in range(1, len(writes) + 1)] + [(len(writes), True)]
    for k, after in points:
        run = tmp_path / f"killed-{k}{'-after' if after else ''}"
        kill_at_rename(monkeypatch, run, k, after)
        with pytest.raises(Killed):
            train(config, cpu(run), reporter=SilentReporter())
        monkeypatch.setattr(os, "replace", REPLACE)
        if k == 1 and not after:  # killed before its first checkpoint: nothing to resume
            with pytest.raises(GsaError, match="no such checkpoint"):
                resume(run)
            continue
        # The resume repairs the run directory first: killed at its first write, then left alone.
        kill_at_rename(monkeypatch, run, 1)
        with contextlib.suppress(Killed):
            resume(run)
        monkeypatch.setattr(os, "replace", REPLACE)
        summary = resume(run)
        assert summary.status == "finished", (k, after)
        try:
            check_run(run, reference, 3, 12)
        except AssertionError as failure:
            raise AssertionError(
                f"killed at write {k} ({writes[k - 1]}, {'after' if after else 'before'} "
                f"its rename): {failure}"
            ) from None


# ---------------------------------------------------------------------------------------------------
# A full disk, a read-only folder.


def fail_checkpoint_writes(monkeypatch: pytest.MonkeyPatch, when: Callable[[], bool], code: int) -> None:
    """``torch.save`` of ``last.pt`` writes a little, then fails with ``code`` while ``when()``."""
    real = torch.save

    def save(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        name = str(getattr(target, "name", target))
        if ".last.pt." in name and when():
            if hasattr(target, "write"):
                target.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(code, os.strerror(code))
        real(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def fail_renames(monkeypatch: pytest.MonkeyPatch, folder: Path, names: set[str], code: int) -> None:
    """Every rename of one of ``names`` into ``folder`` fails with ``code``."""

    def replace(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if Path(target).parent == folder and Path(target).name in names:
            raise OSError(code, os.strerror(code), str(target))
        REPLACE(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


class FullAfter(Stop):
    """The disk fills up once epoch ``at`` has ended."""

    full = False

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None:
        self.full = self.full or row.epoch == self.at


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_failed_at_its_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, reporter = tmp_path / "run", FullAfter(1)
    fail_checkpoint_writes(monkeypatch, lambda: reporter.full, errno.ENOSPC)
    with pytest.raises(GsaError) as failed:
        train(smoke(2), cpu(out), reporter=reporter)
    message = str(failed.value)
    assert "\n" not in message
    assert str(out / "last.pt") in message
    assert "disk is full" in message
    assert f"--resume {out}" in message
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["epochs_done"], summary["best_epoch"]) == ("failed", 1, 1)
    assert Checkpoint.load(out / "last.pt").epoch == 1  # the previous checkpoint, intact
    assert Checkpoint.load(out / "best.pt").epoch == 1
    assert [row.epoch for row in RunDir(out).read_metrics()] == [1]
    assert temporaries(out) == []
    monkeypatch.setattr(torch, "save", torch.serialization.save)  # space freed
    summary = resume(out)
    assert (summary.status, summary.epochs_done) == ("finished", 2)


def test_a_read_only_run_directory_is_one_line_and_keeps_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    stopped_run(out, epochs=3, at=1)
    before = contents(out)
    fail_renames(monkeypatch, out, RUN_FILES, errno.EROFS)
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert str(out) in line
    assert "read-only" in line
    after = contents(out)
    assert {n: d for n, d in after.items() if n != LOCK} == {n: d for n, d in before.items() if n != LOCK}


def test_a_full_disk_at_the_first_checkpoint_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    fail_checkpoint_writes(monkeypatch, lambda: True, errno.EDQUOT)
    result = CliRunner().invoke(app, ["train", "--preset", "smoke", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert str(out / "last.pt") in line
    assert "quota" in line
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["epochs_done"]) == ("failed", 0)
    assert not (out / "last.pt").exists()
    assert temporaries(out) == []


def trained(out: Path) -> float:
    summary = train(smoke(1), cpu(out), reporter=SilentReporter())
    assert summary.final_top1 is not None
    return summary.final_top1


def test_eval_into_a_read_only_run_directory_prints_the_result_then_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    top1 = trained(out)
    fail_renames(monkeypatch, out, {"eval.json"}, errno.EROFS)
    result = CliRunner().invoke(app, ["eval", str(out), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert str(out / "eval.json") in line
    assert "read-only" in line
    table = result.output.split(line)[0]  # the result's table, before the error
    assert f"{top1:.2f}%" in table
    assert all(column in table for column in ("top-1", "top-5", "images/s", "recorded top-1"))
    assert not (out / "eval.json").exists()
    assert temporaries(out) == []


def test_eval_into_a_run_directory_being_written_prints_the_result_then_names_the_writer(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    top1 = trained(out)
    with hold_lock(out):
        result = CliRunner().invoke(app, ["eval", str(out), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert str(out / "eval.json") in line
    assert f"pid {os.getpid()}" in line
    assert f"{top1:.2f}%" in result.output.split(line)[0]
    assert not (out / "eval.json").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_into_a_folder_without_write_permission(tmp_path: Path) -> None:
    out = tmp_path / "run"
    top1 = trained(out)
    out.chmod(0o555)
    try:
        result = CliRunner().invoke(app, ["eval", str(out / "best.pt"), "--device", "cpu"])
    finally:
        out.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert "eval.json" in error_line(result)
    assert f"{top1:.2f}%" in result.output


# ---------------------------------------------------------------------------------------------------
# What a kill or a failed start leaves behind.


def test_a_resume_removes_the_temporary_files_a_kill_left(tmp_path: Path) -> None:
    out = stopped_run(tmp_path / "run")
    stale = [out / ".last.pt.k1ll3d.tmp", out / ".summary.json.x7.tmp", out / ".metrics.csv.a.tmp"]
    foreign = [out / "notes.tmp", out / ".other.txt.ab.tmp"]
    for path in stale + foreign:
        path.write_bytes(b"left by a kill")
    resume(out)
    assert temporaries(out) == sorted(path.name for path in foreign)


def test_a_failed_save_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    trained(out)
    fail_renames(monkeypatch, out, {"summary.json"}, errno.ENOSPC)
    with pytest.raises(GsaError, match="disk is full"):
        RunDir(out).write_summary(RunSummary(**RunDir(out).read_summary()))
    assert temporaries(out) == []


def test_a_start_that_fails_before_writing_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = ["train", "--preset", "cifar26", "--data", str(tmp_path / "nope"), "--device", "cpu"]
    out = tmp_path / "new" / "run"
    result = CliRunner().invoke(app, [*bad, "--out", str(out)])
    assert result.exit_code == 1
    assert "no such folder" in error_line(result)
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()  # a folder the user made stays, empty
    CliRunner().invoke(app, [*bad, "--out", str(mine)])
    assert mine.is_dir()
    assert not any(mine.iterdir())
    monkeypatch.chdir(tmp_path)
    CliRunner().invoke(app, bad)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_run_files_get_the_usual_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    out = tmp_path / "run"
    trained(out)
    for name in RUN_FILES:
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
