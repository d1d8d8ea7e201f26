"""Tables: numbers formatted for reading on screen and in Markdown; files written and read back."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from gsa_cli.choices import OutputFormat
from gsa_cli.errors import ConfigError
from gsa_cli.report import tables


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": ["conv", "gsa"],
            "params": [25_557_032, 18_000_000],
            "gmacs": [4.111512576, 3.2],
            "img_s": [None, 12.5],
            "device": ["cpu", "cpu"],
        }
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (25_557_032, "25,557,032"),
        (4.111512576, "4.112"),
        (0.000123456, "0.0001235"),
        (123456.7, "123,457"),
        (0.0, "0"),
        (None, "-"),
        (math.nan, "-"),
        (True, "yes"),
        ("gsa", "gsa"),
    ],
)
def test_format_value(value: object, text: str) -> None:
    assert tables.format_value(value) == text


def test_split_constant_lifts_only_columns_with_one_value(frame: pd.DataFrame) -> None:
    rest, constant = tables.split_constant(frame, ["device", "model", "absent"])
    assert constant == {"device": "cpu"}
    assert list(rest.columns) == ["model", "params", "gmacs", "img_s"]
    assert tables.caption(constant) == "device: cpu"


def test_view_selects_and_renames_in_order(frame: pd.DataFrame) -> None:
    shown = tables.view(frame, {"gmacs": "GMACs", "model": "model", "missing": "x"})
    assert list(shown.columns) == ["GMACs", "model"]


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_files_keep_every_value_at_full_precision(frame: pd.DataFrame, tmp_path: Path, suffix: str) -> None:
    path = tables.write(frame, tmp_path / "sub" / f"t{suffix}")
    back = pd.read_csv(path) if suffix == ".csv" else pd.DataFrame(json.loads(path.read_text()))
    assert back["params"].tolist() == [25_557_032, 18_000_000]
    assert back["gmacs"].tolist() == [4.111512576, 3.2]
    assert pd.isna(back["img_s"][0])  # an empty cell stays empty


def test_markdown_file_is_a_readable_table_with_its_caption(frame: pd.DataFrame, tmp_path: Path) -> None:
    path = tables.write(frame, tmp_path / "t.md", caption="device: cpu")
    lines = path.read_text().splitlines()
    assert lines[0] == "device: cpu"
    assert lines[2] == "| model | params | gmacs | img_s | device |"
    assert lines[3] == "| --- | ---: | ---: | ---: | --- |"
    assert lines[4] == "| conv | 25,557,032 | 4.112 | - | cpu |"


def test_an_unknown_suffix_is_refused_before_anything_is_written(frame: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.csv, \.json or \.md"):
        tables.write(frame, tmp_path / "t.txt")
    assert not (tmp_path / "t.txt").exists()
    assert tables.format_for_path("x.JSON") is OutputFormat.JSON


def test_rich_table_has_every_column_and_row(frame: pd.DataFrame) -> None:
    table = tables.rich_table(frame, title="t")
    assert [str(c.header) for c in table.columns] == list(frame.columns)
    assert table.row_count == 2
    assert table.columns[1].justify == "right"
    assert table.columns[0].justify == "left"


def test_rich_table_shows_markup_in_titles_headers_and_cells_literally() -> None:
    frame = pd.DataFrame({"run [/x]": ["a[bold]", "[red]b[/red]"], "params": [1, 2]})
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(tables.rich_table(frame, title="t [/x]", caption="c [bold]"))
    text = buffer.getvalue()
    for literal in ("t [/x]", "run [/x]", "a[bold]", "[red]b[/red]", "c [bold]"):
        assert literal in text


# ---------------------------------------------------------------------------------------------------
# Fitting a terminal: key columns first, others as the width allows, no cell ever cut.


@pytest.fixture
def wide_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": ["conv", "gsa"],
            "params": [25_557_032, 18_284_584],
            "GMACs": [4.111512576, 3.2],
            "infer img/s": [1234.5, 12.25],
            "infer ms (IQR)": ["3.24 (0.1061)", "326.5 (12.07)"],
            "params / conv": [1.0, 0.7154],
            "status": ["ok", "out of memory (train)"],
        }
    )


def _printed(table: object, width: int) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=width).print(table)
    return buffer.getvalue()


def test_needed_width_is_the_widest_cell_or_header_word_of_each_column(wide_frame: pd.DataFrame) -> None:
    frame = wide_frame[["model", "params", "infer img/s"]]
    # model: "model" 5; params: "25,557,032" 10; infer img/s: "infer"/"img/s" 5 (cells "1234", "12.25")
    assert tables.needed_width(frame) == 1 + (5 + 3) + (10 + 3) + (5 + 3)
    assert tables.natural_width(frame) == 1 + (5 + 3) + (10 + 3) + (11 + 3)


def test_fit_keeps_the_key_columns_and_adds_others_in_order_while_they_fit(wide_frame: pd.DataFrame) -> None:
    key = ("model", "params", "infer img/s")
    extra = ("params / conv", "status")
    width = tables.needed_width(wide_frame[[*key, "params / conv"]]) + 5  # room for the ratio, not more
    shown, hidden = tables.fit(wide_frame, width, key=key, extra=extra)
    assert list(shown.columns) == ["model", "params", "infer img/s", "params / conv"]  # the frame's order
    assert hidden == ["GMACs", "infer ms (IQR)", "status"]
    everything, none = tables.fit(wide_frame, 500, key=key)
    assert list(everything.columns) == list(wide_frame.columns)
    assert none == []


def test_fit_passes_over_a_key_column_too_wide_for_a_narrow_terminal(wide_frame: pd.DataFrame) -> None:
    shown, hidden = tables.fit(wide_frame, 30, key=("model", "params", "infer ms (IQR)", "GMACs"))
    assert list(shown.columns) == ["model", "params", "GMACs"]
    assert "infer ms (IQR)" in hidden
    assert tables.needed_width(shown) <= 30


@pytest.mark.parametrize("width", [40, 80, 140])
def test_a_fitted_table_cuts_no_cell_and_wraps_headers_at_spaces(
    wide_frame: pd.DataFrame, width: int
) -> None:
    shown, _ = tables.fit(wide_frame, width, key=("model", "params"))
    text = _printed(tables.rich_table(shown, title="t", width=width), width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    for column in shown.columns:
        for cell in map(tables.format_value, shown[column].tolist()):
            assert cell in text  # whole, on one line


def test_prose_columns_wrap_at_their_spaces_and_take_the_room_left() -> None:
    frame = pd.DataFrame({"preset": ["fashion"], "description": ["Fashion-MNIST at 28 px, ResNet-26 layout"]})
    assert tables.needed_width(frame, wrap=("description",)) == 1 + (7 + 3) + (len("Fashion-MNIST") + 3)
    text = _printed(tables.rich_table(frame, width=30, wrap=("description",)), 30)
    assert "…" not in text
    assert "Fashion-MNIST" in text
    assert len(text.splitlines()) > 5  # the description took several lines
    one_line = _printed(tables.rich_table(frame, width=80, wrap=("description",)), 80)
    assert "Fashion-MNIST at 28 px, ResNet-26 layout" in one_line
