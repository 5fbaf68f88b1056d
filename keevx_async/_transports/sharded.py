"""`ShardedTransport`: httpx's own pools, small and several, for trio and plain installs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

import httpx

from .pool import pool_limits, ssl_context

if TYPE_CHECKING:
    import ssl

__all__ = ["CONNECTIONS_PER_SHARD", "ShardedTransport"]

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

    @property
    def shard_count(self) -> int:
        """How many pools the connections are split over."""
        return len(self._shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the least busy pool and read its whole response."""
        in_flight = self._in_flight
        index = in_flight.index(min(in_flight))
        in_flight[index] += 1
        try:
            response = await self._shards[index].handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        finally:
            in_flight[index] -= 1
        return response

    async def aclose(self) -> None:
        """Close every pool's connections."""
        for shard in self._shards:
            await shard.aclose()
