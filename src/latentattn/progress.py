"""Progress of work with a known total: a live bar on a terminal, plain periodic lines elsewhere.

rich redraws one bar in place on a terminal; when stderr is a file or a pipe (CI logs, `2> log`,
nohup) it would print only the final state. `StepProgress` then prints a plain line instead whenever
another tenth of the work is done, or `interval` seconds have passed since the last line:

    train 35/350  loss 5.912  4,812 tok/s  0:00:58 left
"""

from __future__ import annotations

import time
from datetime import timedelta
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LINES_PER_RUN = 10


class StepProgress:
    """`with StepProgress(console, "train", total) as bar: bar.update(done, "loss 5.912")`; `bar.print`
    writes a message above the bar (or as its own line)."""

    def __init__(
        self, console: Console, label: str, total: int, *, completed: int = 0, interval: float = 30.0
    ) -> None:
        self.console, self.label, self.total, self.interval = console, label, total, interval
        self._live = console.is_terminal
        self._bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._bar.add_task("", total=total, completed=completed) if self._live else None
        self._start, self._first = time.monotonic(), completed
        self._last_line, self._last_tenth = self._start, completed * LINES_PER_RUN // max(1, total)

    def __enter__(self) -> StepProgress:
        if self._live:
            self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._live:
            self._bar.stop()

    def update(self, completed: int, detail: str = "") -> None:
        """`completed` of `total` done; `detail` is shown after the count."""
        if self._live:
            self._bar.update(self._task, completed=completed, description=detail)
            return
        now = time.monotonic()
        tenth = completed * LINES_PER_RUN // max(1, self.total)
        if tenth > self._last_tenth or now - self._last_line >= self.interval or completed == self.total:
            self._last_tenth, self._last_line = tenth, now
            self.console.print(self._line(completed, detail, now), soft_wrap=True, highlight=False)

    def _line(self, completed: int, detail: str, now: float) -> str:
        done = completed - self._first
        left = ""
        if done > 0 and completed < self.total:
            seconds = (now - self._start) / done * (self.total - completed)
            left = f"  {timedelta(seconds=round(seconds))} left"
        return f"{self.label} {completed}/{self.total}  {detail}{left}".rstrip()

    def print(self, text: str) -> None:
        """A message line: above the live bar, or between the plain lines."""
        self.console.print(text, soft_wrap=True, highlight=False)
