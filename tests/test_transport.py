"""The client's own HTTP layer (_transports/): real loopback servers, both backends.

`AiohttpTransport` only runs on asyncio (aiohttp is an asyncio library): its tests are
parametrised with the asyncio backend alone (``EACH_TRANSPORT``, ``ASYNCIO_ONLY``), so
there is no trio half to skip. Everything else runs on both backends.
"""

from __future__ import annotations

import gc
import logging
import socket
import ssl
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute
from wiring import API_KEY, CALLBACK_URL, ScriptedApp, ok_reply

import keevx_async as kx
from keevx_async._transports import (
    AiohttpTransport,
    FanoutClient,
    FanoutTransport,
    ShardedTransport,
    aiohttp_usable,
)
from keevx_async._transports.aiohttp import _httpx_error
from keevx_async._transports.pool import ssl_context
from keevx_async.testing import FakeKeevx, serve_asgi

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from anyio.abc import SocketStream

pytestmark = pytest.mark.anyio

LIMITS = httpx.Limits(max_connections=20, max_keepalive_connections=20)
SUBMIT = "/v1/image_generate"


def _sharded() -> httpx.AsyncBaseTransport:
    return ShardedTransport(limits=LIMITS)


def _aiohttp() -> httpx.AsyncBaseTransport:
    return AiohttpTransport(limits=LIMITS)


