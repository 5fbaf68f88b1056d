"""The live view of ``keevx batch``: a rich panel on a terminal, plain lines otherwise.

`Progress` holds the counts of a run (the batch's live counters, the tasks seen, the
client's 429 count); `Progress.render` draws them, `Progress.line` gives the same as one
plain line for logs and pipes, and `summary` is the table printed at the end.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import attrs
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

__all__ = ["Progress", "summary"]

PAUSE_SHOWN_FOR: Final = 2.0
"""Seconds the "paused" state stays visible after the client counted a 429."""
TOP_ERRORS: Final = 10


@attrs.define
class Progress:
    """The counts of one run, as the display shows them.

    The run updates ``read``, ``submitted``, ``running``, ``downloaded`` and
    ``rate_limited`` from the batch and the client, and calls `finished` per task.
    """

    total: int | None = None
    clock: Callable[[], float] = time.monotonic
    read: int = 0
    invalid: int = 0
    submitted: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    downloaded: int = 0
    replayed: int = 0
    rate_limited: int = 0
    stopping: bool = False
    errors: Counter[str] = attrs.field(factory=Counter)
    started: float = attrs.field(init=False)
    _last_429_count: int = attrs.field(init=False, default=0)
    _last_429_at: float = attrs.field(init=False, default=-1e9)

    def __attrs_post_init__(self) -> None:
        self.started = self._now()

    def _now(self) -> float:
        return self.clock()

    def finished(self, error: str | None) -> None:
        """Count one finished task; ``error`` is its error's one-line description."""
        if error is None:
            self.succeeded += 1
        else:
            self.failed += 1
            self.errors[error] += 1

    def saw_rate_limited(self, count: int) -> None:
        """The client's 429 count now (``client.stats.rate_limited``)."""
        if count > self._last_429_count:
            self._last_429_count = count
            self._last_429_at = self._now()
        self.rate_limited = count

    @property
    def paused(self) -> bool:
        """Whether a 429 came in the last `PAUSE_SHOWN_FOR` seconds."""
        return self._now() - self._last_429_at < PAUSE_SHOWN_FOR

    @property
    def elapsed(self) -> float:
        """Seconds since the run started."""
        return self._now() - self.started

    @property
    def rate(self) -> float:
        """Tasks finished per second so far."""
        elapsed = self.elapsed
        return (self.succeeded + self.failed) / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, from the rate requests were read at; None when unknown."""
        if self.total is None or self.read == 0 or self.elapsed <= 0:
            return None
        left = max(0, self.total - self.read) + self.running
        per_request = self.elapsed / max(1, self.read - self.running)
        return left * per_request

    def state(self) -> str:
        """What the run is doing, in a few words."""
        if self.stopping:
            return "stopping: finishing the submits in flight (Ctrl-C again to quit now)"
        if self.paused:
            return "paused: rate limited (429)"
        return "running"

    def _eta_text(self) -> str:
        eta = self.eta
        return "-" if eta is None else _duration(eta)

    def line(self) -> str:
        """The counts as one plain line (for output that is not a terminal)."""
        total = "" if self.total is None else f"/{self.total}"
        return (
            f"progress: read {self.read}{total} | invalid {self.invalid} | "
            f"submitted {self.submitted} | running {self.running} | "
            f"succeeded {self.succeeded} | failed {self.failed} | "
            f"downloaded {self.downloaded} | {self.rate:.1f}/s | eta {self._eta_text()} | "
            f"{self.state()}"
        )

    def render(self) -> Table:
        """The counts as a rich table, redrawn in place on a terminal."""
        table = Table.grid(padding=(0, 2))
        for _ in range(4):
            table.add_column()
        total = "?" if self.total is None else str(self.total)
        table.add_row(
            "read", f"{self.read}/{total}", "invalid", Text(str(self.invalid), style="yellow")
        )
        table.add_row("submitted", str(self.submitted), "running", str(self.running))
        table.add_row(
            "succeeded",
            Text(str(self.succeeded), style="green"),
            "failed",
            Text(str(self.failed), style="red"),
        )
        table.add_row("downloaded", str(self.downloaded), "replayed", str(self.replayed))
        table.add_row("rate", f"{self.rate:.1f} tasks/s", "eta", self._eta_text())
        style = "bold yellow" if self.paused or self.stopping else "cyan"
        table.add_row("state", Text(self.state(), style=style), "elapsed", _duration(self.elapsed))
        return table


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def summary(
    console: Console,
    progress: Progress,
    *,
    paths: dict[str, Path | None],
    resume: str | None,
) -> None:
    """Print the end-of-run table: counts, failures grouped by error, paths, how to resume."""
    counts = Table(title="keevx batch", show_header=False)
    counts.add_column()
    counts.add_column(justify="right")
    for name, value in (
        ("lines read", progress.read),
        ("invalid lines (skipped)", progress.invalid),
        ("tasks succeeded", progress.succeeded),
        ("tasks failed", progress.failed),
        ("from the journal (replayed)", progress.replayed),
        ("files downloaded", progress.downloaded),
        ("429 pauses", progress.rate_limited),
    ):
        counts.add_row(name, str(value))
    counts.add_row("elapsed", _duration(progress.elapsed))
    console.print(counts)
    if progress.errors:
        failures = Table(title="failures by error")
        failures.add_column("tasks", justify="right")
        failures.add_column("error")
        for error, count in progress.errors.most_common(TOP_ERRORS):
            failures.add_row(str(count), error)
        others = len(progress.errors) - TOP_ERRORS
        if others > 0:
            failures.add_row("", f"... and {others} other errors (see the results file)")
        console.print(failures)
    for name, path in paths.items():
        if path is not None:
            console.print(f"{name}: {path}", highlight=False, soft_wrap=True)
    if resume is not None:
        console.print(resume, highlight=False, soft_wrap=True)
