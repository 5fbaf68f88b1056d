# expect: via callback_app: 2 images; via feed_callback: 1
"""Receive callbacks in Starlette (and so in FastAPI): mount ``callback_app``, or call
``feed_callback`` from a route of your own.

Needs ``pip install starlette``. FakeKeevx POSTs the callbacks to the app in-process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from starlette.requests import Request


# --8<-- [start:mount]
def make_app(client: kx.AsyncKeevx) -> Starlette:
    return Starlette(
        routes=[
            # callback_token_in="query" (the default): the callback URL is exactly this path.
            Route("/keevx/callback", client.callback_app),
            # callback_token_in="path": the token is one more segment, so mount under it.
            Mount("/keevx/callback-path", app=client.callback_app),
        ]
    )


# --8<-- [end:mount]


# --8<-- [start:handler]
def make_client_handler(client: kx.AsyncKeevx) -> Route:
    """A route of your own that hands the callback to the client (any framework works)."""

    async def keevx_hook(request: Request) -> Response:
        try:
            outcome = await client.feed_callback(await request.body(), url=str(request.url))
        except kx.CallbackAuthError:
            return JSONResponse({"code": 401, "msg": "bad token"}, status_code=401)
        except kx.CallbackError as exc:
            return JSONResponse({"code": 400, "msg": str(exc)}, status_code=400)
        # RESOLVED, BUFFERED (arrived before the submit reply), DUPLICATE or PROGRESS:
        # all are fine, so always answer 200.
        return JSONResponse({"code": 0, "msg": "ok", "outcome": outcome.value})

    return Route("/hooks/keevx", keevx_hook, methods=["POST"])


# --8<-- [end:handler]


def serve_callbacks(fake: FakeKeevx, app: Starlette) -> httpx.AsyncClient:
    """The fake POSTs callbacks with this client: straight into `app`, no socket."""
    fake.callback_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    return fake.callback_client


async def main() -> None:
    own_hook = "https://app.example.test/hooks/keevx"
    async with FakeKeevx() as fake, fake.http_client() as api_http:
        query_client = kx.AsyncKeevx(
            api_key="test",
            base_url=fake.base_url,
            http_client=api_http,
            callback_url="https://app.example.test/keevx/callback",
        )
        app = make_app(query_client)
        app.router.routes.append(make_client_handler(query_client))
        async with query_client as client, serve_callbacks(fake, app):
            mounted = await client.generate(kx.ImageRequest("a heron", generate_count=2))
            # A request's own callback_url wins over the client's.
            own_route = await client.generate(kx.ImageRequest("a crane", callback_url=own_hook))
            print(f"via callback_app: {len(mounted)} images; via feed_callback: {len(own_route)}")

        path_client = kx.AsyncKeevx(
            api_key="test",
            base_url=fake.base_url,
            http_client=api_http,
            callback_url="https://app.example.test/keevx/callback-path",
            callback_token_in="path",
        )
        async with path_client as client, serve_callbacks(fake, make_app(client)):
            images = await client.generate(kx.ImageRequest("an egret"))
            print(f"token in the path: {len(images)} image via Mount")
    print("starlette example finished")


if __name__ == "__main__":
    anyio.run(main)
