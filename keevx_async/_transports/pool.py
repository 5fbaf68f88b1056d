"""What the fan-out transports share: the pool's bounds, the TLS context, the body."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["OneShotBody", "pool_limits", "ssl_context"]


class _Once:
    """An async iterator of one chunk: a plain object, not an async generator."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        body = self._body
        if body is None:
            raise StopAsyncIteration
        self._body = None
        return body


class OneShotBody(httpx.ByteStream):
    """A request body (bytes) that httpcore iterates without an async generator.

    httpx's ``ByteStream`` yields its body from an async generator; a send cancelled
    midway leaves that generator unfinished, and trio warns when it is collected
    (``ResourceWarning: Async generator 'httpx._content.ByteStream.__aiter__' was garbage
    collected before it had been exhausted``; encode/httpx#3686). A plain iterator has
    nothing to finish. Still a ``ByteStream``, so httpx treats the request as read.
    """

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self._body = body

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._body)


def ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    """The TLS context httpx itself would use for ``verify`` (its CA bundle, its defaults)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    return httpx.create_ssl_context(verify=verify)


def pool_limits(limits: httpx.Limits) -> tuple[int, float | None]:
    connections = limits.max_connections
    if connections is None:
        raise ValueError("a fan-out transport needs a bounded pool: set max_connections")
    return connections, limits.keepalive_expiry
