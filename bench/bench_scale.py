"""Scale: 10,000 against 100,000 tasks end to end (submit, callback, result), and memory after.

Each run is one ``generate_many`` on the default ``AsyncKeevx`` (asyncio, concurrency 64):
every submit goes over HTTP to the loopback server in another process, which writes one
line ``<task id> <callback url>`` per task it creates to a second socket; a reader in the
benchmark turns each line into the service's callback body and hands it to
``feed_callback`` with that URL (token verified), as a receiver would. Some callbacks thus
arrive before their submit reply, as they can from the service.

Figures:

- ``scale_time_ratio``: seconds for the large run over seconds for the small one (target
  <= 11 for 10x the tasks: the per-task cost must not grow with the number of tasks).
- ``scale_leftover_blocks_per_task``: memory blocks still allocated after the large run
  (client closed, results dropped, ``gc.collect()``) against before it, per task (target
  about 0: memory back to baseline).

Run: ``python bench/bench_scale.py`` (``--quick`` for a smoke run, ``--small``, ``--large``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time

import _common
import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

import keevx_async as kx

REQUEST = kx.ImageRequest("a lighthouse at dawn, oil on canvas")
CALLBACK_URL = "https://app.example.test/keevx/callback"


def callback_body(task_id: str) -> bytes:
    """What the service POSTs when a task succeeds."""
    data = {
        "task_id": task_id,
        "status": "SUCCEEDED",
        "image_url": f"https://images.example.test/{task_id}.png",
        "error_message": "",
    }
    return json.dumps(
        {"code": 0, "msg": "ok", "task_type": "image_generate", "data": data}
    ).encode()


async def end_to_end(url: str, feed_port: int, tasks: int, concurrency: int) -> float:
    """Seconds for ``generate_many`` of ``tasks`` requests, callbacks fed as they come."""
    feed = await anyio.connect_tcp("127.0.0.1", feed_port)
    lines = BufferedByteReceiveStream(feed)
    await lines.receive_until(b"\n", 16)  # the server's "ready"
    async with kx.AsyncKeevx(
        api_key="bench",
        base_url=url,
        callback_url=CALLBACK_URL,
        max_concurrency=concurrency,
    ) as client:

        async def deliver() -> None:
            for _ in range(tasks):
                line = await lines.receive_until(b"\n", 4096)
                task_id, _, callback_url = line.decode().partition(" ")
                await client.feed_callback(callback_body(task_id), url=callback_url)

        start = time.perf_counter()
        async with anyio.create_task_group() as group:
            group.start_soon(deliver)
            results = await client.generate_many([REQUEST] * tasks)
        seconds = time.perf_counter() - start
    await feed.aclose()
    failed = [r for rs in results for r in rs if not isinstance(r, kx.ImageResult)]
    if failed or len(results) != tasks:
        raise SystemExit(f"the run lost tasks: {len(failed)} failed, {len(results)} results")
    return seconds


def main() -> None:
    args = _common.parse_args(__doc__ or "", small=10_000, large=100_000, concurrency=64)
    small, large = (200, 2000) if args.quick else (args.small, args.large)
    with _common.loopback_server(feed=True) as server:

        def run(tasks: int) -> float:
            return asyncio.run(end_to_end(server.url, server.feed_port, tasks, args.concurrency))

        run(min(small, 1000))  # warm-up: imports, first connections
        gc.collect()
        blocks_before = sys.getallocatedblocks()
        times = _common.interleaved(
            {f"{small:,} tasks": lambda: run(small), f"{large:,} tasks": lambda: run(large)},
            args.reps,
            warmup=False,
        )
        gc.collect()
        blocks_after = sys.getallocatedblocks()

    small_s = _common.median(times[f"{small:,} tasks"])
    large_s = _common.median(times[f"{large:,} tasks"])
    _common.print_table(
        f"scale: end to end (submit + callback + result), concurrency {args.concurrency}, "
        f"median of {args.reps} ({_common.machine()})",
        ["run", "seconds", "tasks/s", "µs per task"],
        [
            [f"{small:,} tasks", small_s, small / small_s, small_s / small * 1e6],
            [f"{large:,} tasks", large_s, large / large_s, large_s / large * 1e6],
        ],
    )
    leftover = blocks_after - blocks_before
    print(f"\nallocated blocks: {blocks_before:,} before, {blocks_after:,} after ({leftover:+,})")
    print()
    _common.print_figure(
        "scale_time_ratio", large_s / small_s, f"target <= {large / small * 1.1:g}"
    )
    _common.print_figure(
        "scale_leftover_blocks_per_task",
        max(leftover, 0) / large,
        "target about 0: memory back to baseline",
    )


if __name__ == "__main__":
    main()
