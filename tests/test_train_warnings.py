"""What a run says at its start: a schedule that cannot complete, a CPU busy with other work, its
options refused before anything starts; and the CPU's thread count in words."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gsa_cli import load_preset
from gsa_cli.cli.app import app
from gsa_cli.errors import BusyCpuWarning, ConfigError, ScheduleWarning
from gsa_cli.runtime import device_name
from gsa_cli.train import preflight
from gsa_cli.train.options import TrainOptions
from gsa_cli.train.preflight import CpuReading, busy_cpu_message, measure_cpu, warn_if_cpu_busy
from gsa_cli.train.recipe import schedule_problem

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _threads() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


# ---------------------------------------------------------------------------------------------------
# A schedule that cannot complete.


def recipe(epochs: int, warmup: float):
    return load_preset(
        "smoke", overrides=[f"recipe.epochs={epochs}", f"recipe.warmup_epochs={warmup}"]
    ).recipe


def test_a_warm_up_as_long_as_training_ends_at_the_peak() -> None:
    problem = schedule_problem(recipe(2, 2), steps_per_epoch=4)
    assert problem == (
        "recipe.warmup_epochs (2) is not below recipe.epochs (2): the learning rate never decays and the "
        "run ends at the peak (0.05); lower recipe.warmup_epochs or raise recipe.epochs"
    )


def test_a_warm_up_longer_than_training_ends_below_the_peak() -> None:
    # 8 updates of a 12-update warm-up: the last is at 8/12 of the peak 0.05.
    problem = schedule_problem(recipe(2, 3), steps_per_epoch=4)
    assert problem is not None
    assert "the run ends at 0.0333, below the peak (0.05)" in problem


@pytest.mark.parametrize(("epochs", "warmup", "warns"), [(2, 1.5, False), (2, 1.9, True), (1, 0, False)])
def test_the_schedule_is_judged_in_updates(epochs: int, warmup: float, warns: bool) -> None:
    # 1.9 epochs of 4 updates round to 8 warm-up updates: all of training.
    assert (schedule_problem(recipe(epochs, warmup), steps_per_epoch=4) is not None) == warns


def test_gsa_train_says_so_in_one_yellow_line_and_trains(tmp_path: Path) -> None:
    args = ["train", "-p", "smoke", "--epochs", "1", "--set", "recipe.warmup_epochs=1", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert warning_lines(result.stderr) == [
        "warning: recipe.warmup_epochs (1) is not below recipe.epochs (1): the learning rate never decays "
        "and the run ends at the peak (0.05); lower recipe.warmup_epochs or raise recipe.epochs"
    ]


def test_a_complete_schedule_says_nothing(tmp_path: Path) -> None:
    args = ["train", "-p", "smoke", "--epochs", "2", "--set", "recipe.warmup_epochs=1", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert warning_lines(result.stderr) == []


def test_the_library_warns_with_a_schedule_warning(tmp_path: Path) -> None:
    from gsa_cli.train.run import train

    class Quiet:
        def __getattr__(self, name: str) -> object:
            return lambda *args: None

    config = load_preset("smoke", overrides=["recipe.warmup_epochs=2"])
    with pytest.warns(ScheduleWarning, match=r"recipe.warmup_epochs \(2\) is not below recipe.epochs \(1\)"):
        train(config, TrainOptions(out=tmp_path / "run", device="cpu"), reporter=Quiet())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# A CPU busy with other work.


@pytest.mark.parametrize(
    ("busy", "cores", "threads", "fix"),
    [
        (1.2, 2, 2, 1),
        (0.4, 2, 2, None),
        (1.9, 2, 2, 1),
        (4.0, 16, 16, 12),
        (0.6, 16, 16, 15),
        (3.0, 4, 1, None),
    ],
)
def test_the_warning_names_the_threads_that_fit(
    busy: float, cores: int, threads: int, fix: int | None
) -> None:
    message = busy_cpu_message(CpuReading(busy=busy, cores=cores, source="/proc/stat"), threads)
    if fix is None:
        assert message is None
    else:
        assert message == (
            f"the CPU is busy with other work: {busy:.1f} of {cores} cores were in use at the start "
            f"(/proc/stat), and torch's {threads} threads wait for their slowest at every step (a run can "
            f"be many times slower); train with --threads {fix}"
        )


def stat_text(ticks: dict[int, tuple[int, int]]) -> str:
    """A /proc/stat with, per CPU, (busy, idle) ticks: busy split into user and system, idle with some
    iowait; an aggregate line and other lines, which are not read."""
    lines = ["cpu  1 2 3 4 5 6 7 8 9 10"]
    for cpu, (busy, idle) in ticks.items():
        lines.append(f"cpu{cpu} {busy - busy // 3} 0 {busy // 3} {idle - 5} 5 0 0 0 0 0")
    return "\n".join([*lines, "intr 100 0 0", "ctxt 12345", "btime 1"]) + "\n"


def test_measure_cpu_reads_proc_stat_over_the_window_on_this_process_cpus(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    stat = tmp_path / "stat"
    before = dict.fromkeys(cpus, (1000, 1000))
    # Over the window: the first CPU fully busy (100 ticks), each other a quarter (25 of 100).
    after = {cpu: (1100 if i == 0 else 1025, 1000 if i == 0 else 1075) for i, cpu in enumerate(cpus)}
    after[max(cpus) + 1] = (10**6, 0)  # a CPU this process may not run on: not counted
    stat.write_text(stat_text(before))
    windows: list[float] = []

    def sleep(seconds: float) -> None:
        windows.append(seconds)
        stat.write_text(stat_text(after))

    reading = measure_cpu(0.25, stat=stat, sleep=sleep)
    assert windows == [0.25]
    assert reading == CpuReading(
        busy=pytest.approx(1 + 0.25 * (len(cpus) - 1)), cores=len(cpus), source="/proc/stat"
    )


def test_measure_cpu_falls_back_to_the_load_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    reading = measure_cpu(0.25, stat=tmp_path / "absent", sleep=lambda seconds: None)
    assert reading == CpuReading(busy=1.5, cores=len(os.sched_getaffinity(0)), source="the load average")


def test_warn_if_cpu_busy_only_for_default_threads_on_the_cpu() -> None:
    torch.set_num_threads(2)
    busy = CpuReading(busy=1.5, cores=2, source="/proc/stat")
    calls: list[int] = []

    def measure() -> CpuReading:
        calls.append(1)
        return busy

    with pytest.warns(BusyCpuWarning, match=r"1.5 of 2 cores .* train with --threads 1$"):
        warn_if_cpu_busy(CPU, TrainOptions(), measure=measure)
    assert calls == [1]
    warn_if_cpu_busy(CPU, TrainOptions(threads=2), measure=measure)  # threads given: the user chose
    warn_if_cpu_busy(torch.device("meta"), TrainOptions(), measure=measure)  # not a CPU run
    torch.set_num_threads(1)
    warn_if_cpu_busy(CPU, TrainOptions(), measure=measure)  # one thread waits on no other
    assert calls == [1]


def test_gsa_train_on_a_busy_cpu_says_so_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(2)
    monkeypatch.setattr(preflight, "measure_cpu", lambda: CpuReading(busy=1.4, cores=2, source="/proc/stat"))
    args = ["train", "-p", "smoke", "-m", "conv", "--device", "cpu", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (line,) = warning_lines(result.stderr)
    assert line.startswith(
        "warning: the CPU is busy with other work: 1.4 of 2 cores were in use at the start"
    )
    assert line.endswith("train with --threads 1")
    result = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "other"), "--threads", "1"])  # the fix
    assert result.exit_code == 0, result.output
    assert warning_lines(result.stderr) == []


# ---------------------------------------------------------------------------------------------------
# Options refused before anything starts, and the thread count in words.


def test_init_with_resume_is_refused_by_the_library_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--init starts a new run .* drop --init"):
        preflight.prepare(TrainOptions(resume=tmp_path, init="torchvision"))
    with pytest.raises(ConfigError, match=r"--threads must be at least 1, got 0"):
        preflight.prepare(TrainOptions(threads=0))


@pytest.mark.parametrize(("threads", "words"), [(1, "(1 thread)"), (2, "(2 threads)")])
def test_the_cpu_thread_count_reads_in_words(threads: int, words: str) -> None:
    torch.set_num_threads(threads)
    assert device_name(CPU).endswith(words)
