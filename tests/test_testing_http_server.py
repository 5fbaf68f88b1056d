"""Tests of serve_asgi, the h11 + anyio HTTP/1.1 server for ASGI apps used by the fake."""

from __future__ import annotations

import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute, SocketListener
from anyio.streams.buffered import BufferedByteReceiveStream

from keevx_async.testing import LoopbackServer, serve_asgi
from keevx_async.testing._http_server import MAX_BODY_BYTES, STREAM_RESPONSE, _Server

if TYPE_CHECKING:
    from anyio.abc import SocketStream

    from keevx_async._asgi import Receive, Scope, Send

pytestmark = pytest.mark.anyio


class Recorder:
    """An ASGI app that records what it was given and answers with a small JSON body."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.bodies: list[bytes] = []
        self.after_response: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.scopes.append(scope)
        self.bodies.append(message["body"])
        body = b'{"ok":true}'
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", b"application/json"),
                    # Framing headers from the app are replaced by the server's own.
                    (b"content-length", b"999"),
                    (b"connection", b"upgrade"),
                    (b"x-echo-path", scope["path"].encode()),
                ],
            }
        )
        # Sent in two parts to exercise more_body.
        await send({"type": "http.response.body", "body": body[:4], "more_body": True})
        await send({"type": "http.response.body", "body": body[4:]})
        # After the response, the next event is the disconnect.
        self.after_response.append((await receive())["type"])


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def read_response(reader: BufferedByteReceiveStream) -> RawResponse:
    head = (await reader.receive_until(b"\r\n\r\n", 65536)).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.receive_exactly(length) if length else b""
    return RawResponse(int(status_line.split(" ")[1]), headers, body)


async def exchange(port: int, raw_request: bytes) -> tuple[RawResponse, bool]:
    """Send one raw request on a new connection; the response and whether the server
    closed the connection afterwards."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(raw_request)
        reader = BufferedByteReceiveStream(stream)
        response = await read_response(reader)
        return response, await is_closed_by_server(stream, reader)


