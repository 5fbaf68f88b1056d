"""Callback ingestion: how fast ``feed_callback`` applies verified callbacks.

Workload (issue 4): N callback bodies (bytes, exactly as FakeKeevx POSTs them) fed to
``AsyncKeevx.feed_callback`` with the URL the client issued (token included, so every
token is verified), for N tasks pending at once, each from its own submission
(``generate_count=1``: no two callbacks share a token). The tasks are created through
the real path: ``client.submit`` against an in-process FakeKeevx whose tasks never
finish on their own.

Baseline, same process: the bare loop ``json.loads`` + dict lookup + ``Event.set`` over
the same bodies. The two are interleaved in chunks of ``CHUNK`` callbacks (which side goes
first alternates), so both see the same state of a shared machine: a neighbour's burst
slows both, and the ratio of their summed times cancels it.

Usage: ``python bench/bench_callbacks.py [--quick] [--reps N] [--tasks N] [--profile]
[--no-orjson]`` (the last: the stdlib json path, as without the ``orjson`` extra).
The last line is ``callback_ingestion_ratio <median> (target >= 0.40)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from typing import TYPE_CHECKING

import _common
import anyio

if TYPE_CHECKING:
    import keevx_async as kx
    from keevx_async.testing import FakeKeevx

TARGET = 0.40
CHUNK = 1_000


async def _pending_tasks(
    fake: FakeKeevx, client: kx.AsyncKeevx, count: int, submissions: list[kx.Submission]
) -> list[tuple[bytes, str]]:
    """Submit ``count`` one-image requests; the (callback body, callback URL) of each.

    The submissions go to ``submissions``: a task nobody holds is no longer pending.
    """
    import keevx_async as kx  # noqa: PLC0415 (after --no-orjson had its say)

    request = kx.ImageRequest("a lighthouse at dawn")
    fake.reset_metrics()
    submissions.extend(await _common.submit_concurrently(client.submit, request, count))
    callbacks = []
    for task in fake.tasks.values():
        assert task.callback_url is not None
        callbacks.append((_common.succeeded_callback(fake, task), task.callback_url))
    return callbacks


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


async def _interleaved(
    client: kx.AsyncKeevx, callbacks: list[tuple[bytes, str]], sdk_first: bool
) -> tuple[float, float, int]:
    """Seconds for the baseline and for the SDK over the same callbacks, chunk by chunk,
    and the full garbage collections that ran meanwhile."""
    events = {json.loads(body)["data"]["task_id"]: anyio.Event() for body, _ in callbacks}
    feed = client.feed_callback
    bare = sdk = 0.0
    gc.collect()
    collections = _full_collections()
    clock = time.perf_counter
    for number, start in enumerate(range(0, len(callbacks), CHUNK)):
        chunk = callbacks[start : start + CHUNK]
        for side in ("sdk", "bare") if sdk_first == (number % 2 == 0) else ("bare", "sdk"):
            began = clock()
            if side == "sdk":
                for body, url in chunk:
                    await feed(body, url=url)
                sdk += clock() - began
            else:
                # The baseline: parse, look the task up, wake its waiter.
                for body, _ in chunk:
                    payload = json.loads(body)
                    events[payload["data"]["task_id"]].set()
                bare += clock() - began
    # Results the SDK keeps (a finished task keeps its ImageResult) can set off a full
    # collection of every object in the process: that is part of the cost, shown apart.
    collections = _full_collections() - collections
    stats = client.stats
    # Every callback resolved a waiting task: the full path ran, nothing was short-cut.
    assert stats.resolved_by_callback == len(callbacks), stats
    assert stats.pending == 0, stats
    return bare, sdk, collections


async def _run(args: argparse.Namespace) -> int:
    from keevx_async import _wire  # noqa: PLC0415 (after --no-orjson had its say)
    from keevx_async.testing import FakeKeevx  # noqa: PLC0415

    rows = []
    async with FakeKeevx(complete_after=1e9) as fake:
        for rep in range(args.reps):
            async with fake.client(
                deliver_callbacks=False, max_concurrency=64, reconcile_after=None
            ) as client:
                submissions: list[kx.Submission] = []
                callbacks = await _pending_tasks(fake, client, args.tasks, submissions)
                assert client.stats.pending == len(callbacks)
                if args.profile and rep == 0:
                    from pyinstrument import Profiler  # noqa: PLC0415

                    with Profiler(interval=0.0002) as profiler:
                        bare, sdk, collections = await _interleaved(client, callbacks, True)
                    print(profiler.output_text(unicode=False, color=False))
                else:
                    bare, sdk, collections = await _interleaved(client, callbacks, rep % 2 == 0)
            n = len(callbacks)
            assert all(s.tasks[0].done() for s in submissions)
            rows.append((rep + 1, n / bare, n / sdk, bare / sdk, collections))

    parser = "orjson" if _wire._fast_loads is not None else "json (stdlib)"
    print(f"# callback ingestion: {args.tasks:,} pending tasks, one submission each")
    print(f"# callback bodies parsed by: {parser}")
    print(f"# machine: nproc={_nproc()}, Python {platform.python_version()}")
    print(f"{'rep':>4} {'bare loop /s':>14} {'feed_callback /s':>17} {'ratio':>7} {'full gc':>8}")
    for rep, bare_rate, sdk_rate, ratio, collections in rows:
        print(f"{rep:>4} {bare_rate:>14,.0f} {sdk_rate:>17,.0f} {ratio:>7.3f} {collections:>8}")
    bare_median = statistics.median(r[1] for r in rows)
    sdk_median = statistics.median(r[2] for r in rows)
    ratio = statistics.median(r[3] for r in rows)
    print(f"callback_bare_loop_rate {bare_median:.0f} /s")
    print(f"callback_feed_rate {sdk_median:.0f} /s")
    print(f"callback_ingestion_ratio {ratio:.2f} (target >= {TARGET:.2f})")
    return 0


def _nproc() -> int:
    import os  # noqa: PLC0415

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="pyinstrument the first SDK run")
    parser.add_argument(
        "--no-orjson", action="store_true", help="run as if orjson were not installed"
    )
    args = parser.parse_args()
    if args.no_orjson:
        sys.modules["orjson"] = None  # type: ignore[assignment]
    if args.quick:
        args.reps, args.tasks = 1, 2_000
    return anyio.run(_run, args)


if __name__ == "__main__":
    sys.exit(main())
