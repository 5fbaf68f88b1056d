# expect: path form, query string dropped by the proxy: HTTP 200, task done: True
"""Behind a reverse proxy: the URL the service calls is not the URL the app sees.

The service POSTs to the public ``callback_url`` (https, public host, ``/api`` prefix);
the proxy forwards to the app over plain HTTP, to an internal host, without the prefix.
The token survives that, because ``feed_callback`` reads it from the query string (or the
last path segment) only. A proxy that drops the query string loses it: then put the
token in the path (``callback_token_in="path"``). Needs ``pip install starlette``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from starlette.requests import Request

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]

PUBLIC_CALLBACK_URL = "https://images.example.com/api/keevx/callback"


def reverse_proxy(app: ASGIApp, *, keep_query: bool) -> ASGIApp:
    """A stand-in for nginx & co.: ends TLS, strips ``/api``, talks to an internal host,
    and, like some gateways, may drop the query string."""

    async def forward(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix("/api")
            headers = [(k, v) for k, v in scope["headers"] if k != b"host"]
            scope = {
                **scope,
                "scheme": "http",
                "server": ("10.0.0.5", 8000),
                "path": path,
                "raw_path": path.encode(),
                "headers": [(b"host", b"10.0.0.5:8000"), *headers],
                "query_string": scope["query_string"] if keep_query else b"",
            }
        await app(scope, receive, send)

    return forward


# --8<-- [start:hook]
def make_app(client: kx.AsyncKeevx, seen: list[str]) -> Starlette:
    async def keevx_hook(request: Request) -> JSONResponse:
        seen.append(str(request.url))  # the URL as the app sees it, behind the proxy
        try:
            # Only the token counts, from the query string or the last path segment:
            # scheme, host and path prefix may differ from the public URL.
            await client.feed_callback(await request.body(), url=str(request.url))
        except kx.CallbackAuthError:
            return JSONResponse({"code": 401, "msg": "invalid callback token"}, status_code=401)
        return JSONResponse({"code": 0, "msg": "ok"})

    return Starlette(
        routes=[
            Route("/keevx/callback", keevx_hook, methods=["POST"]),  # token in the query
            Route("/keevx/callback/{token}", keevx_hook, methods=["POST"]),  # in the path
        ]
    )


# --8<-- [end:hook]


async def deliver_once(
    fake: FakeKeevx, token_in: Literal["query", "path"], *, keep_query: bool
) -> None:
    seen: list[str] = []
    async with (
        fake.http_client() as api,
        kx.AsyncKeevx(
            api_key="test",
            base_url=fake.base_url,
            http_client=api,
            callback_url=PUBLIC_CALLBACK_URL,  # the URL the service must call: the public one
            callback_token_in=token_in,
        ) as client,
    ):
        proxy = reverse_proxy(make_app(client, seen), keep_query=keep_query)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy)) as to_proxy:
            fake.callback_client = to_proxy
            fake.reset_metrics()
            submission = await client.submit(kx.ImageRequest("a lighthouse"))
            await fake.wait_idle()
    [task] = fake.tasks.values()
    status = fake.delivery_failures[0][1] if fake.delivery_failures else "HTTP 200"
    print(f"the service called: {task.callback_url}")
    print(f"the app saw:        {seen[0]}")
    dropped = "dropped" if not keep_query else "kept"
    print(
        f"{token_in} form, query string {dropped} by the proxy: {status}, "
        f"task done: {submission.tasks[0].done()}"
    )


async def main() -> None:
    async with FakeKeevx() as fake:
        await deliver_once(fake, "query", keep_query=True)
        await deliver_once(fake, "query", keep_query=False)  # the token is lost: 401
        await deliver_once(fake, "path", keep_query=False)


if __name__ == "__main__":
    anyio.run(main)
