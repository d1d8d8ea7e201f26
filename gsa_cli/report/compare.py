"""Side by side: model kinds profiled under identical settings, or finished runs read back.

``gsa compare conv vs gsa`` profiles each kind (:func:`gsa_cli.bench.profile.profile_kinds`, one kind
after another in one process) and :func:`compare_kinds` sets the rows side by side; ``gsa compare
RUN_DIR ...`` reads run directories (:func:`compare_runs`). Both give a :class:`Comparison`: a frame with
every column (for ``compare.csv`` and ``compare.json``), readable tables with each row's ratio to the
first kind or run, and what the plots need; :func:`gsa_cli.report.files.write_report` writes the files.

Nothing here imports torch: comparing existing runs starts fast. A run written before ``summary.json``
recorded its multiply-adds has them counted by a callable the caller passes (the CLI's builds the model,
which imports torch, only for such a run).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gsa_cli.choices import Accuracy
from gsa_cli.report import tables
from gsa_cli.report.profile import latency_text, rows_frame
from gsa_cli.report.runs import compact_labels, config_value, folder_labels, read_checked
from gsa_cli.results import RunRecord

# Counts the GMACs of a run whose summary.json lacks them (None where it cannot).
GmacsCounter = Callable[[RunRecord], float | None]

# Where a run's GMACs come from (the table's caption says it).
GMACS_FROM_SUMMARY = "summary.json"
GMACS_COUNTED = "counted now from config.yaml (fvcore)"  # a summary.json written before it had them
GMACS_NOT_COUNTED = "not counted (gsa train could not)"  # summary.json holds null
GMACS_UNCOUNTABLE = "not counted (neither in summary.json nor countable now)"  # an older run, no count


@dataclass(frozen=True)
class TableView:
    """One readable table: a heading, the frame as shown, and a caption of what its rows share.

    ``frame`` holds every readable column (the Markdown report and ``--wide`` show them all); a terminal
    shows the ``key`` columns and as many others as fit, in the order of ``extra`` first
    (:func:`gsa_cli.report.tables.fit`). Both name columns by their headers; no ``key``: all are key.
    """

    heading: str
    frame: pd.DataFrame
    caption: str = ""
    caption_in_report: bool = True  # False where the report's settings already say it
    key: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()


@dataclass
class Comparison:
    """What ``gsa compare`` shows and writes.

    Attributes:
        title: One line naming what is compared.
        settings: ``name: value`` lines for the report's settings section.
        frame: Every column of every row (``compare.csv``, ``compare.json``).
        views: The readable tables, the main one first.
        scaling: Kinds at several image sizes: the rows the log-log plot draws.
        curves: Runs: validation top-1 per epoch, by run label.
        by: Runs with ``--by KEY``: the dotted key and the long frame the plot draws.
        accuracy: Which top-1 the run plots use.
    """

    title: str
    settings: list[str]
    frame: pd.DataFrame
    views: list[TableView]
    scaling: pd.DataFrame | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    by: tuple[str, pd.DataFrame] | None = None
    accuracy: Accuracy = Accuracy.BEST


# ---------------------------------------------------------------------------------------------------
# Shared helpers.


def _ratio(value: Any, reference: Any) -> float | None:
    if value is None or reference is None or pd.isna(value) or pd.isna(reference) or reference == 0:
        return None
    return float(value) / float(reference)


def _difference(value: Any, reference: Any) -> float | None:
    if value is None or reference is None or pd.isna(value) or pd.isna(reference):
        return None
    return float(value) - float(reference)


def _lift(frame: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """Columns holding one value in every row lifted into a caption (empty values left out)."""
    frame, constant = tables.split_constant(frame, list(columns))
    return frame, tables.caption({k: v for k, v in constant.items() if v not in (None, "") and v == v})


# ---------------------------------------------------------------------------------------------------
# Model kinds, profiled.

RATIO_COLUMNS = ("params", "gmacs", "infer_img_s", "train_img_s", "infer_peak_mib", "train_peak_mib")
# The readable columns, each ratio beside its column (the ratio headers are set per comparison).
KIND_HEADERS = {
    "model": "model",
    "img_size": "px",
    "batch": "batch",
    "params": "params",
    "params_ratio": "",
    "gmacs": "GMACs",
    "gmacs_ratio": "",
    "infer_img_s": "infer img/s",
    "infer_img_s_ratio": "",
    "infer_latency": "infer ms (IQR)",
    "train_img_s": "train img/s",
    "train_img_s_ratio": "",
    "train_latency": "train ms (IQR)",
    "infer_peak_mib": "infer peak MiB",
    "infer_peak_mib_ratio": "",
    "train_peak_mib": "train peak MiB",
    "train_peak_mib_ratio": "",
    "infer_process_mib": "infer process MiB",
    "train_process_mib": "train process MiB",
    "infer_baseline_mib": "infer baseline MiB",
    "train_baseline_mib": "train baseline MiB",
    "infer_cpu_wait_pct": "infer CPU wait %",
    "train_cpu_wait_pct": "train CPU wait %",
    "status": "status",
}
# On a terminal: always these (those present), then others as the width allows, in this order.
KIND_KEY = (
    "model", "img_size", "batch", "params", "gmacs", "infer_img_s", "train_img_s", "train_img_s_ratio",
    "train_peak_mib",
)  # fmt: skip
KIND_KEY_INFER_ONLY = ("infer_img_s_ratio", "infer_peak_mib")  # without a training step's columns
KIND_EXTRA = (
    "infer_img_s_ratio", "train_peak_mib_ratio", "infer_peak_mib", "infer_peak_mib_ratio", "status",
    "params_ratio", "gmacs_ratio", "train_latency", "infer_latency", "train_process_mib",
    "infer_process_mib",
)  # fmt: skip
KIND_CONTEXT = ("img_size", "batch", "status", "preset", "device", "torch", "precision", "layout")
KIND_CONTEXT_MORE = ("compile", "counter", "warmup", "iters", "memory")
SCALING_HEADERS = {
    "model": "model",
    "img_size": "px",
    "gmacs": "GMACs",
    "gmacs_exponent": "GMACs exponent",
    "infer_img_s": "infer img/s",
    "train_img_s": "train img/s",
    "infer_peak_mib": "infer peak MiB",
    "train_peak_mib": "train peak MiB",
}


def _headers_of(view: pd.DataFrame, headers: dict[str, str], columns: Sequence[str]) -> tuple[str, ...]:
    """The headers of those ``columns`` that ``view`` shows."""
    return tuple(headers[c] for c in columns if c in headers and headers[c] in view.columns)


def _with_kind_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``{column}_ratio``: each row over the first kind's row at the same image size and batch."""
    first = frame["model"].iloc[0]
    reference = frame[frame["model"] == first].set_index(["img_size", "batch"])
    frame = frame.copy()
    for column in RATIO_COLUMNS:
        frame[f"{column}_ratio"] = [
            _ratio(row[column], reference[column].get((row["img_size"], row["batch"])))
            for _, row in frame.iterrows()
        ]
    return frame


