"""The figures of ``gsa compare``, drawn with matplotlib's headless Agg canvas and saved as PNG.

Each function takes the frames :mod:`gsa_cli.report.compare` builds, draws one figure with labelled axes
and a legend, writes it and returns its path. A model kind keeps its colour in every figure.
Figures are built with matplotlib's object API on an Agg canvas, never through ``pyplot``: no display
is needed, no global backend is switched and no figure outlives its function. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from gsa_cli.errors import ConfigError

KIND_COLOURS = {"conv": "tab:blue", "gsa": "tab:orange", "full": "tab:green"}
OTHER_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
DPI = 110


def colour(kind: str) -> str:
    """The colour of a model kind (other labels get the remaining colours in a fixed order)."""
    return KIND_COLOURS.get(kind) or OTHER_COLOURS[sum(map(ord, kind)) % len(OTHER_COLOURS)]


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=DPI)
    except OSError as err:
        raise ConfigError(f"{path}: cannot write the plot ({err.strerror})") from None
    return path


def _pixel_ticks(axis: Any, sizes: list[int]) -> None:
    """Log x axis ticked at the image sizes measured."""
    axis.set_xscale("log")
    axis.set_xticks(sizes)
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())


def scaling(frame: pd.DataFrame, path: Path) -> Path:
    """Log-log: GMACs per image, images/s and peak memory against image size, a line per model kind.

    Inference is drawn solid, a training step dashed; grey guide lines show a cost growing with the
    pixel count and with its square, for reading off linear against quadratic growth.
    """
    sizes = sorted(int(size) for size in frame["img_size"].unique())
    figure = _figure(14, 4.2)
    axes = figure.subplots(1, 3)
    panels = [
        (axes[0], [("gmacs", "-", "")], "GMACs per image (batch 1)"),
        (axes[1], [("infer_img_s", "-", " infer"), ("train_img_s", "--", " train")], "images/s"),
        (
            axes[2],
            [("infer_peak_mib", "-", " infer"), ("train_peak_mib", "--", " train")],
            "peak memory (MiB)",
        ),
    ]
    for axis, series, ylabel in panels:
        for kind, rows in frame.groupby("model", sort=False):
            for column, style, suffix in series:
                if column in rows and rows[column].notna().any():
                    axis.plot(rows["img_size"], rows[column], style, marker="o", color=colour(str(kind)),
                              label=f"{kind}{suffix}")  # fmt: skip
        axis.set_yscale("log")
        _pixel_ticks(axis, sizes)
        axis.set_xlabel("image size (px, log scale)")
        axis.set_ylabel(f"{ylabel}, log scale")
        axis.grid(True, which="both", alpha=0.3)
    if frame["gmacs"].notna().any():
        # Reference slopes below the lowest line: a cost linear in the pixel count, and a quadratic one.
        start = 0.6 * frame.loc[frame["img_size"] == sizes[0], "gmacs"].min()
        for power, style, name in ((1, ":", "∝ pixels"), (2, "-.", "∝ pixels²")):
            guide = [start * (size / sizes[0]) ** (2 * power) for size in sizes]
            axes[0].plot(sizes, guide, style, color="grey", label=name)
    axes[0].set_title("Multiply-adds")
    axes[1].set_title("Throughput")
    memory = str(frame["memory"].iloc[0]) if "memory" in frame else ""
    axes[2].set_title("Peak memory" + ("\n(" + memory + ")" if memory else ""), fontsize="medium")
    for axis in axes:
        axis.legend(fontsize="small")
    batch = int(frame["batch"].iloc[0])
    figure.suptitle(
        f"{frame['preset'].iloc[0]}: cost against resolution (batch {batch}, {frame['device'].iloc[0]})"
    )
    return _save(figure, path)


def _count(value: float) -> str:
    """A parameter count for a tick: 540k, 1.2M."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    return f"{value / 1e3:g}k" if abs(value) >= 1e3 else f"{value:g}"


def _at_least_one_point(axis: Any, top1: pd.Series) -> None:
    """A y range of at least one percentage point, so that a difference of 0.04 does not fill the plot
    (and of one point when every run has the same top-1), never above 100%."""
    low, high = axis.get_ylim()
    middle = (top1.min() + top1.max()) / 2
    if pd.isna(middle):
        return
    if high - low < 1 or top1.min() == top1.max():  # equal values: matplotlib pads them by several points
        low, high = middle - 0.5, middle + 0.5
    if high > 100:
        low, high = low - (high - 100), 100.0
    axis.set_ylim(low, high)


