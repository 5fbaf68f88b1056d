"""``keevx batch``: run an input file through ``client.batch``, journaled, resumable.

Requests stream from the input (`read_input`) into
[`AsyncKeevx.batch`][keevx_async.AsyncKeevx.batch] with a journal, so running the same
command again resumes instead of paying twice. Each finished task is appended to ``--out``
as one JSON line at once; invalid lines are appended too (``status: "INVALID"``). The
first Ctrl-C stops reading, lets the submits in flight finish (the journal records them)
and ends the run with exit code 130; a second one quits at once.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import anyio
import attrs
from rich.console import Console
from rich.live import Live

from .._exceptions import (
    AuthenticationError,
    KeevxError,
    TaskFailedError,
    TransportError,
    UnknownOutcomeError,
)
from .._kinds import VideoRequest
from ._display import Progress, summary
from ._inputs import InputError, InvalidLine, Line, count_lines, read_input

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from .._client import AsyncKeevx
    from .._kinds import AnyRequest
    from .._task import Task

__all__ = ["BatchOptions", "UserError", "run_batch"]

EXIT_INTERRUPTED: Final = 130
REFRESH: Final = 0.1
"""Seconds between redraws of the live display."""
PLAIN_EVERY: Final = 2.0
"""Seconds between progress lines when the output is not a terminal."""


class UserError(Exception):
    """A mistake of the user's (bad file, bad key, unreachable service): one line, exit 2."""


@attrs.frozen
class BatchOptions:
    """What ``keevx batch`` was asked to do."""

    input: Path
    out: Path | None = None
    download: Path | None = None
    journal: Path | None = None
    concurrency: int | None = None
    timeout: float | None = None
    resubmit_unknown: bool = False
    command: str = "keevx batch"


@attrs.frozen
class Screen:
    """Where a command writes: ``console`` (stdout), live or plain, quiet or not."""

    console: Console
    live: bool
    quiet: bool = False
    plain_every: float = PLAIN_EVERY


def _jsonable(value: object) -> object:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def request_fields(request: AnyRequest) -> dict[str, object]:
    """A request as JSON-ready fields (local files as their paths)."""
    return {
        field.name: _jsonable(getattr(request, field.name))
        for field in attrs.fields(type(request))
        if field.name != "custom_id"
    }


def describe_error(error: BaseException) -> str:
    """An error as one line: its type and message."""
    if isinstance(error, TaskFailedError):
        return f"{error.status}: {error.error_message or 'no error message'}"
    return f"{type(error).__name__}: {error}"


def task_record(task: Task[Any], line: int | None) -> dict[str, object]:
    """The ``--out`` line of one finished task."""
    request = task.request
    error = task.exception()
    url = path = None
    if error is None:
        result = task.result()
        url = result.url
        path = None if result.path is None else os.fspath(result.path)
        status = result.status
    elif isinstance(error, TaskFailedError):
        status = error.status
    elif isinstance(error, UnknownOutcomeError):
        status = "UNKNOWN"
    elif task.task_id is None:
        status = "NOT_SUBMITTED"
    else:
        status = "ERROR"
    return {
        "line": line,
        "custom_id": request.custom_id,
        "kind": "video" if isinstance(request, VideoRequest) else "image",
        "request": request_fields(request),
        "task_id": task.task_id,
        "status": status,
        "url": url,
        "error": None if error is None else describe_error(error),
        "path": path,
        "replayed": task.replayed,
    }


def invalid_record(line: InvalidLine) -> dict[str, object]:
    """The ``--out`` line of an input line that is not a valid request."""
    return {
        "line": line.number,
        "custom_id": None,
        "kind": None,
        "request": None,
        "task_id": None,
        "status": "INVALID",
        "url": None,
        "error": line.message if line.field is None else f"{line.field}: {line.message}",
        "path": None,
        "replayed": False,
    }


@attrs.define
class _Run:
    """The state shared by the parts of one batch run."""

    options: BatchOptions
    screen: Screen
    progress: Progress
    out: TextIO | None
    lines: array[int] = attrs.field(factory=lambda: array("Q"))
    stop: anyio.Event = attrs.field(factory=anyio.Event)
    fatal: BaseException | None = None

    def write(self, record: dict[str, object]) -> None:
        if self.out is not None:
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.out.flush()

    def invalid(self, line: InvalidLine) -> None:
        self.progress.invalid += 1
        self.write(invalid_record(line))
        if not self.screen.quiet:
            field = "" if line.field is None else f" ({line.field})"
            self.screen.console.print(
                f"line {line.number}{field}: {line.message}; skipped",
                style="yellow",
                highlight=False,
                soft_wrap=True,
            )

    async def requests(self, lines: Iterator[Line | InvalidLine]) -> AsyncIterator[AnyRequest]:
        """The valid requests of the input, until it ends or the run is stopped."""
        for item in lines:
            if self.stop.is_set():
                return
            self.progress.read += 1
            if isinstance(item, InvalidLine):
                self.invalid(item)
                continue
            self.lines.append(item.number)
            yield item.request
            # Let the display and the signal handler run between lines.
            await anyio.lowlevel.checkpoint()


