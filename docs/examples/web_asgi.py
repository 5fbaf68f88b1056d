# expect: a forged callback (no token) is answered with HTTP 401
"""Receive callbacks in a plain ASGI app: no web framework, just ``client.callback_app``.

FakeKeevx POSTs each callback over HTTP to the app (in-process, through
``httpx.ASGITransport``), exactly as the real service would POST to your server.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import httpx

import keevx_async as kx
from keevx_async.testing import FakeKeevx

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CALLBACK_PATH = "/keevx/callback"


# --8<-- [start:app]
def make_app(client: kx.AsyncKeevx) -> ASGIApp:
    """Your ASGI app, with the SDK's receiver mounted under the callback path."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (
            path == CALLBACK_PATH or path.startswith(CALLBACK_PATH + "/")
        ):
            await client.callback_app(scope, receive, send)  # 200 / 400 / 401 / 405 / 413
            return
        await your_own_routes(scope, receive, send)

    return app


# --8<-- [end:app]


async def your_own_routes(scope: Scope, receive: Receive, send: Send) -> None:
    body = json.dumps({"hello": "world"}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def main() -> None:
    async with (
        FakeKeevx() as fake,
        fake.http_client() as api_http,
        kx.AsyncKeevx(
            api_key="test",
            base_url=fake.base_url,
            http_client=api_http,
            callback_url="https://app.example.test" + CALLBACK_PATH,
        ) as client,
    ):
        app = make_app(client)
        # The fake POSTs callbacks with this client: straight into `app`, no socket.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as to_app:
            fake.callback_client = to_app
            images = await client.generate(kx.ImageRequest("a fox", generate_count=2))
            print(f"received {len(images)} images through the ASGI app")

            forged_body = {
                "code": 0,
                "msg": "ok",
                "data": {"task_id": "i2is-x", "status": "FAILED"},
            }
            forged = await to_app.post("https://app.example.test" + CALLBACK_PATH, json=forged_body)
            print(f"a forged callback (no token) is answered with HTTP {forged.status_code}")
            print(f"callbacks rejected: {client.stats.callbacks_rejected}")


if __name__ == "__main__":
    anyio.run(main)
