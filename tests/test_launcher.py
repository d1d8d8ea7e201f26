"""``gsa train --nproc 2``'s launcher and its workers: a signal to the launcher stops them all in one
line with the shell's exit code; a launcher killed outright takes its workers with it; workers that
fail at start leave no default run folder behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 120.0  # for start-up on a loaded 2-core machine; the checks poll, they do not time
ORPHAN_DEADLINE_S = 30.0  # workers stop at their next step: seconds on the smoke preset


def _children(pid: int) -> list[int]:
    """The pids of the live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)) and _parent(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[1])


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # a zombie has finished


def _poll(condition: object, what: str, seconds: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, list[int]]]:
    """A two-process smoke run, once both workers have finished an epoch: (launcher, run dir, workers)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "gsa_cli", "train", "--preset", "smoke", "--epochs", "10000",
               "--nproc", "2", "--device", "cpu", "--threads", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    workers: list[int] = []
    try:
        _poll(lambda: (out / "metrics.csv").is_file() or process.poll() is not None, "the first epoch")
        workers = _children(process.pid)
        assert process.poll() is None, process.communicate()[1]
        assert len(workers) == 2
        yield process, out, workers
    finally:
        for pid in [process.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.communicate()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_the_workers_in_one_line(
    launcher: tuple[subprocess.Popen[str], Path, list[int]], signum: int
) -> None:
    process, out, workers = launcher
    os.kill(process.pid, signum)
    _, stderr = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 128 + signum, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"error: stopped by {name}"), stderr
    assert f"gsa train --resume {out}" in lines[0]
    assert not any(_alive(pid) for pid in workers)  # the launcher waited for them
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_workers_die_with_a_launcher_killed_outright(
    launcher: tuple[subprocess.Popen[str], Path, list[int]],
) -> None:
    process, _, workers = launcher
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=DEADLINE_S)
    _poll(lambda: not any(_alive(pid) for pid in workers), "the orphaned workers to stop", ORPHAN_DEADLINE_S)


def test_a_launch_whose_workers_fail_at_start_leaves_no_default_run_folder(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    command = [sys.executable, "-m", "gsa_cli", "train", "--preset", "cifar26", "--data", missing,
               "--nproc", "2", "--device", "cpu", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert result.returncode == 1, result.stderr
    assert "no such folder" in result.stderr  # the workers' own line
    assert (tmp_path / "runs").is_dir()  # where the launcher made the run's default folder
    assert list((tmp_path / "runs").iterdir()) == []  # and removed it again, empty


@pytest.mark.parametrize(("args", "code"), [(["--version"], 0), (["presets", "--no-such-flag"], 2)])
def test_a_data_parallel_worker_runs_exit_handlers_and_keeps_its_exit_code(
    args: list[str], code: int
) -> None:
    # A worker ends with os._exit after its threads and exit handlers (finalisation could abort it while
    # gloo's threads let go of the last collective); what it prints and its exit code stay the same.
    script = (
        "import atexit, sys, threading, time; "
        "atexit.register(lambda: print('exit handler ran', flush=True)); "
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', flush=True))).start(); "
        f"sys.argv = ['gsa', *{args!r}]; from gsa_cli.cli.app import main; main()"
    )
    plain = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        for env in (
            {**plain, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"},  # a worker
            {**plain, "PYTHONPATH": str(REPO)},
        )
    ]
    worker, single = runs
    assert worker.returncode == single.returncode == code, worker.stderr
    assert worker.stdout.endswith("thread done\nexit handler ran\n")  # threads joined, then the handlers
    assert (worker.stdout, worker.stderr) == (single.stdout, single.stderr)
