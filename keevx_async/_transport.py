"""The HTTP transports of the client's own ``httpx.AsyncClient``, built for fan-out.

httpx's connection pool (httpcore) re-examines every connection of the pool, each with a
``poll()`` system call, and every queued request, each time a request enters or leaves it:
work that grows with the pool, paid twice per request. At 64 connections that caps a
client at a few hundred requests per second on loopback, far below the network. Two ways
around it, picked at the first request, when the running async library is known:

- on asyncio, with ``aiohttp`` importable (the ``keevx-async[aiohttp]`` extra):
  `AiohttpTransport`, one
  ``aiohttp.ClientSession`` behind the httpx interface;
- otherwise (trio, or no aiohttp): `ShardedTransport`,
  the same connections split over several small httpx pools, each request sent through
  the least busy one.

Either way the client's callers see httpx: requests, responses and httpx's exceptions,
mapped so that the retry policy (which tells "never sent" from "maybe acted on" by the
exception's class) holds whichever transport sent the request.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import ssl
import time
from typing import TYPE_CHECKING, Any, Final

import httpx

if TYPE_CHECKING:
    from collections.abc import Mapping

    import aiohttp
    import yarl

__all__ = [
    "CONNECTIONS_PER_SHARD",
    "AiohttpTransport",
    "FanoutClient",
    "FanoutTransport",
    "ShardedTransport",
    "aiohttp_usable",
    "running_on_asyncio",
]

_httpx_logger = logging.getLogger("httpx")
_HTTP_11: Final = b"HTTP/1.1"
# Methods httpx sends "Content-Length: 0" for when there is no body.
_CONTENT_ENCODING: Final = "Content-Encoding"
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_FRAMING_HEADERS: Final = ("host", "content-length", "transfer-encoding")

CONNECTIONS_PER_SHARD: Final = 4
"""Connections per httpx pool in a `ShardedTransport`.

httpcore's per-request cost grows with its pool; measured on loopback at 64 in flight,
pools of 2 to 4 connections do about five times better than one pool of 64, and pools of
one do worse again (a request can only use the one connection of its pool)."""


def aiohttp_usable() -> bool:
    """Whether aiohttp can be imported and is recent enough (3.10: distinct timeout errors)."""
    try:
        import aiohttp  # noqa: PLC0415 (optional extra, loaded on use)
    except ImportError:
        return False
    return hasattr(aiohttp, "ConnectionTimeoutError")


def running_on_asyncio() -> bool:
    """Whether the calling task runs on asyncio (else on trio: the two backends we serve)."""
    # Not sniffio: it is not among our dependencies. Under trio no asyncio loop runs here,
    # and under trio's guest mode on an asyncio loop the current task is not an asyncio task.
    try:
        return asyncio.current_task() is not None
    except RuntimeError:
        return False


def _ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    """The TLS context httpx itself would use for ``verify`` (its CA bundle, its defaults)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    return httpx.create_ssl_context(verify=verify)


