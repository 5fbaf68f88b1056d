"""Receiver: ``callback_app`` under uvicorn against a bare ASGI app under the same server.

Workload (issue 4): N callback POSTs at concurrency 64 into ``client.callback_app`` served
by uvicorn in a subprocess, driven by aiohttp from a second process over loopback. Every
callback is valid and takes the full path: the server process holds an ``AsyncKeevx``
whose N tasks are pending (submitted at startup through ``client.submit``, against an
``httpx.MockTransport`` answering like the service), and each POST goes to the callback
URL that client issued (token in the query), with the body the service would send.
The run checks that every answer was 200 and that the server's client resolved exactly N
tasks.

Baseline, same run, interleaved: the same server process (same setup, same tasks), but
serving a bare ASGI app that answers 200 without reading the body, hit by the same driver
with the same requests.

Usage: ``python bench/bench_receiver.py [--quick] [--reps N] [--callbacks N]``.
The last line is ``receiver_ratio <median> (target >= 0.80)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TARGET = 0.80
CONCURRENCY = 64
CALLBACK_URL = "http://127.0.0.1/keevx/callback"
_OK = b'{"code":0,"msg":"ok"}'


# --- the server process ------------------------------------------------------------------


async def _bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 to every request without reading it: the cheapest ASGI app there is."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_OK))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _OK})


class _Harness:
    """The ASGI app uvicorn serves: sets up the pending tasks, then delegates HTTP."""

    def __init__(self, kind: str, count: int, workdir: Path) -> None:
        self.kind = kind
        self.count = count
        self.workdir = workdir
        self.http_app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.http_app(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        import httpx  # noqa: PLC0415

        import keevx_async as kx  # noqa: PLC0415

        issued: list[tuple[str, str]] = []  # (task ID, callback URL)

        def service(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            task_id = f"i2is-{uuid.uuid4().hex}"
            issued.append((task_id, body["callback_url"]))
            return httpx.Response(
                200, json={"code": 0, "msg": "ok", "data": {"task_ids": [task_id]}}
            )

        await receive()  # lifespan.startup
        transport = httpx.MockTransport(service)
        async with (
            httpx.AsyncClient(transport=transport) as http,
            kx.AsyncKeevx(
                api_key="bench",
                base_url="https://api.keevx.test",
                callback_url=CALLBACK_URL,
                http_client=http,
                reconcile_after=None,
            ) as client,
        ):
            request = kx.ImageRequest("a lighthouse at dawn")
            held = [await client.submit(request) for _ in range(self.count)]
            callbacks = []
            for task_id, url in issued:
                body = {
                    "code": 0,
                    "msg": "ok",
                    "task_type": "image_generate",
                    "data": {
                        "task_id": task_id,
                        "status": "SUCCEEDED",
                        "image_url": f"https://images.keevx.test/{task_id}.png",
                        "error_message": "",
                    },
                }
                callbacks.append([url.removeprefix("http://127.0.0.1"), json.dumps(body)])
            (self.workdir / "callbacks.json").write_text(json.dumps(callbacks))
            self.http_app = client.callback_app if self.kind == "sdk" else _bare_app
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            stats = client.stats
            done = sum(submission.tasks[0].done() for submission in held)
            result = {"resolved": stats.resolved_by_callback, "pending": stats.pending}
            result["done"] = done
            (self.workdir / "stats.json").write_text(json.dumps(result))
        await send({"type": "lifespan.shutdown.complete"})


def _serve(kind: str, count: int, workdir: Path) -> None:
    import uvicorn  # noqa: PLC0415

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # Listening before startup ends: the driver's connections wait in the backlog.
    sock.listen(2048)
    (workdir / "port").write_text(str(sock.getsockname()[1]))
    config = uvicorn.Config(
        _Harness(kind, count, workdir),
        lifespan="on",
        log_level="warning",
        access_log=False,
        loop="asyncio",
    )
    uvicorn.Server(config).run(sockets=[sock])


# --- the driver process ------------------------------------------------------------------


async def _drive(port: int, workdir: Path) -> None:
    import aiohttp  # noqa: PLC0415

    callbacks = json.loads((workdir / "callbacks.json").read_text())
    requests = [(f"http://127.0.0.1:{port}{target}", body.encode()) for target, body in callbacks]
    statuses: dict[int, int] = {}
    position = 0
    headers = {"content-type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal position
        while position < len(requests):
            url, body = requests[position]
            position += 1
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
    print(json.dumps({"elapsed": elapsed, "statuses": statuses}))


# --- the orchestrator --------------------------------------------------------------------


def _one_run(kind: str, count: int) -> float:
    """Rate (callbacks per second) of one server of ``kind``; checks every outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = str(Path(__file__).resolve())
        server = subprocess.Popen(
            [sys.executable, script, "--serve", kind, "--callbacks", str(count), tmp]
        )
        try:
            deadline = time.monotonic() + 300
            while not (workdir / "callbacks.json").exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {kind} server did not start")
                time.sleep(0.05)
            time.sleep(0.2)  # the file is written just before startup completes
            port = (workdir / "port").read_text()
            driven = subprocess.run(
                [sys.executable, script, "--drive", port, tmp],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        result = json.loads(driven.stdout)
        statuses = {int(k): v for k, v in result["statuses"].items()}
        if statuses != {200: count}:
            raise RuntimeError(f"{kind}: expected {count} answers of 200, got {statuses}")
        if kind == "sdk":
            stats = json.loads((workdir / "stats.json").read_text())
            expected = {"resolved": count, "pending": 0, "done": count}
            if stats != expected:
                raise RuntimeError(f"sdk: expected {expected}, got {stats}")
        return count / float(result["elapsed"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--callbacks", type=int, default=20_000)
    parser.add_argument("--serve", choices=["sdk", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    parser.add_argument("workdir", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, args.callbacks, Path(args.workdir))
        return 0
    if args.drive:
        asyncio.run(_drive(int(args.drive), Path(args.workdir)))
        return 0
    if args.quick:
        args.reps, args.callbacks = 1, 500
    rows = []
    for rep in range(args.reps):
        # Alternate which runs first, so neither always meets the same machine state.
        kinds = ("bare", "sdk") if rep % 2 == 0 else ("sdk", "bare")
        rates = {kind: _one_run(kind, args.callbacks) for kind in kinds}
        rows.append((rep + 1, rates["bare"], rates["sdk"], rates["sdk"] / rates["bare"]))
    print(
        f"# receiver: {args.callbacks:,} callback POSTs at concurrency {CONCURRENCY}, "
        "uvicorn (one worker) <- aiohttp in another process, loopback"
    )
    print(f"# machine: nproc={os.cpu_count()}, Python {platform.python_version()}")
    print(f"{'rep':>4} {'bare ASGI /s':>13} {'callback_app /s':>16} {'ratio':>7}")
    for rep, bare, sdk, ratio in rows:
        print(f"{rep:>4} {bare:>13,.0f} {sdk:>16,.0f} {ratio:>7.3f}")
    print(f"receiver_bare_rate {statistics.median(r[1] for r in rows):.0f} /s")
    print(f"receiver_callback_app_rate {statistics.median(r[2] for r in rows):.0f} /s")
    print(f"receiver_ratio {statistics.median(r[3] for r in rows):.2f} (target >= {TARGET:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
