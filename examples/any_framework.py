"""Any framework: one function that turns a callback POST into the answer to send.

Your framework gives you the raw body and the URL the request was POSTed to; hand both to
`answer_callback` and send back what it returns. ``await client.generate(...)`` in another
route then returns once the callback has come in. In an async framework (Quart, Litestar,
Sanic, ...) call it directly from the callback route:

    reply = await answer_callback(client, await request.get_data(), str(request.url))
    return Response(
        reply.body, status=reply.status, content_type=reply.content_type, headers=reply.headers
    )

A synchronous (WSGI) app cannot await, and its requests run in threads: give the client an
event loop of its own in a thread (``anyio.from_thread.start_blocking_portal``) and call
into it with ``portal.call``. `make_wsgi_app` does that with the standard library only;
the same two ``portal.call`` lines go into a Flask or Bottle view. Serve it from one
process with threads, or give each process's client a ``kx.RedisRouter`` (see the
Deployment guide) so that callbacks reach the process that waits for them.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING, NamedTuple
from wsgiref.util import request_uri

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from anyio.from_thread import BlockingPortal

CALLBACK_PATH = "/keevx/callback"
# Routes wait up to WAIT seconds; make the client with reconcile_after=RECONCILE_AFTER, so
# that a lost callback is looked up well before that (the default is 300 s, as long).
WAIT = 300
RECONCILE_AFTER = 60


# --8<-- [start:answer]
class Reply(NamedTuple):
    """What to answer: a status, a JSON body and any more headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


async def answer_callback(client: kx.AsyncKeevx, body: bytes, url: str) -> Reply:
    """Feed one callback to ``client`` and say what to answer.

    Args:
        client: the client that submitted the request.
        body: the raw POST body.
        url: the full URL the service POSTed to, query string included (the token is in
            it); behind a reverse proxy, the public URL, not the one the app sees.
    """
    try:
        await client.feed_callback(body, url=url)
    except kx.CallbackAuthError:
        return Reply(401, b'{"code":401,"msg":"invalid callback token"}')
    except kx.CallbackError as exc:
        return Reply(400, json.dumps({"code": 400, "msg": str(exc)}).encode())
    except kx.RouterError as exc:
        # For another worker's task, and Redis could not record it: have it sent again.
        message = json.dumps({"code": 503, "msg": str(exc)}).encode()
        return Reply(503, message, headers=(("Retry-After", "1"),))
    # RESOLVED, BUFFERED (before the submit reply), DUPLICATE, PROGRESS or FORWARDED
    # (recorded for the worker that waits for it): all are fine.
    return Reply(200, b'{"code":0,"msg":"ok"}')


# --8<-- [end:answer]


async def generate_image(client: kx.AsyncKeevx, prompt: str) -> Reply:
    """Submit one image and wait for its callback; the answer for the app's own route."""
    try:
        [result] = await client.generate(kx.ImageRequest(prompt), timeout=WAIT)
    except kx.InvalidRequestError as exc:
        return Reply(422, json.dumps({"detail": str(exc)}).encode())
    except kx.TaskFailedError as exc:
        return Reply(502, json.dumps({"detail": exc.error_message}).encode())
    except kx.TaskTimeoutError:
        return Reply(504, b'{"detail":"the image was not ready in time"}')
    return Reply(
        200, json.dumps({"task_id": result.task_id, "image_url": result.image_url}).encode()
    )


# --8<-- [start:wsgi]
def make_wsgi_app(
    client: kx.AsyncKeevx, portal: BlockingPortal
) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    """A WSGI app with ``POST /images`` and the callback route; ``client`` lives in
    ``portal``'s event loop."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method, route = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body: bytes = environ["wsgi.input"].read(length)
        if method == "POST" and route == CALLBACK_PATH:
            # request_uri() rebuilds the full URL, query string (and token) included.
            reply = portal.call(answer_callback, client, body, request_uri(environ))
        elif method == "POST" and route == "/images":
            prompt = str(json.loads(body).get("prompt", ""))
            reply = portal.call(generate_image, client, prompt)
        else:
            reply = Reply(404, b'{"detail":"not found"}')
        status = f"{reply.status} {HTTPStatus(reply.status).phrase}"
        start_response(status, [("Content-Type", reply.content_type), *reply.headers])
        return [reply.body]

    return app


# --8<-- [end:wsgi]
