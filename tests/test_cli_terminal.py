"""The terminal: tables that fit 80 and 140 columns without cutting a number, --wide, progress lines on
a pipe, help that reads at 80 columns, --version, shell completion and the short flags."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from fixtures_runs import write_run
from rich.console import Console
from typer.testing import CliRunner

from gsa_cli.bench.profile import ProfileSettings, profile_kinds
from gsa_cli.choices import OutputFormat
from gsa_cli.cli import render
from gsa_cli.cli.app import app
from gsa_cli.presets import load_preset
from gsa_cli.report.compare import Comparison, compare_kinds
from gsa_cli.report.tables import format_value

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (80, 140)
# Every command the app registers (those added later too), the presets group's and the app itself.
COMMANDS = [[name] for name in typer.main.get_command(app).commands] + [["presets", "show"], []]  # type: ignore[attr-defined]


class Screen:
    """render's console pointed at a terminal of a chosen width, and what it showed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.buffer = io.StringIO()

    def at(self, width: int) -> None:
        self.buffer = io.StringIO()
        console = Console(file=self.buffer, width=width, force_terminal=True, color_system=None)
        self.monkeypatch.setattr(render, "console", console)

    def text(self) -> str:
        return self.buffer.getvalue()


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> Screen:
    return Screen(monkeypatch)


def _rows(text: str) -> list[str]:
    """The body lines of the tables in ``text``."""
    return [line for line in text.splitlines() if line.startswith("│")]


def _check_fits(text: str, width: int) -> None:
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width


# ---------------------------------------------------------------------------------------------------
# Runs read back.


@pytest.fixture
def default_named_runs(tmp_path: Path) -> list[Path]:
    """Two runs named as gsa train names them, with ImageNet-sized numbers."""
    return [
        write_run(
            tmp_path / "runs" / f"imagenet50-{kind}-20261127-14422{i}",
            kind=kind,
            val_top1=[61.234, 76.125],
            params=params,
            gmacs=gmacs,
            wall_time_s=wall,
            preset="smoke",
        )
        for i, (kind, params, gmacs, wall) in enumerate(
            (("conv", 25_557_032, 4.111512576, 123_456.7), ("gsa", 18_284_584, 3.203456, 250_123.4))
        )
    ]


@pytest.mark.parametrize("width", WIDTHS)
def test_runs_fit_the_terminal_with_every_key_column(
    screen: Screen, default_named_runs: list[Path], width: int
) -> None:
    screen.at(width)
    result = runner.invoke(app, ["compare", *map(str, default_named_runs)])
    assert result.exit_code == 0, result.output
    text = screen.text()
    _check_fits(text, width)
    assert "gsa compare: conv vs gsa" in text  # compact labels
    conv, gsa = (next(row for row in _rows(text) if f"│ {label} " in row) for label in ("conv", "gsa"))
    # The key columns: run, best top-1, params, GMACs, wall time, train img/s (200 in write_run).
    for row, params, gmacs, wall in (
        (conv, 25_557_032, 4.111512576, 123_456.7),
        (gsa, 18_284_584, 3.203456, 250_123.4),
    ):
        for cell in ("76.12", format_value(params), format_value(gmacs), format_value(wall), "200"):
            assert cell in row, (cell, row)
    if width == 80:
        assert "more with --wide:" in text
    hidden = text.split("more with --wide:")[-1] if "more with --wide:" in text else ""
    for header in ("best top-1 %", "params", "GMACs", "wall time s", "train img/s"):
        assert f" {header}," not in f" {hidden},"


def test_wide_shows_every_column_whole(screen: Screen, default_named_runs: list[Path]) -> None:
    screen.at(80)
    result = runner.invoke(app, ["compare", *map(str, default_named_runs), "--wide"])
    assert result.exit_code == 0, result.output
    text = screen.text()
    assert "…" not in text
    assert "more with --wide" not in text
    assert "imagenet50-gsa-20261127-144221" in text  # the path column, whole
    assert max(len(line) for line in text.splitlines()) > 80  # wider than the terminal, not cut


def test_a_pipe_gets_every_column_with_headers_on_one_line(default_named_runs: list[Path]) -> None:
    result = runner.invoke(app, ["compare", *map(str, default_named_runs)])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    for header in ("best top-5 %", "wall time / conv", "Δ final top-1 vs conv (points)", "path"):
        assert header in result.stdout


# ---------------------------------------------------------------------------------------------------
# Model kinds profiled, and gsa profile.


