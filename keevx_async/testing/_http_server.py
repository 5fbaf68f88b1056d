"""A small, test-grade HTTP/1.1 server that runs any ASGI 3 application on a local socket.

It exists so that [`FakeKeevx`][keevx_async.testing.FakeKeevx] (or a test's own callback
receiver) can be reached over a real TCP connection without a third-party server. The
protocol is h11's (the sans-IO HTTP/1.1 state machine under httpcore and hypercorn, installed
with httpx): it parses requests, frames bodies (``Content-Length`` or chunked) and decides
keep-alive, so there is no parser of ours to get wrong. Everything else is `anyio`, so the
server runs under asyncio and trio alike. It stays deliberately small: request bodies are
read whole before the application runs, responses are buffered and sent with a
``Content-Length`` (unless the application asks for a stream, see `STREAM_RESPONSE`), and
there is no TLS. Do not expose it to a network you do not control.
"""

from __future__ import annotations

import http
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

import anyio
import attrs
import h11
from anyio.abc import SocketAttribute

from keevx_async._asgi import DEFAULT_SHUTDOWN_GRACE, http_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.abc import SocketStream

    from keevx_async._asgi import ASGIApp, Message, Scope

__all__ = ["STREAM_RESPONSE", "LoopbackServer", "serve_asgi"]

STREAM_RESPONSE: Final = "keevx_async.stream"
"""A key of an ``http.response.start`` message: when true, the response is streamed as
the application sends it, as a production server would (the head at once, each body part
as it comes, framed by the application's own ``Content-Length`` when it gives one, else
chunked). A streamed response the application leaves incomplete (returning early, or
sending fewer bytes than its ``Content-Length``) is cut short: the connection closes. The
file host of [`FakeKeevx`][keevx_async.testing.FakeKeevx] streams, so that slow bodies
and bodies cut short reach the client as they would from a real one."""

MAX_HEADER_BYTES: Final = 64 * 1024
"""A request head still incomplete after this many bytes is refused with 431."""
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
"""A request body longer than this is refused with 413 (room for a 20 MB upload)."""

_RECEIVE_BYTES: Final = 64 * 1024
_Outgoing = h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage
_REASON_PHRASES: Final = {status.value: status.phrase.encode() for status in http.HTTPStatus}
# Framing headers are the server's job: whatever the application says about them is dropped
# and replaced by the values that match what is actually written.
_SERVER_OWNED_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_PLAIN_TEXT: Final = (b"content-type", b"text/plain; charset=utf-8")
# A peer that goes away mid-request surfaces as one of these; the connection is just closed.
_CONNECTION_LOST: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
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
        return http_url(self.host, self.port)


class _RequestRefusedError(Exception):
    """A request h11 parsed but this server will not serve; answered, then closed."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@attrs.define
class _Response:
    """What the application sent, validated by h11 as it arrived."""

    head: h11.Response | None = None
    body_parts: list[bytes] = attrs.Factory(list)
    complete: bool = False
    streamed: bool = False
    """The head went out at once and the body follows as it comes (`STREAM_RESPONSE`)."""
    broken: bool = False
    """A streamed response that could not be completed: the connection must close."""
    head_only: bool = False
    """The answer to a HEAD request: no body is sent."""


def _internal_error() -> _Response:
    return _Response(
        head=h11.Response(status_code=500, headers=[_PLAIN_TEXT], reason=_REASON_PHRASES[500]),
        body_parts=[b"Internal Server Error\n"],
        complete=True,
    )


class _Connection:
    """One client connection: h11's state machine, fed from and written to the socket."""

    __slots__ = ("h11", "idle_scope", "stream")

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        # h11 refuses a buffer *longer* than its limit; ours is "not complete at 64 KiB".
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES - 1)
        # Set while the connection waits for the next request: shutdown cancels it so
        # that idle keep-alive connections close at once instead of at the grace deadline.
        self.idle_scope: anyio.CancelScope | None = None

    async def next_event(self) -> h11.Event:
        """The next h11 event, reading from the socket as needed (EOF included)."""
        while True:
            event = self.h11.next_event()
            if isinstance(event, h11.Event):
                return event
            # Never PAUSED: the next request is only read after start_next_cycle().
            assert event is h11.NEED_DATA
            if self.h11.they_are_waiting_for_100_continue:
                await self.send(
                    h11.InformationalResponse(
                        status_code=100, headers=[], reason=_REASON_PHRASES[100]
                    )
                )
            try:
                data = await self.stream.receive(_RECEIVE_BYTES)
            except anyio.EndOfStream:
                data = b""
            self.h11.receive_data(data)

    async def send(self, *events: _Outgoing) -> None:
        await self.stream.send(b"".join(self.h11.send(event) for event in events))

    async def answer(self, head: h11.Response, body: bytes, *, include_body: bool) -> None:
        """Send a whole response, framed by ``Content-Length``."""
        events: list[_Outgoing] = [head]
        if include_body and body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self.send(*events)

    async def refuse(self, status: int, detail: str) -> None:
        """Answer a request that cannot be served with a ``text/plain`` error; the
        connection closes afterwards. Only called before anything of a response was sent."""
        body = detail.encode() + b"\n"
        head = h11.Response(
            status_code=status,
            headers=[
                _PLAIN_TEXT,
                (b"content-length", b"%d" % len(body)),
                (b"connection", b"close"),
            ],
            reason=_REASON_PHRASES.get(status, b""),
        )
        await self.answer(head, body, include_body=True)


