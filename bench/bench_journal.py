"""Durable runs: what a SQLite journal costs a batch, and how fast a finished run resumes.

Figures (ratios of rates measured in this process, this run; median of interleaved
repetitions):

- ``journal_fanout_ratio``: a batch of 5,000 submits at concurrency 64 with the default
  client on asyncio against a loopback server in another process, with a SQLite journal
  against without one (target >= 0.85). Each submit waits for its ``sending`` record to
  be committed before it is sent; the task IDs are written behind.
- ``journal_callback_ratio``: 100,000 callbacks fed to a batch's pending tasks (64 at a
  time, as a server's connections would) until the batch has yielded every task, with a
  journal against without one (target >= 0.50). With a journal, each callback is
  answered, and each task yielded, once its result is committed.
- ``journal_resume_seconds``: running the same 100,000-request input again against the
  journal of that finished run: every task replayed from it, no network call
  (target < 10).

Run: ``python bench/bench_journal.py`` (``--quick`` for a smoke run, ``--submits``,
``--concurrency``, ``--tasks``, ``--reps``).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common
import anyio

import keevx_async as kx

if TYPE_CHECKING:
    from keevx_async.testing import FakeKeevx

CALLBACK_URL = "https://app.example.test/keevx/callback"
PROMPT = "a lighthouse at dawn, oil on canvas"


async def _until(condition: Any) -> None:
    while not condition():  # noqa: ASYNC110 - a batch has no event for its counters
        await anyio.sleep(0.001)


async def fanout(url: str, count: int, concurrency: int, journal: Path | None) -> float:
    """Seconds for a batch to submit ``count`` requests (and to be left, journal written)."""
    async with kx.AsyncKeevx(
        api_key="bench", base_url=url, callback_url=CALLBACK_URL, max_concurrency=concurrency
    ) as client:
        start = time.perf_counter()
        async with client.batch([PROMPT] * count, journal=journal) as batch:
            await _until(lambda: batch.submitted == count)
        return time.perf_counter() - start


async def ingest(fake: FakeKeevx, count: int, journal: Path | None) -> tuple[float, float]:
    """Seconds from the first callback fed until the batch yielded every task; and the
    seconds a second run of the same input took to replay them all (with a journal)."""
    fake.reset_metrics()
    async with fake.client(
        deliver_callbacks=False, max_concurrency=64, reconcile_after=None
    ) as client:
        pending = count + 1  # every task pending at once, as in bench_callbacks.py
        async with client.batch([PROMPT] * count, journal=journal, max_pending=pending) as batch:
            await _until(lambda: batch.submitted == count)
            callbacks = [
                (_common.succeeded_callback(fake, task), task.callback_url or "")
                for task in fake.tasks.values()
            ]
            start = time.perf_counter()
            async with anyio.create_task_group() as group:
                for worker in range(64):
                    group.start_soon(_feed, client, callbacks[worker::64])
                yielded = 0
                async for _ in batch:
                    yielded += 1
            ingestion = time.perf_counter() - start
            assert yielded == count
        resume = 0.0
        if journal is not None:
            start = time.perf_counter()
            async with client.batch(
                [PROMPT] * count, journal=journal, max_pending=pending
            ) as again:
                replayed = sum([task.replayed async for task in again])
            resume = time.perf_counter() - start
            assert replayed == count
    return ingestion, resume


async def _feed(client: kx.AsyncKeevx, callbacks: list[tuple[bytes, str]]) -> None:
    for body, url in callbacks:
        await client.feed_callback(body, url=url)


def main() -> None:
    args = _common.parse_args(__doc__ or "", submits=5000, concurrency=64, tasks=100_000)
    submits = 200 if args.quick else args.submits
    tasks = 2_000 if args.quick else args.tasks
    with tempfile.TemporaryDirectory() as directory:
        files = iter(range(1_000_000))

        def fresh() -> Path:
            return Path(directory) / f"run-{next(files)}.db"

        with _common.loopback_server() as server:
            runs = {
                "batch, no journal": lambda: asyncio.run(
                    fanout(server.url, submits, args.concurrency, None)
                ),
                "batch, SQLite journal": lambda: asyncio.run(
                    fanout(server.url, submits, args.concurrency, fresh())
                ),
            }
            times = _common.interleaved(runs, args.reps, warmup=not args.quick)
        rates = {name: submits / _common.median(seconds) for name, seconds in times.items()}
        _common.print_table(
            f"fan-out: {submits:,} submits at concurrency {args.concurrency}, median of "
            f"{args.reps} ({_common.machine()})",
            ["contender", "submits/s", "best/s", "worst/s"],
            [
                [name, rate, submits / min(times[name]), submits / max(times[name])]
                for name, rate in rates.items()
            ],
        )

        async def ingestion_runs() -> dict[str, list[float]]:
            from keevx_async.testing import FakeKeevx  # noqa: PLC0415

            measured: dict[str, list[float]] = {"plain": [], "journal": [], "resume": []}
            async with FakeKeevx(complete_after=1e9) as fake:
                for _ in range(1 if args.quick else args.reps):
                    plain, _ = await ingest(fake, tasks, None)
                    journaled, resume = await ingest(fake, tasks, fresh())
                    measured["plain"].append(plain)
                    measured["journal"].append(journaled)
                    measured["resume"].append(resume)
            return measured

        ingestion = asyncio.run(ingestion_runs())
    plain = _common.median(ingestion["plain"])
    journaled = _common.median(ingestion["journal"])
    resume = _common.median(ingestion["resume"])
    _common.print_table(
        f"callback ingestion and resume: {tasks:,} tasks, median of {len(ingestion['plain'])}",
        ["contender", "callbacks/s", "seconds"],
        [
            ["batch, no journal", tasks / plain, plain],
            ["batch, SQLite journal", tasks / journaled, journaled],
            ["resume (all replayed)", tasks / resume, resume],
        ],
    )
    print()
    _common.print_figure(
        "journal_fanout_ratio",
        rates["batch, SQLite journal"] / rates["batch, no journal"],
        "target >= 0.85",
    )
    _common.print_figure("journal_callback_ratio", plain / journaled, "target >= 0.50")
    _common.print_figure("journal_resume_seconds", resume, f"{tasks:,} tasks; target < 10")


if __name__ == "__main__":
    main()
