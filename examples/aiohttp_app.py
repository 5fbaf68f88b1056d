"""aiohttp: a handler awaits ``client.generate`` while another one feeds the callback in.

aiohttp is not ASGI, so the callback route hands each POST to ``client.feed_callback``
with the URL it was POSTed to (the token is in it). aiohttp runs on asyncio only.

Run it with ``python -m aiohttp.web -P 8080 examples.aiohttp_app:create_app`` after setting
``KEEVX_API_KEY``, ``KEEVX_CALLBACK_URL`` (the public URL of ``/keevx/callback``) and, with
more than one process or across restarts, ``KEEVX_CALLBACK_SECRET``. ``KEEVX_BASE_URL``
points the client elsewhere (tests point it at FakeKeevx).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence


# Callback URLs carry a token: keep it out of the server's access log.
kx.redact_callback_tokens()

# Routes wait up to WAIT seconds; a lost callback is looked up well before that.
WAIT = 300
RECONCILE_AFTER = 60

CALLBACK_PATH = "/keevx/callback"
KEEVX = web.AppKey("keevx", kx.AsyncKeevx)
# A real callback is a few hundred bytes; refuse big bodies before reading them.
MAX_CALLBACK_BODY = 64 * 1024


async def keevx_client(app: web.Application) -> AsyncIterator[None]:
    """Opens the client at startup and closes it at cleanup (``app.cleanup_ctx``)."""
    # Configured from the KEEVX_* variables. A lost callback is looked up after 60 s,
    # well within the 300 s a route waits (reconcile_after's default is 300 s too).
    async with kx.AsyncKeevx(reconcile_after=RECONCILE_AFTER) as client:
        app[KEEVX] = client
        yield


async def keevx_callback(request: web.Request) -> web.Response:
    client = request.app[KEEVX]
    if (request.content_length or 0) > MAX_CALLBACK_BODY:
        return web.json_response({"code": 413, "msg": "body too large"}, status=413)
    try:
        await client.feed_callback(await request.read(), url=str(request.url))
    except kx.CallbackAuthError:
        return web.json_response({"code": 401, "msg": "invalid callback token"}, status=401)
    except kx.CallbackError as exc:
        return web.json_response({"code": 400, "msg": str(exc)}, status=400)
    except kx.RouterError as exc:
        # For another worker's task, and Redis could not record it: have it sent again.
        return web.json_response(
            {"code": 503, "msg": str(exc)}, status=503, headers={"Retry-After": "1"}
        )
    # RESOLVED, BUFFERED (before the submit reply), DUPLICATE, PROGRESS or FORWARDED
    # (recorded for the worker that waits for it): all are fine.
    return web.json_response({"code": 0, "msg": "ok"})


async def create_image(request: web.Request) -> web.Response:
    client = request.app[KEEVX]
    payload = await request.json()
    try:
        image_request = kx.ImageRequest(payload["prompt"])
        # Waits for the callback, which the service POSTs to CALLBACK_PATH on this app.
        [result] = await client.generate(image_request, timeout=WAIT)
    except (KeyError, TypeError, kx.InvalidRequestError) as exc:
        return web.json_response({"detail": f"invalid request: {exc}"}, status=422)
    except kx.TaskFailedError as exc:
        return web.json_response({"detail": exc.error_message or exc.status}, status=502)
    except kx.TaskTimeoutError:
        return web.json_response({"detail": "the image was not ready in time"}, status=504)
    return web.json_response({"task_id": result.task_id, "image_url": result.image_url})


def create_app(argv: Sequence[str] | None = None) -> web.Application:
    """The app (``argv`` is what ``python -m aiohttp.web`` passes on; unused)."""
    app = web.Application()
    app.cleanup_ctx.append(keevx_client)
    app.add_routes([web.post("/images", create_image), web.post(CALLBACK_PATH, keevx_callback)])
    return app