def _scaling(frame: pd.DataFrame) -> pd.DataFrame:
    """Each kind across image sizes at the first batch size, with GMACs' growth exponent in pixels.

    The exponent between consecutive sizes is log(GMACs ratio) / log(pixel ratio): 1 for a cost
    linear in the pixel count, 2 for a quadratic one.
    """
    rows = frame[frame["batch"] == frame["batch"].iloc[0]].sort_values(["model", "img_size"], kind="stable")
    rows = rows.set_index("model").loc[list(dict.fromkeys(frame["model"]))].reset_index()
    exponents: list[float | None] = [None]
    for previous, row in zip(rows.to_dict("records"), rows.to_dict("records")[1:], strict=False):
        if previous["model"] != row["model"]:
            exponents.append(None)
            continue
        pixels = (row["img_size"] / previous["img_size"]) ** 2
        exponents.append(math.log(row["gmacs"] / previous["gmacs"]) / math.log(pixels))
    rows["gmacs_exponent"] = exponents
    return rows


def compare_kinds(rows: Sequence[Any], *, preset: str, description: str) -> Comparison:
    """Set profile rows of several model kinds side by side, with ratios to the first kind.

    Args:
        rows: :class:`gsa_cli.bench.profile.ProfileRow` s of each kind, measured under the same settings
            (:func:`gsa_cli.bench.profile.profile_kinds`); the first row's kind is the reference.
        preset: The preset's name, for the title.
        description: The preset's description, for the settings.
    """
    frame = _with_kind_ratios(rows_frame(rows))
    first = str(frame["model"].iloc[0])
    headers = dict(KIND_HEADERS)
    headers.update({f"{column}_ratio": f"{KIND_HEADERS[column]} / {first}" for column in RATIO_COLUMNS})
    shown = frame.assign(**{f"{mode}_latency": latency_text(frame, mode) for mode in ("infer", "train")})
    shown = shown.dropna(axis="columns", how="all")
    shown, caption = _lift(shown, KIND_CONTEXT + KIND_CONTEXT_MORE)
    key = KIND_KEY if "train_img_s" in shown.columns else KIND_KEY + KIND_KEY_INFER_ONLY
    view = tables.view(shown, headers)
    keys, extra = _headers_of(view, headers, key), _headers_of(view, headers, KIND_EXTRA)
    views = [TableView("Side by side", view, caption, caption_in_report=False, key=keys, extra=extra)]
    scaling = None
    if frame["img_size"].nunique() > 1:
        scaling = _scaling(frame)
        batch = int(scaling["batch"].iloc[0])
        view = tables.view(scaling.dropna(axis="columns", how="all"), SCALING_HEADERS)
        note = (
            f"batch {batch} · GMACs exponent: log(GMACs ratio) / log(pixel ratio) from the previous size, "
            "1 = linear in the pixel count, 2 = quadratic"
        )
        views.append(TableView("Scaling with resolution", view, note))
    kinds = " vs ".join(str(kind) for kind in dict.fromkeys(frame["model"]))
    context = frame.iloc[0]
    sizes = ", ".join(str(size) for size in dict.fromkeys(frame["img_size"]))
    batches = ", ".join(str(batch) for batch in dict.fromkeys(frame["batch"]))
    lines = [
        f"preset: {preset} ({description})",
        f"models: {kinds}, profiled one after another in one process",
        f"image sizes: {sizes} px · batch sizes: {batches}",
        f"device: {context['device']} · torch: {context['torch']} · precision: {context['precision']} · "
        f"layout: {context['layout']} · compile: {tables.format_value(bool(context['compile']))}",
        f"warm-up: {context['warmup']} · timed iterations: {context['iters']} · MAC counter: "
        f"{context['counter']} (GMACs at batch 1, eval mode)",
        f"peak memory: {context['memory']}, in MiB; the baseline and the process's whole peak in columns "
        "of their own",
        f"ratios: each row over the {first} row at the same image size and batch",
    ]
    return Comparison(f"gsa compare: {kinds} ({preset})", lines, frame, views, scaling=scaling)


