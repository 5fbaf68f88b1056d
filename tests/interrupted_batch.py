"""Run by tests/test_batch.py in a process of its own: Ctrl-C (a real SIGINT) reaches a
batch's submit; prints how the interrupt surfaced to the caller.

Usage: python interrupted_batch.py BACKEND
"""

from __future__ import annotations

import os
import signal
import sys

import anyio
import httpx

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

import keevx_async as kx
from keevx_async.testing import FakeKeevx


class InterruptedAt(httpx.AsyncBaseTransport):
    """The fake's transport; the third submit sends this process SIGINT as it starts,
    so the KeyboardInterrupt is raised in that submit's task (as Ctrl-C can be)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.posts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posts += 1
            if self.posts == 3:
                os.kill(os.getpid(), signal.SIGINT)
                await anyio.sleep(0.5)  # where asyncio's runner cancels us instead
        return await self.inner.handle_async_request(request)


async def main() -> str:
    async with FakeKeevx(complete_after=0.001) as fake:
        transport = InterruptedAt(httpx.ASGITransport(app=fake))
        async with (
            httpx.AsyncClient(transport=transport) as http,
            kx.AsyncKeevx(
                api_key="test", base_url=fake.base_url, http_client=http, reconcile_after=None
            ) as client,
        ):
            try:
                async with client.batch([f"p{i}" for i in range(20)], concurrency=4) as batch:
                    async for _task in batch:
                        pass
            except KeyboardInterrupt:
                return "KeyboardInterrupt in the program"
            except BaseExceptionGroup as group:  # what the fix removes
                return f"a group: {group!r}"
    return "not interrupted"


if __name__ == "__main__":
    try:
        print(anyio.run(main, backend=sys.argv[1]))  # noqa: T201 (the test reads it)
    except KeyboardInterrupt:
        print("KeyboardInterrupt from the runner")  # noqa: T201
    except BaseExceptionGroup as group:
        print(f"a group from the runner: {group!r}")  # noqa: T201
