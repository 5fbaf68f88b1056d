"""The shared harness of the HTTP benchmarks: a loopback server, interleaved runs, tables.

Not a benchmark itself: run without ``--serve`` it does nothing, so ``nox -s bench`` may
glob it harmlessly. ``python bench/_common.py --serve`` is the minimal loopback server the
other scripts start in a second process.

The server is deliberately as cheap as an HTTP/1.1 keep-alive server can be in Python (an
``asyncio.Protocol`` answering every request with a fixed-shape submit envelope), so the
figures measure the client side. With ``--feed`` it also opens a second port and writes one
line ``<task id> <callback url>`` per task created, so a benchmark can deliver each task's
callback in process, exactly as the service would post it, without paying for a second
HTTP server. With ``--files SIZE`` it is a file host instead: every GET is answered with
the same ``SIZE`` bytes as ``image/png`` (the bytes are not a PNG: only the client's side is
measured), after ``--delay SECONDS`` when given (a distant file host's first byte).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import anyio
import attrs

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping

    import keevx_async as kx
    from keevx_async.testing import FakeKeevx, FakeTask

# --- pending tasks and their callbacks (the callback benchmarks) ----------------------------


async def submit_concurrently(
    submit: Callable[[kx.ImageRequest], Awaitable[kx.Submission]],
    request: kx.ImageRequest,
    count: int,
    workers: int = 32,
) -> list[kx.Submission]:
    """Submit ``request`` ``count`` times from ``workers`` concurrent loops."""
    submissions: list[kx.Submission] = []

    async def submit_some(n: int) -> None:
        for _ in range(n):
            submissions.append(await submit(request))

    async with anyio.create_task_group() as group:
        for i in range(workers):
            group.start_soon(submit_some, count // workers + (i < count % workers))
    return submissions


def succeeded_callback(fake: FakeKeevx, task: FakeTask) -> bytes:
    """The body FakeKeevx POSTs once ``task`` has succeeded (see ``FakeKeevx._deliver``)."""
    body = {
        "code": 0,
        "msg": "ok",
        "task_type": "image_generate",
        "data": {
            "task_id": task.task_id,
            "status": "SUCCEEDED",
            "image_url": f"{fake.image_base_url}/{task.task_id}.png",
            "error_message": "",
        },
    }
    return json.dumps(body).encode()


# --- the loopback server (runs in its own process) -------------------------------------------

_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"


class _SubmitProtocol(asyncio.Protocol):
    """Answers every request on a keep-alive connection with a submit envelope."""

    counter = 0
    feed: list[asyncio.StreamWriter] = []  # noqa: RUF012 (one server per process)

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out: list[bytes] = []
        while True:
            end = self.buffer.find(_HEAD_END)
            if end < 0:
                break
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(_CONTENT_LENGTH)
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + len(_CONTENT_LENGTH) : stop if stop > 0 else None])
            total = end + 4 + length
            if len(self.buffer) < total:
                break
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            out.append(self._answer(body))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _answer(self, body: bytes) -> bytes:
        cls = _SubmitProtocol
        cls.counter += 1
        task_id = f"i2is-{os.getpid()}-{cls.counter}"
        if cls.feed and body:
            callback_url = json.loads(body).get("callback_url")
            if callback_url:
                for writer in cls.feed:
                    writer.write(f"{task_id} {callback_url}\n".encode())
        reply = b'{"code":0,"msg":"ok","data":{"task_ids":["%s"]}}' % task_id.encode()
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(reply)
        ) + reply


class _FileProtocol(_SubmitProtocol):
    """Answers every GET on a keep-alive connection with the same file (after ``delay``)."""

    reply = b""
    delay = 0.0

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        requests = self.buffer.count(_HEAD_END)  # GETs: a head, no body
        if not requests or self.transport is None:
            return
        self.buffer = self.buffer[self.buffer.rfind(_HEAD_END) + len(_HEAD_END) :]
        reply = _FileProtocol.reply * requests
        if _FileProtocol.delay:
            asyncio.get_running_loop().call_later(_FileProtocol.delay, self.transport.write, reply)
        else:
            self.transport.write(reply)


def _file_reply(size: int) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: %d\r\n\r\n" % size
    return head + b"\x89PNG" + b"\0" * (size - 4)


async def _serve(feed: bool, files: int = 0, delay: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    protocol: type[_SubmitProtocol] = _SubmitProtocol
    if files:
        _FileProtocol.reply = _file_reply(files)
        _FileProtocol.delay = delay
        protocol = _FileProtocol
    server = await loop.create_server(protocol, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    feed_port = 0
    if feed:

        async def on_feed(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # One benchmark run at a time: the newest feed connection replaces the last.
            for old in _SubmitProtocol.feed:
                old.close()
            _SubmitProtocol.feed[:] = [writer]
            writer.write(b"ready\n")  # lines for tasks created from now on go here

        feed_server = await asyncio.start_server(on_feed, "127.0.0.1", 0)
        feed_port = feed_server.sockets[0].getsockname()[1]
    print(f"{port} {feed_port}", flush=True)
    # The parent closes our stdin to stop us.
    await loop.run_in_executor(None, sys.stdin.read)


@attrs.frozen
class Server:
    """A loopback server running in another process."""

    url: str
    feed_port: int


@contextmanager
def loopback_server(*, feed: bool = False, files: int = 0, delay: float = 0.0) -> Iterator[Server]:
    """Start the minimal loopback server in a second process; stop it on exit.

    ``files``: serve a file of that many bytes at every path instead of submit replies,
    each ``delay`` seconds after its request.
    """
    args = [sys.executable, __file__, "--serve"] + (["--feed"] if feed else [])
    if files:
        args += ["--files", str(files), "--delay", str(delay)]
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            port, feed_port = proc.stdout.readline().split()
            yield Server(url=f"http://127.0.0.1:{port}", feed_port=int(feed_port))
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- measuring ----------------------------------------------------------------------------------


def parse_args(description: str, **extra: Any) -> argparse.Namespace:
    """The common command line: ``--quick`` (tiny sizes, one repetition) and ``--reps``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition (smoke)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    for name, default in extra.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    return args