def _pool_limits(limits: httpx.Limits) -> tuple[int, float | None]:
    connections = limits.max_connections
    if connections is None:
        raise ValueError("a fan-out transport needs a bounded pool: set max_connections")
    return connections, limits.keepalive_expiry


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
        connections, keepalive_expiry = _pool_limits(limits)
        shards = max(1, math.ceil(connections / CONNECTIONS_PER_SHARD))
        per_shard = math.ceil(connections / shards)
        shard_limits = httpx.Limits(
            max_connections=per_shard,
            max_keepalive_connections=per_shard,
            keepalive_expiry=keepalive_expiry,
        )
        # One TLS context for all pools: each would otherwise load the CA bundle again
        # (tens of milliseconds per pool, paid at the first request).
        context = _ssl_context(verify)
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


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport sending through one ``aiohttp.ClientSession`` (asyncio only).

    The session is created at the first request, inside the running loop. Timeouts come
    from httpx's request extensions (``connect`` and ``pool`` bound getting a connection,
    ``read`` each read), and aiohttp's exceptions become httpx's: refused or timed-out
    connections raise ``httpx.ConnectError``/``httpx.ConnectTimeout`` (nothing was sent),
    anything after the request may have left raises a read or protocol error. Responses are
    read whole (this transport is for small bodies, not streaming) and handed to httpx
    still encoded, so httpx decodes them as it would its own.

    Args:
        limits: ``max_connections`` bounds the session's pool; ``keepalive_expiry`` is how
            long an idle connection is kept.
        verify: ``True`` (httpx's CA bundle and TLS defaults), ``False``, or an
            ``SSLContext``.
    """

    def __init__(self, *, limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> None:
        self._connections, self._keepalive_expiry = _pool_limits(limits)
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._url_text = ""
        self._url: yarl.URL | None = None
        self._timeouts_in: object = None
        self._timeout: aiohttp.ClientTimeout | None = None
        self._raw_headers_in: list[tuple[bytes, bytes]] = []
        self._headers: list[tuple[str, str]] = []

    def _open_session(self) -> aiohttp.ClientSession:
        import aiohttp  # noqa: PLC0415 (optional extra, loaded on use)

        connector = aiohttp.TCPConnector(
            limit=self._connections,
            limit_per_host=0,
            keepalive_timeout=self._keepalive_expiry,
            ssl=_ssl_context(self._verify),
        )
        # httpx decodes the body (it sent the Accept-Encoding), and keeps the cookies.
        return aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` with aiohttp; return the whole response as an httpx one."""
        import aiohttp  # noqa: PLC0415 (optional extra; a dict lookup after the first request)
        import yarl  # noqa: PLC0415 (aiohttp's URL type)

        if self._closed:
            raise RuntimeError("this transport is closed")
        session = self._session
        if session is None:
            session = self._session = self._open_session()
        # A fan-out sends to one URL, with the same headers and timeout, over and over:
        # converting each once, not per request, is measurable.
        url_text = str(request.url)
        url = self._url
        if url is None or url_text != self._url_text:
            url = self._url = yarl.URL(url_text, encoded=True)
            self._url_text = url_text
        timeouts = request.extensions.get("timeout", {})
        if timeouts is not self._timeouts_in:
            self._timeout = aiohttp.ClientTimeout(
                total=None,
                connect=timeouts.get("pool"),
                sock_connect=timeouts.get("connect"),
                sock_read=timeouts.get("read"),
            )
            self._timeouts_in = timeouts
        raw_headers = request.headers.raw
        if raw_headers != self._raw_headers_in:
            self._headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers]
            self._raw_headers_in = raw_headers
        headers = self._headers
        try:
            async with session.request(
                request.method,
                url,
                headers=headers,
                data=request.content or None,
                allow_redirects=False,
                timeout=self._timeout,
            ) as reply:
                content = await reply.read()
        except aiohttp.ClientError as exc:
            raise _httpx_error(exc, request) from exc
        version = reply.version
        response = httpx.Response(
            reply.status,
            headers=reply.raw_headers,
            stream=httpx.ByteStream(content),
            request=request,
            extensions={
                "http_version": _HTTP_11
                if version is None
                else f"HTTP/{version.major}.{version.minor}".encode(),
                "reason_phrase": (reply.reason or "").encode(),
            },
        )
        if _CONTENT_ENCODING in reply.headers:
            response.read()  # decodes the body per its Content-Encoding, as httpx would
        else:
            # Nothing to decode: what read() would store, without running its decoder
            # chain (a large share of the per-request cost at fan-out rates).
            response._content = content
        return response

    async def aclose(self) -> None:
        """Close the session and its connections."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _httpx_error(exc: aiohttp.ClientError, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception standing for an aiohttp one.

    The order is the point: the retry policy retries only what provably never reached the
    service, so only a failure to connect may become a connect error; anything that can
    happen after the body left (a reset, a disconnect, a read timeout) is a read or
    protocol error.
    """
    import aiohttp  # noqa: PLC0415 (optional extra)

    message = str(exc) or type(exc).__name__
    error_class: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        error_class = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error_class = httpx.ConnectError
    elif isinstance(exc, aiohttp.ServerTimeoutError):
        error_class = httpx.ReadTimeout
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError)):
        error_class = httpx.RemoteProtocolError
    elif isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        error_class = httpx.UnsupportedProtocol
    elif isinstance(exc, aiohttp.ClientConnectionError):
        error_class = httpx.ReadError
    else:
        error_class = httpx.ProtocolError
    return error_class(message, request=request)


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
        _pool_limits(limits)
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


