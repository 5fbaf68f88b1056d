"""``client.serve_callbacks()``: ``callback_app`` on a real HTTP server, for scripts.

A script with no web app of its own still needs somewhere for the service to POST its
callbacks. `CallbackServer` binds a socket itself (so a port in use is a clear error and
``port=0`` works), then hands it to an ASGI server that runs on the current event loop:
uvicorn under asyncio, hypercorn's trio worker under trio (both from the optional extra
``keevx-async[server]``). Neither server installs signal handlers or configures logging:
the script owns those.

Shutdown is built so that a callback is either applied and answered 200, or not applied
and refused; never one without the other. A gate in front of ``callback_app`` refuses
requests that reach it once shutdown has begun (503), runs the ones already in flight to
their answer without letting the server's own cancellation split "applied" from
"answered", and gives their bodies at most ``shutdown_grace`` seconds to arrive.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import socket
from typing import TYPE_CHECKING, Any, Final, cast

import anyio

from ._asgi import DEFAULT_SHUTDOWN_GRACE, http_url
from ._checks import check_seconds
from ._eventloop import running_on_asyncio
from ._models import check_http_url
from ._taskgroups import enter_task_group, exit_task_group

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from types import TracebackType

    import trio
    from anyio.abc import TaskGroup
    from hypercorn.typing import ASGIFramework
    from typing_extensions import Self

    from ._asgi import ASGIApp, Message, Receive, Scope, Send

    ServeFunction = Callable[..., Awaitable[None]]

__all__ = ["CallbackServer"]

logger = logging.getLogger("keevx_async")

INSTALL_HINT: Final = "pip install 'keevx-async[server]'"
# The listen backlog: callbacks of a large batch arrive in bursts.
_BACKLOG: Final = 2048
# The servers' own graceful deadline is a backstop behind the gate's grace: by then every
# request has been answered, so the server never has to cancel one half-way.
_SERVER_GRACE_MARGIN: Final = 2.0
_REFUSED_BODY: Final = json.dumps(
    {"code": 503, "msg": "the callback receiver is shutting down"}
).encode()

_NEW: Final = "not started"
_SERVING: Final = "serving"
_CLOSING: Final = "closing"
_CLOSED: Final = "closed"


class _BodyCutOffError(Exception):
    """The shutdown grace ran out before a callback's body had arrived."""


class _ShutdownGate:
    """Stands in front of ``callback_app`` so that shutdown never half-applies a callback.

    Relies on what ``callback_app`` does: it reads the whole body before it feeds the
    callback, and answers right after feeding it. Feeding awaits only a router recording
    a callback for another process, bounded by the router's own timeout, and that runs
    inside the gate's shield.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._closing = False
        self._read_deadline = math.inf
        # One scope per body read in progress, so that close() can bound each of them.
        self._reads: set[anyio.CancelScope] = set()
        self.in_flight = 0

    def close(self, grace: float) -> None:
        """Refuse new requests from now on; give bodies in flight ``grace`` seconds."""
        self._closing = True
        self._read_deadline = anyio.current_time() + grace
        for read in self._reads:
            read.deadline = self._read_deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)  # lifespan (hypercorn sends it)
            return
        if self._closing:
            logger.warning("refused a callback: the receiver is shutting down")
            await _refuse(send)
            return
        self.in_flight += 1
        try:
            # Shielded: once the body is in, the callback is applied and answered in one
            # go; only the body read below may be cut off (before anything is applied).
            with anyio.CancelScope(shield=True):
                try:
                    await self._app(scope, self._bounded(receive), send)
                except _BodyCutOffError:
                    logger.warning("refused a callback whose body was still arriving at shutdown")
                    await _refuse(send)
        finally:
            self.in_flight -= 1

    def _bounded(self, receive: Receive) -> Receive:
        async def bounded_receive() -> Message:
            with anyio.CancelScope(deadline=self._read_deadline) as read:
                self._reads.add(read)
                try:
                    return await receive()
                finally:
                    self._reads.discard(read)
            raise _BodyCutOffError

        return bounded_receive


async def _refuse(send: Send) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(_REFUSED_BODY)),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _REFUSED_BODY})


async def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or an ``OSError`` that names them."""
    with contextlib.ExitStack() as on_error:
        try:
            family, kind, proto, _, address = (
                await anyio.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            )[0]
            sock = socket.socket(family, kind, proto)
            on_error.callback(sock.close)
            # Rebinding right after a previous run is fine; a port someone listens on is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason += ": another process listens there (pick another port, or port=0)"
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from exc
        on_error.pop_all()
    return sock


