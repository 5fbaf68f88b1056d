"""`AiohttpTransport`: one ``aiohttp.ClientSession`` behind the httpx interface (asyncio)."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Final

import httpx

from .pool import pool_limits, ssl_context

if TYPE_CHECKING:
    import ssl

    import aiohttp
    import yarl

__all__ = ["AiohttpTransport", "aiohttp_usable"]

_HTTP_11: Final = b"HTTP/1.1"
_CONTENT_ENCODING: Final = "Content-Encoding"


def aiohttp_usable() -> bool:
    """Whether aiohttp can be imported and is recent enough (3.10: distinct timeout errors)."""
    try:
        import aiohttp  # noqa: PLC0415 (optional extra, loaded on use)
    except ImportError:
        return False
    return hasattr(aiohttp, "ConnectionTimeoutError")


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
        self._connections, self._keepalive_expiry = pool_limits(limits)
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
            ssl=ssl_context(self._verify),
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
                # The whole attempt (see attempt_deadline): a trickled reply included.
                total=timeouts.get("total"),
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
        except asyncio.TimeoutError as exc:  # TimeoutError from 3.11
            # aiohttp's total timeout: the attempt ran out, after the request may have
            # left, so a read timeout (ambiguous for a submit), never a connect error.
            raise httpx.ReadTimeout(
                f"the attempt took longer than {timeouts.get('total')} s", request=request
            ) from exc
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
        # aiohttp's own wording says "ssl:default" even for plain http: say it plainly.
        cause = exc.os_error
        reason = os.strerror(cause.errno) if cause.errno else str(cause) or type(cause).__name__
        message = f"cannot connect to {exc.host}:{exc.port}: {reason}"
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
