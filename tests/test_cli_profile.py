"""`gsa profile` driven through the command line, its files read back, its errors one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import one_error_line
from typer.testing import CliRunner

from gsa_cli.cli.app import app

runner = CliRunner()
QUICK = ["--preset", "smoke", "--device", "cpu", "--warmup", "0", "--iters", "1"]


def test_csv_file_and_json_output_hold_the_same_rows(tmp_path: Path) -> None:
    out = tmp_path / "profile.csv"
    args = [
        "profile",
        *QUICK,
        "--img-size",
        "16,24",
        "--batch-size",
        "2",
        "--format",
        "json",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    frame = pd.read_csv(out)
    assert [r["img_size"] for r in records] == frame["img_size"].tolist() == [16, 24]
    assert frame["gmacs"].tolist() == [r["gmacs"] for r in records]
    assert frame["model"].tolist() == ["gsa", "gsa"]
    assert set(frame["precision"]) == {"fp32"}
    assert set(frame["counter"]) == {"fvcore"}
    assert frame["infer_img_s"].gt(0).all()
    assert frame["train_img_s"].gt(0).all()
    assert frame["gmacs"][1] > frame["gmacs"][0]


def test_markdown_file_is_the_readable_summary(tmp_path: Path) -> None:
    out = tmp_path / "profile.md"
    result = runner.invoke(app, ["profile", *QUICK, "--model", "conv", "--mode", "infer", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| model | px | batch | params | GMACs |" in text
    assert "| conv | 16 | 4 | " in text  # one row: the model stays in the table
    assert "train img/s" not in text  # not timed
    assert "gsa profile: smoke" in result.stdout  # the rich table on screen


def test_full_model_with_torch_counter_and_detail() -> None:
    args = [
        "profile",
        *QUICK,
        "--model",
        "full",
        "--mode",
        "infer",
        "--counter",
        "torch",
        "--detail",
        "-f",
        "md",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "counter: torch" in result.stdout
    assert "### MACs by module: full at 16 px" in result.stdout
    assert "_scaled_dot_product_flash_attention_for_cpu" in result.stdout or "attention" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nonesuch"], "unknown preset 'nonesuch'"),
        (["--preset", "smoke", "--batch-size", "0"], "batch size must be at least 1"),
        (["--preset", "smoke", "--batch-size", "4,x"], "--batch-size 4,x: expected whole numbers"),
        (["--preset", "smoke", "--img-size", "0"], "image size must be at least 1"),
        (["--preset", "smoke", "--model", "mlp"], "unknown model kind 'mlp'"),
        (["--preset", "smoke", "--set", "model.heads=3"], "model.heads"),
        (["--preset", "smoke", "--out", "results.txt"], ".csv, .json or .md"),
    ],
)
def test_bad_options_give_one_clear_line_and_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["profile", *args])
    assert result.exit_code == 2
    assert message in one_error_line(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_where_there_is_none_gives_one_clear_line() -> None:
    result = runner.invoke(app, ["profile", "--preset", "smoke", "--device", "cuda"])
    assert result.exit_code == 2
    assert "CUDA is not available on this machine" in one_error_line(result)
