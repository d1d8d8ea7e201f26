"""`gsa compare` driven through the command line: kinds profiled, runs read back, files read back,
misplaced inputs and options refused in one clear line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from cli_helpers import one_error_line
from fixtures_runs import write_run
from typer.testing import CliRunner

from gsa_cli.cli.app import app
from gsa_cli.cli.options import split_inputs
from gsa_cli.errors import ConfigError
from gsa_cli.models import count_parameters
from gsa_cli.presets import load_preset
from gsa_cli.report.compare import GMACS_COUNTED

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--preset", "smoke", "--device", "cpu", "--warmup", "0", "--iters", "1", "--batch-size", "2"]


def test_kinds_profiled_side_by_side_with_a_scaling_plot(tmp_path: Path) -> None:
    out = tmp_path / "kinds"
    args = ["compare", "conv", "vs", "gsa", *QUICK, "--img-size", "16,24", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "gsa compare: conv vs gsa (smoke)" in result.stdout
    assert "params / conv" in result.stdout

    frame = pd.read_csv(out / "compare.csv")
    assert frame["model"].tolist() == ["conv", "conv", "gsa", "gsa"]
    assert frame["img_size"].tolist() == [16, 24, 16, 24]
    conv_params = count_parameters(load_preset("smoke", model="conv"))
    gsa_params = count_parameters(load_preset("smoke", model="gsa"))
    assert frame["params"].iloc[0] == conv_params
    assert frame["params"].iloc[2] == gsa_params  # the preset's own size, 16 px
    assert frame["params_ratio"].iloc[2] == pytest.approx(gsa_params / conv_params)
    assert frame["params_ratio"].iloc[:2].tolist() == [1.0, 1.0]
    gsa_24 = frame.iloc[3]
    conv_24 = frame.iloc[1]
    assert gsa_24["gmacs_ratio"] == pytest.approx(gsa_24["gmacs"] / conv_24["gmacs"])
    assert gsa_24["infer_img_s_ratio"] == pytest.approx(gsa_24["infer_img_s"] / conv_24["infer_img_s"])
    assert frame["train_img_s"].gt(0).all()
    assert set(frame["device"].str.len()) != {0}
    assert json.loads((out / "compare.json").read_text())[3]["model"] == "gsa"

    pixels = matplotlib.image.imread(out / "scaling.png")
    assert pixels.ndim == 3
    assert pixels.shape[1] > 1000  # three panels side by side
    report = (out / "compare.md").read_text()
    assert "(log-log)](scaling.png)" in report
    assert "## Scaling with resolution" in report
    assert "- preset: smoke" in report


def test_any_number_of_kinds_and_markdown_output() -> None:
    args = ["compare", "conv", "gsa", "full", *QUICK, "--mode", "infer", "--format", "md"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "### Side by side" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| conv", "| gsa", "| full"))]
    assert [row.split(" | ")[0] for row in rows] == ["| conv", "| gsa", "| full"]
    assert "train img/s" not in result.stdout  # not timed
    assert "Scaling" not in result.stdout  # one image size


def test_runs_read_back_with_accuracy_and_ratios(tmp_path: Path) -> None:
    conv = write_run(tmp_path / "digits-conv", kind="conv", val_top1=[90.0, 97.5], params=800, gmacs=0.04)
    gsa = write_run(tmp_path / "digits-gsa", kind="gsa", val_top1=[92.0, 98.5], params=600, gmacs=0.03)
    out = tmp_path / "report"
    result = runner.invoke(app, ["compare", str(conv), str(gsa), "--out", str(out), "--format", "csv"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "compare.csv")
    assert frame["run"].tolist() == ["digits-conv", "digits-gsa"]
    assert frame["params_ratio"].tolist() == pytest.approx([1.0, 0.75])
    assert frame["best_top1_delta"].tolist() == pytest.approx([0.0, 1.0])
    assert pd.read_csv(io.StringIO(result.stdout))["run"].tolist() == frame["run"].tolist()
    for name in ("accuracy_vs_cost.png", "learning_curves.png"):
        assert matplotlib.image.imread(out / name).ndim == 3
        assert f"]({name})" in (out / "compare.md").read_text()


def test_no_out_means_only_the_terminal_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path / "a", kind="conv", val_top1=[50.0], params=2, gmacs=1.0)
    write_run(tmp_path / "b", kind="gsa", val_top1=[55.0], params=1, gmacs=1.0)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compare", "*"])  # a glob, as a shell that found no match passes it
    assert result.exit_code == 0, result.output
    assert "gsa compare: a vs b" in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["conv", "{run}"], "compare model kinds or run directories, not both"),
        (["conv", "cnv"], "cnv: neither a model kind (gsa, conv, full) nor an existing run directory"),
        (["{run}", "--img-size", "32"], "--img-size: for model kinds, not run directories"),
        (["{run}", "--preset", "cifar26"], "--preset: for model kinds, not run directories"),
        (["conv", "gsa", "--by", "data.distance"], "--by: for run directories, not model kinds"),
        (["{run}", "--by", "data.nope"], "--by data.nope: "),
        (["{empty}"], "empty: not a run directory"),
        (["conv", "gsa", "--preset", "smoke", "--img-size", "0"], "image size must be at least 1"),
        (["conv", "gsa", "--set", "model.kind=full"], "--set model.kind: name the model kinds as arguments"),
    ],
)
def test_misplaced_inputs_give_one_clear_line_and_exit_2_or_1(
    tmp_path: Path, args: list[str], message: str
) -> None:
    run = write_run(tmp_path / "run", kind="conv", val_top1=[50.0], params=2, gmacs=1.0)
    (tmp_path / "empty").mkdir()
    args = [arg.format(run=run, empty=tmp_path / "empty") for arg in args]
    result = runner.invoke(app, ["compare", *args])
    assert message in one_error_line(result)
    assert result.exit_code == (1 if "empty" in message else 2)


def test_runs_gsa_train_wrote_are_compared_as_recorded(tmp_path: Path) -> None:
    for kind in ("conv", "gsa"):
        args = [
            "train",
            "--preset",
            "smoke",
            "--model",
            kind,
            "--device",
            "cpu",
            "--out",
            str(tmp_path / kind),
        ]
        trained = runner.invoke(app, args)
        assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["compare", str(tmp_path / "conv"), str(tmp_path / "gsa"), "-f", "json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    for record, kind in zip(records, ("conv", "gsa"), strict=True):
        summary = json.loads((tmp_path / kind / "summary.json").read_text())
        metrics = pd.read_csv(tmp_path / kind / "metrics.csv")
        assert record["model"] == kind
        assert record["params"] == count_parameters(load_preset("smoke", model=kind))
        assert record["gmacs"] == summary["gmacs"] > 0
        assert record["gmacs_source"] == "summary.json"
        assert record["best_top1"] == metrics["val_top1"].max()
        assert record["final_top1"] == metrics["val_top1"].iloc[-1]
    assert records[1]["params_ratio"] == pytest.approx(records[1]["params"] / records[0]["params"])


def test_inputs_are_kinds_or_directories_never_both(tmp_path: Path) -> None:
    two_runs = [
        write_run(tmp_path / kind, kind=kind, val_top1=[50.0], params=2, gmacs=1.0)
        for kind in ("conv", "gsa")
    ]
    assert split_inputs(["conv", "vs", "gsa"]).kinds == ("conv", "gsa")
    assert split_inputs(["conv", "gsa", "full"]).kinds == ("conv", "gsa", "full")
    glob = str(two_runs[0].parent / "*")
    assert split_inputs([glob]).runs == tuple(two_runs)
    with pytest.raises(ConfigError, match="model kinds or run directories, not both"):
        split_inputs(["conv", str(two_runs[1])])
    with pytest.raises(ConfigError, match="cnv: neither a model kind"):
        split_inputs(["cnv", "gsa"])
    with pytest.raises(ConfigError, match="matches no run directory"):
        split_inputs([str(two_runs[0].parent / "nothing*")])
    with pytest.raises(ConfigError, match="gsa named more than once"):
        split_inputs(["gsa", "vs", "gsa"])
    with pytest.raises(ConfigError, match="nothing to compare"):
        split_inputs(["vs"])


def test_gmacs_an_older_summary_lacks_are_counted_from_the_config_and_labelled(tmp_path: Path) -> None:
    from gsa_cli.bench.macs import count_macs
    from gsa_cli.models import build_model

    run = write_run(tmp_path / "old", kind="gsa", val_top1=[10.0], params=1, gmacs=None)
    result = runner.invoke(app, ["compare", str(run), "-f", "json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    count = count_macs(build_model(load_preset("smoke", model="gsa")), img_size=16)
    assert record["gmacs"] == pytest.approx(count.total / 1e9)
    assert record["gmacs_source"] == GMACS_COUNTED


def test_comparing_runs_that_record_their_gmacs_does_not_import_torch(tmp_path: Path) -> None:
    runs = [
        str(write_run(tmp_path / kind, kind=kind, val_top1=[50.0, 60.0], params=2, gmacs=1.0))
        for kind in ("conv", "gsa")
    ]
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from gsa_cli.cli.app import app\n"
        f"result = CliRunner().invoke(app, ['compare', *{runs!r}, '--out', {str(out)!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (out / "compare.md").is_file()


# ---------------------------------------------------------------------------------------------------
# Damaged run directories and unwritable --out: one line naming the file, the key, the epoch or the path.


@pytest.mark.parametrize("name", ["summary.json", "metrics.csv", "config.yaml"])
def test_a_run_file_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    run = write_run(tmp_path / "run", kind="gsa", val_top1=[10.0, 20.0], params=1000, gmacs=1.0)
    (run / name).write_bytes(b"\xff\xfe" + (run / name).read_bytes())
    result = runner.invoke(app, ["compare", str(run)])
    assert result.exit_code == 1, result.output
    assert one_error_line(result).startswith(f"error: {run / name}: not UTF-8 text")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("parameters", "many", "a whole number"), ("best_top1", "high", "a number"),
     ("model_kind", 3, "a string"), ("epochs", 2.5, "a whole number"), ("wall_time_s", [1], "a number")],
)  # fmt: skip
def test_an_ill_typed_summary_value_is_one_line_naming_the_key(
    tmp_path: Path, key: str, value: object, expected: str
) -> None:
    run = write_run(tmp_path / "run", kind="gsa", val_top1=[10.0, 20.0], params=1000, gmacs=1.0)
    summary = json.loads((run / "summary.json").read_text())
    summary[key] = value
    (run / "summary.json").write_text(json.dumps(summary))
    result = runner.invoke(app, ["compare", str(run)])
    assert result.exit_code == 1, result.output
    assert one_error_line(result).startswith(
        f"error: {run / 'summary.json'}: {key} is {json.dumps(value)}, expected {expected}"
    )


def test_an_ill_typed_eval_value_is_one_line_naming_the_key(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", kind="gsa", val_top1=[10.0], params=1000, gmacs=1.0, eval_top1=9.0)
    report = json.loads((run / "eval.json").read_text())
    report["top1"] = "9%"
    (run / "eval.json").write_text(json.dumps(report))
    result = runner.invoke(app, ["compare", str(run), "--accuracy", "eval"])
    assert result.exit_code == 1, result.output
    assert one_error_line(result).startswith(f'error: {run / "eval.json"}: top1 is "9%", expected a number')


def test_a_repeated_epoch_in_metrics_is_one_line_naming_the_file_and_epoch(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", kind="gsa", val_top1=[10.0, 20.0, 30.0], params=1000, gmacs=1.0)
    lines = (run / "metrics.csv").read_text().splitlines()
    lines[3] = lines[2]  # epochs 1, 2, 2: as many rows as summary.json's epochs_done
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["compare", str(run)])
    assert result.exit_code == 1, result.output
    assert one_error_line(result).startswith(f"error: {run / 'metrics.csv'}: epoch 2 appears 2 times")


def test_an_unwritable_out_is_one_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("profiled before --out was checked")

    monkeypatch.setattr("gsa_cli.bench.profile.profile", never)
    monkeypatch.setattr("gsa_cli.bench.profile.profile_kinds", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    folder = tmp_path / "a-folder.csv"
    folder.mkdir()
    for command, out, problem in (
        ("compare", blocker / "report", f"{blocker} is a file, not a folder"),
        ("compare", blocker, "exists and is not a folder"),
        ("profile", blocker / "rows.csv", f"{blocker} is a file, not a folder"),
        ("profile", folder, "exists and is not a file"),
    ):
        args = [command, *(["conv", "gsa"] if command == "compare" else []), *QUICK, "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert one_error_line(result).startswith(f"error: --out {out}: {problem}")
