"""Django async views: one awaits ``client.generate`` while another feeds the callback in.

A single-file Django project, to keep the recipe in one place: in a real project the
settings go to ``settings.py``, the views to ``views.py``, ``urlpatterns`` to ``urls.py``
and ``application`` to ``asgi.py``.

Serve ``application`` with an ASGI server that speaks the lifespan protocol (uvicorn,
hypercorn, granian; not daphne, not ``runserver``), one event loop per process: the client
lives on that loop, opened at startup and closed at shutdown. Django itself has no
lifespan hook, so ``application`` adds one around Django's own ASGI handler. Django runs
on asyncio only. Configuration comes from ``KEEVX_API_KEY``, ``KEEVX_CALLBACK_URL`` (the
public URL of ``/keevx/callback``), ``KEEVX_CALLBACK_SECRET`` and ``KEEVX_BASE_URL``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    Message = MutableMapping[str, Any]


# Callback URLs carry a token: keep it out of the server's access log.
kx.redact_callback_tokens()

# Routes wait up to WAIT seconds; a lost callback is looked up well before that.
WAIT = 300
RECONCILE_AFTER = 60

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "not-used-by-this-example"),
        ALLOWED_HOSTS=os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(","),
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[
            "django.middleware.security.SecurityMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
        ],
    )

_client: kx.AsyncKeevx | None = None


def keevx() -> kx.AsyncKeevx:
    """The client opened by the lifespan of `application`."""
    if _client is None:
        raise RuntimeError("the Keevx client is opened by the ASGI lifespan: serve `application`")
    return _client


# The service does not send a CSRF token; the callback token authenticates it instead.
@csrf_exempt
@require_POST
async def keevx_callback(request: HttpRequest) -> JsonResponse:
    try:
        # build_absolute_uri() keeps the query string, where the token is.
        await keevx().feed_callback(request.body, url=request.build_absolute_uri())
    except kx.CallbackAuthError:
        return JsonResponse({"code": 401, "msg": "invalid callback token"}, status=401)
    except kx.CallbackError as exc:
        return JsonResponse({"code": 400, "msg": str(exc)}, status=400)
    except kx.RouterError as exc:
        # For another worker's task, and Redis could not record it: have it sent again.
        return JsonResponse(
            {"code": 503, "msg": str(exc)}, status=503, headers={"Retry-After": "1"}
        )
    # RESOLVED, BUFFERED (before the submit reply), DUPLICATE, PROGRESS or FORWARDED
    # (recorded for the worker that waits for it): all are fine.
    return JsonResponse({"code": 0, "msg": "ok"})


@csrf_exempt  # an API endpoint for this example; protect yours as your app does
@require_POST
async def create_image(request: HttpRequest) -> JsonResponse:
    try:
        image_request = kx.ImageRequest(json.loads(request.body)["prompt"])
        # Waits for the callback, which the service POSTs to keevx_callback.
        [result] = await keevx().generate(image_request, timeout=WAIT)
    except (ValueError, KeyError, TypeError) as exc:  # InvalidRequestError is a ValueError
        return JsonResponse({"detail": f"invalid request: {exc}"}, status=422)
    except kx.TaskFailedError as exc:
        return JsonResponse({"detail": exc.error_message or exc.status}, status=502)
    except kx.TaskTimeoutError:
        return JsonResponse({"detail": "the image was not ready in time"}, status=504)
    return JsonResponse({"task_id": result.task_id, "image_url": result.image_url})


urlpatterns = [
    path("images", create_image),
    path("keevx/callback", keevx_callback),
]

django_application = get_asgi_application()


async def application(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Django's ASGI handler, plus the lifespan that opens and closes the client."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await django_application(scope, receive, send)


async def _lifespan(
    receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    global _client  # noqa: PLW0603 - one client per process, like Django's own connections
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                # From the KEEVX_* variables; lost callbacks looked up within the wait.
                # Entered here, in the lifespan's task, and left there at shutdown: the
                # lookups (and a RedisRouter's work) run in the background meanwhile.
                _client = await kx.AsyncKeevx(reconcile_after=RECONCILE_AFTER).__aenter__()
            except kx.KeevxError as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _client is not None:
                await _client.__aexit__(None, None, None)
                _client = None
            await send({"type": "lifespan.shutdown.complete"})
            return