def _address(value: Any) -> tuple[str, int]:
    # IPv6 socket addresses carry flowinfo and scope id; ASGI wants (host, port) only.
    host, port = value[0], value[1]
    return (str(host), int(port))


def _check_servable(request: h11.Request) -> None:
    """Refuse what h11 accepts but an ASGI ``http`` scope cannot describe."""
    if request.http_version not in (b"1.0", b"1.1"):
        raise _RequestRefusedError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    # Only origin-form ("/path?query"): no absolute URLs, authority or "*" targets.
    if not request.target.startswith(b"/"):
        raise _RequestRefusedError(400, "the request target must be a path")
    for name, value in request.headers:
        # h11 has checked that it is a number, and the only one.
        if name == b"content-length" and int(value) > MAX_BODY_BYTES:
            raise _RequestRefusedError(413, "request body too large")


async def _read_body(connection: _Connection) -> bytes:
    """The whole request body, whether framed by ``Content-Length`` or chunked."""
    parts: list[bytes] = []
    size = 0
    while True:
        event = await connection.next_event()
        if isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        assert isinstance(event, h11.Data)
        size += len(event.data)
        if size > MAX_BODY_BYTES:  # only a chunked body gets this far
            raise _RequestRefusedError(413, "request body too large")
        parts.append(bytes(event.data))


def _scope(request: h11.Request, client: tuple[str, int], server: tuple[str, int]) -> Scope:
    raw_path, _, query_string = bytes(request.target).partition(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version.decode(),
        "method": request.method.decode("ascii").upper(),
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query_string,
        "root_path": "",
        # h11 gives the names lowercased, as ASGI wants them.
        "headers": [(bytes(name), bytes(value)) for name, value in request.headers],
        "client": client,
        "server": server,
    }