@pytest.fixture(scope="module")
def kinds() -> Comparison:
    configs = [load_preset("smoke", model=kind) for kind in ("conv", "gsa")]
    settings = ProfileSettings(device="cpu", batch_sizes=(2, 3), warmup=0, iters=1)
    return compare_kinds(profile_kinds(configs, settings), preset="smoke", description="")


@pytest.mark.parametrize("width", WIDTHS)
def test_kinds_fit_the_terminal_with_every_key_column(screen: Screen, kinds: Comparison, width: int) -> None:
    screen.at(width)
    render.comparison(kinds, fmt=OutputFormat.TABLE, out=None)
    text = screen.text()
    _check_fits(text, width)
    view = kinds.views[0]
    expected = ("model", "batch", "params", "GMACs", "infer img/s", "train img/s", "train img/s / conv")
    assert view.key == (*expected, "train peak MiB")
    rows = _rows(text)[: len(view.frame)]
    for row, values in zip(rows, view.frame[list(view.key)].itertuples(index=False), strict=True):
        for value in values:
            assert format_value(value.item() if hasattr(value, "item") else value) in row
    assert "memory: peak RSS above the process without the model" in " ".join(text.split())


def test_profile_fits_80_columns_with_its_key_columns(screen: Screen) -> None:
    screen.at(80)
    args = ["profile", "--preset", "smoke", "-m", "conv", "--device", "cpu", "--warmup", "0", "--iters", "1"]
    args += ["-b", "2,3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = screen.text()
    _check_fits(text, 80)
    header = "\n".join(line for line in text.splitlines() if line.startswith("┃"))
    for word in ("px", "batch", "params", "GMACs", "infer", "train", "img/s", "peak", "MiB"):
        assert word in header
    assert "model: conv" in text  # one model: in the caption
    assert len(_rows(text)) == 2  # batch 2 and 3


def test_piped_progress_is_plain_lines_on_stderr() -> None:
    args = ["profile", "--preset", "smoke", "--model", "conv", "--device", "cpu", "--warmup", "0"]
    result = runner.invoke(app, [*args, "--iters", "1", "-b", "2", "-f", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("profiling: conv 16 px: counting multiply-adds (fvcore) [")
    assert lines[1].startswith("profiling: conv 16 px, batch 2: timing infer [")
    assert lines[2].startswith("profiling: conv 16 px, batch 2: timing train [")
    assert all(line.endswith(" s]") for line in lines)
    assert "\x1b" not in result.stderr  # no spinner's control codes


# ---------------------------------------------------------------------------------------------------
# Help, --version, completion, short flags.


@pytest.mark.parametrize("command", COMMANDS, ids=lambda words: " ".join(words) or "gsa")
def test_help_reads_at_80_columns_with_flags_shown_as_flags(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert runner.invoke(app, [*command, "-h"], env={"COLUMNS": "80"}).output == result.output


@pytest.mark.parametrize("command", ["train", "eval", "profile", "compare"])
def test_batch_size_is_dash_b_everywhere(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    line = next(line for line in result.output.splitlines() if "--batch-size" in line)
    assert " -b " in line


def test_short_flags_reach_their_options(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--preset", "smoke", "-b", "0", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "recipe.batch_size=0" in result.stderr
    result = runner.invoke(app, ["eval", str(tmp_path / "none"), "-b", "0"])
    assert result.stderr.strip() == "error: --batch-size 0: must be at least 1"
    result = runner.invoke(app, ["train", "--preset", "smoke", "-j", "-1", "-o", str(tmp_path / "run")])
    assert result.stderr.strip() == "error: --workers must not be negative, got -1"
    assert not (tmp_path / "run").exists()


def test_version_names_gsa_cli_and_torch_without_importing_torch() -> None:
    from importlib.metadata import version

    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from gsa_cli.cli.app import app\n"
        "result = CliRunner().invoke(app, ['--version'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(result.output, end='')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"gsa-cli {version('gsa-cli')} (torch {version('torch')}, Python ")


def test_shell_completion_is_on_and_completes_presets_and_kinds() -> None:
    shown = runner.invoke(app, ["--show-completion", "bash"])
    assert shown.exit_code == 0, shown.output
    assert "_GSA_COMPLETE=complete_bash" in shown.output
    gsa = shutil.which("gsa")
    if gsa is None:
        pytest.skip("the gsa console script is not installed")
    for words, cword, expected in (
        ("gsa profile --preset ima", "3", "imagenet50"),
        ("gsa train -m ", "3", "conv"),
    ):
        env = {**os.environ, "_GSA_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword}
        done = subprocess.run([gsa], env=env, capture_output=True, text=True, check=False)
        assert expected in done.stdout.split(), done.stdout + done.stderr
