"""``python -m keevx_async demo``: the SDK end to end on this machine, no API key needed.

Everything runs on 127.0.0.1: [`FakeKeevx`][keevx_async.testing.FakeKeevx] serves the API on
one loopback port, the client's ``callback_app`` receives the callbacks on another, and
an [`AsyncKeevx`][keevx_async.AsyncKeevx] between them submits a batch of requests. The output
shows live progress, then every request with the task IDs it was given and each task's
result, so the mapping request -> task IDs -> result can be read off directly.

The run is reproducible per ``seed`` (prompts, image counts, which requests fail), apart
from timing. One scripted 429 at the start shows the client-wide pause and retry, and a few
callbacks the emulator never sends show the safety net: those tasks are looked up with the
GET endpoint after ``RECONCILE_AFTER`` seconds. With ``callbacks=False`` (``--no-callbacks``)
there is no receiver at all, as in a script on a laptop: every result comes by lookup. With
``download`` (``--download DIR``) every image is saved into that directory as it finishes,
fetched from the emulator's file host over loopback, and each task is reported once saved.
"""

from __future__ import annotations

import logging
import random
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import anyio
import attrs

from ._batch import Batch
from ._client import AsyncKeevx
from ._eventloop import running_on_asyncio
from ._exceptions import TaskFailedError
from ._models import ImageRequest
from ._task import Task
from .testing import FakeKeevx, serve_asgi

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from ._asgi import Message, Receive, Scope, Send

__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_REQUESTS", "DEFAULT_SEED", "build_requests", "run_demo"]

DEFAULT_REQUESTS: Final = 50
DEFAULT_SEED: Final = 7
DEFAULT_CONCURRENCY: Final = 8

FLAGGED_MARKER: Final = "[flagged]"
"""Prompts starting with this are refused by the emulated moderation: all their tasks fail."""
FLAGGED_SHARE: Final = 0.1
"""The share of requests that carry the marker."""
CALLBACK_PATH: Final = "/keevx/callback"
COMPLETE_AFTER: Final = (0.05, 0.6)
"""Seconds the emulated service takes to finish a task, drawn uniformly."""
RATE_LIMIT_PAUSE: Final = 0.2
"""The scripted 429's Retry-After, in seconds."""
LOST_RATE: Final = 0.04
"""The share of callbacks the emulated service never sends (looked up instead)."""
RECONCILE_AFTER: Final = 1.0
"""The demo client's ``reconcile_after``: short, so lost callbacks show up in the run."""
RECONCILE_PER_SECOND: Final = 200.0
"""The demo client's ``reconcile_per_second``."""
TASK_TIMEOUT: Final = 15.0
"""The most seconds a task may take after its submit reply before it is reported late."""
REFRESH_INTERVAL: Final = 0.1
"""Seconds between redraws of the live status line."""
PROGRESS_EVERY: Final = 10
"""On a non-terminal output, one progress line per this many finished tasks."""

_PROMPT_WIDTH: Final = 34
_TASK_ID_CHARS: Final = 12
_RULE_WIDTH: Final = 100
_SUBJECTS: Final = (
    "a red fox in fresh snow",
    "a lighthouse at dawn",
    "a tiny robot watering a bonsai",
    "an old tram in Lisbon",
    "a koi pond seen from above",
    "a desert city under two moons",
    "a cat reading a newspaper",
    "a paper boat on a rainy street",
    "a mountain cabin in autumn",
    "a jellyfish made of glass",
    "a market stall full of lemons",
    "a dragon asleep on a bookshelf",
)
_STYLES: Final = (
    "watercolor",
    "oil painting",
    "isometric 3D render",
    "35mm film photo",
    "ink sketch",
    "pixel art",
    "ukiyo-e woodblock print",
)
_RATIOS: Final = ("1:1", "3:2", "2:3", "9:16", "16:9")


