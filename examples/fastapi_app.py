"""FastAPI: a route awaits ``client.generate`` while the callback arrives on the same app.

Run it with ``uvicorn --factory examples.fastapi_app:create_app`` (or hypercorn) after
setting ``KEEVX_API_KEY``, ``KEEVX_CALLBACK_URL`` (the public URL of ``/keevx/callback``)
and, with more than one process or across restarts, ``KEEVX_CALLBACK_SECRET``.
``KEEVX_BASE_URL`` points the client elsewhere (tests point it at FakeKeevx).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, TypedDict

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from starlette.routing import Route

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


# Callback URLs carry a token: keep it out of the server's access log.
kx.redact_callback_tokens()

# Routes wait up to WAIT seconds; a lost callback is looked up well before that.
WAIT = 300
RECONCILE_AFTER = 60

CALLBACK_PATH = "/keevx/callback"


class ImageIn(BaseModel):
    prompt: str


class ImageOut(BaseModel):
    task_id: str
    image_url: str


class State(TypedDict):
    keevx: kx.AsyncKeevx


def get_keevx(request: Request) -> kx.AsyncKeevx:
    """The client opened by the lifespan (lifespan state is copied into each request)."""
    client: kx.AsyncKeevx = request.state.keevx
    return client


Keevx = Annotated[kx.AsyncKeevx, Depends(get_keevx)]
router = APIRouter()


@router.post("/images")
async def create_image(image: ImageIn, keevx: Keevx) -> ImageOut:
    try:
        # Waits for the callback, which the service POSTs to CALLBACK_PATH on this app.
        [result] = await keevx.generate(kx.ImageRequest(image.prompt), timeout=WAIT)
    except kx.InvalidRequestError as exc:
        raise HTTPException(422, str(exc)) from exc
    except kx.TaskFailedError as exc:
        raise HTTPException(502, exc.error_message or exc.status) from exc
    except kx.TaskTimeoutError as exc:
        raise HTTPException(504, "the image was not ready in time") from exc
    return ImageOut(task_id=result.task_id, image_url=result.image_url)


def create_app() -> FastAPI:
    """The app, with a client configured from the ``KEEVX_*`` environment variables."""
    # Made here, not in the lifespan, so its callback_app can be routed before startup.
    # A lost callback is looked up after 60 s, well within the 300 s a route waits.
    client = kx.AsyncKeevx(reconcile_after=RECONCILE_AFTER)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        async with client:  # closed at shutdown
            yield {"keevx": client}

    app = FastAPI(lifespan=lifespan)
    app.include_router(router)
    # callback_app checks the token, the size and the body, and answers 200/400/401/405/413
    # (503 with Retry-After when a RedisRouter cannot record another worker's callback).
    # A Route, not a Mount: the token is in the query string, the path is exact.
    app.router.routes.append(Route(CALLBACK_PATH, client.callback_app, include_in_schema=False))
    return app
