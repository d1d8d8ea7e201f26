"""What the ``gsa`` commands print and write: rich tables on a terminal, CSV, JSON or Markdown text on a
pipe, and the files of ``--out``.

The frames come from :mod:`gsa_cli.report`; this module only chooses where and how they show. The
profile's breakdowns import the torch side (:mod:`gsa_cli.bench.breakdown`) when asked for, after a
profile has loaded torch anyway. pandas and the report modules are imported when a table is shown, so
that ``gsa --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from gsa_cli.choices import OutputFormat

if TYPE_CHECKING:
    from gsa_cli.bench.params import PresetSummary
    from gsa_cli.bench.profile import ProfileResult
    from gsa_cli.report.compare import Comparison
    from gsa_cli.results import EvalReport, RunSummary

console = Console()
error_console = Console(stderr=True)

# Every string that reaches a console here is a rich Text, never markup: paths, preset names and
# messages are shown exactly as they are ("[/x]" or "[bold]" in a folder name included).
NOTICE_STYLES = {"error": "bold red", "warning": "yellow"}


def notice(label: str, text: str) -> None:
    """One ``label: text`` line on stderr (``error``, ``warning``), the text shown literally."""
    line = Text.assemble((f"{label}:", NOTICE_STYLES.get(label, "")), " ", text)
    error_console.print(line, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def status(text: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr; yields a callable that replaces its line (shown literally)."""
    with error_console.status(Text(text)) as shown:
        yield lambda line: shown.update(Text(line))


def _wide(width: int) -> Console:
    """The console for a wide table: a terminal wraps it to its width, a pipe or a log file gets it whole."""
    return console if console.is_terminal else Console(width=width)


def presets(rows: Iterable[PresetSummary]) -> None:
    """The table of ``gsa presets``."""
    table = Table(title="Presets")
    for column in ("preset", "data set", "image", "conv params", "gsa params", "description"):
        table.add_column(column, justify="right" if column.endswith("params") else "left")
    for row in rows:
        cells = (row.name, row.dataset, f"{row.img_size} px", f"{row.conv_params:,}", f"{row.gsa_params:,}")
        table.add_row(*(Text(cell) for cell in (*cells, row.description)))
    console.print(table)
    console.print("Parameter counts are computed from the models the presets build (all parameters).")


def yaml_text(text: str) -> None:
    """YAML highlighted on a terminal, as it is on a pipe (so that it loads back)."""
    if console.is_terminal:
        console.print(Syntax(text, "yaml", background_color="default"))
    else:
        sys.stdout.write(text)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def run_summary(summary: RunSummary) -> None:
    """The one-row table a training run ends with."""
    table = Table(title=Text(f"{summary.preset} / {summary.model_kind}: {summary.run_dir}"))
    for column in ("best top-1", "at epoch", "final top-1", "final top-5", "parameters", "wall time"):
        table.add_column(column, justify="right")
    table.add_row(
        _percent(summary.best_top1),
        f"{summary.best_epoch}/{summary.epochs}",
        _percent(summary.final_top1),
        _percent(summary.final_top5),
        f"{summary.parameters:,}",
        f"{summary.wall_time_s:.1f} s",
    )
    console.print(table)


def eval_report(report: EvalReport) -> None:
    """The table of ``gsa eval``, and the line of how it was measured."""
    table = Table(title=Text(f"{report.checkpoint} (epoch {report.epoch}, {report.weights} weights)"))
    for column in ("top-1", "top-5", "loss", "images", "images/s", "recorded top-1"):
        table.add_column(column, justify="right")
    recorded = "-" if report.recorded_top1 is None else f"{report.recorded_top1:.2f}%"
    table.add_row(
        f"{report.top1:.2f}%",
        f"{report.top5:.2f}%",
        f"{report.loss:.4f}",
        f"{report.images:,}",
        f"{report.images_per_s:,.0f}",
        recorded,
    )
    console.print(table)
    console.print(Text(f"{report.device}, {report.precision}, batch {report.batch_size}"))


def profile(result: ProfileResult, *, preset: str, fmt: OutputFormat, out: Path | None) -> None:
    """A profile's rows: every column to a CSV or JSON file or pipe, the readable summary elsewhere."""
    from gsa_cli.report import tables
    from gsa_cli.report.profile import rows_frame, summary_frame

    frame = rows_frame(result.rows)
    summary, caption = summary_frame(frame)
    if out is not None:
        as_file = tables.format_for_path(out)
        tables.write(summary if as_file is OutputFormat.MD else frame, out, caption=caption)
        error_console.print(Text(f"wrote {out}"))
    if fmt is OutputFormat.TABLE:
        _wide(250).print(tables.rich_table(summary, title=f"gsa profile: {preset}", caption=caption))
    elif fmt is OutputFormat.MD:
        sys.stdout.write(tables.to_text(summary, fmt, caption=caption))
    else:
        sys.stdout.write(tables.to_text(frame, fmt))


def profile_detail(result: ProfileResult, *, kind: str, fmt: OutputFormat) -> None:
    """The MACs of each image size's model by module and by operator (``gsa profile --detail``)."""
    from gsa_cli.bench.breakdown import module_shares, operator_shares
    from gsa_cli.report import tables
    from gsa_cli.report.profile import module_frame, operator_frame

    for size, count in result.counts.items():
        title = f"{kind} at {size} px, batch 1 ({count.counter.value})"
        modules = module_frame(module_shares(count, result.module_params[size]))
        operators = operator_frame(operator_shares(count))
        if fmt is OutputFormat.TABLE:
            console.print(tables.rich_table(modules, title=f"MACs by module: {title}"))
            console.print(tables.rich_table(operators, title=f"Counts by operator: {title}"))
        elif fmt is OutputFormat.MD:
            sys.stdout.write(f"\n### MACs by module: {title}\n\n" + tables.markdown(modules))
            sys.stdout.write(f"\n### Counts by operator: {title}\n\n" + tables.markdown(operators))
        else:
            error_console.print("--detail shows with --format table or md")
            break


def comparison(result: Comparison, *, fmt: OutputFormat, out: Path | None) -> None:
    """A comparison's files (``--out DIR``), then its tables: rich, Markdown, or every column as text."""
    from gsa_cli.report import tables
    from gsa_cli.report.files import write_report

    if out is not None:
        written = write_report(result, out)
        error_console.print(Text(f"wrote {', '.join(path.name for path in written)} to {out}"))
    if fmt is OutputFormat.TABLE:
        screen = _wide(400)  # ratios make the table of kinds wide
        for number, view in enumerate(result.views):
            title = result.title if number == 0 else view.heading
            screen.print(tables.rich_table(view.frame, title=title, caption=view.caption or None))
    elif fmt is OutputFormat.MD:
        for view in result.views:
            sys.stdout.write(f"\n### {view.heading}\n\n" + tables.markdown(view.frame, caption=view.caption))
    else:
        sys.stdout.write(tables.to_text(result.frame, fmt))
