"""A plain WSGI app with ``kx.Keevx``: one route blocks in ``generate`` while another
feeds the service's callback in. No framework, no ``await``.

The client is made once per process, when the module is imported, and closed at exit. It
runs its own event loop in a thread, and its methods may be called from every request
thread at once, so serve the app from one process with threads::

    gunicorn --workers 1 --threads 16 examples.wsgi_app:application

or give each process's client a ``kx.RedisRouter`` (see the Deployment guide) so that a
callback reaching one process resolves the task waiting in another. A server that imports
the app and then forks its workers (uWSGI without ``lazy-apps``, gunicorn with
``--preload``) would leave the client's thread behind in the parent: import it in each
worker instead. The same two calls (``client.generate`` and ``client.feed_callback``) go
into a Flask or Django view. Configuration comes from ``KEEVX_API_KEY``,
``KEEVX_CALLBACK_URL`` (the public URL of ``/keevx/callback``), ``KEEVX_CALLBACK_SECRET``
and ``KEEVX_BASE_URL``.
"""

from __future__ import annotations

import atexit
import json
from http import HTTPStatus
from typing import TYPE_CHECKING
from wsgiref.util import request_uri

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

CALLBACK_PATH = "/keevx/callback"
# Requests wait up to WAIT seconds; a lost callback is looked up well before that.
WAIT = 300
RECONCILE_AFTER = 60

# Callback URLs carry a token: keep it out of the server's access log.
kx.redact_callback_tokens()

# --8<-- [start:client]
# One client per process, from the KEEVX_* variables, closed when the process exits.
client = kx.Keevx(reconcile_after=RECONCILE_AFTER)
atexit.register(client.close)
# --8<-- [end:client]


# --8<-- [start:views]
def create_image(body: bytes) -> tuple[int, dict[str, object]]:
    """``POST /images`` with ``{"prompt": ...}``: blocks until the image is ready."""
    try:
        request = kx.ImageRequest(json.loads(body)["prompt"])
        [result] = client.generate(request, timeout=WAIT)
    except (ValueError, KeyError, TypeError) as exc:  # InvalidRequestError is a ValueError
        return 422, {"detail": f"invalid request: {exc}"}
    except kx.TaskFailedError as exc:
        return 502, {"detail": exc.error_message or exc.status}
    except kx.TaskTimeoutError:
        return 504, {"detail": "the image was not ready in time"}
    return 200, {"task_id": result.task_id, "image_url": result.image_url}


def receive_callback(body: bytes, url: str) -> tuple[int, dict[str, object]]:
    """``POST /keevx/callback``: the service's callback, with its token in ``url``."""
    try:
        client.feed_callback(body, url=url)
    except kx.CallbackAuthError:
        return 401, {"code": 401, "msg": "invalid callback token"}
    except kx.CallbackError as exc:
        return 400, {"code": 400, "msg": str(exc)}
    except kx.RouterError as exc:  # for another worker's task, and Redis failed: resend
        return 503, {"code": 503, "msg": str(exc)}
    # RESOLVED, BUFFERED (before the submit reply), DUPLICATE, PROGRESS or FORWARDED.
    return 200, {"code": 0, "msg": "ok"}


# --8<-- [end:views]


def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point: routes the two POSTs, 404 for anything else."""
    method, route = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body: bytes = environ["wsgi.input"].read(length)
    if method == "POST" and route == CALLBACK_PATH:
        # request_uri() rebuilds the full URL, query string (and token) included.
        status, reply = receive_callback(body, request_uri(environ))
    elif method == "POST" and route == "/images":
        status, reply = create_image(body)
    else:
        status, reply = 404, {"detail": "not found"}
    headers = [("Content-Type", "application/json")]
    if status == 503:
        headers.append(("Retry-After", "1"))
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [json.dumps(reply).encode()]
