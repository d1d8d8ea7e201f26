"""Result tables: a pandas DataFrame shown as a rich table, or written as CSV, JSON or Markdown.

Used by ``gsa profile`` and ``gsa compare``. Files are written through pandas (CSV and JSON keep every
column at full precision); the terminal and Markdown views format numbers for reading. Columns that
hold one value in every row can be lifted out of the view into a caption (:func:`split_constant`), so
that the table shows what varies and the caption what was held fixed.

On a terminal a table fits its width (:func:`fit`): the columns a view names as key always, then as
many of the others as fit, each as wide as its widest cell, so that no number is ever cut; headers wrap
at their spaces. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from gsa_cli.choices import OutputFormat
from gsa_cli.errors import ConfigError

SUFFIX_FORMATS = {".csv": OutputFormat.CSV, ".json": OutputFormat.JSON, ".md": OutputFormat.MD}
MISSING = "-"  # shown for an empty cell (a mode not measured, a peak not known)


def format_value(value: Any) -> str:
    """A cell for reading: integers with thousands separators, floats to 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def _python_value(value: Any) -> Any:
    """numpy scalars from a DataFrame as Python values, so that :func:`format_value` sees ints as ints."""
    return value.item() if hasattr(value, "item") else value


def split_constant(frame: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Lift those of ``columns`` that hold a single value into a mapping; return the rest of the frame.

    A column that varies stays in the frame. With one row, every listed column is lifted.
    """
    constant: dict[str, Any] = {}
    for column in columns:
        if column in frame.columns and frame[column].astype(str).nunique(dropna=False) <= 1 and len(frame):
            constant[column] = _python_value(frame[column].iloc[0])
    return frame.drop(columns=list(constant)), constant


def caption(constant: Mapping[str, Any]) -> str:
    """``name: value`` pairs on one line, for what :func:`split_constant` lifted out."""
    return " · ".join(f"{name}: {format_value(value)}" for name, value in constant.items())


def view(frame: pd.DataFrame, headers: Mapping[str, str]) -> pd.DataFrame:
    """The columns of ``headers`` that ``frame`` has, in that order, renamed to their headers."""
    present = [column for column in headers if column in frame.columns]
    return frame[present].rename(columns={c: headers[c] for c in present})


def _is_numeric(series: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(series)) and not pd.api.types.is_bool_dtype(series)


def _cells(frame: pd.DataFrame, column: Any) -> list[str]:
    return [format_value(_python_value(value)) for value in frame[column]]


def _needed_width(frame: pd.DataFrame, column: Any, wrap: Collection[str] = ()) -> int:
    """The narrowest a column can be without cutting a cell: its widest cell (its longest word, for a
    column of ``wrap``), or its header's longest word."""
    cells = _cells(frame, column)
    words = [word for cell in cells for word in cell.split()] if str(column) in wrap else cells
    return max(1, *(cell_len(word) for word in words + str(column).split()))


def _natural_width(frame: pd.DataFrame, column: Any) -> int:
    """A column's width with its header and each cell on one line."""
    return max(1, cell_len(str(column)), *(cell_len(cell) for cell in _cells(frame, column)))


# Each column costs its cells' width plus a space either side and one rule; the table one rule more.
COLUMN_FRAME = 3
CHEAP = 4  # characters that put a wrapped header on one line before prose gets the room


def needed_width(frame: pd.DataFrame, wrap: Collection[str] = ()) -> int:
    """The width of the narrowest table of ``frame`` in which no cell is cut."""
    return 1 + sum(_needed_width(frame, column, wrap) + COLUMN_FRAME for column in frame.columns)


def natural_width(frame: pd.DataFrame) -> int:
    """The width of the table of ``frame`` with every header on one line."""
    return 1 + sum(_natural_width(frame, column) + COLUMN_FRAME for column in frame.columns)


def fit(
    frame: pd.DataFrame,
    width: int,
    *,
    key: Sequence[str] = (),
    extra: Sequence[str] = (),
    wrap: Collection[str] = (),
) -> tuple[pd.DataFrame, list[str]]:
    """The columns of ``frame`` that fit in ``width`` characters, in the frame's order, and those left out.

    The ``key`` columns come first (all of them, unless the width cannot hold even those), then the
    others in the order of ``extra``, then in the frame's order, each taken if it still fits. With no
    ``key``, every column is key. A column is never narrowed below its widest cell (a ``wrap`` column:
    its longest word).
    """
    present = [str(column) for column in frame.columns]
    keys = [column for column in key if column in present] if key else present
    rest = [c for c in extra if c in present and c not in keys]
    rest += [c for c in present if c not in keys and c not in rest]
    chosen: list[str] = []
    used = 1
    for column in keys + rest:  # a column that does not fit is passed over: a later, narrower one may
        cost = _needed_width(frame, column, wrap) + COLUMN_FRAME
        if used + cost <= width or not chosen:
            chosen.append(column)
            used += cost
    shown = [column for column in present if column in chosen]
    return frame[shown], [column for column in present if column not in chosen]


def _widths(frame: pd.DataFrame, width: int | None, wrap: Collection[str] = ()) -> list[int]:
    """Column widths for a table of ``width`` characters (None: every header and cell on one line).

    Each column gets its needed width (:func:`_needed_width`); what the width leaves over goes first to
    headers a few characters short of one line, then to the ``wrap`` columns, then to the other headers,
    the cheapest first.
    """
    needed = [_needed_width(frame, column, wrap) for column in frame.columns]
    natural = [_natural_width(frame, column) for column in frame.columns]
    if width is None:
        return natural
    spare = width - needed_width(frame, wrap)
    widths = list(needed)

    def turn(index: int) -> tuple[int, int]:  # headers a few characters from one line, prose, the rest
        cost = natural[index] - needed[index]
        return (1 if str(frame.columns[index]) in wrap else 0 if cost <= CHEAP else 2), cost

    for index in sorted(range(len(widths)), key=turn):
        grow = max(0, min(spare, natural[index] - needed[index]))
        widths[index] += grow
        spare -= grow
    return widths


def _wrapped(header: str, width: int) -> str:
    """A header broken at its spaces into lines of at most ``width`` (a longer word keeps a line)."""
    lines: list[str] = []
    for word in header.split():
        if lines and cell_len(lines[-1]) + 1 + cell_len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def rich_table(
    frame: pd.DataFrame,
    *,
    title: str | None = None,
    caption: str | None = None,
    width: int | None = None,
    wrap: Collection[str] = (),
) -> Table:
    """The frame as a rich table, numbers right-aligned; every text shown literally (never as markup).

    Every column is at least as wide as its widest cell (a ``wrap`` column: its longest word), so that
    nothing is cut; headers and the cells of ``wrap`` columns wrap at their spaces. Print it on a
    console at least :func:`needed_width` wide.

    Args:
        width: The width to lay the table out in (a terminal's); None: every header on one line.
        wrap: Columns of prose, whose cells may take several lines.
    """
    table = Table(
        title=None if title is None else Text(title),
        caption=None if caption is None else Text(caption),
        caption_justify="left",
    )
    for column, column_width in zip(frame.columns, _widths(frame, width, wrap), strict=True):
        numeric = _is_numeric(frame[column]) or frame[column].map(lambda v: isinstance(v, int | float)).all()
        table.add_column(
            Text(_wrapped(str(column), column_width)),
            justify="right" if numeric else "left",
            width=column_width,
            no_wrap=str(column) not in wrap,
        )
    for values in frame.itertuples(index=False):
        table.add_row(*(Text(format_value(_python_value(v))) for v in values))
    return table


def markdown(frame: pd.DataFrame, *, caption: str | None = None) -> str:
    """The frame as a GitHub Markdown table (numbers formatted for reading), with a caption line."""
    columns = [str(c) for c in frame.columns]
    right = [_is_numeric(frame[c]) for c in frame.columns]
    lines = []
    if caption:
        lines += [caption, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("| " + " | ".join("---:" if r else "---" for r in right) + " |")
    for values in frame.itertuples(index=False):
        cells = [format_value(_python_value(v)).replace("|", "\\|") for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_text(frame: pd.DataFrame, fmt: OutputFormat, *, caption: str | None = None) -> str:
    """The frame as the text of a CSV, JSON (a list of records) or Markdown file."""
    if fmt is OutputFormat.CSV:
        return str(frame.to_csv(index=False))
    if fmt is OutputFormat.JSON:
        return str(frame.to_json(orient="records", indent=2)) + "\n"
    if fmt is OutputFormat.MD:
        return markdown(frame, caption=caption)
    raise ValueError(f"{fmt} is not a file format")


def format_for_path(path: str | Path) -> OutputFormat:
    """The file format a path's suffix names.

    Raises:
        ConfigError: for a suffix other than .csv, .json or .md.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise ConfigError(f"{path}: cannot tell the format from the suffix; use .csv, .json or .md")
    return SUFFIX_FORMATS[suffix]


def write(frame: pd.DataFrame, path: str | Path, *, caption: str | None = None) -> Path:
    """Write the frame to ``path`` in the format its suffix names; create missing parent folders.

    Raises:
        ConfigError: for an unknown suffix, or a path that cannot be written.
    """
    path = Path(path)
    text = to_text(frame, format_for_path(path), caption=caption)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot write the table ({err.strerror})") from None
    return path
