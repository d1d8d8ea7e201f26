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
