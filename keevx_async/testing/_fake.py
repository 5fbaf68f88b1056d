"""FakeKeevx: an emulator of the Keevx image generation service, as a plain ASGI 3 app.

The emulator applies the service's own rules (request validation, envelopes, task IDs, the
task-state GET endpoint, one callback per finished task) and adds fault knobs so that code
built on the service can be tested against its hard cases: latency, scripted HTTP errors,
failed tasks, and callbacks that arrive early, twice, out of order or never.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
import secrets
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import anyio
import attrs
import httpx

from keevx_async._client import AsyncKeevx
from keevx_async._types import (
    FINISHED_OK,
    IMAGE_QUALITIES,
    IMAGE_RATIOS,
    MAX_GENERATE_COUNT,
    MAX_PROMPT_LENGTH,
    MAX_REFERENCE_IMAGES,
    MODULES,
)
from keevx_async.testing._http_server import LoopbackServer, serve_asgi

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from types import TracebackType

    from anyio.abc import TaskGroup
    from typing_extensions import Self

    from keevx_async._asgi import Message, Receive, Scope, Send

__all__ = ["CallbackSink", "FakeKeevx", "FakeTask"]

IN_PROCESS_BASE_URL: Final = "https://api.fake.keevx.test"
"""``base_url`` of a fake that is not served on a socket (reached through ASGITransport)."""
DEFAULT_IMAGE_BASE_URL: Final = "https://images.fake.keevx.test"
EXAMPLE_CALLBACK_URL: Final = "https://app.example.test/keevx/callback"
"""The ``callback_url`` of clients made by ``FakeKeevx.client`` unless told otherwise."""
SUBMIT_PATH: Final = "/v1/image_generate"
TASK_ID_PREFIX: Final = "i2is-"
GENERATING: Final = "GENERATING"
FAILED: Final = "FAILED"
CODE_OK: Final = 0
CODE_PARAMETER_ERROR: Final = 100001
CODE_TASK_NOT_FOUND: Final = 110002
MODERATION_MESSAGE: Final = "content moderation rejected the prompt"
"""``error_message`` of tasks failed by ``fail_if``."""
RANDOM_FAILURE_MESSAGE: Final = "image processing error: generation failed"
"""``error_message`` of tasks failed by ``fail_rate``."""

# The service's defaults for the optional request fields.
_DEFAULT_MODULE: Final = "std"
_DEFAULT_GENERATE_COUNT: Final = 1
_DEFAULT_IMAGE_QUALITY: Final = "2K"
_DEFAULT_IMAGE_RATIO: Final = "9:16"


class CallbackSink(Protocol):
    """Anything [`FakeKeevx.deliver_into`][keevx_async.testing.FakeKeevx.deliver_into] can hand
    callbacks to (e.g. the SDK client).
    """

    async def feed_callback(self, body: bytes, /, *, url: str) -> object:
        """Take one callback: the exact body bytes and the URL it would be POSTed to."""
        ...


@attrs.define
class FakeTask:
    """One task created by [`FakeKeevx`][keevx_async.testing.FakeKeevx], with what happened to it
    so far.

    ``body`` is the validated request (defaults filled in, ``reference_images`` cut to
    five); ``index`` is the task's position among its request's task IDs. ``status`` is
    ``"GENERATING"`` until ``finished_at`` is set, then ``"SUCCEEDED"`` or ``"FAILED"``.
    ``lost`` tasks are never called back; ``duplicated`` ones are called back twice.
    ``callbacks_sent`` counts successful deliveries of this task's callback.
    """

    task_id: str
    prompt: str
    body: dict[str, Any]
    index: int
    callback_url: str | None
    created_at: float
    status: str = GENERATING
    image_url: str = ""
    thumbnail_url: str = ""
    error_message: str = ""
    finished_at: float | None = None
    callbacks_sent: int = 0
    lost: bool = False
    duplicated: bool = False


@attrs.define
class _Fault:
    status: int
    times: int
    retry_after: float | str | None
    create: bool
    route: Literal["submit", "get"]


@attrs.define(eq=False)
class _Planned:
    """A created task and how it will finish."""

    task: FakeTask
    failure: str | None  # error_message when the task will fail, else None
    submission: int  # groups the tasks of one submit, so they are delivered in order
    delay: float  # seconds from creation until the task finishes


@attrs.define
class _Reply:
    status: int
    payload: dict[str, Any]
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)


def _envelope(code: int, msg: str, data: object = None) -> dict[str, Any]:
    return {"code": code, "msg": msg, "data": data}


def _error_reply(status: int, msg: str, *, code: int | None = None) -> _Reply:
    return _Reply(status, _envelope(status if code is None else code, msg))


def _format_retry_after(value: float | str) -> str:
    if isinstance(value, str):
        return value
    # Seconds without float noise: 2.0 -> "2", 0.25 -> "0.25" (never exponent notation).
    return format(value, "f").rstrip("0").rstrip(".")


def _optional(body: dict[str, Any], field: str, default: object) -> Any:
    # The service treats an explicit null like an absent optional field.
    value = body.get(field)
    return default if value is None else value


def _validate(body: dict[str, Any]) -> dict[str, Any] | str:
    """Apply the service's rules to a submit body: the normalised request, or an error."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        return "prompt is required and must be a string"
    if not 1 <= len(prompt) <= MAX_PROMPT_LENGTH:
        return f"prompt must be 1..{MAX_PROMPT_LENGTH} characters, got {len(prompt)}"
    reference_images = _optional(body, "reference_images", [])
    if not isinstance(reference_images, list) or not all(
        isinstance(url, str) for url in reference_images
    ):
        return "reference_images must be a list of URL strings"
    module = _optional(body, "module", _DEFAULT_MODULE)
    if module not in MODULES:
        return f"module must be one of {', '.join(MODULES)}"
    generate_count = _optional(body, "generate_count", _DEFAULT_GENERATE_COUNT)
    # bool is an int subclass, but JSON true is not a count.
    if (
        isinstance(generate_count, bool)
        or not isinstance(generate_count, int)
        or not 1 <= generate_count <= MAX_GENERATE_COUNT
    ):
        return f"generate_count must be an integer in 1..{MAX_GENERATE_COUNT}"
    image_quality = _optional(body, "image_quality", _DEFAULT_IMAGE_QUALITY)
    if image_quality not in IMAGE_QUALITIES:
        return f"image_quality must be one of {', '.join(IMAGE_QUALITIES)}"
    image_ratio = _optional(body, "image_ratio", _DEFAULT_IMAGE_RATIO)
    if image_ratio not in IMAGE_RATIOS:
        return f"image_ratio must be one of {', '.join(IMAGE_RATIOS)}"
    callback_url = body.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        return "callback_url must be a URL string"
    return {
        "prompt": prompt,
        # The service silently keeps the first five; the SDK refuses more instead.
        "reference_images": reference_images[:MAX_REFERENCE_IMAGES],
        "module": module,
        "generate_count": generate_count,
        "image_quality": image_quality,
        "image_ratio": image_ratio,
        "callback_url": callback_url or None,
    }


