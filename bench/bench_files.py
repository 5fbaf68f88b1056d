"""Files: downloading result files, and a fan-out that saves them as it goes.

Loopback servers run in other processes: file hosts answering every GET with the same
file (``--size`` bytes, ``image/png``), at once or after ``--host-delay`` seconds (a distant
host's first byte), and the submit server of ``bench_fanout.py``, which also reports every
task it creates so the benchmark can feed each task's callback in process (as
``bench_scale.py`` does), its ``image_url`` pointing at a file host.

Figures (each a ratio of rates measured in this process, this run; median of interleaved
repetitions):

- ``download_ratio``: ``client.download`` of ``--files`` result files, all asked for at
  once and run at its default bound (``max_downloads=8``; checks, a temporary file written,
  fsynced and renamed on a worker thread), against bare httpx streaming the same files into
  files with the same bound (8 workers, the writes done in place on the event loop, no
  fsync), from the immediate file host (target >= 0.80).
- ``fanout_download_ratio``: submits per second of a batch of ``--submits`` requests at
  concurrency 64 with ``download_to=`` against the same batch without it, the files coming
  from the slow file host (target >= 0.90): a slow file host does not stall the fan-out.
- ``fanout_download_cpu_ratio``: the same with the immediate file host (no target): the
  downloads' own work shares the event loop's one core with the submits.

Run: ``python bench/bench_files.py`` (``--quick`` for a smoke run, ``--files``, ``--size``,
``--submits``, ``--reps``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common
import anyio
import httpx
from anyio.streams.buffered import BufferedByteReceiveStream

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

CALLBACK_URL = "https://app.example.test/keevx/callback"
SLOW = "fan-out, download_to, slow file host"
FAST = "fan-out, download_to, immediate file host"
NONE = "fan-out, no download"
BOUND = 8  # the SDK's default max_downloads
FANOUT = 64


async def _workers(count: int, concurrency: int, one: Callable[[int], Awaitable[object]]) -> None:
    """``one(i)`` for i in 0..count-1, ``concurrency`` at a time."""
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:
            await one(index)

    async with anyio.create_task_group() as group:
        for _ in range(concurrency):
            group.start_soon(worker)


async def sdk_download(url: str, count: int, directory: Path) -> float:
    """``client.download`` of ``count`` files, all asked for at once (as a batch's
    ``download_to`` does): the SDK's bound, ``max_downloads``, is the only one."""
    async with kx.AsyncKeevx(api_key="bench", base_url=url) as client:
        start = time.perf_counter()
        async with anyio.create_task_group() as group:
            for index in range(count):
                group.start_soon(client.download, f"{url}/files/i2is-{index}.png", directory)
        return time.perf_counter() - start


async def bare_httpx(url: str, count: int, directory: Path) -> float:
    """httpx streaming each file into a file, as a hand-written downloader would."""
    limits = httpx.Limits(max_connections=BOUND, max_keepalive_connections=BOUND)
    async with httpx.AsyncClient(limits=limits) as http:

        async def one(index: int) -> None:
            async with http.stream("GET", f"{url}/files/i2is-{index}.png") as response:
                response.raise_for_status()
                with (directory / f"i2is-{index}.png").open("wb") as file:
                    async for chunk in response.aiter_raw():
                        file.write(chunk)

        start = time.perf_counter()
        await _workers(count, BOUND, one)
        return time.perf_counter() - start


def callback_body(task_id: str, files_url: str) -> bytes:
    """What the service POSTs when a task succeeds; its image is on the file host."""
    data = {
        "task_id": task_id,
        "status": "SUCCEEDED",
        "image_url": f"{files_url}/files/{task_id}.png",
        "error_message": "",
    }
    return json.dumps(
        {"code": 0, "msg": "ok", "task_type": "image_generate", "data": data}
    ).encode()