def interleaved(
    runs: Mapping[str, Callable[[], float]], reps: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """Run every contender once per repetition, in turn, and collect the seconds each took.

    Interleaving (A B C, A B C, ...) spreads drifts of a shared machine (other processes,
    CPU frequency) over all contenders instead of charging them to whichever ran last.
    """
    if warmup:
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(run())
    return times


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` took (wall clock)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    """The median (of the repetitions)."""
    return statistics.median(values)


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print a Markdown table (so it can be pasted into the docs as is)."""
    print(f"\n{title}\n")
    cells = [list(header)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " |")
        if index == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_figure(name: str, value: float | None, target: str) -> None:
    """The last lines of a script: one figure each, machine-readable.

    ``None`` prints ``n/a``: a baseline could not run (its package is not installed).
    """
    shown = "n/a" if value is None else f"{value:.2f}"
    print(f"{name} {shown} ({target})")


def importable(module: str) -> bool:
    """Whether an optional baseline's package is installed (the ``bench`` extra)."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def machine() -> str:
    """A one-line description of where the figures were measured."""
    return f"nproc={os.cpu_count()} python={sys.version.split()[0]} platform={sys.platform}"


if __name__ == "__main__":
    if "--serve" in sys.argv:
        size = int(sys.argv[sys.argv.index("--files") + 1]) if "--files" in sys.argv else 0
        pause = float(sys.argv[sys.argv.index("--delay") + 1]) if "--delay" in sys.argv else 0.0
        asyncio.run(_serve(feed="--feed" in sys.argv, files=size, delay=pause))
