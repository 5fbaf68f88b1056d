"""A web app with several worker processes, for tests/test_multiworker.py.

Run by ``uvicorn --workers 2 multiworker_app:app``: each worker process makes its own
client (from the ``KEEVX_*`` variables), entered in the lifespan, with a RedisRouter under
``KEEVX_TEST_ROUTER_PREFIX`` when that is set, else the default LocalRouter (the mistake
the test shows). ``POST /images`` waits for one image; ``GET /stats`` tells the worker's
counters.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import attrs
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request

_prefix = os.environ.get("KEEVX_TEST_ROUTER_PREFIX")
# Early callbacks held 2 s (hinted at after 1 s), lost ones looked up after 1 s: the test
# need not wait for the defaults (600 s and 300 s).
client = kx.AsyncKeevx(
    router=kx.RedisRouter(prefix=_prefix) if _prefix else None,
    early_callback_max_age=2.0,
    reconcile_after=1.0,
)


async def images(request: Request) -> JSONResponse:
    prompt = (await request.json())["prompt"]
    [image] = await client.generate(kx.ImageRequest(prompt), timeout=60)
    return JSONResponse({"prompt": prompt, "task_id": image.task_id, "image_url": image.image_url})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), **attrs.asdict(client.stats)})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with client:
        yield


app = Starlette(
    routes=[
        Route("/images", images, methods=["POST"]),
        Route("/stats", stats),
        Route("/keevx/callback", client.callback_app),
    ],
    lifespan=lifespan,
)
