"""`FanoutClient`: the client's ``httpx.AsyncClient``, with a direct path for the SDK's calls."""

from __future__ import annotations

import datetime
import logging
import time
from typing import TYPE_CHECKING, Any, Final

import httpx

from .pool import OneShotBody

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["FanoutClient", "attempt_deadline"]

_httpx_logger = logging.getLogger("httpx")
# Methods httpx sends "Content-Length: 0" for when there is no body.
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_FRAMING_HEADERS: Final = ("host", "content-length", "transfer-encoding")


def attempt_deadline(timeout: httpx.Timeout) -> float | None:
    """Seconds one whole attempt (connect, send, receive) may take: the longest of the
    timeout's phases, or ``None`` when a phase is unlimited.

    httpx's timeouts bound each phase, and each read: a reply trickled a byte at a time
    never trips them. This bounds the attempt; the transports carry it as ``"total"`` in
    the ``timeout`` extension.
    """
    phases = (timeout.connect, timeout.read, timeout.write, timeout.pool)
    if any(phase is None for phase in phases):
        return None
    return max(phase for phase in phases if phase is not None)


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
            self._timeout_extension = {**timeout.as_dict(), "total": attempt_deadline(timeout)}
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
            stream=OneShotBody(content or b""),
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