class FanoutClient(httpx.AsyncClient):
    """The client's own ``httpx.AsyncClient``: a direct path for the requests the SDK sends.

    ``AsyncClient.request`` spends more time than the network on loopback: it merges the
    client's and the call's headers and URL, runs the auth, redirect and cookie machinery,
    and wraps the response stream, for every request. The SDK's own requests need none of
    that (no auth flow, no redirects, no cookies, the same URL and headers again and
    again), so a call with only ``content``, ``headers`` and an ``httpx.Timeout`` goes
    straight to the transport, with the merged headers and the parsed URL reused while
    they do not change. Anything else (other arguments, auth or event hooks set, proxy
    mounts from the environment) takes httpx's full path. This client keeps no cookies.

    Args:
        transport: where requests go (a `FanoutTransport`).
        **kwargs: as for ``httpx.AsyncClient``.
    """

    def __init__(self, *, transport: httpx.AsyncBaseTransport, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self._direct = transport
        # Proxies taken from the environment are mounted transports: httpx must route.
        # The direct path leans on two private httpx names (present from 0.27 on); an
        # httpx without them simply takes its own path.
        self._routable = hasattr(self, "_merge_url") and not getattr(self, "_mounts", True)
        self._url_in: object = None
        self._url = httpx.URL()
        self._headers_in: dict[str, str] | None = None
        self._client_headers: httpx.Headers | None = None
        # The request head without its Content-Length: Host first, as httpx orders it.
        self._head: list[tuple[bytes, bytes]] = []
        self._head_is_plain = False
        self._timeout_in: object = None
        self._timeout_extension: dict[str, float | None] = {}

    async def request(  # type: ignore[override]
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request (and read its response), directly when nothing needs httpx's path."""
        if (
            kwargs
            or not isinstance(timeout, httpx.Timeout)
            or not self._routable
            or self.auth is not None
            or any(self.event_hooks.values())
        ):
            return await super().request(
                method, url, content=content, headers=headers, timeout=timeout, **kwargs
            )
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if (
            url is not self._url_in
            or headers != self._headers_in
            or self.headers is not self._client_headers
        ):
            self._prepare_head(url, headers)
        if not self._head_is_plain:
            # Framing headers set by the caller: httpx knows how to honour them.
            return await super().request(
                method, url, content=content, headers=headers, timeout=timeout
            )
        if timeout is not self._timeout_in:
            self._timeout_extension = timeout.as_dict()
            self._timeout_in = timeout
        # Request(stream=...) takes the head as given; Request(content=...) would merge
        # and search the headers again on every call.
        head = self._head
        if content is not None:
            head = [*head, (b"Content-Length", b"%d" % len(content))]
        elif method in _BODY_METHODS:
            head = [*head, (b"Content-Length", b"0")]
        request = httpx.Request(
            method,
            self._url,
            headers=head,
            stream=httpx.ByteStream(content or b""),
            extensions={"timeout": self._timeout_extension},
        )
        request.read()
        start = time.perf_counter()
        try:
            response = await self._direct.handle_async_request(request)
        except httpx.RequestError as exc:
            # httpx's own path attaches the request; callers may read it.
            _attach_request(exc, request)
            raise
        response.request = request
        await response.aread()
        response.elapsed = datetime.timedelta(seconds=time.perf_counter() - start)
        if _httpx_logger.isEnabledFor(logging.INFO):
            _httpx_logger.info(
                'HTTP Request: %s %s "%s %d %s"',
                method,
                request.url,
                response.http_version,
                response.status_code,
                response.reason_phrase,
            )
        return response

    def _prepare_head(self, url: httpx.URL | str, headers: Mapping[str, str] | None) -> None:
        if url is not self._url_in:
            self._url = self._merge_url(url)
            self._url_in = url
        merged = self.headers.copy()
        merged.update(headers or {})
        self._head_is_plain = not any(name in merged for name in _FRAMING_HEADERS)
        self._head = [(b"Host", self._url.netloc), *merged.raw]
        self._headers_in = None if headers is None else dict(headers)
        self._client_headers = self.headers


def _attach_request(exc: httpx.RequestError, request: httpx.Request) -> None:
    try:
        exc.request  # noqa: B018 (raises RuntimeError when unset)
    except RuntimeError:
        exc.request = request