def _label_points(axis: Any, frame: pd.DataFrame, x_column: str, y_column: str) -> None:
    """Each run's name beside its point: above it, or below it in the top tenth of the y range (where
    a label above would run into the title, as at 100%)."""
    low, high = axis.get_ylim()
    for _, row in frame.iterrows():
        x, y = row[x_column], row[y_column]
        if pd.isna(x) or pd.isna(y):
            continue
        below = y > high - (high - low) / 10
        axis.annotate(str(row["run"]), (x, y), textcoords="offset points", xytext=(5, -5 if below else 5),
                      va="top" if below else "baseline", fontsize="small")  # fmt: skip


def _kind_legend(axis: Any, kinds: list[str]) -> None:
    handles = [Line2D([], [], marker="o", linestyle="", color=colour(kind), label=kind) for kind in kinds]
    axis.legend(handles=handles, title="model", fontsize="small")


def accuracy_vs_cost(frame: pd.DataFrame, column: str, label: str, path: Path) -> Path:
    """Top-1 against GMACs and against parameters: a labelled point per run, coloured by model kind."""
    figure = _figure(11, 4.2)
    axes = figure.subplots(1, 2)
    kinds = list(dict.fromkeys(str(kind) for kind in frame["model"]))
    for axis, x_column, xlabel in ((axes[0], "gmacs", "GMACs per image"), (axes[1], "params", "parameters")):
        for _, row in frame.iterrows():
            if pd.isna(row[x_column]) or pd.isna(row[column]):
                continue
            axis.scatter(row[x_column], row[column], color=colour(str(row["model"])), s=40, zorder=3)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"{label} (%)")
        axis.grid(True, alpha=0.3)
        axis.margins(x=0.25, y=0.2)
        _at_least_one_point(axis, frame[column])
        _label_points(axis, frame, x_column, column)
        _kind_legend(axis, kinds)
    axes[1].xaxis.set_major_formatter(FuncFormatter(lambda value, _: _count(value)))
    axes[0].set_title(f"{label} against multiply-adds")
    axes[1].set_title(f"{label} against parameters")
    return _save(figure, path)


def learning_curves(
    curves: Mapping[str, list[tuple[int, float]]], kinds: Mapping[str, str], path: Path
) -> Path:
    """Validation top-1 per epoch, a line per run: coloured by model kind, runs of one kind dashed apart."""
    figure = _figure(7.5, 4.5)
    axis = figure.subplots()
    styles = ("-", "--", ":", "-.")
    seen: list[str] = []
    for name, points in curves.items():
        kind = kinds.get(name, name)
        style = styles[seen.count(kind) % len(styles)]
        seen.append(kind)
        if points:
            epochs, top1 = zip(*points, strict=True)
            axis.plot(epochs, top1, style, marker=".", color=colour(kind), label=f"{name} ({kind})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation top-1 (%)")
    axis.set_title("Learning curves")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small")
    return _save(figure, path)


def by_key(long: pd.DataFrame, key: str, label: str, path: Path) -> Path:
    """Top-1 against a config value, a line per model kind (the range where several runs share a value).

    ``long`` has the columns ``by_value``, ``by_x`` (numeric position or NaN), ``model``, ``top1``,
    ``top1_min``, ``top1_max`` and ``runs``.
    """
    figure = _figure(7.5, 4.5)
    axis = figure.subplots()
    numeric = bool(long["by_x"].notna().all())
    order = list(dict.fromkeys(long["by_value"]))
    for kind, rows in long.groupby("model", sort=False):
        x = rows["by_x"] if numeric else [order.index(value) for value in rows["by_value"]]
        spread = [rows["top1"] - rows["top1_min"], rows["top1_max"] - rows["top1"]]
        axis.errorbar(
            x, rows["top1"], yerr=spread, marker="o", capsize=3, color=colour(str(kind)), label=kind
        )
    ranges = any("-" in str(value)[1:] for value in order)  # [min, max] ranges: placed at the midpoint
    if not numeric or ranges:
        positions = long.drop_duplicates("by_value")["by_x"] if numeric else range(len(order))
        axis.set_xticks(list(positions), order)
    axis.set_xlabel(f"{key} (each range at its midpoint)" if numeric and ranges else key)
    axis.set_ylabel(f"{label} (%)")
    several = bool(long["runs"].gt(1).any())
    axis.set_title(
        f"{label} against {key}" + ("\n(mean; bars from the lowest to the highest run)" if several else "")
    )
    axis.grid(True, alpha=0.3)
    axis.legend(title="model", fontsize="small")
    return _save(figure, path)