async def is_closed_by_server(stream: SocketStream, reader: BufferedByteReceiveStream) -> bool:
    """Whether the server closed the connection: it is still open if it answers another
    request, closed if it reports end of stream."""
    try:
        await stream.send(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_response(reader)
    except (anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
        return True
    return False


async def test_scope_is_a_complete_asgi_http_scope() -> None:
    app = Recorder()
    async with serve_asgi(app) as server, httpx.AsyncClient(trust_env=False) as http:
        response = await http.post(
            f"{server.url}/caf%C3%A9/a%20b?x=1&y=%2F",
            content=b"hello",
            headers={"X-Custom": "Value"},
        )
    assert response.status_code == 201
    assert response.json() == {"ok": True}
    assert response.headers["content-length"] == "11"
    assert response.headers["connection"] == "keep-alive"
    assert response.headers["x-echo-path"] == "/café/a b"
    (scope,) = app.scopes
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "POST"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/café/a b"
    assert scope["raw_path"] == b"/caf%C3%A9/a%20b"
    assert scope["query_string"] == b"x=1&y=%2F"
    assert scope["root_path"] == ""
    assert (b"x-custom", b"Value") in scope["headers"]
    assert (b"content-length", b"5") in scope["headers"]
    assert scope["client"][0] == "127.0.0.1"
    assert scope["server"] == ("127.0.0.1", server.port)
    assert app.bodies == [b"hello"]
    assert app.after_response == ["http.disconnect"]


async def test_port_zero_reports_the_real_port_and_url() -> None:
    async with serve_asgi(Recorder()) as server:
        assert server.host == "127.0.0.1"
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
    assert LoopbackServer(host="::1", port=8080).url == "http://[::1]:8080"


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    app = Recorder()
    async with serve_asgi(app) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            reader = BufferedByteReceiveStream(stream)
            for index in range(3):
                await stream.send(
                    b"POST /n HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % index
                )
                response = await read_response(reader)
                assert response.status == 201
                assert response.headers["connection"] == "keep-alive"
            assert not await is_closed_by_server(stream, reader)
    assert app.bodies == [b"0", b"1", b"2", b""]


async def test_connection_close_is_honoured() -> None:
    async with serve_asgi(Recorder()) as server:
        response, closed = await exchange(
            server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    assert response.status == 201
    assert response.headers["connection"] == "close"
    assert closed


async def test_http_1_0_is_served_and_closed_even_when_keep_alive_is_asked() -> None:
    # h11 keeps only HTTP/1.1 connections alive (RFC 9112 leaves 1.0 keep-alive optional).
    async with serve_asgi(Recorder()) as server:
        for raw_request in (
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
        ):
            response, closed = await exchange(server.port, raw_request)
            assert response.status == 201
            assert response.headers["connection"] == "close"
            assert closed


@pytest.mark.parametrize(
    ("raw_request", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET noslash HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Name : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n: empty name\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 requires Host
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ],
)
async def test_unservable_requests_are_answered_and_closed(raw_request: bytes, status: int) -> None:
    app = Recorder()
    async with serve_asgi(app) as server:
        response, closed = await exchange(server.port, raw_request)
    assert response.status == status
    assert response.headers["connection"] == "close"
    assert closed
    assert app.scopes == []


async def test_oversized_header_block_gets_431() -> None:
    # Exactly 64 KiB without the blank line: the server reads all of it, then refuses.
    raw_request = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (65536 - 23)
    assert len(raw_request) == 65536
    async with serve_asgi(Recorder()) as server:
        response, closed = await exchange(server.port, raw_request)
    assert response.status == 431
    assert closed


async def test_repeated_identical_content_length_is_accepted() -> None:
    app = Recorder()
    async with serve_asgi(app) as server:
        response, _ = await exchange(
            server.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        )
    assert response.status == 201
    assert app.bodies == [b"ok", b""]  # the request, then the keep-alive probe


async def test_chunked_request_bodies_are_read_whole() -> None:
    app = Recorder()
    async with serve_asgi(app) as server:
        response, closed = await exchange(
            server.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
    assert response.status == 201
    assert not closed
    assert app.bodies == [b"hello world", b""]  # the request, then the keep-alive probe
    assert (b"transfer-encoding", b"chunked") in app.scopes[0]["headers"]


async def test_a_chunked_body_over_the_limit_gets_413() -> None:
    app = Recorder()
    size = MAX_BODY_BYTES + 1
    async with serve_asgi(app) as server:
        response, closed = await exchange(
            server.port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % size
            + b"a" * size,
        )
    assert response.status == 413
    assert closed
    assert app.scopes == []


async def test_pipelined_requests_are_answered_in_order() -> None:
    app = Recorder()
    async with serve_asgi(app) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(
                b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
                b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nb"
            )
            reader = BufferedByteReceiveStream(stream)
            first, second = await read_response(reader), await read_response(reader)
    assert [first.headers["x-echo-path"], second.headers["x-echo-path"]] == ["/1", "/2"]
    assert app.bodies == [b"a", b"b"]


async def test_expect_100_continue_gets_an_interim_response() -> None:
    app = Recorder()
    async with serve_asgi(app) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            reader = BufferedByteReceiveStream(stream)
            await stream.send(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
            )
            interim = await reader.receive_until(b"\r\n\r\n", 1024)
            assert interim == b"HTTP/1.1 100 Continue"
            await stream.send(b"abc")
            response = await read_response(reader)
    assert response.status == 201
    assert app.bodies == [b"abc"]


async def test_head_response_has_length_but_no_body() -> None:
    async with serve_asgi(Recorder()) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            reader = BufferedByteReceiveStream(stream)
            await stream.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.receive_until(b"\r\n\r\n", 1024)
            assert b"content-length: 11" in head
            # The next response starts right away: no body bytes came in between.
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await read_response(reader)
    assert response.body == b'{"ok":true}'


async def test_unknown_status_code_has_an_empty_reason() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 599})
        await send({"type": "http.response.body"})

    async with serve_asgi(app) as server, await anyio.connect_tcp("127.0.0.1", server.port) as s:
        await s.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await BufferedByteReceiveStream(s).receive_until(b"\r\n", 1024)
    assert head == b"HTTP/1.1 599 "


async def _raises(scope: Scope, receive: Receive, send: Send) -> None:
    raise ValueError("boom")


async def _no_response(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})


async def _body_before_start(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.body", "body": b"x"})


async def _body_after_complete(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body", "body": b"x"})
    await send({"type": "http.response.body", "body": b"y"})


async def _start_twice(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.start", "status": 200})


async def _invalid_header(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"a\r\nb")]})
    await send({"type": "http.response.body", "body": b"x"})


async def _informational_status(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 103})
    await send({"type": "http.response.body", "body": b"x"})


