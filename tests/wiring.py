"""Shared builders for tests: a FakeKeevx wired to a real client, and scripted apps."""

from __future__ import annotations

import json
import socket
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import httpx
from anyio.from_thread import start_blocking_portal

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping

    from anyio.from_thread import BlockingPortal

API_KEY = "test-key"
CALLBACK_URL = "https://app.example.test/keevx/callback"


@asynccontextmanager
async def wired(
    fake_options: Mapping[str, Any] | None = None, **client_options: Any
) -> AsyncIterator[tuple[FakeKeevx, kx.AsyncKeevx]]:
    """A running FakeKeevx and an AsyncKeevx talking to it in-process.

    Callbacks go straight into the client (``feed_callback`` with the URL the service
    would POST to, token included).
    """
    options: dict[str, Any] = {"api_key": API_KEY, "seed": 1234, "complete_after": 0.001}
    options.update(fake_options or {})
    client_options.setdefault("callback_url", CALLBACK_URL)
    async with FakeKeevx(**options) as fake, fake.client(**client_options) as client:
        yield fake, client


@contextmanager
def fake_in_thread(**fake_options: Any) -> Iterator[tuple[FakeKeevx, BlockingPortal]]:
    """A running FakeKeevx on a loopback port, served by an event loop in a thread of its
    own: the service for tests of synchronous code. Call into it with ``portal.call``."""
    options: dict[str, Any] = {"api_key": API_KEY, "seed": 1234, "complete_after": 0.001}
    options.update(fake_options)
    fake = FakeKeevx(**options)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(fake),
        portal.wrap_async_context_manager(fake.serve()),
    ):
        yield fake, portal


def callback_body(
    task_id: str,
    status: str = "SUCCEEDED",
    *,
    image_url: str | None = None,
    error_message: str = "",
    **extra: Any,
) -> bytes:
    """The JSON body the service POSTs for a finished task."""
    if image_url is None:
        image_url = f"https://images.example.test/{task_id}.png" if status == "SUCCEEDED" else ""
    data = {
        "task_id": task_id,
        "status": status,
        "image_url": image_url,
        "error_message": error_message,
        **extra,
    }
    return json.dumps(
        {"code": 0, "msg": "ok", "task_type": "image_generate", "data": data}
    ).encode()


class ScriptedApp:
    """An ASGI app answering each request with the next scripted reply, recording requests.

    A reply is ``(status, body, headers)``; the last one repeats.
    """

    def __init__(self, *replies: tuple[int, Any, Mapping[str, str]]) -> None:
        self.replies = list(replies)
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["method"], scope["path"], headers, body))
        status, reply, reply_headers = (
            self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        )
        content = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        raw_headers = [(b"content-type", b"application/json")]
        raw_headers += [(k.encode(), v.encode()) for k, v in reply_headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content})


def ok_reply(*task_ids: str) -> tuple[int, Any, dict[str, str]]:
    """A successful submit reply with these task IDs."""
    return 200, {"code": 0, "msg": "ok", "data": {"task_ids": list(task_ids)}}, {}


@asynccontextmanager
async def scripted_client(app: ScriptedApp, **client_options: Any) -> AsyncIterator[kx.AsyncKeevx]:
    """An AsyncKeevx whose HTTP goes to ``app`` in-process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as http:
        client_options.setdefault("callback_url", CALLBACK_URL)
        async with kx.AsyncKeevx(
            api_key=API_KEY, base_url="https://api.example.test", http_client=http, **client_options
        ) as client:
            yield client


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
