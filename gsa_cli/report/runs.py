"""Run directories read back for a comparison: each file checked before use, a value at a config key,
and labels for the runs (folder names for the files, short ones for the terminal's narrow columns).

Nothing here imports torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gsa_cli.errors import ConfigError, GsaError
from gsa_cli.results import CONFIG_FILE, EVAL_FILE, METRICS_FILE, SUMMARY_FILE, RunRecord, read_run


def config_value(record: RunRecord, key: str) -> Any:
    """The value at a dotted key (``data.distance``) of the run's resolved ``config.yaml``.

    Raises:
        ConfigError: naming the run and the key, when the config has no such key.
    """
    node: Any = record.config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"--by {key}: {record.path / CONFIG_FILE} has no such key (e.g. data.distance)")
        node = node[part]
    return node


# The values of summary.json and eval.json that a comparison computes with, by the type they must have.
WHOLE = ("epochs", "epochs_done", "parameters", "best_epoch", "world_size", "batch_size")
REAL = ("best_top1", "best_top5", "final_top1", "final_top5", "wall_time_s", "images_per_s")
TEXT = ("model_kind",)
EVAL_REAL = ("top1", "top5")


def read_checked(path: Path) -> RunRecord:
    """:func:`gsa_cli.results.read_run`, with each file's text and each value used here checked first.

    Raises:
        GsaError: naming the file and what is wrong: text that is not UTF-8, a value of the wrong type,
            an epoch that ``metrics.csv`` holds twice.
    """
    for name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, EVAL_FILE):
        file = path / name
        if not file.is_file():
            continue  # read_run names a missing file
        try:
            file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise GsaError(f"{file}: not UTF-8 text (byte {err.start}); damaged, or not from gsa") from None
        except OSError as err:
            raise GsaError(f"{file}: unreadable ({err.strerror})") from None
    record = read_run(path)
    _check_types(path / SUMMARY_FILE, record.summary, whole=WHOLE, real=REAL, text=TEXT)
    if record.evaluation is not None:
        _check_types(path / EVAL_FILE, record.evaluation, whole=(), real=EVAL_REAL, text=())
    epochs = [row.epoch for row in record.metrics]
    for epoch in epochs:
        if epochs.count(epoch) > 1:
            raise GsaError(
                f"{path / METRICS_FILE}: epoch {epoch} appears {epochs.count(epoch)} times; each finished "
                "epoch must appear once (a damaged run: train it again, or delete the repeated rows)"
            )
    return record


def _check_types(
    file: Path, values: Mapping[str, Any], *, whole: Sequence[str], real: Sequence[str], text: Sequence[str]
) -> None:
    """Refuse a value of the wrong type (null stands for "not known" in every numeric field)."""
    for key, value in values.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        expected = None
        if key in whole and value is not None and not (number and isinstance(value, int)):
            expected = "a whole number"
        elif key in real and value is not None and not number:
            expected = "a number"
        elif key in text and not isinstance(value, str):
            expected = "a string"
        if expected is not None:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise GsaError(f"{file}: {key} is {shown}, expected {expected}; damaged, or not from gsa train")


def folder_labels(paths: Sequence[Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a folder name."""
    names = [path.name or str(path) for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths, strict=True)]


# The end of a default run folder's name (results.default_run_dir): -YYYYmmdd-HHMMSS, maybe -N.
STAMP = re.compile(r"-(?P<date>\d{8})-(?P<time>\d{6}(?:-\d+)?)$")


def _distinct(labels: Sequence[str]) -> bool:
    return all(labels) and len(set(labels)) == len(labels)


def _shortest_suffixes(paths: Sequence[Path]) -> list[str]:
    """The fewest trailing path parts that tell the runs apart (the folder name, where that does)."""
    parts = [path.parts or (str(path),) for path in paths]
    for count in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-count:]) for p in parts]
        if _distinct(labels):
            return labels
    return [str(path) for path in paths]


def compact_labels(paths: Sequence[Path]) -> list[str]:
    """Short, distinct labels for run directories, for the terminal's narrow columns.

    From the shortest distinct path suffix (the folder name), a default name's timestamp is dropped
    where the labels stay distinct (else its date, where that is shared), then the leading ``-`` words
    every label shares (the preset of ``runs/PRESET-MODEL-TIMESTAMP``, which the caption names). The
    files keep the folder names (``run``) and paths (``path``).
    """
    labels = _shortest_suffixes(paths)
    for pattern in (r"", r"-\g<time>"):
        shorter = [STAMP.sub(pattern, label) for label in labels]
        if _distinct(shorter):
            labels = shorter
            break
    words = [label.split("-") for label in labels]
    shared = 0
    while len(labels) > 1 and all(len(w) > shared + 1 and w[shared] == words[0][shared] for w in words):
        shared += 1
    shorter = ["-".join(w[shared:]) for w in words]
    return shorter if _distinct(shorter) else labels
