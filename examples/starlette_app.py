"""Starlette: a route awaits ``client.generate`` while the callback arrives on the same app.

Run it with ``uvicorn --factory examples.starlette_app:create_app`` (or hypercorn, also on
trio) after setting ``KEEVX_API_KEY``, ``KEEVX_CALLBACK_URL`` (the public URL of
``/keevx/callback``) and, with more than one process or across restarts,
``KEEVX_CALLBACK_SECRET``. ``KEEVX_BASE_URL`` points the client elsewhere (tests point it
at FakeKeevx).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request


# Callback URLs carry a token: keep it out of the server's access log.
kx.redact_callback_tokens()

# Routes wait up to WAIT seconds; a lost callback is looked up well before that.
WAIT = 300
RECONCILE_AFTER = 60

CALLBACK_PATH = "/keevx/callback"


def create_app() -> Starlette:
    """The app, with a client configured from the ``KEEVX_*`` environment variables."""
    # Made here, not in the lifespan, so its callback_app can be routed before startup.
    # A lost callback is looked up after 60 s, well within the 300 s a route waits.
    client = kx.AsyncKeevx(reconcile_after=RECONCILE_AFTER)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:  # closed at shutdown
            yield

    async def create_image(request: Request) -> JSONResponse:
        payload = await request.json()
        try:
            image_request = kx.ImageRequest(payload["prompt"])
            # Waits for the callback, which the service POSTs to CALLBACK_PATH on this app.
            [result] = await client.generate(image_request, timeout=WAIT)
        except (KeyError, TypeError, kx.InvalidRequestError) as exc:
            return JSONResponse({"detail": f"invalid request: {exc}"}, status_code=422)
        except kx.TaskFailedError as exc:
            return JSONResponse({"detail": exc.error_message or exc.status}, status_code=502)
        except kx.TaskTimeoutError:
            return JSONResponse({"detail": "the image was not ready in time"}, status_code=504)
        return JSONResponse({"task_id": result.task_id, "image_url": result.image_url})

    return Starlette(
        routes=[
            Route("/images", create_image, methods=["POST"]),
            # callback_app checks the token, the size and the body (200/400/401/405/413;
            # 503 with Retry-After when a RedisRouter cannot record another worker's callback).
            # A Route, not a Mount: the token is in the query string, the path is exact.
            Route(CALLBACK_PATH, client.callback_app),
        ],
        lifespan=lifespan,
    )
