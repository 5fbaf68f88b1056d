"""Memory per pending task: what the SDK keeps while 100,000 tasks wait for callbacks.

Workload (issue 4): N tasks pending at once, each from its own submission
(``generate_count=1``, the dearest case: nothing per submission is shared), measured with
tracemalloc: everything allocated between "client ready, request built" and "N
submissions held, garbage collected", divided by N. The one `ImageRequest` all
submissions share is built before tracing starts, so request objects are excluded; the
`Submission` objects the caller holds (a task nobody holds is not waited for, so it is no
longer pending) are counted, as is the list holding them.

The tasks are created through the real path: ``client.submit`` (body encoding, token,
the HTTP exchange through httpx, reply decoding, registry) against an
``httpx.MockTransport`` that answers like the service. FakeKeevx is not used here only
because it keeps its own record of every task in the same process, which tracemalloc
would count as the client's.

Usage: ``python bench/bench_memory.py [--quick] [--reps N] [--tasks N]``.
The last line is ``memory_per_pending_task <median> bytes (target <= 1000, aim 500)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tracemalloc
import uuid

import anyio
import httpx

import keevx_async as kx

TARGET = 1_000
AIM = 500


def _service(request: httpx.Request) -> httpx.Response:
    """The submit endpoint: one fresh task ID per image, as the service answers."""
    count = json.loads(request.content).get("generate_count", 1)
    task_ids = [f"i2is-{uuid.uuid4().hex}" for _ in range(count)]
    return httpx.Response(200, json={"code": 0, "msg": "ok", "data": {"task_ids": task_ids}})


def _top_sites(diff: list[tracemalloc.StatisticDiff], count: int) -> list[tuple[str, int]]:
    sites = []
    for stat in diff[:14]:
        frame = stat.traceback[0]
        sites.append((f"{os.path.relpath(frame.filename)}:{frame.lineno}", stat.size_diff // count))
    return sites


async def _measure(count: int) -> tuple[float, list[tuple[str, int]]]:
    """Bytes per pending task, and the top allocation sites (bytes per task)."""
    request = kx.ImageRequest("a lighthouse at dawn")
    transport = httpx.MockTransport(_service)
    async with (
        httpx.AsyncClient(transport=transport, base_url="https://api.keevx.test") as http,
        kx.AsyncKeevx(
            api_key="bench",
            base_url="https://api.keevx.test",
            callback_url="https://app.example.test/keevx/callback",
            http_client=http,
            max_concurrency=64,
        ) as client,
    ):
        # Warm up: first-call caches (httpx, the converter) are not per-task costs.
        warm = [await client.submit(request) for _ in range(100)]
        del warm
        held: list[kx.Submission] = []

        async def submit_some(n: int) -> None:
            for _ in range(n):
                held.append(await client.submit(request))

        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        workers = 32
        async with anyio.create_task_group() as tg:
            for i in range(workers):
                tg.start_soon(submit_some, count // workers + (i < count % workers))
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        assert client.stats.pending == count, client.stats
        diff = after.compare_to(before, "lineno")
        total = sum(stat.size_diff for stat in diff)
        top = _top_sites(diff, count)
    return total / count, top


async def _run(args: argparse.Namespace) -> int:
    figures = []
    top: list[tuple[str, int]] = []
    for _ in range(args.reps):
        per_task, top = await _measure(args.tasks)
        figures.append(per_task)
    print(f"# memory per pending task: {args.tasks:,} tasks pending at once, tracemalloc")
    print(f"# machine: nproc={os.cpu_count()}, Python {platform.python_version()}")
    print(f"{'rep':>4} {'bytes per task':>15}")
    for rep, figure in enumerate(figures, 1):
        print(f"{rep:>4} {figure:>15,.0f}")
    print("# where it goes (last repetition, bytes per task):")
    for site, size in top:
        print(f"#   {size:>5}  {site}")
    median = statistics.median(figures)
    print(f"memory_per_pending_task {median:.0f} bytes (target <= {TARGET}, aim {AIM})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
    if args.quick:
        args.reps, args.tasks = 1, 2_000
    return anyio.run(_run, args)


if __name__ == "__main__":
    sys.exit(main())
