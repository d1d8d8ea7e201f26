"""What the ``gsa`` commands print and write: rich tables on a terminal, CSV, JSON or Markdown text on a
pipe, and the files of ``--out``.

The frames come from :mod:`gsa_cli.report`; this module only chooses where and how they show. A table
on a terminal fits its width: the key columns and as many others as fit, never a cut cell
(:func:`gsa_cli.report.tables.fit`); ``--wide`` shows every column, and so does a table sent down a pipe
or into a log (each header on one line). Progress shows as a spinner on a terminal and as plain lines
on stderr elsewhere. The
profile's breakdowns import the torch side (:mod:`gsa_cli.bench.breakdown`) when asked for, after a
profile has loaded torch anyway. pandas and the report modules are imported when a table is shown, so
that ``gsa --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from gsa_cli.choices import OutputFormat
from gsa_cli.cli.progress import PlainStatus

if TYPE_CHECKING:
    import pandas as pd

    from gsa_cli.bench.params import PresetSummary
    from gsa_cli.bench.profile import ProfileResult
    from gsa_cli.report.compare import Comparison
    from gsa_cli.results import EvalReport, RunSummary
    from gsa_cli.train.export import ExportReport
    from gsa_cli.train.warmstart import WarmStart

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
    """Progress on stderr: a spinner whose line each call replaces on a terminal; elsewhere (a pipe, a
    log, a batch job) one plain line per call, with the seconds since the start (shown literally)."""
    if not error_console.is_terminal:
        yield PlainStatus(error_console, text)
        return
    with error_console.status(Text(text)) as shown:
        yield lambda line: shown.update(Text(line))


def _console_for(width: int) -> Console:
    """Our console where it is ``width`` wide, else one as wide on the same output: a table is never cut
    to fit (a terminal wraps the long lines of ``--wide``)."""
    if width <= console.width:
        return console
    return Console(
        file=console.file,
        width=width,
        force_terminal=console.is_terminal,
        color_system=console.color_system,  # type: ignore[arg-type]  # its name, or None for none
        no_color=console.no_color,
    )


def show_table(
    frame: pd.DataFrame,
    *,
    title: str | None = None,
    caption: str = "",
    key: Sequence[str] = (),
    extra: Sequence[str] = (),
    wrap: Sequence[str] = (),
    wide: bool = False,
) -> None:
    """A table on stdout, then its caption and what it left out.

    On a terminal: the ``key`` columns and those of the others that fit its width, in the order of
    ``extra`` (all of them with ``wide``); the ``wrap`` columns (prose) wrap at their spaces. Elsewhere:
    every column, each header and cell on one line.
    """
    from gsa_cli.report import tables

    hidden: list[str] = []
    if console.is_terminal:
        if not wide:
            frame, hidden = tables.fit(frame, console.width, key=key, extra=extra, wrap=wrap)
        width = max(console.width, tables.needed_width(frame, wrap))
        shown = tables.rich_table(frame, title=title, width=width, wrap=wrap)
    else:
        width = tables.natural_width(frame)
        shown = tables.rich_table(frame, title=title)
    screen = _console_for(width)
    screen.print(shown)
    notes = [caption] if caption else []
    if hidden:
        notes.append(f"{len(hidden)} more with --wide: {', '.join(hidden)}")
    for note in notes:
        screen.print(Text(note), highlight=False, soft_wrap=not console.is_terminal)


def presets(rows: Iterable[PresetSummary]) -> None:
    """The table of ``gsa presets``: every column; the descriptions wrap to the terminal's width."""
    import pandas as pd

    columns = ("preset", "data set", "px", "conv params", "gsa params", "description")
    records = [
        (row.name, row.dataset, row.img_size, row.conv_params, row.gsa_params, row.description)
        for row in rows
    ]
    show_table(
        pd.DataFrame(records, columns=list(columns)),
        title="Presets",
        caption="Parameter counts are computed from the models the presets build (all parameters).",
        wrap=("description",),
    )


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


