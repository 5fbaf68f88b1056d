"""`ShardedTransport`: httpx's own pools, small and several, for trio and plain installs.

It also keeps the whole-attempt deadline (``timeout``: connect, send and the whole reply)
without a cancel scope per request, which costs trio about 8% of the fan-out rate: each
pool's network streams bound every connect, read and write by what is left of the
attempt (a context variable set per request), so a reply trickled one byte at a time
ends at the deadline like any other read timeout.
"""

from __future__ import annotations

import contextvars
import math
import time
from typing import TYPE_CHECKING, Any, Final

import httpcore
import httpx

from .pool import OneShotBody, pool_limits, ssl_context

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable

__all__ = ["CONNECTIONS_PER_SHARD", "ShardedTransport"]

# The current attempt's (deadline on time.monotonic(), its length in seconds).
_attempt: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "keevx_attempt_deadline", default=None
)


def _bounded(timeout: float | None) -> float | None:
    """``timeout`` for one network operation, cut to what is left of the attempt."""
    attempt = _attempt.get()
    if attempt is None:
        return timeout
    left = attempt[0] - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout(_too_long(attempt[1]))
    return left if timeout is None or left < timeout else timeout


def _too_long(seconds: float) -> str:
    return f"the attempt took longer than {seconds:g} s (timeout)"


def _cut_short(timeout: float | None, bounded: float | None) -> bool:
    """Whether an operation timed out because the attempt's deadline cut it short."""
    return bounded is not None and (timeout is None or bounded < timeout)


class _AttemptStream(httpcore.AsyncNetworkStream):
    """A connection whose reads and writes end at the current attempt's deadline."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        bounded = _bounded(timeout)
        try:
            return await self._stream.read(max_bytes, bounded)
        except httpcore.ReadTimeout:
            attempt = _attempt.get()
            if attempt is not None and _cut_short(timeout, bounded):
                raise httpcore.ReadTimeout(_too_long(attempt[1])) from None
            raise

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, _bounded(timeout))

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout))
        return _AttemptStream(stream)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _AttemptBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own network backend, its connections bounded by the attempt's deadline."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(
            host, port, _bounded(timeout), local_address, socket_options
        )
        return _AttemptStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:  # pragma: no cover - the SDK connects over TCP
        stream = await self._backend.connect_unix_socket(path, _bounded(timeout), socket_options)
        return _AttemptStream(stream)

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - httpcore's retries
        await self._backend.sleep(seconds)


def _bound_attempts(transport: httpx.AsyncHTTPTransport) -> bool:
    """Put `_AttemptBackend` under ``transport``'s pool; whether that could be done
    (httpx keeps its pool private: if a release moves it, the client falls back on a
    cancel scope per attempt, slower but as correct)."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if not isinstance(backend, httpcore.AsyncNetworkBackend):  # pragma: no cover
        return False
    pool._network_backend = _AttemptBackend(backend)  # type: ignore[union-attr]
    return True


CONNECTIONS_PER_SHARD: Final = 4
"""Connections per httpx pool in a `ShardedTransport`.

httpcore's per-request cost grows with its pool; measured on loopback at 64 in flight,
pools of 2 to 4 connections do about five times better than one pool of 64, and pools of
one do worse again (a request can only use the one connection of its pool)."""


class ShardedTransport(httpx.AsyncBaseTransport):
    """httpx's own transport, with its connections split over several small pools.

    Each request goes to the pool with the fewest requests in flight, so no request
    waits in one pool while another has an idle connection, and each pool stays small
    enough for httpcore's bookkeeping to be cheap. The response body is read before the
    request leaves its pool (the request is not counted in flight any more then):
    this transport is for small bodies, not streaming.

    Args:
        limits: the pool as a whole; ``max_connections`` is split into pools of
            `CONNECTIONS_PER_SHARD`.
        verify: as for ``httpx.AsyncHTTPTransport``.
    """

    def __init__(self, *, limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> None:
        connections, keepalive_expiry = pool_limits(limits)
        shards = max(1, math.ceil(connections / CONNECTIONS_PER_SHARD))
        per_shard = math.ceil(connections / shards)
        shard_limits = httpx.Limits(
            max_connections=per_shard,
            max_keepalive_connections=per_shard,
            keepalive_expiry=keepalive_expiry,
        )
        # One TLS context for all pools: each would otherwise load the CA bundle again
        # (tens of milliseconds per pool, paid at the first request).
        context = ssl_context(verify)
        self._shards = [
            httpx.AsyncHTTPTransport(limits=shard_limits, verify=context) for _ in range(shards)
        ]
        self._in_flight = [0] * shards
        bounded = [_bound_attempts(shard) for shard in self._shards]  # each, no shortcut
        self.keeps_deadline = all(bounded)
        """Whether a request's ``total`` timeout extension bounds its whole attempt."""

    @property
    def shard_count(self) -> int:
        """How many pools the connections are split over."""
        return len(self._shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the least busy pool and read its whole response."""
        if type(request.stream) is httpx.ByteStream:  # httpx's own path built it
            request.stream = OneShotBody(request.content)
        in_flight = self._in_flight
        index = in_flight.index(min(in_flight))
        in_flight[index] += 1
        total = request.extensions.get("timeout", {}).get("total")
        token = None if total is None else _attempt.set((time.monotonic() + total, total))
        try:
            response = await self._shards[index].handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        finally:
            in_flight[index] -= 1
            if token is not None:
                _attempt.reset(token)
        return response

    async def aclose(self) -> None:
        """Close every pool's connections."""
        for shard in self._shards:
            await shard.aclose()