def _missing_extra(server: str, backend: str, exc: ImportError) -> ImportError:
    error = ImportError(
        f"client.serve_callbacks() runs {server} under {backend}, and {server} is not "
        f"installed: {INSTALL_HINT}",
        name=server,
    )
    error.__cause__ = exc
    return error


def _pick_server() -> tuple[str, ServeFunction]:
    """The ASGI server for the running event loop, and the function that runs it."""
    if not running_on_asyncio():
        try:
            # Imported now so that a missing extra fails before anything is bound.
            import hypercorn.trio.run  # noqa: PLC0415, F401
        except ImportError as exc:
            raise _missing_extra("hypercorn", "trio", exc) from exc
        return "hypercorn", _serve_hypercorn
    try:
        import uvicorn  # noqa: PLC0415, F401
    except ImportError as exc:
        raise _missing_extra("uvicorn", "asyncio", exc) from exc
    return "uvicorn", _serve_uvicorn


async def _serve_uvicorn(
    app: ASGIApp,
    sock: socket.socket,
    grace: float,
    stop: anyio.Event,
    started: Callable[[], None],
) -> None:
    """Run uvicorn on ``sock`` until ``stop`` is set, then shut it down gracefully."""
    import uvicorn  # noqa: PLC0415
    from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: PLC0415

    class QuietH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Off whatever logging is configured: callback tokens ride in the query string.
            self.access_log = False

    class EmbeddedServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the script owns its signals; leaving the block stops the server

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            started()

    config = uvicorn.Config(
        app,
        http=QuietH11Protocol,
        ws="none",
        lifespan="off",
        interface="asgi3",
        log_config=None,  # never touch the script's logging configuration
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(grace + _SERVER_GRACE_MARGIN),
    )
    server = EmbeddedServer(config)

    async def exit_on_stop() -> None:
        await stop.wait()
        server.should_exit = True

    async with anyio.create_task_group() as watcher:
        watcher.start_soon(exit_on_stop)
        await server.serve(sockets=[sock])
        watcher.cancel_scope.cancel()


async def _serve_hypercorn(
    app: ASGIApp,
    sock: socket.socket,
    grace: float,
    stop: anyio.Event,
    started: Callable[[], None],
) -> None:
    """Run hypercorn's trio worker on ``sock`` until ``stop`` is set."""
    from hypercorn.config import Config, Sockets  # noqa: PLC0415
    from hypercorn.trio.run import worker_serve  # noqa: PLC0415
    from hypercorn.utils import wrap_app  # noqa: PLC0415

    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger("keevx_async.server")
    config.graceful_timeout = grace + _SERVER_GRACE_MARGIN
    await worker_serve(
        wrap_app(cast("ASGIFramework", app), config.wsgi_max_body_size, "asgi"),
        config,
        sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
        shutdown_trigger=stop.wait,
        task_status=cast("trio.TaskStatus[list[str]]", _StartedCallback(started)),
    )


