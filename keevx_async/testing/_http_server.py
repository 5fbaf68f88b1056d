"""A small, test-grade HTTP/1.1 server that runs any ASGI 3 application on a local socket.

It exists so that [`FakeKeevx`][keevx_async.testing.FakeKeevx] (or a test's own callback
receiver) can be reached over a real TCP connection without a third-party server: it uses
only `anyio`, so it runs under asyncio and trio alike. It is deliberately small:
bodies are framed by ``Content-Length`` only (chunked requests get 501), responses are
buffered and sent with a ``Content-Length``, and there is no TLS. Do not expose it to a
network you do not control.
"""

from __future__ import annotations

import http
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import unquote

import anyio
import attrs
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ["ASGIApp", "LoopbackServer", "Message", "Receive", "Scope", "Send", "serve_asgi"]

Scope = MutableMapping[str, Any]
"""An ASGI connection scope."""
Message = MutableMapping[str, Any]
"""An ASGI event (sent or received)."""
Receive = Callable[[], Awaitable[Message]]
"""The ASGI ``receive`` callable."""
Send = Callable[[Message], Awaitable[None]]
"""The ASGI ``send`` callable."""
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI 3 application."""

MAX_HEADER_BYTES: Final = 64 * 1024
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
DEFAULT_SHUTDOWN_GRACE: Final = 5.0

_REASON_PHRASES: Final = {status.value: status.phrase for status in http.HTTPStatus}
# Framing headers are the server's job: whatever the application says about them is dropped
# and replaced by the values that match what is actually written.
_SERVER_OWNED_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding", b"connection"})
# A peer that goes away mid-request surfaces as one of these; the connection is just closed.
_CONNECTION_LOST: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    OSError,
)

logger = logging.getLogger(__name__)


@attrs.frozen
class LoopbackServer:
    """Where a server started by [`serve_asgi`][keevx_async.testing.serve_asgi] listens.

    ``port`` is the real port, also when ``0`` was asked for; ``url`` is the base URL to
    give to an HTTP client (``http://host:port``, IPv6 hosts in brackets).
    """

    host: str
    port: int

    @property
    def url(self) -> str:
        """The server's base URL, without a trailing slash."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class _BadRequestError(Exception):
    """A request that cannot be served; the connection is answered and closed."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@attrs.define
class _RequestHead:
    method: str
    http_version: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


@attrs.define
class _Response:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    body_parts: list[bytes] = attrs.Factory(list)
    complete: bool = False


class _ConnectionState:
    """What shutdown needs to know about one connection."""

    __slots__ = ("idle_scope",)

    def __init__(self) -> None:
        # Set while the connection waits for the next request: shutdown cancels it so
        # that idle keep-alive connections close at once instead of at the grace deadline.
        self.idle_scope: anyio.CancelScope | None = None


def _parse_head(head: bytes) -> _RequestHead:
    """Parse a request line and header block (without the final blank line)."""
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[1].startswith("/"):
        raise _BadRequestError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequestError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    headers: list[tuple[bytes, bytes]] = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        # A name with surrounding whitespace is a request-smuggling vector (RFC 9112 5.1).
        if not colon or not name or name != name.strip():
            raise _BadRequestError(400, "malformed header line")
        headers.append((name.lower().encode("latin-1"), value.strip(" \t").encode("latin-1")))
    raw_path, _, query = target.partition("?")
    return _RequestHead(
        method=method.upper(),
        http_version=version.removeprefix("HTTP/"),
        raw_path=raw_path.encode("latin-1"),
        query_string=query.encode("latin-1"),
        headers=headers,
    )


def _body_length(head: _RequestHead) -> int:
    """How many body bytes follow the head, per ``Content-Length`` (0 when absent)."""
    if head.values(b"transfer-encoding"):
        raise _BadRequestError(501, "Transfer-Encoding is not supported: send Content-Length")
    lengths = set(head.values(b"content-length"))
    if not lengths:
        return 0
    length = lengths.pop()
    if lengths or not length.isdigit():
        raise _BadRequestError(400, "invalid Content-Length")
    if int(length) > MAX_BODY_BYTES:
        raise _BadRequestError(413, "request body too large")
    return int(length)


def _wants_keep_alive(head: _RequestHead) -> bool:
    tokens = {
        token.strip().lower() for value in head.values(b"connection") for token in value.split(b",")
    }
    if head.http_version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def _encode_response(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    keep_alive: bool,
    include_body: bool = True,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASON_PHRASES.get(status, '')}".encode("latin-1")]
    lines.extend(
        name + b": " + value for name, value in headers if name not in _SERVER_OWNED_HEADERS
    )
    lines.append(b"content-length: %d" % len(body))
    lines.append(b"connection: keep-alive" if keep_alive else b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body if include_body else b"")


def _plain_error(status: int, detail: str) -> bytes:
    """A complete ``text/plain`` error response that closes the connection."""
    return _encode_response(
        status,
        [(b"content-type", b"text/plain; charset=utf-8")],
        detail.encode() + b"\n",
        keep_alive=False,
    )


def _address(value: Any) -> tuple[str, int]:
    # IPv6 socket addresses carry flowinfo and scope id; ASGI wants (host, port) only.
    host, port = value[0], value[1]
    return (str(host), int(port))


class _Server:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._connections: set[_ConnectionState] = set()
        self._closing = False
        self._all_closed = anyio.Event()

    def begin_shutdown(self) -> None:
        """Stop serving new requests; close idle connections now, busy ones when done."""
        self._closing = True
        for state in self._connections:
            if state.idle_scope is not None:
                state.idle_scope.cancel()
        if not self._connections:
            self._all_closed.set()

    async def wait_closed(self) -> None:
        await self._all_closed.wait()

    async def handle_connection(self, stream: SocketStream) -> None:
        state = _ConnectionState()
        self._connections.add(state)
        try:
            async with stream:
                await self._serve_requests(stream, state)
        except _CONNECTION_LOST:
            logger.debug("connection lost", exc_info=True)
        finally:
            self._connections.discard(state)
            if self._closing and not self._connections:
                self._all_closed.set()

    async def _serve_requests(self, stream: SocketStream, state: _ConnectionState) -> None:
        reader = BufferedByteReceiveStream(stream)
        client = _address(stream.extra(SocketAttribute.remote_address))  # noqa: S610 - not Django
        server = _address(stream.extra(SocketAttribute.local_address))  # noqa: S610 - not Django
        while not self._closing:
            with anyio.CancelScope() as idle_scope:
                state.idle_scope = idle_scope
                try:
                    raw_head = await reader.receive_until(b"\r\n\r\n", MAX_HEADER_BYTES)
                except anyio.DelimiterNotFound:
                    await stream.send(_plain_error(431, "request header fields too large"))
                    return
            state.idle_scope = None
            if idle_scope.cancelled_caught:
                return
            try:
                head = _parse_head(raw_head)
                body_length = _body_length(head)
            except _BadRequestError as exc:
                await stream.send(_plain_error(exc.status, exc.detail))
                return
            if body_length and b"100-continue" in head.values(b"expect"):
                await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await reader.receive_exactly(body_length) if body_length else b""
            keep_alive = _wants_keep_alive(head)
            scope: Scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": head.http_version,
                "method": head.method,
                "scheme": "http",
                "path": unquote(head.raw_path.decode("latin-1")),
                "raw_path": head.raw_path,
                "query_string": head.query_string,
                "root_path": "",
                "headers": head.headers,
                "client": client,
                "server": server,
            }
            response = await self._run_app(scope, body)
            # Re-read the flag: shutdown may have begun while the application ran.
            keep_alive = keep_alive and not self._closing
            await stream.send(
                _encode_response(
                    response.status or 500,
                    response.headers,
                    b"".join(response.body_parts),
                    keep_alive=keep_alive,
                    include_body=head.method != "HEAD",
                )
            )
            if not keep_alive:
                return

    async def _run_app(self, scope: Scope, body: bytes) -> _Response:
        response = _Response()
        response_done = anyio.Event()
        request_delivered = False

        async def receive() -> Message:
            nonlocal request_delivered
            if not request_delivered:
                request_delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # ASGI: after the request body, the next event is the disconnect, which for a
            # buffered server is when the response is complete.
            await response_done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start" and response.status is None:
                response.status = int(message["status"])
                response.headers = [
                    (bytes(name).lower(), bytes(value))
                    for name, value in message.get("headers", ())
                ]
            elif kind == "http.response.body" and response.status is not None:
                if response.complete:
                    raise RuntimeError("ASGI response body sent after the response was complete")
                response.body_parts.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    response.complete = True
                    response_done.set()
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} at this point")

        try:
            await self._app(scope, receive, send)
        except Exception:
            logger.exception("ASGI application raised; answering 500")
            return _error_response()
        finally:
            response_done.set()
        if not response.complete:
            logger.error("ASGI application returned without a complete response; answering 500")
            return _error_response()
        return response


def _error_response() -> _Response:
    return _Response(
        status=500,
        headers=[(b"content-type", b"text/plain; charset=utf-8")],
        body_parts=[b"Internal Server Error\n"],
        complete=True,
    )


@asynccontextmanager
async def serve_asgi(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
) -> AsyncIterator[LoopbackServer]:
    """Serve ``app`` over HTTP/1.1 on ``host:port`` for the duration of the block.

    ``port=0`` picks a free port; the yielded
    [`LoopbackServer`][keevx_async.testing.LoopbackServer] has the real one.
    Each connection runs in its own task; connections are kept alive unless the client
    sends ``Connection: close`` (or speaks HTTP/1.0 without asking for keep-alive).
    Request bodies must be framed by ``Content-Length`` (chunked: 501), header blocks are
    limited to 64 KiB (431) and bodies to 16 MiB (413). An exception from the application
    is logged and answered with 500.

    Leaving the block stops accepting at once and releases the port, closes idle
    connections, and gives requests being handled up to ``shutdown_grace`` seconds to
    finish before their tasks are cancelled. Works under asyncio and trio.
    """
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        server = _Server(app)
        bound_port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - not Django
        location = LoopbackServer(host=host, port=bound_port)
        accept_scope = anyio.CancelScope()
        accept_stopped = anyio.Event()
        # An exception from the block is held and re-raised after the task group has
        # exited, so callers see it as raised rather than wrapped in an exception group.
        block_error: BaseException | None = None
        async with anyio.create_task_group() as connections:

            async def accept_connections() -> None:
                try:
                    with accept_scope:
                        await listener.serve(server.handle_connection, task_group=connections)
                finally:
                    accept_stopped.set()

            connections.start_soon(accept_connections)
            try:
                yield location
            except BaseException as exc:  # noqa: BLE001 - re-raised below, unwrapped
                block_error = exc
            # Shielded: shutdown must complete (and free the port) even when the block is
            # left because of a cancellation.
            with anyio.CancelScope(shield=True):
                accept_scope.cancel()
                await accept_stopped.wait()
                await listener.aclose()
                server.begin_shutdown()
                with anyio.move_on_after(shutdown_grace):
                    await server.wait_closed()
            connections.cancel_scope.cancel()
    if block_error is not None:
        raise block_error
