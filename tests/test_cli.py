"""The ``gsa`` command line driven through typer's CliRunner, with its output read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from cli_helpers import one_error_line
from typer.testing import CliRunner

from gsa_cli import load_preset
from gsa_cli.cli.app import app
from gsa_cli.models import count_parameters
from gsa_cli.presets import preset_names

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "presets" in result.output


def test_presets_lists_every_preset_with_both_parameter_counts() -> None:
    result = runner.invoke(app, ["presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in preset_names():
        assert name in result.output
    conv = count_parameters(load_preset("imagenet50", model="conv"))
    gsa = count_parameters(load_preset("imagenet50", model="gsa"))
    assert conv == 25_557_032
    row = next(line for line in result.output.splitlines() if " imagenet50 " in line)
    assert f"{conv:,}" in row
    assert f"{gsa:,}" in row
    assert "imagenet" in row


def test_presets_show_prints_yaml_that_loads_back(tmp_path: Path) -> None:
    result = runner.invoke(app, ["presets", "show", "cifar26", "--model", "conv", "--set", "model.heads=4"])
    assert result.exit_code == 0, result.output
    saved = tmp_path / "cifar26.yaml"
    saved.write_text(result.output)
    document = yaml.safe_load(result.output)
    assert document["model"]["kind"] == "conv"
    assert document["model"]["heads"] == 4
    expected = load_preset("cifar26", model="conv", overrides=["model.heads=4"])
    assert load_preset(saved, model=None).model == expected.model


def test_presets_show_accepts_a_path(tmp_path: Path) -> None:
    path = tmp_path / "custom.yaml"
    path.write_text((ROOT / "presets" / "smoke.yaml").read_text())
    result = runner.invoke(app, ["presets", "show", str(path)])
    assert result.exit_code == 0, result.output
    assert "preset: custom" in result.output


def test_a_bad_preset_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text((ROOT / "presets" / "smoke.yaml").read_text().replace("heads: 2", "heads: 3"))
    result = runner.invoke(app, ["presets", "show", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}: model.heads: 3 heads do not divide")


def test_unknown_preset_and_bad_override_exit_2() -> None:
    result = runner.invoke(app, ["presets", "show", "nope"])
    assert result.exit_code == 2
    assert "unknown preset 'nope'" in result.stderr
    result = runner.invoke(app, ["presets", "show", "smoke", "--set", "model.span=0"])
    assert result.exit_code == 2
    assert "--set model.span=0: model.span: must be at least 1" in result.stderr


def test_debug_shows_the_traceback() -> None:
    result = runner.invoke(app, ["--debug", "presets", "show", "nope"])
    assert result.exit_code != 0
    assert result.exception is not None
    assert "unknown preset" in str(result.exception)


def test_python_dash_m_runs_the_same_program() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "gsa_cli", "presets", "show", "smoke"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["data"]["dataset"] == "synthetic"
    result = subprocess.run(
        [sys.executable, "-m", "gsa_cli", "presets", "show", "nope"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown preset 'nope'")


def test_an_old_preset_key_is_one_warning_line_and_the_command_runs() -> None:
    result = runner.invoke(app, ["presets", "show", "smoke", "--set", "model.gsa_stages=[2]"])
    assert result.exit_code == 0, result.output
    warning_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning_lines == [
        "warning: --set model.gsa_stages=[2]: model.gsa_stages is deprecated; call it model.attention_stages"
    ]
    assert "attention_stages:\n  - 2" in result.stdout


# ---------------------------------------------------------------------------------------------------
# Counts and endpoints refused in one line before anything starts.


def test_process_counts_below_one_are_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for option, value in (("--nproc", "0"), ("--nproc", "-2"), ("--nnodes", "0")):
        result = runner.invoke(app, ["train", "--preset", "smoke", option, value, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert one_error_line(result) == f"error: {option} {value}: must be at least 1"
    result = runner.invoke(app, ["train", "--preset", "smoke", "--nnodes", "2", "--node-rank", "2",
                                 "--rdzv-endpoint", "node0:29500", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == "error: --node-rank 2: must be from 0 to 1 (--nnodes 2)"
    assert not out.exists()  # nothing trained


def test_a_garbage_rendezvous_endpoint_is_one_line(tmp_path: Path) -> None:
    for endpoint in ("nonsense:abc", "nonsense", ":29500", "node0:70000"):
        args = ["train", "--preset", "smoke", "--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", endpoint]
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        assert one_error_line(result).startswith(f"error: --rdzv-endpoint {endpoint}: expected HOST:PORT")


def test_eval_batch_size_below_one_is_one_line(tmp_path: Path) -> None:
    for value in ("0", "-1"):
        result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--batch-size", value])
        assert result.exit_code == 2, result.output
        assert one_error_line(result) == f"error: --batch-size {value}: must be at least 1"