async def _watch_signals(run: _Run) -> None:
    """The first Ctrl-C stops the run cleanly (see `_stop_when_quiet`); the second quits."""
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            if run.stop.is_set():  # pragma: no cover - the process ends here (test_cli.py)
                if run.out is not None:
                    run.out.flush()
                # At once, as asked: the journal (SQLite, WAL) is safe against this.
                os._exit(EXIT_INTERRUPTED)
            run.stop.set()
            run.progress.stopping = True


def _count(progress: Progress, client: AsyncKeevx, batch: Any) -> None:
    """Copy the batch's and the client's live counters into ``progress``."""
    progress.submitted = batch.submitted
    progress.running = batch.in_flight
    progress.downloaded = batch.saved
    progress.replayed = batch.replayed
    progress.saw_rate_limited(client.stats.rate_limited)


async def _display(run: _Run, client: AsyncKeevx, batch: Any) -> None:
    progress = run.progress
    screen = run.screen
    refresh = functools.partial(_count, progress, client, batch)

    if screen.quiet:
        while True:
            refresh()
            await anyio.sleep(REFRESH)
    if not screen.live:
        next_line = anyio.current_time() + screen.plain_every
        while True:
            refresh()
            if anyio.current_time() >= next_line:
                screen.console.print(progress.line(), highlight=False, soft_wrap=True)
                next_line += screen.plain_every
            await anyio.sleep(REFRESH)
    with Live(
        progress.render(), console=screen.console, auto_refresh=False, transient=False
    ) as live:
        try:
            while True:
                refresh()
                live.update(progress.render(), refresh=True)
                await anyio.sleep(REFRESH)
        finally:
            refresh()
            live.update(progress.render(), refresh=True)


def _abort_on(task: Task[Any], batch: Any) -> BaseException | None:
    """An error that means the whole run cannot work (bad key, no service), else None."""
    error = task.exception()
    if isinstance(error, AuthenticationError):
        return UserError(
            f"the service refused the API key ({error.status_code}): check KEEVX_API_KEY"
        )
    if isinstance(error, TransportError) and batch.submitted == 0 and task.task_id is None:
        return UserError(f"cannot reach the service: {error}; check --base-url and the network")
    return None


async def run_batch(client: AsyncKeevx, options: BatchOptions, screen: Screen) -> int:
    """Run ``options.input`` through ``client.batch``; the exit code.

    Returns:
        0 when every task succeeded, 1 when a task failed or a line was invalid, 130
        when stopped by Ctrl-C.

    Raises:
        UserError: the input cannot be read, the key is refused, the service unreachable,
            or the journal is in use.
    """
    try:
        lines = read_input(options.input)
        first = next(lines, None)
        total = count_lines(options.input)
    except (InputError, OSError) as error:
        raise UserError(str(error)) from None
    out = None
    if options.out is not None:
        try:
            options.out.parent.mkdir(parents=True, exist_ok=True)
            out = options.out.open("a", encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot write --out {options.out}: {error.strerror}") from None
    run = _Run(options=options, screen=screen, progress=Progress(total=total), out=out)

    def chained() -> Iterator[Line | InvalidLine]:
        if first is not None:
            yield first
        yield from lines

    try:
        code = await _run(client, run, chained())
    finally:
        if out is not None:
            out.close()
    resume = None
    if code == EXIT_INTERRUPTED:
        resume = "stopped: run the same command again to resume" + (
            "" if options.journal is not None else " (no journal: it starts over)"
        )
    elif run.progress.failed and options.journal is not None:
        resume = f"failed tasks are final; the journal {options.journal} keeps this run"
    summary(
        screen.console,
        run.progress,
        paths={"results": options.out, "downloads": options.download, "journal": options.journal},
        resume=resume,
    )
    return code


async def _run(client: AsyncKeevx, run: _Run, lines: Iterator[Line | InvalidLine]) -> int:
    options = run.options
    progress = run.progress
    try:
        async with (
            client.batch(
                run.requests(lines),
                concurrency=options.concurrency,
                timeout=options.timeout,
                download_to=options.download,
                journal=options.journal,
                resubmit_unknown=options.resubmit_unknown,
            ) as batch,
            anyio.create_task_group() as helpers,
        ):
            helpers.start_soon(_display, run, client, batch)
            # Signal handlers belong to the main thread (main() may run in another).
            if threading.current_thread() is threading.main_thread():
                helpers.start_soon(_watch_signals, run)
            with anyio.CancelScope() as consuming:
                helpers.start_soon(_stop_when_quiet, run, batch, consuming)
                async for task in batch:
                    line = None if task.position is None else run.lines[task.position]
                    abort = _abort_on(task, batch)
                    if abort is not None:
                        run.fatal = abort
                        break
                    error = task.exception()
                    progress.finished(None if error is None else describe_error(error))
                    run.write(task_record(task, line))
            helpers.cancel_scope.cancel()
        _count(progress, client, batch)
    except KeevxError as error:
        raise UserError(describe_error(error)) from None
    if run.fatal is not None:
        raise run.fatal
    if run.stop.is_set():
        return EXIT_INTERRUPTED
    return 1 if progress.failed or progress.invalid else 0


async def _stop_when_quiet(run: _Run, batch: Any, consuming: anyio.CancelScope) -> None:
    """After the first Ctrl-C: once no submit is under way, stop waiting for results."""
    await run.stop.wait()
    # The batch signals no event when its submits drain: poll its gauge.
    while batch.submitting:  # noqa: ASYNC110
        await anyio.sleep(REFRESH)
    consuming.cancel()
