"""`FanoutTransport`: the client's default transport, picked at the first request."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from .._eventloop import running_on_asyncio
from .aiohttp import AiohttpTransport, aiohttp_usable
from .pool import pool_limits
from .sharded import ShardedTransport

if TYPE_CHECKING:
    import ssl

__all__ = ["FanoutTransport"]


class FanoutTransport(httpx.AsyncBaseTransport):
    """The client's default transport: aiohttp on asyncio when available, else sharded httpx.

    The choice is made at the first request, when the running async library is known, so
    a client built outside any event loop works under asyncio and trio alike.

    Args:
        limits: the pool as a whole (``max_connections`` must be set).
        verify: TLS verification, as for httpx's transports.
        prefer_aiohttp: ``False`` keeps httpx's own transport also on asyncio.
    """

    def __init__(
        self,
        *,
        limits: httpx.Limits,
        verify: ssl.SSLContext | bool = True,
        prefer_aiohttp: bool = True,
    ) -> None:
        pool_limits(limits)
        self._limits = limits
        self._verify = verify
        self._prefer_aiohttp = prefer_aiohttp
        self._chosen: httpx.AsyncBaseTransport | None = None

    @property
    def chosen(self) -> httpx.AsyncBaseTransport | None:
        """The transport picked at the first request (``None`` before it)."""
        return self._chosen

    def _choose(self) -> httpx.AsyncBaseTransport:
        if self._prefer_aiohttp and running_on_asyncio() and aiohttp_usable():
            return AiohttpTransport(limits=self._limits, verify=self._verify)
        return ShardedTransport(limits=self._limits, verify=self._verify)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the transport chosen for the running async library."""
        chosen = self._chosen
        if chosen is None:
            chosen = self._chosen = self._choose()
        return await chosen.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the chosen transport, if a request ever chose one."""
        chosen, self._chosen = self._chosen, None
        if chosen is not None:
            await chosen.aclose()
