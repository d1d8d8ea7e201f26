"""Paths and user text are printed literally: rich markup in a path (``[/x]``, ``[bold]``) neither
crashes a message nor changes what it says."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from cli_helpers import one_error_line
from fixtures_data import make_image_folder
from fixtures_runs import write_run
from rich.console import Console
from typer.testing import CliRunner

from gsa_cli.cli.app import app
from gsa_cli.cli.progress import PlainReporter, RichReporter

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
MARKUP = ("[/x]", "[bold]", "[red]x[/red]", "\\[bold]")


def test_a_preset_path_with_markup_is_named_literally_in_the_error(tmp_path: Path) -> None:
    for number, text in enumerate(MARKUP):
        folder = tmp_path / f"p{number}{text}"
        folder.mkdir(parents=True)
        path = folder / "bad.yaml"
        path.write_text((ROOT / "presets" / "smoke.yaml").read_text().replace("heads: 2", "heads: 3"))
        result = runner.invoke(app, ["presets", "show", str(path)])
        assert result.exit_code == 2, result.output
        assert one_error_line(result).startswith(f"error: {path}: model.heads: 3 heads do not divide")


def test_a_run_directory_with_markup_is_found_and_named_literally(tmp_path: Path) -> None:
    # A folder whose name holds brackets is that folder, not a glob pattern.
    for number, text in enumerate(MARKUP):
        folder = tmp_path / f"r{number}{text}"
        folder.mkdir(parents=True)  # "[/x]" is two folders, "r0[" and "x]"
        result = runner.invoke(app, ["compare", str(folder)])
        assert result.exit_code == 1, result.output
        assert one_error_line(result).startswith(f"error: {folder}: not a run directory")


def test_runs_with_markup_in_their_names_show_literally_in_tables_and_messages(tmp_path: Path) -> None:
    first = write_run(tmp_path / "a[bold]", kind="conv", val_top1=[10.0, 20.0], params=1000, gmacs=1.0)
    second = write_run(tmp_path / "b[red]", kind="gsa", val_top1=[30.0], params=500, gmacs=0.5)
    out = tmp_path / "report[/x]"
    result = runner.invoke(
        app, ["compare", str(first), str(second), "--out", str(out)], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 0, result.output
    assert "gsa compare: a[bold] vs b[red]" in result.stdout
    assert "│ a[bold]" in result.stdout
    assert "│ b[red]" in result.stdout
    assert "params / a[bold]" in result.stdout
    assert f"to {out}" in result.stderr
    assert (out / "compare.md").is_file()


def test_both_reporters_print_messages_literally() -> None:
    for reporter_class in (RichReporter, PlainReporter):
        buffer = io.StringIO()
        reporter = reporter_class(Console(file=buffer, width=200))
        reporter.message("skipping unreadable image /data/[/x]/[bold]a.jpeg (broken)")
        assert buffer.getvalue() == "skipping unreadable image /data/[/x]/[bold]a.jpeg (broken)\n"


def test_a_skipped_image_named_with_markup_does_not_stop_training(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = make_image_folder(tmp_path / "data[/x]", classes=2, train_per_class=3, val_per_class=1)
    bad = data / "train" / "n00000001" / "img_2.JPEG"
    bad.write_bytes(b"GIF89a garbage")
    out = tmp_path / "run[/x]"  # named in the summary table's title
    args = ["train", "--preset", "smoke", "--set", "data.dataset=imagenet", "--set", "data.num_classes=2",
            "--set", "recipe.batch_size=2", "--data", str(data), "--device", "cpu", "--workers", "0",
            "--threads", "1", "--on-corrupt", "skip", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"skipping unreadable image {bad}" in result.output
    assert (out / "summary.json").is_file()
