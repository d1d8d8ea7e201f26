"""compare: run directories in the real format read back, the table's numbers and ratios checked by
hand, half-written runs named in clear errors, the plots written and readable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from fixtures_runs import write_run

from gsa_cli.choices import Accuracy
from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.report.compare import (
    GMACS_COUNTED,
    GMACS_FROM_SUMMARY,
    GMACS_UNCOUNTABLE,
    compare_runs,
)
from gsa_cli.report.files import write_report
from gsa_cli.report.runs import compact_labels
from gsa_cli.results import RunRecord, read_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    conv = write_run(
        tmp_path / "conv", kind="conv", val_top1=[50.0, 80.0, 78.0], params=1000, gmacs=2.0, wall_time_s=100.0
    )
    gsa = write_run(
        tmp_path / "gsa",
        kind="gsa",
        val_top1=[60.0, 70.0, 84.0],
        params=600,
        gmacs=1.5,
        wall_time_s=150.0,
        eval_top1=83.5,
    )
    return [conv, gsa]


def test_runs_table_holds_their_numbers_and_ratios_to_the_first(two_runs: list[Path]) -> None:
    comparison = compare_runs(two_runs)
    frame = comparison.frame.set_index("run")
    assert list(frame.index) == ["conv", "gsa"]
    assert frame.loc["conv", "best_top1"] == 80.0
    assert frame.loc["conv", "best_epoch"] == 2
    assert frame.loc["conv", "final_top1"] == 78.0
    assert frame.loc["gsa", "best_top1"] == frame.loc["gsa", "final_top1"] == 84.0
    assert frame.loc["gsa", "eval_top1"] == 83.5
    assert pd.isna(frame.loc["conv", "eval_top1"])  # no eval.json
    assert frame.loc["gsa", "params_ratio"] == pytest.approx(0.6)
    assert frame.loc["gsa", "gmacs_ratio"] == pytest.approx(0.75)
    assert frame.loc["gsa", "wall_time_s_ratio"] == pytest.approx(1.5)
    assert frame.loc["gsa", "best_top1_delta"] == pytest.approx(4.0)
    assert frame.loc["gsa", "final_top1_delta"] == pytest.approx(6.0)
    assert frame.loc["conv", "params_ratio"] == 1.0
    assert frame.loc["conv", "best_top1_delta"] == 0.0
    assert set(frame["gmacs_source"]) == {GMACS_FROM_SUMMARY}
    assert comparison.curves["conv"] == [(1, 50.0), (2, 80.0), (3, 78.0)]

    view = comparison.views[0]
    assert "params / conv" in view.frame.columns
    assert "Δ best top-1 vs conv (points)" in view.frame.columns
    assert view.frame["epochs"].tolist() == ["3/3", "3/3"]
    assert "preset: smoke" in view.caption  # what both runs share is lifted into the caption
    assert "preset" not in view.frame.columns


def test_report_files_read_back_and_the_markdown_embeds_the_plots(
    two_runs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    written = write_report(compare_runs(two_runs), out)
    names = [path.name for path in written]
    assert names == [
        "compare.csv",
        "compare.json",
        "accuracy_vs_cost.png",
        "learning_curves.png",
        "compare.md",
    ]
    frame = pd.read_csv(out / "compare.csv")
    assert frame["gmacs_ratio"].tolist() == pytest.approx([1.0, 0.75])
    records = json.loads((out / "compare.json").read_text())
    assert [record["best_top1"] for record in records] == [80.0, 84.0]
    for name in ("accuracy_vs_cost.png", "learning_curves.png"):
        pixels = matplotlib.image.imread(out / name)
        assert pixels.ndim == 3
        assert pixels.shape[0] > 300
        assert pixels.shape[1] > 500
        assert pixels.std() > 0  # something is drawn
    report = (out / "compare.md").read_text()
    assert "![Top-1 against cost](accuracy_vs_cost.png)" in report
    assert "![Learning curves](learning_curves.png)" in report
    assert "| conv | conv | 3/3 | 80 | 0 | 2 |" in report  # each difference beside its column


def test_the_gmacs_counter_is_called_only_for_runs_whose_summary_lacks_them(two_runs: list[Path]) -> None:
    old = write_run(two_runs[0].parent / "old", kind="gsa", val_top1=[10.0], params=1, gmacs=None)
    asked: list[Path] = []

    def counter(record: RunRecord) -> float | None:
        asked.append(record.path)
        return 0.25

    frame = compare_runs([*two_runs, old], count_gmacs=counter).frame
    assert asked == [old]
    assert frame["gmacs"].tolist() == [2.0, 1.5, 0.25]
    assert frame["gmacs_source"].tolist() == [GMACS_FROM_SUMMARY, GMACS_FROM_SUMMARY, GMACS_COUNTED]


def test_gmacs_an_older_summary_lacks_stay_missing_without_a_counter(tmp_path: Path) -> None:
    run = write_run(tmp_path / "old", kind="gsa", val_top1=[10.0], params=1, gmacs=None)
    for comparison in (compare_runs([run]), compare_runs([run], count_gmacs=lambda record: None)):
        assert pd.isna(comparison.frame["gmacs"].iloc[0])
        assert comparison.frame["gmacs_source"].iloc[0] == GMACS_UNCOUNTABLE
        assert f"GMACs: {GMACS_UNCOUNTABLE}" in comparison.views[0].caption


def test_gmacs_gsa_train_could_not_count_stay_missing(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", kind="gsa", val_top1=[10.0], params=1, gmacs=None)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "gmacs": None}))
    comparison = compare_runs([run])
    assert pd.isna(comparison.frame["gmacs"].iloc[0])
    assert "GMACs: not counted (gsa train could not)" in comparison.views[0].caption


def test_by_key_tabulates_top1_against_the_config_value_per_model(tmp_path: Path) -> None:
    runs = []
    for kind, distance, top1 in (
        ("conv", 16, [52.0]),  # given first: the table and the plot still run from 6 to 16
        ("conv", 6, [90.0]),
        ("gsa", 6, [96.0]),
        ("gsa", 16, [94.0]),
        ("gsa", 16, [98.0]),  # a second seed: the table shows the mean
    ):
        name = f"{kind}-{distance}-{len(runs)}"
        overrides = [f"data.distance=[{distance}, {distance}]", "data.train_samples=8", "data.val_samples=8"]
        runs.append(
            write_run(
                tmp_path / name,
                kind=kind,
                val_top1=top1,
                params=10,
                gmacs=0.1,
                preset="longrange",
                overrides=overrides,
            )
        )
    comparison = compare_runs(runs, by="data.distance", accuracy=Accuracy.FINAL)
    assert comparison.frame["by_value"].tolist() == ["16", "6", "6", "16", "16"]
    wide = comparison.views[-1].frame.set_index("data.distance")
    assert list(wide.index) == ["6", "16"]
    assert list(wide.columns) == ["conv", "gsa"]
    assert wide.loc["6", "conv"] == 90.0
    assert wide.loc["16", "conv"] == 52.0
    assert wide.loc["16", "gsa"] == pytest.approx(96.0)
    assert "mean" in comparison.views[-1].caption
    assert comparison.by is not None
    long = comparison.by[1]
    assert long["by_x"].tolist() == [6.0, 6.0, 16.0, 16.0]  # sorted by the value
    row = long[(long["model"] == "gsa") & (long["by_value"] == "16")].iloc[0]
    assert (row["top1_min"], row["top1_max"], row["runs"]) == (94.0, 98.0, 2)
    written = write_report(comparison, tmp_path / "out")
    assert (tmp_path / "out" / "top1_by_data_distance.png") in written
    assert (
        "![Top-1 against data.distance](top1_by_data_distance.png)"
        in (tmp_path / "out" / "compare.md").read_text()
    )


def test_by_key_a_run_lacks_is_named(two_runs: list[Path]) -> None:
    with pytest.raises(ConfigError, match=r"--by data\.nope: .*conv/config\.yaml has no such key"):
        compare_runs(two_runs, by="data.nope")


def test_half_written_run_directories_are_named(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", kind="conv", val_top1=[50.0, 60.0], params=1, gmacs=1.0)
    with pytest.raises(ConfigError, match=r"nope: not a run directory \(no such folder\)"):
        read_run(tmp_path / "nope")
    (tmp_path / "run.log").write_text("a log beside the run, as a shell glob run* also matches\n")
    with pytest.raises(ConfigError, match=r"run\.log: not a run directory \(a file\)"):
        read_run(tmp_path / "run.log")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GsaError, match="empty: not a run directory"):
        read_run(tmp_path / "empty")

    summary = (run / "summary.json").read_text()
    (run / "summary.json").unlink()  # killed during the first epoch: only config.yaml and metrics.csv
    with pytest.raises(GsaError, match=r"run: half-written run directory: summary\.json missing"):
        read_run(run)
    (run / "summary.json").write_text(summary[: len(summary) // 2])  # cut short
    with pytest.raises(GsaError, match=r"run/summary\.json: unreadable"):
        read_run(run)
    (run / "summary.json").write_text(json.dumps({**json.loads(summary), "epochs_done": 3}))
    with pytest.raises(GsaError, match=r"says 3 epochs done, metrics\.csv has 2"):
        read_run(run)
    (run / "summary.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(GsaError, match="no model_kind, epochs, epochs_done"):
        read_run(run)


def test_comparing_runs_does_not_import_torch(two_runs: list[Path]) -> None:
    runs = ", ".join(f"Path({str(run)!r})" for run in two_runs)
    out = str(two_runs[0].parent / "out")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gsa_cli.report.compare import compare_runs\n"
        "from gsa_cli.report.files import write_report\n"
        f"write_report(compare_runs([{runs}]), Path({out!r}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (Path(out) / "compare.md").is_file()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((99.17, 99.17), (98.67, 99.67)),  # equal: one point around them, not matplotlib's padding
        ((99.9, 99.9), (99.0, 100.0)),  # never above 100%
        ((80.0, 90.0), None),  # a real spread keeps matplotlib's limits
    ],
)
def test_the_accuracy_axis_spans_at_least_a_point_and_stops_at_100(
    values: tuple[float, float], expected: tuple[float, float] | None
) -> None:
    import pandas as pd
    from matplotlib.figure import Figure

    from gsa_cli.report.plots import _at_least_one_point

    axis = Figure().subplots()
    axis.scatter([1, 2], list(values))
    axis.margins(y=0.2)
    before = axis.get_ylim()
    _at_least_one_point(axis, pd.Series(values))
    low, high = axis.get_ylim()
    if expected is None:
        assert (low, high) == pytest.approx(before)
    else:
        assert (low, high) == pytest.approx(expected, abs=1e-6)


def test_a_label_at_the_top_of_the_accuracy_axis_goes_below_its_point() -> None:
    import pandas as pd
    from matplotlib.figure import Figure

    from gsa_cli.report.plots import _at_least_one_point, _label_points

    frame = pd.DataFrame({"run": ["conv", "gsa"], "gmacs": [1.0, 2.0], "best": [100.0, 99.72]})
    axis = Figure().subplots()
    axis.scatter(frame["gmacs"], frame["best"])
    _at_least_one_point(axis, frame["best"])
    _label_points(axis, frame, "gmacs", "best")
    offsets = {text.get_text(): text.xyann[1] for text in axis.texts}
    assert offsets["conv"] < 0  # at 100%, the top of the axis: below the point, clear of the title
    assert offsets["gsa"] > 0


# ---------------------------------------------------------------------------------------------------
# Run labels for narrow columns.


@pytest.mark.parametrize(
    ("paths", "labels"),
    [
        # gsa train's default names: the shared preset and the timestamps go.
        (["runs/digits-conv-20261127-144228", "runs/digits-gsa-20261127-144232"], ["conv", "gsa"]),
        # Two runs of one kind: the time of day tells them apart.
        (
            [
                "runs/digits-gsa-20261127-144228",
                "runs/digits-gsa-20261128-101500",
                "runs/digits-conv-20261127-150000",
            ],
            ["gsa-144228", "gsa-101500", "conv-150000"],
        ),
        # Started in the same second: default_run_dir's -2 suffix stays.
        (["runs/digits-gsa-20261127-144228", "runs/digits-gsa-20261127-144228-2"], ["144228", "144228-2"]),
        # Other presets: the preset stays, the shared stamp date goes.
        (["runs/digits-gsa-20261127-144228", "runs/smoke-gsa-20261127-144228"], ["digits-gsa", "smoke-gsa"]),
        # Folders of one name in different places: the shortest distinct path suffix.
        (["a/run", "b/run"], ["a/run", "b/run"]),
        (["x/a/run", "y/a/run"], ["x/a/run", "y/a/run"]),
        # Names of the user's own: as they are, less a leading word they all share.
        (["sweep-d2", "sweep-d4"], ["d2", "d4"]),
        (["baseline", "gsa"], ["baseline", "gsa"]),
        # One run: its name without the timestamp.
        (["runs/longrange-gsa-20261127-144228"], ["longrange-gsa"]),
    ],
)
def test_compact_labels_are_short_and_distinct(paths: list[str], labels: list[str]) -> None:
    assert compact_labels([Path(path) for path in paths]) == labels


def test_the_table_uses_compact_labels_and_the_files_keep_folder_names(tmp_path: Path) -> None:
    runs = [
        write_run(
            tmp_path / f"runs/smoke-{kind}-20261127-14422{i}",
            kind=kind,
            val_top1=[50.0],
            params=10,
            gmacs=1.0,
        )
        for i, kind in enumerate(("conv", "gsa"))
    ]
    comparison = compare_runs(runs)
    assert comparison.title == "gsa compare: conv vs gsa"
    assert comparison.frame["run"].tolist() == [run.name for run in runs]
    assert comparison.frame["label"].tolist() == ["conv", "gsa"]
    assert comparison.frame["path"].tolist() == [str(run) for run in runs]
    view = comparison.views[0]
    assert view.frame["run"].tolist() == ["conv", "gsa"]
    assert "params / conv" in view.frame.columns
    assert view.key == ("run", "best top-1 %", "params", "GMACs", "wall time s", "train img/s")
    assert all(column in view.frame.columns for column in view.key + view.extra)