async def fanout(
    url: str, feed_port: int, files_url: str, count: int, download_to: Path | None
) -> float:
    """Submits per second of a batch of ``count`` requests (until the last submit reply),
    every task's callback fed as it comes, its file saved when ``download_to`` is set.
    The batch is left once every submit has its reply (its downloads still running are
    cancelled): the rate of submits is what is measured."""
    feed = await anyio.connect_tcp("127.0.0.1", feed_port)
    lines = BufferedByteReceiveStream(feed)
    await lines.receive_until(b"\n", 16)  # the server's "ready"
    request = kx.ImageRequest("a lighthouse at dawn, oil on canvas")
    async with kx.AsyncKeevx(
        api_key="bench", base_url=url, callback_url=CALLBACK_URL, max_concurrency=FANOUT
    ) as client:
        submitted = 0
        last_reply = 0.0
        submit = client.submit

        async def timed_submit(request: kx.ImageRequest) -> kx.Submission:
            nonlocal submitted, last_reply
            submission = await submit(request)
            submitted += 1
            last_reply = time.perf_counter()
            return submission

        client.submit = timed_submit  # type: ignore[method-assign]

        async def deliver() -> None:
            for _ in range(count):
                line = await lines.receive_until(b"\n", 4096)
                task_id, _, callback_url = line.decode().partition(" ")
                await client.feed_callback(callback_body(task_id, files_url), url=callback_url)

        start = time.perf_counter()
        saved = 0
        async with anyio.create_task_group() as group:
            group.start_soon(deliver)
            async with client.batch([request] * count, download_to=download_to) as batch:
                async for task in batch:
                    saved += task.result().path is not None
                    if submitted == count:
                        break
            group.cancel_scope.cancel()
    await feed.aclose()
    if submitted != count or (download_to is not None and not saved):
        raise SystemExit(f"the run went wrong: {submitted} submitted, {saved} saved")
    return count / (last_reply - start)


def main() -> None:
    args = _common.parse_args(
        __doc__ or "", files=2000, size=200_000, submits=2000, host_delay=0.25
    )
    count = 100 if args.quick else args.files
    submits = 200 if args.quick else args.submits
    scratch = Path(tempfile.mkdtemp(prefix="bench-files-"))

    def fresh() -> Path:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        return scratch

    try:
        with (
            _common.loopback_server(files=args.size) as files,
            _common.loopback_server(files=args.size, delay=args.host_delay) as slow_files,
            _common.loopback_server(feed=True) as api,
        ):

            def download_run(fn: Callable[..., Any]) -> Callable[[], float]:
                return lambda: asyncio.run(fn(files.url, count, fresh()))

            def fanout_run(download: bool, host: str = slow_files.url) -> Callable[[], float]:
                def run() -> float:
                    target = fresh() if download else None
                    # The rate, as a time: interleaved() collects "seconds".
                    return 1 / asyncio.run(fanout(api.url, api.feed_port, host, submits, target))

                return run

            times = _common.interleaved(
                {
                    "client.download": download_run(sdk_download),
                    "bare httpx": download_run(bare_httpx),
                    SLOW: fanout_run(True),
                    FAST: fanout_run(True, files.url),
                    NONE: fanout_run(False),
                },
                args.reps,
                warmup=not args.quick,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    megabytes = count * args.size / 1e6
    download_rates = {
        name: count / _common.median(times[name]) for name in times if "fan" not in name
    }
    fanout_rates = {name: 1 / _common.median(times[name]) for name in times if "fan" in name}
    _common.print_table(
        f"downloads: {count:,} files of {args.size:,} bytes ({megabytes:,.0f} MB) at "
        f"{BOUND} at once, median of {args.reps} ({_common.machine()})",
        ["contender", "files/s", "MB/s", "best files/s", "worst files/s"],
        [
            [
                name,
                rate,
                rate * args.size / 1e6,
                count / min(times[name]),
                count / max(times[name]),
            ]
            for name, rate in download_rates.items()
        ],
    )
    _common.print_table(
        f"fan-out: {submits:,} submits at concurrency {FANOUT}, callbacks fed, slow file host "
        f"{args.host_delay:g} s to first byte, median of {args.reps}",
        ["contender", "submits/s", "best/s", "worst/s"],
        [
            [name, rate, 1 / min(times[name]), 1 / max(times[name])]
            for name, rate in fanout_rates.items()
        ],
    )
    print()
    _common.print_figure(
        "download_ratio",
        download_rates["client.download"] / download_rates["bare httpx"],
        "target >= 0.80",
    )
    _common.print_figure(
        "fanout_download_ratio", fanout_rates[SLOW] / fanout_rates[NONE], "target >= 0.90"
    )
    _common.print_figure(
        "fanout_download_cpu_ratio",
        fanout_rates[FAST] / fanout_rates[NONE],
        "no target: downloads and submits share the event loop's core",
    )


if __name__ == "__main__":
    main()
