"""The files of a comparison: ``compare.csv``, ``compare.json``, the PNG plots and ``compare.md``.

The CSV and JSON files hold every column of every row; the Markdown report holds the settings, the
readable tables and the plots, embedded by file name so that the folder can be moved or published
whole. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from gsa_cli.errors import ConfigError
from gsa_cli.report import plots, tables
from gsa_cli.report.compare import ACCURACY_COLUMNS, Comparison

REPORT = "compare.md"


def write_report(comparison: Comparison, out: Path) -> list[Path]:
    """Write ``compare.csv``, ``compare.json``, the PNG plots and ``compare.md`` (which embeds them).

    Returns:
        The paths written, the report last.

    Raises:
        ConfigError: if ``out`` cannot be written.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    written = [
        tables.write(comparison.frame, out / "compare.csv"),
        tables.write(comparison.frame, out / "compare.json"),
    ]
    figures: list[tuple[str, Path]] = []
    if comparison.scaling is not None:
        figures.append(
            (
                "GMACs, throughput and memory against resolution (log-log)",
                plots.scaling(comparison.scaling, out / "scaling.png"),
            )
        )
    if comparison.curves:
        label = f"{comparison.accuracy.value} top-1"
        column = ACCURACY_COLUMNS[comparison.accuracy]
        figures.append(
            (
                "Top-1 against cost",
                plots.accuracy_vs_cost(comparison.frame, column, label, out / "accuracy_vs_cost.png"),
            )
        )
        kinds = dict(zip(comparison.frame["run"], comparison.frame["model"], strict=True))
        figures.append(
            ("Learning curves", plots.learning_curves(comparison.curves, kinds, out / "learning_curves.png"))
        )
    if comparison.by is not None:
        key, long = comparison.by
        name = f"top1_by_{key.replace('.', '_')}.png"
        figures.append(
            (
                f"Top-1 against {key}",
                plots.by_key(long, key, f"{comparison.accuracy.value} top-1", out / name),
            )
        )
    written += [path for _, path in figures]
    written.append(_write_markdown(comparison, figures, out / REPORT))
    return written


def _write_markdown(comparison: Comparison, figures: list[tuple[str, Path]], path: Path) -> Path:
    lines = [f"# {comparison.title}", "", "## Settings", ""]
    lines += [f"- {line}" for line in comparison.settings]
    for view in comparison.views:
        lines += [
            "",
            f"## {view.heading}",
            "",
            tables.markdown(view.frame, caption=view.caption if view.caption_in_report else None).rstrip(),
        ]
    for heading, figure in figures:
        lines += ["", f"## {heading}", "", f"![{heading}]({figure.name})"]
    lines += ["", "Every column of every row: `compare.csv` and `compare.json`.", ""]
    text = "\n".join(lines)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot write the report ({err.strerror})") from None
    return path
