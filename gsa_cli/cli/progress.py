"""Showing progress: a run's rich progress bar on a terminal, plain log lines elsewhere; and the plain
lines that stand in for ``gsa profile``'s and ``gsa compare``'s spinner off a terminal."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from gsa_cli.results import EpochMetrics

PLAIN_EVERY_S = 30.0  # seconds between log lines within an epoch


def _stats_text(stats: dict[str, float]) -> str:
    if not stats:
        return ""
    return (
        f"loss {stats['loss']:.4f}  acc {stats['top1']:.2f}%  lr {stats['lr']:.3g}  "
        f"{stats['images_per_s']:,.0f} img/s"
    )


def epoch_line(row: EpochMetrics, epochs: int, best: bool) -> str:
    return (
        f"epoch {row.epoch}/{epochs}  train loss {row.train_loss:.4f} acc {row.train_top1:.2f}%  "
        f"val loss {row.val_loss:.4f} top-1 {row.val_top1:.2f}% top-5 {row.val_top5:.2f}%  "
        f"lr {row.lr:.3g}  {row.images_per_s:,.0f} img/s  {row.epoch_time_s:.1f} s" + ("  *" if best else "")
    )


class RichReporter:
    """A transient progress bar per epoch and phase, and one kept line per finished epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task = 0

    def start(self, phase: str, epoch: int, total: int, done: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(f"epoch {epoch} {phase}", total=total, completed=done, stats="")

    def update(self, done: int, stats: dict[str, float]) -> None:
        if self.progress is not None:
            fields = {"stats": _stats_text(stats)} if stats else {}
            self.progress.update(self.task, completed=done, **fields)  # type: ignore[arg-type]

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def message(self, text: str) -> None:
        self.console.print(Text(text), highlight=False, soft_wrap=True)  # a path with [brackets] too

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None:
        self.console.print(Text(epoch_line(row, epochs, best)), highlight=False, soft_wrap=True)


class PlainReporter:
    """Log lines: one per finished epoch, and one every ``PLAIN_EVERY_S`` seconds within an epoch."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.label = ""
        self.total = 0
        self.last_line = 0.0

    def start(self, phase: str, epoch: int, total: int, done: int) -> None:
        self.label, self.total = f"epoch {epoch} {phase}", total
        self.last_line = time.monotonic()

    def update(self, done: int, stats: dict[str, float]) -> None:
        now = time.monotonic()
        if stats and now - self.last_line >= PLAIN_EVERY_S:
            self.last_line = now
            line = Text(f"{self.label} {done}/{self.total}  {_stats_text(stats)}")
            self.console.print(line, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        pass

    def message(self, text: str) -> None:
        self.console.print(Text(text), highlight=False, soft_wrap=True)  # a path with [brackets] too

    def epoch_end(self, row: EpochMetrics, epochs: int, best: bool) -> None:
        self.console.print(Text(epoch_line(row, epochs, best)), highlight=False, soft_wrap=True)


class PlainStatus:
    """The progress of ``gsa profile`` and ``gsa compare`` where there is no terminal for a spinner: one
    line per step on the console (stderr), with the seconds since the start, so that a log shows what
    the minutes went on. Called with each step's line, as the spinner's update is."""

    def __init__(self, console: Console, label: str) -> None:
        self.console = console
        self.label = label
        self.began = time.monotonic()

    def __call__(self, line: str) -> None:
        elapsed = time.monotonic() - self.began
        text = Text(f"{self.label}: {line} [{elapsed:,.0f} s]")
        self.console.print(text, highlight=False, soft_wrap=True)


def reporter_for(console: Console) -> RichReporter | PlainReporter:
    """A progress bar on a terminal, log lines elsewhere (a pipe, a log file, a batch job)."""
    return RichReporter(console) if console.is_terminal else PlainReporter(console)
