"""``timeout`` bounds a whole HTTP attempt, not each read.

Found by adversarial testing: a reply trickled one byte every 0.3 s with ``timeout=2.0``
took 26.8 s on every transport (httpx's timeouts bound each read). Here a real loopback
server trickles its reply; every transport the client can use gives up after about
``timeout`` seconds, as an ambiguous read timeout.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import httpx
import pytest

import keevx_async as kx
from keevx_async._transports import FanoutTransport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from anyio.abc import SocketStream

pytestmark = pytest.mark.anyio

BODY = b'{"code":0,"msg":"ok","data":{"task_ids":["i2is-trickled"]}}'
TIMEOUT = 0.5
HANG_GUARD = 10  # what the adversarial run measured was ~13 times the timeout


@asynccontextmanager
async def trickling_server(*, head_too: bool = False) -> AsyncIterator[tuple[int, list[float]]]:
    """A server that reads a request, then sends a complete head and its body one byte
    every 0.1 s (with ``head_too``, the head as well); yields its port and the times
    requests arrived."""
    arrivals: list[float] = []

    async def serve(stream: SocketStream) -> None:
        async with stream:
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive()
            arrivals.append(anyio.current_time())
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            head += b"Content-Length: %d\r\n\r\n" % len(BODY)
            trickled = head + BODY if head_too else BODY
            if not head_too:
                await stream.send(head)
            try:
                for byte in trickled:
                    await stream.send(bytes([byte]))
                    await anyio.sleep(0.1)  # the behaviour under test: a trickle
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the client gave up: what the test wants

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 (not Django)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield port, arrivals
        finally:
            tg.cancel_scope.cancel()


def _default(port: int) -> kx.AsyncKeevx:
    return kx.AsyncKeevx(
        api_key="k", base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT, max_retries=0
    )


@asynccontextmanager
async def _own_http_client(port: int) -> AsyncIterator[kx.AsyncKeevx]:
    async with httpx.AsyncClient(trust_env=False) as http:
        yield kx.AsyncKeevx(
            api_key="k",
            base_url=f"http://127.0.0.1:{port}",
            timeout=TIMEOUT,
            max_retries=0,
            http_client=http,
        )


@asynccontextmanager
async def _default_client(port: int) -> AsyncIterator[kx.AsyncKeevx]:
    async with _default(port) as client:
        yield client


CLIENTS: dict[str, Callable[[int], Any]] = {
    "the client's own (aiohttp on asyncio, sharded httpx on trio)": _default_client,
    "an httpx.AsyncClient of the caller's": _own_http_client,
}


@pytest.mark.parametrize("make", CLIENTS.values(), ids=list(CLIENTS))
async def test_a_trickled_reply_times_out_after_timeout_seconds(make: Any) -> None:
    async with trickling_server() as (port, arrivals), make(port) as client:
        with anyio.fail_after(HANG_GUARD):
            # Twice: the first attempt of the client's own transport also picks it.
            for _ in range(2):
                started = anyio.current_time()
                with pytest.raises(kx.TransportError) as caught:
                    await client.submit(kx.ImageRequest("a trickled reply"))
                elapsed = anyio.current_time() - started
                # The body takes 6 s to trickle in; the attempt gave up near TIMEOUT.
                assert elapsed < 4 * TIMEOUT, elapsed
                assert caught.value.maybe_created is True  # the request had left
                assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
            with pytest.raises(kx.TransportError):
                await client.retrieve("i2is-trickled")
    assert len(arrivals) == 3  # max_retries=0: no attempt repeated


def test_the_attempt_deadline_is_the_longest_phase_or_none() -> None:
    from keevx_async._transports.fanout_client import attempt_deadline  # noqa: PLC0415

    assert attempt_deadline(httpx.Timeout(2.0)) == 2.0
    assert attempt_deadline(httpx.Timeout(2.0, connect=5.0)) == 5.0
    assert attempt_deadline(httpx.Timeout(2.0, read=None)) is None


@pytest.mark.parametrize("head_too", [False, True], ids=["body", "head and body"])
async def test_the_sharded_pools_keep_the_deadline_without_a_cancel_scope(
    head_too: bool,
) -> None:
    """The transport of trio (and of asyncio without aiohttp) bounds each network
    operation by what is left of the attempt: the engine's cancel scope per attempt,
    which cost trio about 8% of its fan-out rate, is dropped after the first request."""
    async with trickling_server(head_too=head_too) as (port, _):
        client = _default(port)
        # The sharded pools on both backends: what trio always gets.
        transport = client._engine.http._direct  # type: ignore[attr-defined]
        assert isinstance(transport, FanoutTransport)
        transport._prefer_aiohttp = False
        async with client:
            with anyio.fail_after(HANG_GUARD):
                for _ in range(2):
                    started = anyio.current_time()
                    with pytest.raises(kx.TransportError) as caught:
                        await client.submit(kx.ImageRequest("a trickled reply"))
                    assert anyio.current_time() - started < 4 * TIMEOUT
                    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
                    assert f"longer than {TIMEOUT:g} s" in str(caught.value.__cause__)
            # The transport keeps it: the second attempt above had no cancel scope.
            assert client._engine._deadline is None