class _Server:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._connections: set[_Connection] = set()
        self._closing = False
        self._all_closed = anyio.Event()

    def begin_shutdown(self) -> None:
        """Stop serving new requests; close idle connections now, busy ones when done."""
        self._closing = True
        for connection in self._connections:
            if connection.idle_scope is not None:
                connection.idle_scope.cancel()
        if not self._connections:
            self._all_closed.set()

    async def wait_closed(self) -> None:
        await self._all_closed.wait()

    async def handle_connection(self, stream: SocketStream) -> None:
        connection = _Connection(stream)
        self._connections.add(connection)
        try:
            async with stream:
                await self._serve_requests(connection)
        except _CONNECTION_LOST:
            logger.debug("connection lost", exc_info=True)
        finally:
            self._connections.discard(connection)
            if self._closing and not self._connections:
                self._all_closed.set()

    async def _serve_requests(self, connection: _Connection) -> None:
        stream = connection.stream
        client = _address(stream.extra(SocketAttribute.remote_address))  # noqa: S610 - not Django
        server = _address(stream.extra(SocketAttribute.local_address))  # noqa: S610 - not Django
        try:
            while not self._closing:
                with anyio.CancelScope() as idle_scope:
                    connection.idle_scope = idle_scope
                    event = await connection.next_event()
                connection.idle_scope = None
                if idle_scope.cancelled_caught or isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request)
                _check_servable(event)
                body = await _read_body(connection)
                response = await self._run_app(_scope(event, client, server), body, connection)
                if response.broken:
                    return  # a streamed response cut short: closing says so
                if not response.streamed:
                    await self._answer(connection, event, response)
                if connection.h11.our_state is not h11.DONE:  # h11 decided: no keep-alive
                    return
                connection.h11.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await connection.refuse(exc.error_status_hint, str(exc))
        except _RequestRefusedError as exc:
            await connection.refuse(exc.status, str(exc))

    async def _answer(
        self, connection: _Connection, request: h11.Request, response: _Response
    ) -> None:
        head = response.head
        assert head is not None
        body = b"".join(response.body_parts)
        headers = [
            *((name, value) for name, value in head.headers if name not in _SERVER_OWNED_HEADERS),
            (b"content-length", b"%d" % len(body)),
            (b"connection", self._connection_header()),
        ]
        await connection.answer(
            h11.Response(status_code=head.status_code, headers=headers, reason=head.reason),
            body,
            include_body=request.method != b"HEAD",
        )

    def _connection_header(self) -> bytes:
        # Read when the head goes out: shutdown may have begun while the application ran.
        # h11 turns keep-alive into close by itself when the client asked for that.
        return b"close" if self._closing else b"keep-alive"

    async def _start_stream(self, connection: _Connection, head: h11.Response) -> None:
        """Send a streamed response's head: the application's framing headers dropped
        but its ``Content-Length``."""
        headers = [
            *(
                (name, value)
                for name, value in head.headers
                if name == b"content-length" or name not in _SERVER_OWNED_HEADERS
            ),
            (b"connection", self._connection_header()),
        ]
        await connection.send(
            h11.Response(status_code=head.status_code, headers=headers, reason=head.reason)
        )

    async def _stream_part(
        self, connection: _Connection, response: _Response, data: bytes, *, last: bool
    ) -> None:
        """Send a part of a streamed body (none of it for a HEAD request)."""
        include_body = data and not response.head_only
        events: list[_Outgoing] = [h11.Data(data=data)] if include_body else []
        if last:
            events.append(h11.EndOfMessage())
        try:
            await connection.send(*events)
        except h11.LocalProtocolError:
            # More or fewer bytes than the application's Content-Length: cut it short.
            response.broken = True
            logger.debug("a streamed response did not match its Content-Length; closing")
        except _CONNECTION_LOST:
            response.broken = True
            raise

    async def _run_app(self, scope: Scope, body: bytes, connection: _Connection) -> _Response:
        response = _Response(head_only=scope["method"] == "HEAD")
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
            if kind == "http.response.start" and response.head is None:
                status = int(message["status"])
                try:
                    # h11 validates the status and every header name and value here.
                    response.head = h11.Response(
                        status_code=status,
                        headers=list(message.get("headers", ())),
                        reason=_REASON_PHRASES.get(status, b""),
                    )
                except h11.LocalProtocolError as exc:
                    raise RuntimeError(f"invalid ASGI response start: {exc}") from exc
                if message.get(STREAM_RESPONSE):
                    response.streamed = True
                    await self._start_stream(connection, response.head)
            elif kind == "http.response.body" and response.head is not None:
                if response.complete:
                    raise RuntimeError("ASGI response body sent after the response was complete")
                data = bytes(message.get("body", b""))
                last = not message.get("more_body", False)
                if response.streamed:
                    if not response.broken:
                        await self._stream_part(connection, response, data, last=last)
                else:
                    response.body_parts.append(data)
                if last:
                    response.complete = True
                    response_done.set()
            else:
                raise RuntimeError(f"unexpected ASGI message {kind!r} at this point")

        try:
            await self._app(scope, receive, send)
        except Exception:
            if response.streamed:
                # The head is out: nothing to answer, the connection just closes. A lost
                # connection (the client went away) is no error of the application's.
                log = logger.debug if response.broken else logger.exception
                log("ASGI application raised while streaming; closing", exc_info=True)
                response.broken = True
                return response
            logger.exception("ASGI application raised; answering 500")
            return _internal_error()
        finally:
            response_done.set()
        if not response.complete:
            if response.streamed:
                response.broken = True
                return response
            logger.error("ASGI application returned without a complete response; answering 500")
            return _internal_error()
        return response


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
    Each connection runs in its own task; HTTP/1.1 connections are kept alive unless the
    client sends ``Connection: close`` (HTTP/1.0 connections close after one response).
    Request bodies may be framed by ``Content-Length`` or chunked; header blocks are
    limited to 64 KiB (431) and bodies to 32 MiB (413), and a request h11 cannot parse is
    answered with 400 before the connection closes. An exception from the application is
    logged and answered with 500.

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