class _StartedCallback:
    """What ``hypercorn.trio.run.worker_serve`` needs of a task status."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback()


async def _run_server(serve: ServeFunction, ready: anyio.Event, *args: Any) -> None:
    # Shielded: the server stops when asked (``stop``), gracefully, even when the block
    # around it is cancelled; a cancellation reaching it directly would cut callbacks off.
    # Its start is bounded (the socket is bound already), so a cancelled start ends too.
    with anyio.CancelScope(shield=True):
        await serve(*args, started=ready.set)


def _sole_error(error: BaseException) -> BaseException:
    """The one error inside an exception group (a server that failed to start), else
    ``error`` itself."""
    inner: tuple[BaseException, ...] = getattr(error, "exceptions", ())
    return inner[0] if len(inner) == 1 else error


class CallbackServer:
    """A real HTTP server running an ASGI app that receives callbacks (``callback_app``).

    [`client.serve_callbacks()`][keevx_async.AsyncKeevx.serve_callbacks] makes one for
    the client's ``callback_app`` and, for the block, points the client's
    ``callback_url`` at it; the server itself knows nothing of clients and serves any
    ASGI app.

    Use it as an async context manager, once. Entering binds ``host:port`` and starts the
    server (uvicorn under asyncio, hypercorn under trio); it is listening when the block
    starts. Leaving the block refuses new requests (503), lets those in flight finish
    (their bodies get ``shutdown_grace`` seconds to arrive) and frees the port.

    ```python
    async with client.serve_callbacks(port=0) as server:
        print(server.url)  # http://127.0.0.1:<the port picked>
        images = await client.generate(kx.ImageRequest("a lighthouse at dawn"))
    ```

    Attributes:
        host: the address asked for.
        shutdown_grace: seconds a callback in flight at shutdown gets to finish arriving.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 8787,
        public_url: str | None = None,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string; got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535; got {port!r}")
        self.host = host
        self._port = port
        self._public_url = None if public_url is None else check_http_url(public_url, "public_url")
        self.shutdown_grace = check_seconds("shutdown_grace", shutdown_grace, zero_ok=True)
        self._url: str | None = None
        self._server_name: str | None = None
        self._state = _NEW
        self._gate = _ShutdownGate(app)
        self._task_group: TaskGroup | None = None
        self._stop: anyio.Event | None = None

    def __repr__(self) -> str:
        if self._url is None:
            return f"<CallbackServer {self.host}:{self._port} {self._state}>"
        return (
            f"<CallbackServer url={self._url!r} public_url={self.public_url!r} "
            f"{self._state} ({self._server_name})>"
        )

    @property
    def port(self) -> int:
        """The port: the one bound once entered (the real one when ``0`` was asked)."""
        return self._port

    @property
    def url(self) -> str:
        """The bound address, ``http://host:port`` (also after the block, for logs).

        Raises:
            RuntimeError: the server was not entered yet.
        """
        if self._url is None:
            raise RuntimeError("the CallbackServer is not started: use `async with`")
        return self._url

    @property
    def public_url(self) -> str:
        """The URL the service is told to call: ``public_url`` if given, else `url`."""
        return self._public_url if self._public_url is not None else self.url

    @property
    def in_flight(self) -> int:
        """Callbacks being received or answered right now."""
        return self._gate.in_flight

    async def __aenter__(self) -> Self:
        """Bind and start the server; it is listening when this returns.

        Raises:
            RuntimeError: entered before.
            ImportError: the ``keevx-async[server]`` extra is not installed.
            OSError: ``host:port`` cannot be bound (e.g. the port is taken).
        """
        if self._state != _NEW:
            raise RuntimeError(
                "a CallbackServer runs once: make a new one with client.serve_callbacks()"
            )
        server_name, serve = _pick_server()
        sock = await _listen(self.host, self._port)
        bound_host, bound_port = sock.getsockname()[:2]
        # Made per start: a start that failed leaves the server as new, ready to retry.
        self._stop = stop = anyio.Event()
        ready = anyio.Event()
        task_group = await enter_task_group()
        try:
            task_group.start_soon(
                _run_server, serve, ready, self._gate, sock, self.shutdown_grace, stop
            )
            await ready.wait()
        except BaseException:
            # A start that failed or was cancelled: a server that started anyway stops.
            stop.set()
            try:
                await exit_task_group(task_group, cancel=False)
            except BaseException as exit_error:  # noqa: BLE001 - re-raised, unwrapped
                raise _sole_error(exit_error) from None
            finally:
                sock.close()
            raise
        self._port = bound_port
        self._url = http_url(bound_host, bound_port)
        self._server_name = server_name
        self._task_group = task_group
        self._state = _SERVING
        logger.info("receiving callbacks at %s (%s)", self._url, server_name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Refuse new requests, finish those in flight, stop the server, free the port."""
        task_group, stop = self._task_group, self._stop
        if self._state != _SERVING or task_group is None or stop is None:
            raise RuntimeError("the CallbackServer is not serving")
        self._state = _CLOSING
        self._gate.close(self.shutdown_grace)
        stop.set()
        # Shielded: the port must be freed even when the block was cancelled.
        try:
            await exit_task_group(task_group, cancel=False, shield=True)
        finally:
            self._task_group = None
            self._state = _CLOSED