def build_requests(count: int, seed: int) -> list[ImageRequest]:
    """The demo's requests: ``count`` varied prompts, 1..4 images each, seeded.

    About one request in ten (at least one, when there are two or more) starts with
    `FLAGGED_MARKER`, which the demo's emulated service refuses.
    """
    rng = random.Random(seed)
    flagged_count = max(1, round(count * FLAGGED_SHARE)) if count >= 2 else 0
    flagged = set(rng.sample(range(count), flagged_count))
    requests = []
    for position in range(count):
        prompt = f"{rng.choice(_SUBJECTS)}, {rng.choice(_STYLES)}"
        if position in flagged:
            prompt = f"{FLAGGED_MARKER} {prompt}"
        requests.append(
            ImageRequest(
                prompt,
                generate_count=rng.randint(1, 4),
                image_ratio=rng.choice(_RATIOS),
                image_quality=rng.choice(("1K", "2K")),
                module=rng.choice(("std", "std", "pro")),
            )
        )
    return requests


def _is_flagged(prompt: str) -> bool:
    return prompt.startswith(FLAGGED_MARKER)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


class _CallbackRoute:
    """An ASGI app serving ``callback_app`` at one path; the app is plugged in later.

    The receiver has to listen before the client exists (the client needs the receiver's
    URL), and the client's ``callback_app`` exists only once the client does.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.target: AsyncKeevx | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == self.path and self.target is not None:
            await self.target.callback_app(scope, receive, send)
            return
        start: Message = {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"application/json")],
        }
        await send(start)
        await send({"type": "http.response.body", "body": b'{"code":404,"msg":"not found"}'})


@attrs.define
class _Progress:
    """The live view: one redrawn status line on a terminal, else a line every few tasks."""

    out: TextIO
    live: bool
    total_requests: int
    total_tasks: int
    started: float
    batch: Batch | None = None
    done: int = 0
    failed: int = 0
    _line_open: bool = False

    def status(self) -> str:
        """The current counters as one line."""
        batch = self.batch
        assert batch is not None, "the batch is running"
        elapsed = anyio.current_time() - self.started
        return (
            f"read {batch.requests_read}/{self.total_requests} | submitted {batch.submitted} | "
            f"in flight {batch.in_flight} | done {self.done}/{self.total_tasks} | "
            f"failed {self.failed} | {elapsed:5.2f} s"
        )

    def redraw(self) -> None:
        """Rewrite the status line in place (for a terminal)."""
        self.out.write("\r\x1b[K" + self.status())
        self.out.flush()
        self._line_open = True

    def task_finished(self, failed: bool) -> None:
        """Count one finished task; without a terminal, print every few tasks."""
        self.done += 1
        self.failed += failed
        if not self.live and (self.done % PROGRESS_EVERY == 0 or self.done == self.total_tasks):
            self.line("progress: " + self.status())

    def line(self, text: str) -> None:
        """Print a line of its own, above the live status line when there is one."""
        if self._line_open:
            self.out.write("\r\x1b[K")
            self._line_open = False
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        """Leave the final counters on screen (a log has its last line already)."""
        if self.live:
            self.redraw()
            self.out.write("\n")
            self._line_open = False
            self.out.flush()


class _EventLines(logging.Handler):
    """Shows the SDK's warnings (the 429 pause, retries) as lines of the demo's output."""

    def __init__(self, progress: _Progress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.line(f"  ! {record.getMessage()}")


async def _refresh(progress: _Progress) -> None:
    while True:
        progress.redraw()
        await anyio.sleep(REFRESH_INTERVAL)


def _describe(task: Task) -> str:
    error = task.exception()
    if error is None:
        # The file name, shortened like the task ID column, so the two can be matched.
        name = task.result().image_url.rpartition("/")[2]
        stem, dot, extension = name.rpartition(".")
        return f"ok      .../{_shorten(stem, _TASK_ID_CHARS + 3)}{dot}{extension}"
    if isinstance(error, TaskFailedError):
        return f"{error.status:<7} {error.error_message or 'no error message'}"
    # A submit that failed (task ID "-") or a task that timed out.
    return f"{type(error).__name__}: {error}"


def _print_table(
    out: TextIO, requests: Sequence[ImageRequest], reported: Sequence[list[Task]]
) -> None:
    number_width = max(len("#"), len(str(len(requests))))
    task_width = _TASK_ID_CHARS + 3
    header = (
        f"{'#':>{number_width}}  {'prompt':<{_PROMPT_WIDTH}}  {'task ID':<{task_width}}  result"
    )
    out.write(header + "\n" + "-" * _RULE_WIDTH + "\n")
    for position, (request, tasks) in enumerate(zip(requests, reported, strict=True), 1):
        number = str(position)
        prompt = _shorten(request.prompt, _PROMPT_WIDTH)
        if not tasks:
            out.write(f"{number:>{number_width}}  {prompt:<{_PROMPT_WIDTH}}  (no outcome)\n")
        for task in sorted(tasks, key=lambda task: task.index):
            task_id = "-" if task.task_id is None else task.task_id[:_TASK_ID_CHARS] + "..."
            out.write(
                f"{number:>{number_width}}  {prompt:<{_PROMPT_WIDTH}}  "
                f"{task_id:<{task_width}}  {_describe(task)}\n"
            )
            number = prompt = ""


def _verdict(out: TextIO, requests: Sequence[ImageRequest], reported: Sequence[list[Task]]) -> int:
    """The exit code: 0 when every request's tasks were all reported exactly once."""
    missing = []
    for position, (request, tasks) in enumerate(zip(requests, reported, strict=True), 1):
        not_submitted = len(tasks) == 1 and tasks[0].task_id is None
        expected = 1 if not_submitted else request.generate_count
        indexes = sorted(task.index for task in tasks)
        if indexes != list(range(expected)) or not all(task.done() for task in tasks):
            missing.append(position)
    if missing:
        out.write(f"requests without a reported fate: {', '.join(map(str, missing))}\n")
        return 1
    return 0