@pytest.mark.parametrize(
    "app",
    [
        _raises,
        _no_response,
        _body_before_start,
        _body_after_complete,
        _start_twice,
        _invalid_header,
        _informational_status,
    ],
)
async def test_broken_applications_give_500_and_the_server_keeps_serving(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="keevx_async.testing._http_server")
    async with serve_asgi(app) as server, httpx.AsyncClient(trust_env=False) as http:
        for _ in range(2):
            response = await http.get(server.url)
            assert response.status_code == 500
            assert response.text == "Internal Server Error\n"
    assert "answering 500" in caplog.text


async def test_exit_releases_the_port_and_refuses_new_connections() -> None:
    async with serve_asgi(Recorder()) as server:
        response, _ = await exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.status == 201
    with pytest.raises(OSError):  # noqa: PT011 - the errno differs across platforms
        await anyio.connect_tcp("127.0.0.1", server.port)
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=server.port):
        pass


async def test_exit_closes_idle_keep_alive_connections_at_once() -> None:
    async with serve_asgi(Recorder()) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = BufferedByteReceiveStream(stream)
        assert (await read_response(reader)).status == 201
    async with stream:
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()


async def test_exit_lets_a_request_in_flight_finish() -> None:
    app_started = anyio.Event()

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        app_started.set()
        await anyio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})

    responses: list[httpx.Response] = []
    async with httpx.AsyncClient(trust_env=False) as http, anyio.create_task_group() as tg:
        async with serve_asgi(slow_app) as server:

            async def request() -> None:
                responses.append(await http.get(server.url))

            tg.start_soon(request)
            await app_started.wait()
    (response,) = responses
    assert response.text == "done"
    assert response.headers["connection"] == "close"


async def test_exit_cancels_a_request_that_outlives_the_grace() -> None:
    app_started = anyio.Event()

    async def stuck_app(scope: Scope, receive: Receive, send: Send) -> None:
        app_started.set()
        await anyio.sleep_forever()

    errors: list[Exception] = []
    async with httpx.AsyncClient(trust_env=False) as http, anyio.create_task_group() as tg:
        async with serve_asgi(stuck_app, shutdown_grace=0.05) as server:

            async def request() -> None:
                try:
                    await http.get(server.url)
                except httpx.TransportError as exc:
                    errors.append(exc)

            tg.start_soon(request)
            await app_started.wait()
    assert len(errors) == 1


async def test_clients_that_vanish_mid_request_do_not_disturb_the_server() -> None:
    app = Recorder()
    async with serve_asgi(app) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Len")
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        response, _ = await exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.status == 201
    assert [scope["path"] for scope in app.scopes] == ["/", "/probe"]


async def test_a_client_reset_before_its_answer_only_closes_that_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client_gone = anyio.Event()

    async def answer_late(scope: Scope, receive: Receive, send: Send) -> None:
        await client_gone.wait()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"x" * 65536})

    caplog.set_level(logging.DEBUG, logger="keevx_async.testing._http_server")
    async with serve_asgi(answer_late) as server:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await anyio.wait_all_tasks_blocked()  # the request is with the application
        # Linger 0: closing sends a reset, so the server's write fails instead of landing.
        raw = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - not Django
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        client_gone.set()
    assert "connection lost" in caplog.text


async def test_a_connection_accepted_during_shutdown_is_closed_unserved() -> None:
    app = Recorder()
    server = _Server(app)
    server.begin_shutdown()
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        (socket_listener,) = listener.listeners
        assert isinstance(socket_listener, SocketListener)
        port = socket_listener.extra(SocketAttribute.local_port)  # noqa: S610 - not Django
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            await server.handle_connection(await socket_listener.accept())
            with pytest.raises(anyio.EndOfStream):
                await client.receive()
    await server.wait_closed()
    assert app.scopes == []


async def test_a_cancelled_block_shuts_down_cleanly() -> None:
    with anyio.CancelScope() as scope:
        async with serve_asgi(Recorder()) as server:
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    with pytest.raises(OSError):  # noqa: PT011 - the errno differs across platforms
        await anyio.connect_tcp("127.0.0.1", server.port)