# Each transport on each backend it supports: aiohttp is asyncio-only by design, so its
# trio combination does not exist (rather than being skipped).
EACH_TRANSPORT = pytest.mark.parametrize(
    ("anyio_backend", "make_transport"),
    [("asyncio", _sharded), ("trio", _sharded), ("asyncio", _aiohttp)],
    ids=["sharded-asyncio", "sharded-trio", "aiohttp-asyncio"],
)
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@asynccontextmanager
async def fanout_client(
    transport: httpx.AsyncBaseTransport, **kwargs: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with FanoutClient(transport=transport, trust_env=False, **kwargs) as http:
        yield http


def chosen(transport: FanoutTransport) -> httpx.AsyncBaseTransport | None:
    """The transport's current choice (a call, so checks before and after do not narrow)."""
    return transport.chosen


def refused_url() -> str:
    """A loopback URL nothing listens on (the port was just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@asynccontextmanager
async def silent_server(*, answer: bool) -> AsyncIterator[str]:
    """A TCP server that reads a request, then hangs (``answer=False``) or hangs up."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            await stream.receive()
            if not answer:
                await anyio.sleep_forever()

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - not Django
        yield f"http://127.0.0.1:{port}"
        group.cancel_scope.cancel()


# --- the default client's full path ---------------------------------------------------------


async def test_default_client_generates_over_loopback() -> None:
    requests = [kx.ImageRequest(f"prompt {n}", generate_count=1 + n % 3) for n in range(12)]
    async with (
        FakeKeevx(api_key=API_KEY, seed=7, complete_after=0.001) as fake,
        fake.serve() as server,
        kx.AsyncKeevx(
            api_key=API_KEY, base_url=server.url, callback_url=CALLBACK_URL, max_concurrency=4
        ) as client,
    ):
        fake.deliver_into(client)
        results = await client.generate_many(requests, timeout=30)
    for request, images in zip(requests, results, strict=True):
        assert len(images) == request.generate_count
        for index, image in enumerate(images):
            assert isinstance(image, kx.ImageResult)
            assert (image.request, image.index) == (request, index)
    assert fake.accepted_submits == len(requests)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_transport_is_chosen_for_the_running_backend(anyio_backend: str) -> None:
    transport = FanoutTransport(limits=LIMITS)
    assert transport.chosen is None  # built outside any request: nothing chosen yet
    async with serve_asgi(ScriptedApp(ok_reply("i2is-1"))) as server:
        async with fanout_client(transport) as http:
            response = await http.post(server.url + SUBMIT, content=b"{}", timeout=httpx.Timeout(5))
            assert response.json()["data"]["task_ids"] == ["i2is-1"]
            expected = AiohttpTransport if anyio_backend == "asyncio" else ShardedTransport
            assert type(chosen(transport)) is expected
    assert transport.chosen is None


async def test_prefer_aiohttp_false_keeps_httpx() -> None:
    transport = FanoutTransport(limits=LIMITS, prefer_aiohttp=False)
    async with serve_asgi(ScriptedApp(ok_reply("i2is-1"))) as server:
        async with fanout_client(transport) as http:
            await http.get(server.url, timeout=httpx.Timeout(5))
            assert type(chosen(transport)) is ShardedTransport


# --- what the server sees, what the caller gets ----------------------------------------------


@EACH_TRANSPORT
async def test_requests_carry_headers_body_and_changed_headers(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    app = ScriptedApp(ok_reply("i2is-1"))
    headers = {"Authorization": "Bearer one", "Content-Type": "application/json"}
    timeout = httpx.Timeout(5)
    async with serve_asgi(app) as server, fanout_client(make_transport()) as http:
        url = server.url + SUBMIT
        first = await http.request(
            "POST", url, content=b'{"a":1}', headers=headers, timeout=timeout
        )
        headers["Authorization"] = "Bearer two"  # the same mapping, changed in place
        second = await http.request(
            "POST", url, content=b'{"a":2}', headers=headers, timeout=timeout
        )
    assert [r[3] for r in app.requests] == [b'{"a":1}', b'{"a":2}']
    assert [r[2]["authorization"] for r in app.requests] == ["Bearer one", "Bearer two"]
    assert app.requests[0][2]["host"] == url.split("/")[2]
    assert app.requests[0][2]["content-length"] == "7"
    for response in (first, second):
        assert response.status_code == 200
        assert response.json()["code"] == 0
        assert response.request.url == url
        assert response.headers["content-type"] == "application/json"


@EACH_TRANSPORT
async def test_other_arguments_take_httpx_full_path(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    app = ScriptedApp(ok_reply("i2is-1"))
    async with serve_asgi(app) as server, fanout_client(make_transport()) as http:
        response = await http.post(server.url + SUBMIT, json={"b": 2}, params={"q": "1"})
    assert response.json()["code"] == 0
    assert app.requests[0][3] == b'{"b":2}' or app.requests[0][3] == b'{"b": 2}'


@EACH_TRANSPORT
async def test_a_full_pool_never_waits_for_a_connection(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    # The server answers nobody until every request has arrived: that only completes if
    # all of them are on the wire at once, each on its own connection.
    in_flight = LIMITS.max_connections
    assert in_flight is not None
    arrived = 0
    everyone = anyio.Event()

    async def barrier_app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal arrived
        await receive()
        arrived += 1
        if arrived == in_flight:
            everyone.set()
        await everyone.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    bodies: list[bytes] = []
    async with serve_asgi(barrier_app) as server, fanout_client(make_transport()) as http:

        async def one() -> None:
            response = await http.request("GET", server.url, timeout=httpx.Timeout(30))
            bodies.append(response.content)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for _ in range(in_flight):
                    group.start_soon(one)
    assert bodies == [b"ok"] * in_flight


def test_sharded_transport_splits_the_pool() -> None:
    assert ShardedTransport(limits=httpx.Limits(max_connections=68)).shard_count == 17
    assert ShardedTransport(limits=httpx.Limits(max_connections=3)).shard_count == 1
    with pytest.raises(ValueError, match="max_connections"):
        ShardedTransport(limits=httpx.Limits(max_connections=None))


# --- failures map to the httpx exceptions the retry policy reads -------------------------------


@EACH_TRANSPORT
async def test_refused_connection_raises_connect_error(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    async with fanout_client(make_transport()) as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.request("POST", refused_url(), content=b"{}", timeout=httpx.Timeout(5))
    assert caught.value.request.method == "POST"


@EACH_TRANSPORT
async def test_silence_after_the_request_raises_read_timeout(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    timeout = httpx.Timeout(5, read=0.2)
    async with silent_server(answer=False) as url, fanout_client(make_transport()) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.request("POST", url, content=b"{}", timeout=timeout)


@EACH_TRANSPORT
async def test_hang_up_after_the_request_is_not_a_connect_error(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    async with silent_server(answer=True) as url, fanout_client(make_transport()) as http:
        with pytest.raises(httpx.TransportError) as caught:
            await http.request("POST", url, content=b"{}", timeout=httpx.Timeout(5))
    # The body left: the service may have acted on it, so it must not look "never sent".
    assert not isinstance(caught.value, (httpx.ConnectError, httpx.ConnectTimeout))
    assert isinstance(caught.value, (httpx.RemoteProtocolError, httpx.ReadError))


async def test_submit_to_a_refused_port_is_retried_and_not_created() -> None:
    async with kx.AsyncKeevx(
        api_key=API_KEY, base_url=refused_url(), callback_url=CALLBACK_URL, max_retries=1
    ) as client:
        with pytest.raises(kx.TransportError) as caught:
            await client.submit(kx.ImageRequest("a red fox"))
        assert client.stats.retries == 1
    assert caught.value.maybe_created is False


async def test_submit_read_timeout_is_not_retried_and_maybe_created() -> None:
    async with (
        silent_server(answer=False) as url,
        kx.AsyncKeevx(
            api_key=API_KEY,
            base_url=url,
            callback_url=CALLBACK_URL,
            timeout=httpx.Timeout(5, read=0.2),
        ) as client,
    ):
        with pytest.raises(kx.TransportError) as caught:
            await client.submit(kx.ImageRequest("a red fox"))
        assert client.stats.retries == 0
    assert caught.value.maybe_created is True
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


_CONNECTION_KEY = aiohttp.client_reqrep.ConnectionKey(
    "127.0.0.1", 1, is_ssl=False, ssl=True, proxy=None, proxy_auth=None, proxy_headers_hash=None
)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout),
        (
            aiohttp.ClientConnectorError(_CONNECTION_KEY, ConnectionRefusedError(111, "refused")),
            httpx.ConnectError,
        ),
        (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout),
        (aiohttp.ServerTimeoutError("timeout"), httpx.ReadTimeout),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
        (aiohttp.ClientPayloadError("truncated"), httpx.ProtocolError),
        (aiohttp.InvalidURL("nope"), httpx.UnsupportedProtocol),
    ],
)
def test_aiohttp_errors_map_to_httpx_errors(
    error: aiohttp.ClientError, expected: type[httpx.TransportError]
) -> None:
    request = httpx.Request("POST", "http://127.0.0.1:1/")
    mapped = _httpx_error(error, request)
    assert type(mapped) is expected
    assert mapped.request is request


# --- closing -------------------------------------------------------------------------------


@ASYNCIO_ONLY
async def test_closing_releases_the_aiohttp_session() -> None:
    transport = AiohttpTransport(limits=LIMITS)
    async with serve_asgi(ScriptedApp(ok_reply("i2is-1"))) as server:
        async with fanout_client(transport) as http:
            await http.get(server.url, timeout=httpx.Timeout(5))
        with pytest.raises(RuntimeError, match="closed"):
            await http.get(server.url, timeout=httpx.Timeout(5))
    del http, transport
    # An unclosed aiohttp session warns when collected; pytest turns that into an error.
    gc.collect()


async def test_closing_an_unused_client_is_fine() -> None:
    client = kx.AsyncKeevx(api_key=API_KEY, callback_url=CALLBACK_URL)
    await client.aclose()
    gc.collect()


@EACH_TRANSPORT
async def test_client_auth_takes_httpx_full_path(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    app = ScriptedApp(ok_reply("i2is-1"))
    async with (
        serve_asgi(app) as server,
        fanout_client(make_transport(), auth=("user", "pass")) as http,
    ):
        await http.request("POST", server.url, content=b"{}", timeout=httpx.Timeout(5))
    assert app.requests[0][2]["authorization"].startswith("Basic ")


@EACH_TRANSPORT
async def test_framing_headers_set_by_the_caller_take_httpx_full_path(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    app = ScriptedApp(ok_reply("i2is-1"))
    timeout = httpx.Timeout(5)
    async with serve_asgi(app) as server, fanout_client(make_transport()) as http:
        url = server.url + SUBMIT
        framed = await http.request(
            "POST", url, content=b"{}", headers={"Content-Length": "2"}, timeout=timeout
        )
        empty_post = await http.request("POST", url, timeout=timeout)
        plain_get = await http.request("GET", url, timeout=timeout)
    assert [r.status_code for r in (framed, empty_post, plain_get)] == [200, 200, 200]
    assert [(r[0], r[3]) for r in app.requests] == [("POST", b"{}"), ("POST", b""), ("GET", b"")]
    assert app.requests[0][2]["content-length"] == "2"
    assert app.requests[1][2]["content-length"] == "0"  # what httpx sends for a bodiless POST
    assert "content-length" not in app.requests[2][2]


@EACH_TRANSPORT
async def test_a_closed_client_refuses_requests(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    async with fanout_client(make_transport()) as http:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        await http.request("GET", "http://127.0.0.1:1/", timeout=httpx.Timeout(1))


@EACH_TRANSPORT
async def test_compressed_replies_are_decoded_and_requests_logged(
    make_transport: Callable[[], httpx.AsyncBaseTransport], caplog: pytest.LogCaptureFixture
) -> None:
    import gzip  # noqa: PLC0415 - this test only

    body = gzip.compress(b'{"code":0,"msg":"ok","data":{"task_ids":["i2is-9"]}}')
    app = ScriptedApp((200, body, {"Content-Encoding": "gzip"}))
    with caplog.at_level(logging.INFO, logger="httpx"):
        async with serve_asgi(app) as server, fanout_client(make_transport()) as http:
            response = await http.request(
                "POST", server.url + SUBMIT, content=b"{}", timeout=httpx.Timeout(5)
            )
    assert response.json()["data"]["task_ids"] == ["i2is-9"]
    assert response.elapsed.total_seconds() >= 0
    assert any("HTTP Request: POST" in r.getMessage() for r in caplog.records)


@EACH_TRANSPORT
async def test_event_hooks_take_httpx_full_path(
    make_transport: Callable[[], httpx.AsyncBaseTransport],
) -> None:
    seen: list[str] = []

    async def hook(request: httpx.Request) -> None:
        seen.append(request.method)

    app = ScriptedApp(ok_reply("i2is-1"))
    async with (
        serve_asgi(app) as server,
        fanout_client(make_transport(), event_hooks={"request": [hook]}) as http,
    ):
        await http.request("POST", server.url, content=b"{}", timeout=httpx.Timeout(5))
    assert seen == ["POST"]


def test_aiohttp_is_not_used_when_it_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    assert aiohttp_usable()
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # what a missing extra looks like
    assert not aiohttp_usable()


def test_a_given_ssl_context_is_used_as_is() -> None:
    context = ssl.create_default_context()
    assert ssl_context(context) is context


@ASYNCIO_ONLY
async def test_a_closed_aiohttp_transport_refuses_requests() -> None:
    transport = AiohttpTransport(limits=LIMITS)
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", "http://127.0.0.1:1/"))