@attrs.define
class _Outcome:
    """What a run produced, for the report."""

    reported: list[list[Task]]
    elapsed: float
    stats: dict[str, object]
    submit_calls: int
    accepted_submits: int
    get_calls: int
    saved: int = 0


async def _run_batch(
    batch_input: Sequence[ImageRequest],
    *,
    seed: int,
    concurrency: int,
    progress: _Progress,
    callbacks: bool,
    download: Path | None = None,
) -> _Outcome:
    """Serve the emulator and the receiver on loopback ports, run the batch, collect."""
    out = progress.out
    reported: list[list[Task]] = [[] for _ in batch_input]
    fake = FakeKeevx(
        complete_after=COMPLETE_AFTER, fail_if=_is_flagged, lost_rate=LOST_RATE, seed=seed
    )
    receiver_app = _CallbackRoute(CALLBACK_PATH)
    async with fake, fake.serve() as api, serve_asgi(receiver_app) as receiver:
        client = AsyncKeevx(
            api_key="demo-key",
            base_url=api.url,
            callback_url=receiver.url + CALLBACK_PATH if callbacks else None,
            max_concurrency=concurrency,
            reconcile_after=RECONCILE_AFTER,
            reconcile_per_second=RECONCILE_PER_SECOND,
        )
        async with client:
            receiver_app.target = client
            if callbacks:
                out.write(
                    f"service (FakeKeevx) at {api.url}, callbacks to {client.callback_url}; "
                    f"it loses {LOST_RATE:.0%} of them, looked up after {RECONCILE_AFTER:g} s\n"
                )
            else:
                out.write(
                    f"service (FakeKeevx) at {api.url}, no callback URL: every result "
                    "comes from status lookups (GET)\n"
                )
            fake.inject(429, retry_after=RATE_LIMIT_PAUSE)
            out.write(
                "the service will answer the first submit with HTTP 429, "
                f"Retry-After: {RATE_LIMIT_PAUSE:g}\n"
            )
            if download is not None:
                out.write(f"every image is saved into {download} as it finishes\n")
            progress.started = anyio.current_time()
            async with (
                client.batch(batch_input, timeout=TASK_TIMEOUT, download_to=download) as batch,
                anyio.create_task_group() as refresher,
            ):
                progress.batch = batch
                if progress.live:
                    refresher.start_soon(_refresh, progress)
                async for task in batch:
                    assert task.position is not None  # every task a batch yields has one
                    reported[task.position].append(task)
                    progress.task_finished(failed=task.exception() is not None)
                refresher.cancel_scope.cancel()
            elapsed = anyio.current_time() - progress.started
            progress.close()
            return _Outcome(
                reported=reported,
                elapsed=elapsed,
                stats=attrs.asdict(client.stats),
                submit_calls=fake.submit_calls,
                accepted_submits=fake.accepted_submits,
                get_calls=fake.get_calls,
                saved=batch.saved,
            )