async def test_an_exception_in_the_block_propagates_unwrapped() -> None:
    with pytest.raises(LookupError, match="from the block"):
        async with serve_asgi(Recorder()):
            raise LookupError("from the block")


async def test_many_concurrent_clients() -> None:
    app = Recorder()
    async with (
        serve_asgi(app) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as http,
    ):

        async def one(index: int) -> None:
            response = await http.post("/", content=str(index).encode())
            assert response.status_code == 201

        async with anyio.create_task_group() as tg:
            for index in range(40):
                tg.start_soon(one, index)
    assert sorted(int(body) for body in app.bodies) == list(range(40))


# --- streamed responses (STREAM_RESPONSE) ---------------------------------------------------


class StreamingApp:
    """Streams ``parts``; waits for ``go`` before the second part; optionally declares a
    Content-Length and leaves the body incomplete (``cut``) or raises midway."""

    def __init__(
        self, parts: list[bytes], *, length: int | None = None, ending: str = "complete"
    ) -> None:
        self.parts = parts
        self.length = length
        self.ending = ending
        self.go = anyio.Event()
        self.first_sent = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        headers = [(b"content-type", b"image/png"), (b"connection", b"upgrade")]
        if self.length is not None:
            headers.append((b"content-length", b"%d" % self.length))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": headers,
                STREAM_RESPONSE: True,
            }
        )
        for index, part in enumerate(self.parts):
            if index == 1:
                await self.go.wait()
            await send({"type": "http.response.body", "body": part, "more_body": True})
            self.first_sent.set()
        if self.ending == "raise":
            raise RuntimeError("the app broke mid-body")
        if self.ending == "complete":
            await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.mark.parametrize("length", [None, 6])
async def test_a_streamed_body_reaches_the_client_before_it_is_complete(
    length: int | None,
) -> None:
    app = StreamingApp([b"abc", b"def"], length=length)
    async with serve_asgi(app) as server, httpx.AsyncClient(trust_env=False) as http:
        async with http.stream("GET", server.url) as response:
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"abc"  # while the app still waits to go on
            app.go.set()
            rest = b"".join([chunk async for chunk in chunks])
        # The app's Content-Length, else chunked; the server's own Connection header.
        framing = response.headers.get("content-length") or response.headers["transfer-encoding"]
        assert framing == ("6" if length else "chunked")
        assert response.headers["connection"] == "keep-alive"
        # The connection is kept alive for the next request.
        app.go = anyio.Event()
        app.go.set()
        again = await http.get(server.url)
    assert rest == b"def"
    assert again.content == b"abcdef"


@pytest.mark.parametrize("ending", ["short", "raise", "return"])
async def test_a_streamed_body_left_incomplete_is_cut_short(
    ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = StreamingApp([b"abc", b"def"], length=100, ending=ending)
    app.go.set()
    if ending == "short":  # says it is complete, with 6 bytes of 100
        app.ending = "complete"
    elif ending == "return":  # returns without saying so
        app.ending = "stop"
    async with serve_asgi(app) as server, httpx.AsyncClient(trust_env=False) as http:
        with pytest.raises(httpx.RemoteProtocolError, match=r"incomplete|complete message"):
            await http.get(server.url)
        # The server goes on serving new connections.
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(server.url)
    if ending == "raise":
        assert "raised while streaming" in caplog.text


async def test_a_streamed_head_response_sends_no_body() -> None:
    app = StreamingApp([b"abc", b"def"], length=6)
    app.go.set()
    async with serve_asgi(app) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            reader = BufferedByteReceiveStream(stream)
            await stream.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.receive_until(b"\r\n\r\n", 1024)
            assert b"content-length: 6" in head
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await read_response(reader)
    assert response.body == b"abcdef"


async def test_a_client_gone_mid_stream_closes_the_connection_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = StreamingApp([b"a" * 65536] * 64, length=65536 * 64)
    async with serve_asgi(app) as server:
        async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await app.first_sent.wait()
        app.go.set()  # the rest goes to a closed socket
        with anyio.fail_after(10):
            async with httpx.AsyncClient(trust_env=False) as http:
                app.go = anyio.Event()
                app.go.set()
                assert len((await http.get(server.url)).content) == 65536 * 64
    assert "raised while streaming" not in caplog.text