# ---------------------------------------------------------------------------------------------------
# Finished runs, read back.


def _gmacs(record: RunRecord, count_gmacs: GmacsCounter | None) -> tuple[float | None, str]:
    """The run's GMACs and where they come from: its summary, or counted now for an older run."""
    if "gmacs" not in record.summary:
        counted = None if count_gmacs is None else count_gmacs(record)
        return counted, GMACS_UNCOUNTABLE if counted is None else GMACS_COUNTED
    value = record.summary["gmacs"]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), GMACS_FROM_SUMMARY
    return None, GMACS_NOT_COUNTED


def _run_row(label: str, short: str, record: RunRecord, count_gmacs: GmacsCounter | None) -> dict[str, Any]:
    summary = record.summary
    evaluation = record.evaluation or {}
    gmacs, source = _gmacs(record, count_gmacs)
    return {
        "run": label,
        "label": short,
        "path": str(record.path),
        "model": summary["model_kind"],
        "preset": summary.get("preset"),
        "dataset": summary.get("dataset"),
        "status": summary.get("status"),
        "epochs_done": summary["epochs_done"],
        "epochs": summary["epochs"],
        "best_top1": summary["best_top1"],
        "best_top5": summary.get("best_top5"),
        "best_epoch": summary.get("best_epoch"),
        "final_top1": summary["final_top1"],
        "final_top5": summary.get("final_top5"),
        "eval_top1": evaluation.get("top1"),
        "eval_top5": evaluation.get("top5"),
        "params": summary["parameters"],
        "gmacs": gmacs,
        "gmacs_source": source,
        "wall_time_s": summary.get("wall_time_s"),
        "train_img_s": summary.get("images_per_s"),
        "device": summary.get("device"),
        "world_size": summary.get("world_size"),
        "precision": summary.get("precision"),
        "batch_size": summary.get("batch_size"),
        "torch": summary.get("torch_version"),
    }


