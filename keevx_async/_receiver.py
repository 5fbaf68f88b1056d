"""``callback_app``: a plain ASGI application that receives the service's callbacks.

The order of checks is the cheap-first order an endpoint facing the internet wants:
method (405), token (401, before a byte of the body is read), size (413), body (400), then
the registry. The body must be JSON whatever its ``Content-Type`` says: the service does
not document the header it sends, and a callback refused for a header would be lost.

No web framework is needed; mount it under the path of your ``callback_url`` in any ASGI
server or framework.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Final

import anyio

from ._exceptions import CallbackAuthError, CallbackError, JournalError, RouterError
from ._models import CallbackOutcome
from ._tokens import token_from_target

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._asgi import Receive, Scope, Send

__all__ = ["DEFAULT_MAX_BODY_SIZE", "CallbackApp"]

logger = logging.getLogger("keevx_async")

DEFAULT_MAX_BODY_SIZE: Final = 64 * 1024
"""Default cap on a callback body (a real one is a few hundred bytes)."""

_OK: Final = b'{"code":0,"msg":"ok"}'
DEFAULT_BODY_TIMEOUT: Final = 10.0
"""Seconds a callback body may take to arrive before it is refused with 408 (a real one
arrives in one packet; a trickled one would hold its task until shutdown)."""
#: Seconds the service is asked to wait before delivering a refused callback again.
RETRY_AFTER_UNAVAILABLE: Final = 1


class _BodyTooLargeError(Exception):
    pass


class _BodyTooSlowError(Exception):
    pass


def _error_body(status: int, msg: str) -> bytes:
    return json.dumps({"code": status, "msg": msg}).encode()


class CallbackApp:
    """The ASGI callable behind ``AsyncKeevx.callback_app``.

    ``POST`` with a valid body -> 200 ``{"code":0,"msg":"ok"}`` (also for duplicates and
    early callbacks: feeding is idempotent); malformed -> 400; bad or missing token -> 401;
    body over ``max_body_size`` -> 413; a body still incomplete after ``body_timeout``
    seconds -> 408; other methods -> 405; a callback the client's router could not
    record, or a result a journaled batch could not commit -> 503 with ``Retry-After``,
    so the service delivers it again.
    """

    __slots__ = ("_authenticate", "_feed", "body_timeout", "max_body_size")

    def __init__(
        self,
        *,
        authenticate: Callable[[str | None], str | None],
        feed: Callable[[bytes, str | None], CallbackOutcome | Awaitable[CallbackOutcome]],
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ) -> None:
        self._authenticate = authenticate
        self._feed = feed
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope (``http``, or ``lifespan`` for standalone use)."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            raise RuntimeError(f"callback_app serves HTTP only, not {kind!r}")
        status, body = await self._handle(scope, receive)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if status == 405:
            headers.append((b"allow", b"POST"))
        elif status == 503:
            headers.append((b"retry-after", b"%d" % RETRY_AFTER_UNAVAILABLE))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        if scope["method"] != "POST":
            return 405, _error_body(405, "callbacks are POSTed")
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            # The path as sent, when the server gives it: the same parse as feed_callback.
            # (Some servers, httpx's ASGITransport among them, leave the query on it.)
            raw_path = scope.get("raw_path")
            path = raw_path.decode("latin-1").partition("?")[0] if raw_path else scope["path"]
            submission_id = self._authenticate(token_from_target(path, query))
        except CallbackAuthError as exc:
            return 401, _error_body(401, str(exc))
        headers = dict(scope.get("headers") or ())
        try:
            body = await self._read_body(headers, receive)
        except _BodyTooLargeError:
            logger.warning("rejected a callback body over %d bytes", self.max_body_size)
            return 413, _error_body(413, f"callback body exceeds {self.max_body_size} bytes")
        except _BodyTooSlowError:
            logger.warning(
                "rejected a callback whose body took over %g s to arrive", self.body_timeout
            )
            return 408, _error_body(
                408, f"callback body not received within {self.body_timeout:g} seconds"
            )
        try:
            outcome = self._feed(body, submission_id)
            if not isinstance(outcome, CallbackOutcome):
                await outcome  # routed to another process: recorded before the 200
        except CallbackAuthError as exc:
            return 401, _error_body(401, str(exc))
        except CallbackError as exc:
            return 400, _error_body(400, str(exc))
        except RouterError as exc:
            return 503, _error_body(503, str(exc))
        except JournalError as exc:
            logger.warning(
                "answered a callback 503 (the service will deliver it again): its result "
                "could not be committed to the run's journal: %s",
                exc,
            )
            return 503, _error_body(503, str(exc))
        return 200, _OK

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        with anyio.move_on_after(self.body_timeout):
            return await self._read_whole_body(headers, receive)
        raise _BodyTooSlowError

    async def _read_whole_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        limit = self.max_body_size
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyTooLargeError
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; what we have is all there is
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLargeError
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