def warm_start(report: WarmStart) -> None:
    """The table of what a warm start (``gsa train --init``) loaded and what it did not, and its notes."""
    table = Table(title=Text(f"warm start from {report.source}"))
    table.add_column("tensors")
    table.add_column("count", justify="right")
    table.add_column("modules (block numbers as *)")
    for what, count, groups in report.rows():
        table.add_row(Text(what), f"{count:,}", Text(", ".join(groups) or "-"))
    console.print(table)
    for note in report.notes:
        console.print(Text(note), highlight=False, soft_wrap=True)


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


def export_report(report: ExportReport) -> None:
    """The check of ``gsa export`` (the exported program against eager, per batch), and what was written."""
    source = f"{report.checkpoint}, epoch {report.epoch}, {report.weights} weights"
    table = Table(title=Text(f"{report.path} ({report.format.value}; {source})"))
    for column in ("batch", "max |exported - eager|", "max |eager|", "allowed", "check"):
        table.add_column(column, justify="right")
    for check in report.checks:
        cells = (f"{check.batch}", f"{check.max_diff:.3g}", f"{check.max_eager:.3g}", f"{check.limit:.3g}")
        table.add_row(*cells, "ok" if check.ok else "failed")
    console.print(table)
    shape = " x ".join(str(size) for size in report.input_shape)
    opset = "" if report.opset is None else f", opset {report.opset}"
    console.print(
        Text(
            f"input {shape} (any batch){opset}, {report.size_bytes / 2**20:.1f} MiB; allowed: "
            f"{report.tolerance:g} of the largest logit (at least 1)"
        )
    )


def profile(
    result: ProfileResult, *, preset: str, fmt: OutputFormat, out: Path | None, wide: bool = False
) -> None:
    """A profile's rows: every column to a CSV or JSON file or pipe, the readable summary elsewhere."""
    from gsa_cli.report import tables
    from gsa_cli.report.profile import SUMMARY_EXTRA, SUMMARY_KEY, rows_frame, summary_frame

    frame = rows_frame(result.rows)
    summary, caption = summary_frame(frame)
    if out is not None:
        as_file = tables.format_for_path(out)
        tables.write(summary if as_file is OutputFormat.MD else frame, out, caption=caption)
        error_console.print(Text(f"wrote {out}"))
    if fmt is OutputFormat.TABLE:
        title = f"gsa profile: {preset}"
        show_table(summary, title=title, caption=caption, key=SUMMARY_KEY, extra=SUMMARY_EXTRA, wide=wide)
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
            show_table(modules, title=f"MACs by module: {title}")
            show_table(operators, title=f"Counts by operator: {title}")
        elif fmt is OutputFormat.MD:
            sys.stdout.write(f"\n### MACs by module: {title}\n\n" + tables.markdown(modules))
            sys.stdout.write(f"\n### Counts by operator: {title}\n\n" + tables.markdown(operators))
        else:
            error_console.print("--detail shows with --format table or md")
            break


def comparison(result: Comparison, *, fmt: OutputFormat, out: Path | None, wide: bool = False) -> None:
    """A comparison's files (``--out DIR``), then its tables: rich, Markdown, or every column as text."""
    from gsa_cli.report import tables
    from gsa_cli.report.files import write_report

    if out is not None:
        written = write_report(result, out)
        error_console.print(Text(f"wrote {', '.join(path.name for path in written)} to {out}"))
    if fmt is OutputFormat.TABLE:
        for number, view in enumerate(result.views):
            title = result.title if number == 0 else view.heading
            show_table(
                view.frame, title=title, caption=view.caption, key=view.key, extra=view.extra, wide=wide
            )
    elif fmt is OutputFormat.MD:
        for view in result.views:
            sys.stdout.write(f"\n### {view.heading}\n\n" + tables.markdown(view.frame, caption=view.caption))
    else:
        sys.stdout.write(tables.to_text(result.frame, fmt))