ACCURACY_COLUMNS = {Accuracy.BEST: "best_top1", Accuracy.FINAL: "final_top1", Accuracy.EVAL: "eval_top1"}
RUN_RATIOS = ("params", "gmacs", "wall_time_s")
RUN_DELTAS = ("best_top1", "final_top1")
RUN_CONTEXT = ("preset", "dataset", "status", "device", "world_size", "precision", "batch_size", "torch")
RUN_HEADERS = {
    "label": "run",
    "model": "model",
    "by_value": "",  # set to the --by key
    "epochs_text": "epochs",
    "best_top1": "best top-1 %",
    "best_top1_delta": "",  # the ratio and difference headers are set per comparison
    "best_epoch": "at epoch",
    "best_top5": "best top-5 %",
    "final_top1": "final top-1 %",
    "final_top1_delta": "",
    "final_top5": "final top-5 %",
    "eval_top1": "eval top-1 %",
    "params": "params",
    "params_ratio": "",
    "gmacs": "GMACs",
    "gmacs_ratio": "",
    "wall_time_s": "wall time s",
    "wall_time_s_ratio": "",
    "train_img_s": "train img/s",
    "path": "path",
}
# On a terminal: the run, its --by value, the top-1 that --accuracy picks, and these; then the rest as
# the width allows, in the order of RUN_EXTRA.
RUN_KEY = ("params", "gmacs", "wall_time_s", "train_img_s")
RUN_EXTRA = (
    "wall_time_s_ratio", "model", "best_top1_delta", "final_top1_delta", "epochs_text", "params_ratio",
    "gmacs_ratio", "best_top1", "final_top1", "eval_top1", "best_epoch", "best_top5", "final_top5",
)  # fmt: skip


def _by_frame(frame: pd.DataFrame, accuracy: Accuracy) -> pd.DataFrame:
    """Top-1 by (key value, model): mean, lowest, highest and number of runs; numeric x where possible."""
    column = ACCURACY_COLUMNS[accuracy]
    grouped = frame.groupby(["by_value", "model"], sort=False)[column]
    long = grouped.agg(["mean", "min", "max", "count"]).reset_index()
    long = long.merge(frame.drop_duplicates("by_value")[["by_value", "by_x"]], on="by_value")
    if long["by_x"].notna().all():
        long = long.sort_values("by_x", kind="stable")
    return long.rename(columns={"mean": "top1", "min": "top1_min", "max": "top1_max", "count": "runs"})


def _axis_value(value: Any) -> tuple[str, float | None]:
    """A config value as a label and, when numeric (a number or a [min, max] range), an x position."""
    if isinstance(value, bool):
        return str(value).lower(), None
    if isinstance(value, int | float):
        return tables.format_value(value), float(value)
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        label = tables.format_value(value[0]) if len(set(value)) == 1 else "-".join(map(str, value))
        return label, sum(value) / len(value)
    return json.dumps(value) if not isinstance(value, str) else value, None


