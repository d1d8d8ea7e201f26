"""The tables of ``gsa profile``: the measured rows as pandas frames, and the summary a reader sees.

:func:`gsa_cli.bench.profile.profile` measures and returns rows (dataclasses, one per image size and
batch size) and, for ``--detail``, the MACs per module and per operator; this module turns them into
frames. The frames keep every column for the CSV and JSON files; :func:`summary_frame` picks the
columns worth reading, under readable headers, and lifts what every row shares into a caption.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pandas as pd

from gsa_cli.report.tables import caption, format_value, split_constant, view

# What the terminal and Markdown views show, under which headers; the files keep every column.
SUMMARY_HEADERS = {
    "model": "model",
    "img_size": "px",
    "batch": "batch",
    "params": "params",
    "gmacs": "GMACs",
    "gmacs_products": "of which products",
    "g_elementwise": "G elementwise",
    "gmacs_spatial": "spatial-op GMACs",
    "infer_img_s": "infer img/s",
    "infer_latency": "infer ms (IQR)",
    "infer_peak_mib": "infer peak MiB",
    "infer_process_mib": "infer process MiB",
    "infer_baseline_mib": "infer baseline MiB",
    "infer_tflops": "infer TFLOP/s",
    "infer_peak_pct": "infer % peak",
    "infer_cpu_wait_pct": "infer CPU wait %",
    "train_img_s": "train img/s",
    "train_latency": "train ms (IQR)",
    "train_peak_mib": "train peak MiB",
    "train_process_mib": "train process MiB",
    "train_baseline_mib": "train baseline MiB",
    "train_tflops": "train TFLOP/s",
    "train_peak_pct": "train % peak",
    "train_cpu_wait_pct": "train CPU wait %",
    "status": "status",
}
# On a terminal: always the key columns (those present), then others as the width allows, in order.
SUMMARY_KEY = tuple(
    SUMMARY_HEADERS[column]
    for column in (
        "model", "img_size", "batch", "params", "gmacs", "infer_img_s", "train_img_s", "infer_peak_mib",
        "train_peak_mib",
    )
)  # fmt: skip
SUMMARY_EXTRA = tuple(
    SUMMARY_HEADERS[column]
    for column in (
        "status", "infer_latency", "train_latency", "gmacs_spatial", "infer_tflops", "train_tflops",
        "infer_peak_pct", "train_peak_pct", "infer_process_mib", "train_process_mib", "gmacs_products",
    )
)  # fmt: skip
# Held fixed in a profile: shown once, in the caption, when every row has the same value.
CONTEXT_COLUMNS = (
    "preset",
    "model",
    "device",
    "torch",
    "precision",
    "layout",
    "compile",
    "counter",
    "warmup",
    "iters",
    "memory",
    "dense_peak_tflops",
    "peak_math",
    "uncounted",
    "status",
)
# The breakdowns of --detail: a share's field and the column it shows under.
MODULE_COLUMNS = {"module": "module", "params": "params", "gmacs": "gmacs", "share_pct": "share_pct"}
OPERATOR_COLUMNS = {"operator": "operator", "kind": "kind", "g": "G", "share_pct": "share of GMACs %"}


def rows_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """Dataclass rows (:class:`gsa_cli.bench.profile.ProfileRow`) as a frame, one column per field."""
    if not rows:
        return pd.DataFrame()
    columns = [field.name for field in dataclasses.fields(rows[0])]
    return pd.DataFrame([dataclasses.asdict(row) for row in rows], columns=columns)


def latency_text(frame: pd.DataFrame, mode: str) -> list[str | None]:
    """``median (IQR)`` of a mode's (``infer``, ``train``) latency per batch, one per row."""
    pairs = zip(frame[f"{mode}_ms"], frame[f"{mode}_ms_iqr"], strict=True)
    return [
        None if pd.isna(ms) else f"{format_value(float(ms))} ({format_value(float(iqr))})"
        for ms, iqr in pairs
    ]


def summary_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The columns worth reading from :func:`rows_frame`, and a caption of what every row shares.

    Latency shows as ``median (IQR)``; columns empty in every row (a mode not timed, a peak not known)
    are dropped.
    """
    frame = frame.copy()
    for mode in ("infer", "train"):
        frame[f"{mode}_latency"] = latency_text(frame, mode)
    frame = frame.dropna(axis="columns", how="all")
    frame, constant = split_constant(frame, [c for c in CONTEXT_COLUMNS if c != "model" or len(frame) > 1])
    constant = {k: v for k, v in constant.items() if v not in (None, "") and v == v}
    return view(frame, SUMMARY_HEADERS), caption(constant)


def _shares_frame(shares: Sequence[Any], columns: dict[str, str]) -> pd.DataFrame:
    records = [dataclasses.asdict(share) for share in shares]
    return pd.DataFrame(records, columns=list(columns)).rename(columns=columns)


def module_frame(shares: Sequence[Any]) -> pd.DataFrame:
    """Per-module parameters, GMACs and share of the total (:func:`gsa_cli.bench.breakdown.module_shares`)."""
    return _shares_frame(shares, MODULE_COLUMNS)


def operator_frame(shares: Sequence[Any]) -> pd.DataFrame:
    """Per-operator counts and kinds (:func:`gsa_cli.bench.breakdown.operator_shares`)."""
    return _shares_frame(shares, OPERATOR_COLUMNS)