def _print_report(
    out: TextIO,
    batch_input: Sequence[ImageRequest],
    outcome: _Outcome,
    download: Path | None = None,
) -> None:
    out.write("\n")
    _print_table(out, batch_input, outcome.reported)
    tasks = [task for group in outcome.reported for task in group]
    failed = sum(task.exception() is not None for task in tasks)
    out.write(
        f"\n{len(batch_input)} requests, {len(tasks)} tasks: {len(tasks) - failed} succeeded, "
        f"{failed} failed in {outcome.elapsed:.2f} s\n"
    )
    refused = outcome.submit_calls - outcome.accepted_submits
    out.write(
        f"service: {outcome.submit_calls} submit calls, {outcome.accepted_submits} accepted "
        f"({refused} refused), {outcome.get_calls} status lookups\n"
    )
    if download is not None:
        out.write(f"files: {outcome.saved} images saved into {download}\n")
    fields = ", ".join(f"{name}={value}" for name, value in outcome.stats.items())
    wrapped = textwrap.fill(
        fields, width=100, initial_indent="client stats: ", subsequent_indent="  "
    )
    out.write(wrapped + "\n")


async def run_demo(
    *,
    requests: int = DEFAULT_REQUESTS,
    seed: int = DEFAULT_SEED,
    concurrency: int = DEFAULT_CONCURRENCY,
    file: TextIO | None = None,
    live: bool | None = None,
    callbacks: bool = True,
    download: str | os.PathLike[str] | None = None,
) -> int:
    """Run the demo: a seeded batch against a loopback FakeKeevx; returns the exit code.

    Everything listens on 127.0.0.1 only, on random ports; no API key is needed.

    Args:
        requests: how many requests to submit.
        seed: seeds the prompts, the image counts, the failing requests and the emulator.
        concurrency: the client's ``max_concurrency``.
        file: where to write (default ``sys.stdout``).
        live: redraw one status line in place; default: whether ``file`` is a terminal.
        callbacks: receive callbacks on a loopback port; ``False`` runs with no callback
            URL, every result coming from status lookups.
        download: a directory to save every image into (created if missing), fetched from
            the emulator's file host as each task finishes.

    Returns:
        0 when every request's fate was reported (failed tasks are part of the show),
        1 when some request's tasks went unreported.

    Raises:
        ValueError: ``requests`` or ``concurrency`` is below 1.
        NotADirectoryError: ``download`` is an existing file.
    """
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be >= 1")
    out = sys.stdout if file is None else file
    batch_input = build_requests(requests, seed)
    total_tasks = sum(request.generate_count for request in batch_input)
    backend = "asyncio" if running_on_asyncio() else "trio"
    out.write(
        f"keevx_async demo: {requests} requests ({total_tasks} images), "
        f"concurrency {concurrency}, seed {seed}, on {backend}\n"
    )
    progress = _Progress(
        out=out,
        live=out.isatty() if live is None else live,
        total_requests=requests,
        total_tasks=total_tasks,
        started=anyio.current_time(),
    )
    # The SDK reports its pause and retries as log warnings: show them between the
    # progress lines, not wherever the root logger happens to write.
    sdk_logger = logging.getLogger("keevx_async")
    events = _EventLines(progress)
    propagate = sdk_logger.propagate
    sdk_logger.addHandler(events)
    sdk_logger.propagate = False
    try:
        outcome = await _run_batch(
            batch_input,
            seed=seed,
            concurrency=concurrency,
            progress=progress,
            callbacks=callbacks,
            download=None if download is None else Path(download),
        )
    finally:
        sdk_logger.removeHandler(events)
        sdk_logger.propagate = propagate
    _print_report(out, batch_input, outcome, None if download is None else Path(download))
    return _verdict(out, batch_input, outcome.reported)