def _runs_view(frame: pd.DataFrame, first: str, by: str | None, accuracy: Accuracy) -> TableView:
    """The readable table of runs: what they share in the caption, ratios and differences to ``first``."""
    headers = dict(RUN_HEADERS, by_value=by or "")
    headers.update({f"{c}_ratio": f"{RUN_HEADERS[c].removesuffix(' s')} / {first}" for c in RUN_RATIOS})
    headers.update({f"{c}_delta": f"Δ {RUN_HEADERS[c][:-2]} vs {first} (points)" for c in RUN_DELTAS})
    shown = frame.assign(
        epochs_text=[f"{d}/{n}" for d, n in zip(frame["epochs_done"], frame["epochs"], strict=True)]
    )
    shown = shown.dropna(axis="columns", how="all")
    shown, caption = _lift(shown, RUN_CONTEXT)
    sources = set(frame["gmacs_source"])
    caption = " · ".join(part for part in (caption, f"GMACs: {', '.join(sorted(sources))}") if part)
    top1 = ACCURACY_COLUMNS[accuracy]
    view = tables.view(shown, headers)
    key = _headers_of(view, headers, ("label", "by_value", top1, *RUN_KEY))
    extra = _headers_of(view, headers, (f"{top1}_delta", *RUN_EXTRA))
    return TableView("Side by side", view, caption, key=key, extra=extra)


def compare_runs(
    paths: Sequence[Path],
    *,
    by: str | None = None,
    accuracy: Accuracy = Accuracy.BEST,
    count_gmacs: GmacsCounter | None = None,
) -> Comparison:
    """Read finished runs and set them side by side, with ratios against the first.

    Args:
        paths: Run directories written by ``gsa train``; the first is the reference.
        by: A dotted config key (``data.distance``): also tabulate top-1 against its value per model.
        accuracy: Which top-1 the plots and the ``by`` table use.
        count_gmacs: Counts the GMACs of a run whose ``summary.json`` predates them; called for such
            runs only. Without it, or where it gives None, their GMACs stay empty and the caption says so.

    Raises:
        ConfigError: for a path that is not a folder, or a ``by`` key a run's config lacks.
        GsaError: naming a folder that is not a run directory or is half-written, or the file of a
            damaged run (not UTF-8, a value of the wrong type, an epoch repeated).
    """
    records = [read_checked(path) for path in paths]
    labels, short = folder_labels(paths), compact_labels(paths)
    rows = [_run_row(*row, count_gmacs) for row in zip(labels, short, records, strict=True)]
    frame = pd.DataFrame(rows)
    if by is not None:
        values = [_axis_value(config_value(record, by)) for record in records]
        frame.insert(3, "by_value", [label for label, _ in values])
        frame.insert(4, "by_x", [x for _, x in values])
    first = frame.iloc[0]
    for column in RUN_RATIOS:
        frame[f"{column}_ratio"] = [_ratio(value, first[column]) for value in frame[column]]
    for column in RUN_DELTAS:
        frame[f"{column}_delta"] = [_difference(value, first[column]) for value in frame[column]]

    views = [_runs_view(frame, short[0], by, accuracy)]

    comparison = Comparison(
        f"gsa compare: {' vs '.join(short)}",
        [f"`{record.path}`: {_describe(record)}" for record in records],
        frame,
        views,
        curves={
            label: [(m.epoch, m.val_top1) for m in r.metrics]
            for label, r in zip(labels, records, strict=True)
        },
        accuracy=accuracy,
    )
    comparison.settings += [
        f"ratios over {short[0]} ({labels[0]}); top-1 differences in percentage points",
        "GMACs: per image at the run's image size, batch 1, eval mode",
    ]
    if by is not None:
        long = _by_frame(frame, accuracy)
        comparison.by = (by, long)
        wide = long.pivot_table(index="by_value", columns="model", values="top1", sort=False).reset_index()
        wide = wide.rename(columns={"by_value": by})
        wide.columns.name = None
        note = f"{accuracy.value} top-1 % by model" + (
            "; the mean where several runs share a value" if long["runs"].gt(1).any() else ""
        )
        comparison.views.append(TableView(f"Top-1 against {by}", wide, note))
    return comparison


def _describe(record: RunRecord) -> str:
    summary = record.summary
    return (
        f"{summary['model_kind']}, preset {summary.get('preset')}, {summary.get('status')} "
        f"after {summary['epochs_done']}/{summary['epochs']} epochs"
        + ("" if record.evaluation is None else f", evaluated ({record.evaluation.get('weights')} weights)")
    )