def _parse_json_object(raw_body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(raw_body)
    except ValueError:  # invalid JSON and invalid UTF-8 alike
        return None
    return parsed if isinstance(parsed, dict) else None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send_reply(send: Send, reply: _Reply) -> None:
    body = json.dumps(reply.payload).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *reply.headers,
    ]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class FakeKeevx:
    """An emulator of the Keevx image generation service, usable as an ASGI 3 app.

    Run it with ``async with FakeKeevx(...) as fake:``, which starts its one background
    scheduler (tasks finish and are called back only while it runs; a request to a fake
    that is not running is answered with HTTP 500). Reach it in-process with
    `http_client` (``httpx.ASGITransport``) or on a real loopback socket with
    `serve`. Callbacks are POSTed to each request's ``callback_url`` with
    ``callback_client`` (default: an own ``httpx.AsyncClient``), or handed straight to an
    object given to `deliver_into`.

    Every constructor argument is also an attribute that may be changed at any time;
    changes apply to requests that arrive afterwards:

    - ``api_key``: when set, requests must carry ``Authorization: Bearer <api_key>``; when
      ``None``, any bearer token is accepted. Either way a missing or malformed header is
      answered with 401.
    - ``latency``: seconds every submit and GET waits before it is processed.
    - ``complete_after``: seconds from creation until a task finishes, or a ``(low, high)``
      range to draw from uniformly (which makes callbacks arrive out of order).
    - ``fail_rate`` / ``fail_if``: the fraction of tasks that finish ``FAILED``, and a
      predicate on the prompt that fails every task of a request.
    - ``lost_rate`` / ``duplicate_rate``: fractions of callbacks never sent / sent twice;
      ``lose_if``: a predicate on the prompt whose tasks finish without calling back (a
      lost task still finishes: the GET endpoint tells its result).
    - ``early_callbacks``: every task of a submit finishes and is called back before the
      submit reply is sent.
    - ``shuffle``: the callbacks of one submission are delivered in a different order than
      their task IDs (random, and reversed whenever the draw happens to keep the order).
    - ``seed``: seeds the fake's private random generator so runs are reproducible
      (assigning ``seed`` reseeds it). Task IDs are random UUIDs regardless.
    - ``image_base_url``: result URLs are ``{image_base_url}/{task_id}.png`` (and
      ``_thumb.png``).
    - ``delivery_concurrency``: callback deliveries in flight at once.
    - ``redeliveries`` / ``redeliver_after``: how many more times a callback whose
      delivery failed (an exception, or an answer other than 2xx: a 503 of a receiver
      that could not record it) is POSTed again, the first after ``redeliver_after``
      seconds, then at doubling intervals. The service does not document retries, so
      the default is none.

    The counters (``submit_calls``, ``accepted_submits``, ``submit_times``,
    ``max_in_flight``, ``get_calls``, ``get_times``, ``callbacks_sent``,
    ``delivery_failures``) and
    ``tasks`` (the tasks created since the last reset) start over with
    `reset_metrics`; tasks created before a reset can still be looked up with GET.
    """

    api_key: str | None
    latency: float
    complete_after: float | tuple[float, float]
    fail_rate: float
    fail_if: Callable[[str], bool] | None
    lost_rate: float
    lose_if: Callable[[str], bool] | None
    duplicate_rate: float
    early_callbacks: bool
    shuffle: bool
    callback_client: httpx.AsyncClient | None
    image_base_url: str
    delivery_concurrency: int
    redeliveries: int
    redeliver_after: float

    tasks: dict[str, FakeTask]
    """The tasks created since construction or the last `reset_metrics`, by ID."""
    submit_calls: int
    """Submit requests received (any outcome)."""
    accepted_submits: int
    """Submit requests that created tasks (including ``inject(..., create=True)`` ones)."""
    submit_times: list[float]
    """``anyio.current_time()`` at the arrival of each submit request."""
    in_flight: int
    """Submit requests being handled right now (latency included)."""
    max_in_flight: int
    """The most submit requests ever handled at once."""
    get_calls: int
    """Task-state GET requests received."""
    get_times: list[float]
    """``anyio.current_time()`` at the arrival of each task-state GET request."""
    callbacks_sent: int
    """Callbacks delivered successfully (a duplicate counts twice)."""
    delivery_failures: list[tuple[str, str]]
    """``(task_id, reason)`` for every delivery that failed."""

    # Made on first entering, when an event loop is sure to run; nothing can schedule or
    # deliver before that, because a fake that is not running refuses every request.
    _limiter: anyio.CapacityLimiter
    _wakeup: anyio.Event

    def __init__(
        self,
        *,
        api_key: str | None = None,
        latency: float = 0.0,
        complete_after: float | tuple[float, float] = 0.01,
        fail_rate: float = 0.0,
        fail_if: Callable[[str], bool] | None = None,
        lost_rate: float = 0.0,
        lose_if: Callable[[str], bool] | None = None,
        duplicate_rate: float = 0.0,
        early_callbacks: bool = False,
        shuffle: bool = False,
        seed: int | None = None,
        callback_client: httpx.AsyncClient | None = None,
        image_base_url: str = DEFAULT_IMAGE_BASE_URL,
        delivery_concurrency: int = 64,
        redeliveries: int = 0,
        redeliver_after: float = 0.5,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self.complete_after = complete_after
        self.fail_rate = fail_rate
        self.fail_if = fail_if
        self.lost_rate = lost_rate
        self.lose_if = lose_if
        self.duplicate_rate = duplicate_rate
        self.early_callbacks = early_callbacks
        self.shuffle = shuffle
        self.seed = seed
        self.callback_client = callback_client
        self.image_base_url = image_base_url
        self.delivery_concurrency = delivery_concurrency
        self.redeliveries = redeliveries
        self.redeliver_after = redeliver_after

        self.in_flight = 0
        self.reset_metrics()
        # Every task ever created, for GET: unlike ``tasks`` it survives reset_metrics().
        self._registry: dict[str, FakeTask] = {}
        self._faults: list[_Fault] = []
        self._callback_target: CallbackSink | None = None
        self._served_url: str | None = None

        self._task_group: TaskGroup | None = None
        self._owned_client: httpx.AsyncClient | None = None
        self._lifespan_entered = False
        # Tasks waiting to finish: (due time, tie-breaker, task), earliest first. One
        # scheduler loop sleeps until the head is due; ``_wakeup`` (made on entering)
        # interrupts that sleep when a push makes an earlier item the head.
        self._due: list[tuple[float, int, _Planned]] = []
        self._sequence = itertools.count()
        self._submissions = itertools.count()
        # Outstanding work for wait_idle(): submit requests being handled plus tasks whose
        # finishing and callbacks are not done yet.
        self._pending = 0
        self._idle: anyio.Event | None = None

    # -- configuration -----------------------------------------------------------------

    @property
    def seed(self) -> int | None:
        """The seed of the fake's random generator; assigning it reseeds the generator."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        self._seed = value
        self._rng = random.Random(value)

    @property
    def base_url(self) -> str:
        """The URL to reach the fake at: the loopback URL inside `serve`, else a
        placeholder that only `http_client`'s in-process transport understands."""
        return self._served_url or IN_PROCESS_BASE_URL

    def reset_metrics(self) -> None:
        """Start the counters and ``tasks`` over (``in_flight`` is live state and stays)."""
        self.tasks = {}
        self.submit_calls = 0
        self.accepted_submits = 0
        self.submit_times = []
        self.max_in_flight = self.in_flight
        self.get_calls = 0
        self.get_times = []
        self.callbacks_sent = 0
        self.delivery_failures = []

    def inject(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: float | str | None = None,
        create: bool = False,
        route: Literal["submit", "get"] = "submit",
    ) -> None:
        """Answer the next ``times`` requests to ``route`` with HTTP ``status``.

        Faults are queued and consumed in order, one per matching request, before the
        request is validated (but after authentication). The reply is the envelope
        ``{"code": status, "msg": ..., "data": null}``, with a ``Retry-After`` header when
        ``retry_after`` is given (a number is sent as seconds, a string verbatim, e.g. an
        HTTP date). ``create=True`` (submit only) creates the tasks of a valid request,
        and calls them back later, although the reply is the error: the ambiguous "billed
        but no task IDs" case.
        """
        if route not in ("submit", "get"):
            raise ValueError(f"route must be 'submit' or 'get', not {route!r}")
        if create and route != "submit":
            raise ValueError("create=True only applies to route='submit'")
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        self._faults.append(_Fault(status, times, retry_after, create, route))

    def deliver_into(self, target: CallbackSink | None) -> None:
        """Hand callbacks to ``await target.feed_callback(body, url=callback_url)``.

        ``body`` is the exact bytes that would be POSTed and ``url`` the request's
        ``callback_url``. An exception from ``feed_callback`` is recorded in
        ``delivery_failures`` like a failed HTTP delivery. ``None`` goes back to HTTP.
        """
        self._callback_target = target

    def http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """A new ``httpx.AsyncClient`` that reaches this fake in-process.

        It uses ``httpx.ASGITransport(app=self)`` and ``base_url=self.base_url`` unless
        ``kwargs`` say otherwise; other ``kwargs`` go to ``httpx.AsyncClient``. The caller
        closes it.
        """
        kwargs.setdefault("transport", httpx.ASGITransport(app=self))
        kwargs.setdefault("base_url", self.base_url)
        return httpx.AsyncClient(**kwargs)

    @asynccontextmanager
    async def client(
        self, *, deliver_callbacks: bool = True, **options: Any
    ) -> AsyncIterator[AsyncKeevx]:
        """An [`AsyncKeevx`][keevx_async.AsyncKeevx] wired to this fake, for the block.

        It reaches the fake in-process (through ``httpx.ASGITransport``) and, with
        ``deliver_callbacks``, gets every callback handed straight in, token included,
        as its ``callback_app`` would:

        ```python
        async with FakeKeevx() as fake, fake.client() as client:
            images = await client.generate(kx.ImageRequest("a red fox"))
        ```

        ``options`` go to ``AsyncKeevx`` (``api_key`` defaults to the fake's, or
        ``"test"``; ``callback_url`` to ``https://app.example.test/keevx/callback``).
        """
        options.setdefault("api_key", self.api_key or "test")
        options.setdefault("base_url", self.base_url)
        options.setdefault("callback_url", EXAMPLE_CALLBACK_URL)
        async with self.http_client() as http, AsyncKeevx(http_client=http, **options) as client:
            if deliver_callbacks:
                self.deliver_into(client)
            try:
                yield client
            finally:
                if deliver_callbacks and self._callback_target is client:
                    self.deliver_into(None)

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[LoopbackServer]:
        """Serve the fake on a real socket for the block; ``base_url`` points there meanwhile.

        The fake must be running (``async with fake:``) for requests to be answered.
        ``port=0`` picks a free port; the yielded
        [`LoopbackServer`][keevx_async.testing.LoopbackServer] has the real one.
        """
        async with serve_asgi(self, host=host, port=port) as server:
            self._served_url = server.url
            try:
                yield server
            finally:
                self._served_url = None

    async def wait_idle(self) -> None:
        """Return once nothing is left to do: every created task has finished, every due
        callback was delivered (or lost, or failed), and no submit is being handled.

        Only meaningful while the fake is running (it raises ``RuntimeError`` otherwise).
        Do not call it from inside a callback receiver: the delivery waits for it.
        """
        if self._task_group is None:
            raise RuntimeError("FakeKeevx is not running: use `async with FakeKeevx(...)`")
        while self._pending:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start the scheduler (and the own callback HTTP client, if none was given)."""
        if self._task_group is not None:
            raise RuntimeError("FakeKeevx is already running")
        if self.callback_client is None:
            # No proxies from the environment: callbacks go to loopback receivers.
            self._owned_client = httpx.AsyncClient(trust_env=False)
        self._limiter = anyio.CapacityLimiter(self.delivery_concurrency)
        self._wakeup = anyio.Event()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._run_scheduler, task_group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the scheduler, cancelling pending deliveries; unfinished tasks stay
        unfinished (they resume if the fake is entered again)."""
        task_group = self._task_group
        if task_group is None:
            raise RuntimeError("FakeKeevx is not running")
        self._task_group = None
        task_group.cancel_scope.cancel()
        try:
            # The block's own exception is not passed in, so it propagates as raised
            # instead of wrapped in an exception group.
            await task_group.__aexit__(None, None, None)
        finally:
            client, self._owned_client = self._owned_client, None
            if client is not None:
                with anyio.CancelScope(shield=True):
                    await client.aclose()

    # -- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection (``http``, or ``lifespan``, which starts and stops
        the fake when a server such as uvicorn sends it)."""
        if scope["type"] == "lifespan":
            await self._run_lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"FakeKeevx serves HTTP only, not {scope['type']!r}")
        raw_body = await _read_body(receive)
        method: str = scope["method"]
        path: str = scope["path"]
        task_id = path.removeprefix(SUBMIT_PATH + "/")
        if self._task_group is None:
            reply = _error_reply(
                500, "FakeKeevx is not running: enter it with `async with FakeKeevx(...)`"
            )
        elif path == SUBMIT_PATH:
            reply = (
                await self._handle_submit(scope, raw_body)
                if method == "POST"
                else self._method_not_allowed(method, path, "POST")
            )
        elif task_id != path and task_id and "/" not in task_id:
            reply = (
                await self._handle_get(scope, task_id)
                if method == "GET"
                else self._method_not_allowed(method, path, "GET")
            )
        else:
            reply = _error_reply(404, f"not found: {method} {path}")
        await _send_reply(send, reply)

    @staticmethod
    def _method_not_allowed(method: str, path: str, allowed: str) -> _Reply:
        reply = _error_reply(405, f"method {method} not allowed on {path}")
        reply.headers.append((b"allow", allowed.encode()))
        return reply

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                if self._task_group is None:
                    await self.__aenter__()
                    self._lifespan_entered = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._lifespan_entered:
                    self._lifespan_entered = False
                    await self.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _auth_error(self, scope: Scope) -> _Reply | None:
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _error_reply(401, "missing or malformed Authorization header")
        if self.api_key is not None and not secrets.compare_digest(
            token.encode(), self.api_key.encode()
        ):
            return _error_reply(401, "invalid api key")
        return None

    def _take_fault(self, route: str) -> _Fault | None:
        for fault in self._faults:
            if fault.route == route:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _fault_reply(fault: _Fault) -> _Reply:
        reply = _error_reply(fault.status, f"injected fault: HTTP {fault.status}")
        if fault.retry_after is not None:
            reply.headers.append(
                (b"retry-after", _format_retry_after(fault.retry_after).encode("latin-1"))
            )
        return reply

    async def _handle_submit(self, scope: Scope, raw_body: bytes) -> _Reply:
        self.submit_calls += 1
        self.submit_times.append(anyio.current_time())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._work_started()
        try:
            await anyio.sleep(self.latency)
            denied = self._auth_error(scope)
            if denied is not None:
                return denied
            fault = self._take_fault("submit")
            if fault is not None and not fault.create:
                return self._fault_reply(fault)
            reply = await self._accept_submission(raw_body)
            return reply if fault is None else self._fault_reply(fault)
        finally:
            self.in_flight -= 1
            self._work_done()

    async def _accept_submission(self, raw_body: bytes) -> _Reply:
        body = _parse_json_object(raw_body)
        if body is None:
            return _error_reply(
                400, "parameter error: body must be a JSON object", code=CODE_PARAMETER_ERROR
            )
        request = _validate(body)
        if isinstance(request, str):
            return _error_reply(200, f"parameter error: {request}", code=CODE_PARAMETER_ERROR)
        planned = self._create_tasks(request)
        if self.early_callbacks:
            for batch in self._finish(planned):
                await self._deliver_batch(batch)
        else:
            for item in planned:
                self._schedule(item)
        task_ids = sorted((item.task for item in planned), key=lambda task: task.index)
        return _Reply(200, _envelope(CODE_OK, "ok", {"task_ids": [t.task_id for t in task_ids]}))

    def _create_tasks(self, request: dict[str, Any]) -> list[_Planned]:
        """Create the request's tasks and decide their fates; the result is in delivery
        order (shuffled when ``shuffle`` is on)."""
        self.accepted_submits += 1
        submission = next(self._submissions)
        now = anyio.current_time()
        prompt: str = request["prompt"]
        callback_url: str | None = request["callback_url"]
        scripted_failure = self.fail_if is not None and self.fail_if(prompt)
        scripted_loss = self.lose_if is not None and self.lose_if(prompt)
        planned: list[_Planned] = []
        for index in range(request["generate_count"]):
            # The three fate draws are made for every task, whatever the rates are, so
            # that one seed gives the same fates when only a rate changes.
            random_failure = self._rng.random() < self.fail_rate
            lost = self._rng.random() < self.lost_rate
            duplicated = self._rng.random() < self.duplicate_rate
            delay = (
                self._rng.uniform(*self.complete_after)
                if isinstance(self.complete_after, tuple)
                else self.complete_after
            )
            task = FakeTask(
                task_id=TASK_ID_PREFIX + uuid.uuid4().hex,
                prompt=prompt,
                body=request,
                index=index,
                callback_url=callback_url,
                created_at=now,
                lost=(lost or scripted_loss) and callback_url is not None,
                duplicated=duplicated and not (lost or scripted_loss) and callback_url is not None,
            )
            self.tasks[task.task_id] = self._registry[task.task_id] = task
            failure = (
                MODERATION_MESSAGE
                if scripted_failure
                else RANDOM_FAILURE_MESSAGE
                if random_failure
                else None
            )
            planned.append(_Planned(task, failure, submission, delay))
            self._work_started()
        if self.shuffle:
            shuffled = planned.copy()
            self._rng.shuffle(shuffled)
            # A shuffle that keeps the order would make the knob a no-op for this request
            # (_Planned compares by identity, so this compares the orders).
            planned = shuffled if shuffled != planned else planned[::-1]
        return planned

    async def _handle_get(self, scope: Scope, task_id: str) -> _Reply:
        self.get_calls += 1
        self.get_times.append(anyio.current_time())
        await anyio.sleep(self.latency)
        denied = self._auth_error(scope)
        if denied is not None:
            return denied
        fault = self._take_fault("get")
        if fault is not None:
            return self._fault_reply(fault)
        task = self._registry.get(task_id)
        if task is None:
            return _error_reply(200, "task not found", code=CODE_TASK_NOT_FOUND)
        snapshot = {
            "task_id": task.task_id,
            "status": task.status,
            "image_url": task.image_url,
            "thumbnail_url": task.thumbnail_url,
            "error_message": task.error_message,
        }
        return _Reply(200, _envelope(CODE_OK, "ok", snapshot))

    # -- scheduling and delivery -------------------------------------------------------

    def _work_started(self) -> None:
        self._pending += 1

    def _work_done(self) -> None:
        self._pending -= 1
        if not self._pending and self._idle is not None:
            self._idle.set()
            self._idle = None

    def _schedule(self, item: _Planned) -> None:
        entry = (item.task.created_at + item.delay, next(self._sequence), item)
        heapq.heappush(self._due, entry)
        if self._due[0] is entry:
            self._wakeup.set()

    async def _run_scheduler(self, task_group: TaskGroup) -> None:
        """Finish tasks when due and start their deliveries; one loop for all tasks."""
        while True:
            now = anyio.current_time()
            due: list[_Planned] = []
            while self._due and self._due[0][0] <= now:
                due.append(heapq.heappop(self._due)[2])
            for batch in self._finish(due):
                task_group.start_soon(self._deliver_batch, batch)
            self._wakeup = anyio.Event()
            with anyio.move_on_after(self._due[0][0] - now if self._due else math.inf):
                await self._wakeup.wait()

    def _finish(self, items: Iterable[_Planned]) -> list[list[_Planned]]:
        """Finish the given tasks; return those to call back, in batches per submission
        (in the given order), so each batch can be delivered in order by one task."""
        now = anyio.current_time()
        batches: dict[int, list[_Planned]] = {}
        for item in items:
            task = item.task
            task.finished_at = now
            if item.failure is None:
                task.status = FINISHED_OK
                task.image_url = f"{self.image_base_url}/{task.task_id}.png"
                task.thumbnail_url = f"{self.image_base_url}/{task.task_id}_thumb.png"
            else:
                task.status = FAILED
                task.error_message = item.failure
            if task.callback_url is None or task.lost:
                self._work_done()
            else:
                batches.setdefault(item.submission, []).append(item)
        return list(batches.values())

    async def _deliver_batch(self, batch: list[_Planned]) -> None:
        try:
            # The knob may have changed since the limiter was made.
            self._limiter.total_tokens = self.delivery_concurrency
            async with self._limiter:
                for item in batch:
                    for _ in range(2 if item.task.duplicated else 1):
                        await self._deliver(item.task)
        finally:
            for _ in batch:
                self._work_done()

    async def _deliver(self, task: FakeTask) -> None:
        body = json.dumps(
            {
                "code": CODE_OK,
                "msg": "ok",
                "task_type": "image_generate",
                "data": {
                    "task_id": task.task_id,
                    "status": task.status,
                    "image_url": task.image_url,
                    "error_message": task.error_message,
                },
            }
        ).encode()
        attempt = 0
        while True:
            try:
                failure = await self._send_callback(task.callback_url or "", body)
            # A receiver's failure is what the fake is for: record it, never crash on it.
            except Exception as exc:  # noqa: BLE001
                failure = f"{type(exc).__name__}: {exc}"
            if failure is None:
                task.callbacks_sent += 1
                self.callbacks_sent += 1
                return
            self.delivery_failures.append((task.task_id, failure))
            if attempt >= self.redeliveries:
                return
            await anyio.sleep(self.redeliver_after * 2**attempt)
            attempt += 1

    async def _send_callback(self, url: str, body: bytes) -> str | None:
        """Deliver one callback body; the reason it failed, or None."""
        target = self._callback_target
        if target is not None:
            await target.feed_callback(body, url=url)
            return None
        client = self.callback_client or self._owned_client
        if client is None:
            return "no HTTP client for callbacks: the fake is not running"
        response = await client.post(
            url, content=body, headers={"content-type": "application/json"}
        )
        return None if response.is_success else f"HTTP {response.status_code}"
