"""Result tables: a pandas DataFrame shown as a rich table, or written as CSV, JSON or Markdown.

Used by ``gsa profile`` and ``gsa compare``. Files are written through pandas (CSV and JSON keep every
column at full precision); the terminal and Markdown views format numbers for reading. Columns that
hold one value in every row can be lifted out of the view into a caption (:func:`split_constant`), so
that the table shows what varies and the caption what was held fixed. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
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


def rich_table(frame: pd.DataFrame, *, title: str | None = None, caption: str | None = None) -> Table:
    """The frame as a rich table, numbers right-aligned; every text shown literally (never as markup)."""
    table = Table(
        title=None if title is None else Text(title),
        caption=None if caption is None else Text(caption),
        caption_justify="left",
    )
    for column in frame.columns:
        numeric = _is_numeric(frame[column]) or frame[column].map(lambda v: isinstance(v, int | float)).all()
        table.add_column(Text(str(column)), justify="right" if numeric else "left")
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
