"""FakeKeevx: an emulator of the Keevx image generation service, as a plain ASGI 3 app.

The emulator applies the service's own rules (request validation, envelopes, task IDs, the
task-state GET endpoint, one callback per finished task, the upload endpoint) and serves
every result URL as a file host would, and adds fault knobs so that code built on the
service can be tested against its hard cases: latency, scripted HTTP errors, failed
tasks, callbacks that arrive early, twice, out of order or never, failing uploads and
file hosts that fail, cut bodies short, serve error pages, expire URLs or trickle.

This module is the composition: the ASGI routes, the public knobs and counters, and the
fates drawn for each new task. The parts it wires live one concept per module: the
service's contract in `_rules`, the task record in `_task`, scripted faults in `_faults`,
finishing tasks on time in `_scheduler`, calling them back in `_deliverer`, serving files
and reading uploads in `_file_host`, and the awaitable counters behind the ``wait_for_*``
hooks in `_milestones`.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio
import httpx

from keevx_async._client import AsyncKeevx
from keevx_async._taskgroups import enter_task_group, exit_task_group
from keevx_async._types import IMAGE_CONTENT_TYPES
from keevx_async.testing._deliverer import CallbackDeliverer
from keevx_async.testing._faults import FaultScript
from keevx_async.testing._file_host import (
    FILES_PATH,
    FileHost,
    StoredFile,
    parse_multipart,
)
from keevx_async.testing._http_server import LoopbackServer, serve_asgi
from keevx_async.testing._milestones import Milestones
from keevx_async.testing._rules import (
    CODE_PARAMETER_ERROR,
    MODERATION_MESSAGE,
    RANDOM_FAILURE_MESSAGE,
    SUBMIT_PATH,
    TASK_ID_PREFIX,
    UPLOAD_PATH,
    VIDEO_SUBMIT_PATH,
    VIDEO_TASK_ID_PREFIX,
    Reply,
    auth_error,
    check_upload,
    error_reply,
    method_not_allowed,
    ok_reply,
    parameter_error,
    parse_json_object,
    task_not_found,
    task_snapshot,
    upload_error,
    upload_reply,
    validate,
    validate_video,
    video_error,
    video_snapshot,
)
from keevx_async.testing._scheduler import Scheduler
from keevx_async.testing._task import GENERATING, PENDING, PROCESSING, FakeTask, PlannedTask

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from types import TracebackType

    from anyio.abc import TaskGroup
    from typing_extensions import Self

    from keevx_async._asgi import Message, Receive, Scope, Send
    from keevx_async.testing._deliverer import CallbackSink, Recipient
    from keevx_async.testing._faults import Route
    from keevx_async.testing._file_host import FileFault

__all__ = ["FakeKeevx"]

IN_PROCESS_BASE_URL: Final = "https://api.fake.keevx.test"
"""``base_url`` of a fake that is not served on a socket (reached through ASGITransport)."""
EXAMPLE_CALLBACK_URL: Final = "https://app.example.test/keevx/callback"
"""The ``callback_url`` of clients made by ``FakeKeevx.client`` unless told otherwise."""
STATE_PATH: Final = "/_fake/state"
"""The path of the fake's own state (`FakeKeevx.state`), for tests in other processes."""


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


async def _send_reply(send: Send, reply: Reply) -> None:
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
    """An emulator of the Keevx generation service (images and image to video), usable as
    an ASGI 3 app.

    Run it with ``async with FakeKeevx(...) as fake:``, which starts its one background
    scheduler (tasks finish and are called back only while it runs; a request to a fake
    that is not running is answered with HTTP 500). Reach it in-process with
    `http_client` (``httpx.ASGITransport``) or on a real loopback socket with
    `serve`. Callbacks are POSTed to each request's ``callback_url`` with
    ``callback_client`` (default: an own ``httpx.AsyncClient``), or handed straight to an
    object given to `deliver_into`.

    Images: ``POST /v1/image_generate`` and ``GET /v1/image_generate/{task_id}``, ``i2is-``
    task IDs, ``GENERATING`` until finished. Videos: ``POST /v1/image_to_video`` and
    ``GET /v1/image_to_video/{task_id}``, ``i2v-`` task IDs, ``PENDING``, then
    ``PROCESSING`` from half-way, then ``SUCCEEDED`` or ``FAILED``; a finished video
    has ``video_url`` (``{task_id}.mp4``, served as ``video/mp4``), ``thumbnail_url``,
    ``duration``, ``width`` and ``height``, in its GET ``data`` and in its callback
    (``task_type`` ``"image_to_video"``). Each GET endpoint knows only its own kind's tasks
    (another's ID is ``110002`` task not found). The video endpoint applies the service's
    per-model table on its own (not with the SDK's validators) and refuses with HTTP 200
    and a business code:

    - ``100001``: a parameter is missing or malformed (prompt, aspect_ratio,
      generate_count 1..4, a non-integer duration, an image that is not an http(s) URL).
    - ``100002``: the model is not supported (``V``, ``KL``).
    - ``100003``: the images do not fit the model (``V``: ``image_url`` or 1..3
      ``reference_images``, not both, ``end_image_url`` only with ``image_url``;
      ``KL``: 1..7 ``reference_images``).
    - ``100004``: the duration is not allowed (``V`` with ``image_url``: 4, 6, 8; ``V``
      multi-image: 8; ``KL``: 5, 10).
    - ``100005``: the resolution is not allowed (``KL``: no ``4k``).
    - ``100006``: audio is not supported by the model (``KL``).
    - ``100007``: ``image_url``/``end_image_url`` is not allowed for the model (``KL``).

    Every constructor argument is also an attribute that may be changed at any time;
    changes apply to requests that arrive afterwards:

    - ``api_key``: when set, requests must carry ``Authorization: Bearer <api_key>``; when
      ``None``, any bearer token is accepted. Either way a missing or malformed header is
      answered with 401.
    - ``latency``: seconds every submit and GET waits before it is processed.
    - ``complete_after``: seconds from creation until a task finishes, or a ``(low, high)``
      range to draw from uniformly (which makes callbacks arrive out of order).
    - ``video_complete_after``: the same for video tasks (default 0.05 s: videos are
      slower; the service's may take 20 minutes).
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
      ``_thumb.png``). Default: the fake's own file host, ``{base_url}/files``, which
      serves each as a real PNG (see below); ``base_url`` is read when the task finishes.
    - ``file_size``: the bytes of each result PNG (padded, still a valid PNG); default a
      tiny one (under 100 bytes).
    - ``file_delay``: seconds each file body takes, spread over its parts (slow bodies).
    - ``file_ttl``: seconds a result file is served after its task finished; later it
      answers 404, as the service's URLs do after about 7 days. ``None``: forever.
    - ``delivery_concurrency``: callback deliveries in flight at once.
    - ``redeliveries`` / ``redeliver_after``: how many more times a callback whose
      delivery failed (an exception, or an answer other than 2xx: a 503 of a receiver
      that could not record it) is POSTed again, the first after ``redeliver_after``
      seconds, then at doubling intervals. The service does not document retries, so
      the default is none.

    The file host answers ``GET {base_url}/files/...`` without authentication (as a
    CDN would): ``{task_id}.png`` and ``{task_id}_thumb.png`` of a succeeded task, and
    every uploaded file. Its faults: `inject` with ``route="file"`` (a 503, a 429 with
    ``Retry-After``, a 403/404 as for an expired URL), `inject_file_fault` (a body cut
    short, an HTML error page served as 200), `hold_files` (bodies stop after their first
    part until `release_files`), and ``file_delay``/``file_ttl``. The upload endpoint
    (``POST {base_url}/v1/figure-resource/upload/file``) applies the service's rules: a
    multipart part ``file`` with a JPG/JPEG/PNG/BMP/WebP/GIF name, not empty, at most
    20 MB; ``inject(..., route="upload")`` fails it.

    The counters (``submit_calls``, ``accepted_submits``, ``submit_times``,
    ``max_in_flight``, ``get_calls``, ``get_times``, ``callbacks_sent``,
    ``delivery_failures``, ``upload_calls``, ``uploads``, ``file_requests``,
    ``file_request_headers``, ``max_files_in_flight``) and
    ``tasks`` (the tasks created since the last reset) start over with
    `reset_metrics`; tasks created before a reset can still be looked up with GET, and
    their files (and uploaded files) are still served.

    Served on a socket, ``GET {base_url}/_fake/state`` answers the counters
    ``submit_calls`` and ``accepted_submits`` and, per task, its prompt, status and
    callback URL (`state`): what a test in another process reads.

    Tests wait on the fake instead of sleeping: `wait_for_submits`, `wait_for_gets`,
    `wait_for_callbacks` and `wait_for_file_requests` return once a counter reaches a
    value, `wait_idle` once nothing is left to do.
    """

    api_key: str | None
    latency: float
    complete_after: float | tuple[float, float]
    video_complete_after: float | tuple[float, float]
    fail_rate: float
    fail_if: Callable[[str], bool] | None
    lost_rate: float
    lose_if: Callable[[str], bool] | None
    duplicate_rate: float
    early_callbacks: bool
    shuffle: bool
    callback_client: httpx.AsyncClient | None
    file_size: int | None
    file_delay: float
    file_ttl: float | None
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
    get_paths: list[str]
    """The path of each task-state GET request, in order (``/v1/image_to_video/i2v-…``)."""
    submit_paths: list[str]
    """The path of each submit request, in order."""
    """``anyio.current_time()`` at the arrival of each task-state GET request."""
    callbacks_sent: int
    """Callbacks delivered successfully (a duplicate counts twice)."""
    delivery_failures: list[tuple[str, str]]
    """``(task_id, reason)`` for every delivery that failed."""
    upload_calls: int
    """Upload requests received (any outcome)."""
    uploads: dict[str, StoredFile]
    """The files uploaded (accepted), by file ID."""
    file_requests: int
    """Requests the file host received (any outcome)."""
    file_request_headers: list[dict[str, str]]
    """The headers of every request the file host received, in order (names lowercase)."""
    files_in_flight: int
    """File requests being answered right now."""
    max_files_in_flight: int
    """The most file requests ever answered at once."""

    # Made on entering, when an event loop is sure to run; nothing can deliver before
    # that, because a fake that is not running refuses every request.
    _deliverer: CallbackDeliverer

    def __init__(
        self,
        *,
        api_key: str | None = None,
        latency: float = 0.0,
        complete_after: float | tuple[float, float] = 0.01,
        video_complete_after: float | tuple[float, float] = 0.05,
        fail_rate: float = 0.0,
        fail_if: Callable[[str], bool] | None = None,
        lost_rate: float = 0.0,
        lose_if: Callable[[str], bool] | None = None,
        duplicate_rate: float = 0.0,
        early_callbacks: bool = False,
        shuffle: bool = False,
        seed: int | None = None,
        callback_client: httpx.AsyncClient | None = None,
        image_base_url: str | None = None,
        delivery_concurrency: int = 64,
        redeliveries: int = 0,
        redeliver_after: float = 0.5,
        file_size: int | None = None,
        file_delay: float = 0.0,
        file_ttl: float | None = None,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self.complete_after = complete_after
        self.video_complete_after = video_complete_after
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
        self.file_size = file_size
        self.file_delay = file_delay
        self.file_ttl = file_ttl

        self.in_flight = 0
        self.files_in_flight = 0
        self.reset_metrics()
        # Every task ever created, for GET: unlike ``tasks`` it survives reset_metrics().
        self._registry: dict[str, FakeTask] = {}
        self._faults = FaultScript()
        self._callback_target: CallbackSink | None = None
        self._served_url: str | None = None

        self._task_group: TaskGroup | None = None
        self._owned_client: httpx.AsyncClient | None = None
        self._lifespan_entered = False
        # Tasks waiting to finish; it outlives a session, so they resume on re-entering.
        self._scheduler = Scheduler()
        self._submissions = itertools.count()
        # Outstanding work for wait_idle(): submit requests being handled plus tasks whose
        # finishing and callbacks are not done yet.
        self._pending = 0
        self._idle: anyio.Event | None = None
        # Waiters of the wait_for_* hooks, told each new value of their counter.
        self._accepted_milestones = Milestones()
        self._get_milestones = Milestones()
        self._callback_milestones = Milestones()
        self._file_milestones = Milestones()
        self._file_host = FileHost(self)

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
    def image_base_url(self) -> str:
        """Where result URLs point: the value given, else the fake's own file host
        (``{base_url}/files``)."""
        return self._image_base_url or self.base_url + FILES_PATH

    @image_base_url.setter
    def image_base_url(self, value: str | None) -> None:
        self._image_base_url = value

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
        self.submit_paths = []
        self.max_in_flight = self.in_flight
        self.get_calls = 0
        self.get_times = []
        self.get_paths = []
        self.callbacks_sent = 0
        self.delivery_failures = []
        self.upload_calls = 0
        self.uploads = {}
        self.file_requests = 0
        self.file_request_headers = []
        self.max_files_in_flight = self.files_in_flight

    def inject(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: float | str | None = None,
        create: bool = False,
        route: Route = "submit",
    ) -> None:
        """Answer the next ``times`` requests to ``route`` with HTTP ``status``.

        ``route`` is ``"submit"``, ``"get"`` (the task-state lookup), ``"upload"`` or
        ``"file"`` (the file host: any file it serves). Faults are queued and consumed in
        order, one per matching request, before the request is validated (but after
        authentication). The reply is the envelope ``{"code": status, "msg": ...,
        "data": null}`` (for an upload, its own envelope with ``"success": false``; for a
        file, a line of text), with a ``Retry-After`` header when ``retry_after`` is given
        (a number is sent as seconds, a string verbatim, e.g. an HTTP date).
        ``create=True`` (submit only) creates the tasks of a valid request, and calls them
        back later, although the reply is the error: the ambiguous "billed but no task
        IDs" case.
        """
        self._faults.add(status, times=times, retry_after=retry_after, create=create, route=route)

    def inject_file_fault(self, kind: FileFault, *, times: int = 1) -> None:
        """Break the next ``times`` files the file host serves: ``"cut"`` sends half the
        body under a ``Content-Length`` of the whole and ends it there; ``"content_type"``
        answers 200 with an HTML error page instead of the file. Status faults of
        ``inject(..., route="file")`` are taken first."""
        self._file_host.add_fault(kind, times)

    def hold_files(self) -> None:
        """Stop every file body after its first part until `release_files` (a file host
        stalled mid-body, for as long as a test needs)."""
        self._file_host.hold()

    def release_files(self) -> None:
        """Let the file bodies held by `hold_files` (and later ones) go on."""
        self._file_host.release()

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
        ``"test"``; ``callback_url`` to ``https://app.example.test/keevx/callback``;
        ``http_client`` to one of `http_client`'s; ``download_client`` to a second
        in-process client, so downloads reach the fake's file host).
        """
        options.setdefault("api_key", self.api_key or "test")
        options.setdefault("base_url", self.base_url)
        options.setdefault("callback_url", EXAMPLE_CALLBACK_URL)
        async with AsyncExitStack() as stack:
            if "http_client" not in options:
                options["http_client"] = await stack.enter_async_context(self.http_client())
            if "download_client" not in options:
                options["download_client"] = await stack.enter_async_context(
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=self))
                )
            client = await stack.enter_async_context(AsyncKeevx(**options))
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
        self._require_running()
        while self._pending:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def wait_for_submits(self, n: int) -> None:
        """Return once at least ``n`` submit requests have created tasks, i.e. once
        ``accepted_submits >= n``.

        A submit counts when its tasks are created (``inject(..., create=True)`` ones
        included): after validation, before its reply is sent and, with
        ``early_callbacks``, before its callbacks. Refused, invalid and faulted submits do
        not count (``submit_calls`` has them). Like ``accepted_submits``, the count starts
        over with `reset_metrics`. To be sure the caller has its reply, wait for what the
        caller does with it:

        ```python
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit_all, client, prompts)
            await fake.wait_for_submits(len(prompts))  # every request reached the service
        ```

        Returns at once (after a checkpoint) when the count is already reached; raises
        ``RuntimeError`` when it is not and the fake is not running. A waiter is not woken
        when the fake stops: bound the wait with your own timeout if that can happen.
        """
        await self._wait_for(self._accepted_milestones, n, self.accepted_submits)

    async def wait_for_gets(self, n: int) -> None:
        """Return once at least ``n`` task-state GET requests have arrived, i.e. once
        ``get_calls >= n``.

        A GET counts on arrival, before latency and whatever its answer (a fault, an
        unknown task and a refused key included). Otherwise like `wait_for_submits`.
        """
        await self._wait_for(self._get_milestones, n, self.get_calls)

    async def wait_for_callbacks(self, n: int) -> None:
        """Return once at least ``n`` callbacks have been delivered, i.e. once
        ``callbacks_sent >= n``.

        A callback counts once it was delivered: the receiver answered 2xx, or the
        target of `deliver_into` returned from ``feed_callback`` (so the SDK client has
        already resolved the task). A duplicate counts twice; failed deliveries do not
        count (they are in ``delivery_failures``), but a failed callback delivered on a
        later try (``redeliveries``) counts then. Lost callbacks never count: wait with
        `wait_idle` when some may be lost or fail. Do not call it from inside a callback
        receiver: its own delivery counts only once it returns. Otherwise like
        `wait_for_submits`.
        """
        await self._wait_for(self._callback_milestones, n, self.callbacks_sent)

    async def wait_for_file_requests(self, n: int) -> None:
        """Return once the file host has received at least ``n`` requests, i.e. once
        ``file_requests >= n``. A request counts on arrival, whatever its answer.
        Otherwise like `wait_for_submits`."""
        await self._wait_for(self._file_milestones, n, self.file_requests)

    async def _wait_for(self, milestones: Milestones, n: int, current: int) -> None:
        if current < n:
            self._require_running()
        await milestones.wait_for(n, current)

    def _require_running(self) -> None:
        if self._task_group is None:
            raise RuntimeError("FakeKeevx is not running: use `async with FakeKeevx(...)`")

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start the scheduler (and the own callback HTTP client, if none was given)."""
        if self._task_group is not None:
            raise RuntimeError("FakeKeevx is already running")
        if self.callback_client is None:
            # No proxies from the environment: callbacks go to loopback receivers.
            self._owned_client = httpx.AsyncClient(trust_env=False)
        self._deliverer = CallbackDeliverer(
            self,
            recipient=self._recipient,
            on_delivered=self._delivered,
            on_failed=self._delivery_failed,
        )
        task_group = self._task_group = await enter_task_group()
        task_group.start_soon(
            self._scheduler.run, functools.partial(self._start_deliveries, task_group)
        )
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
        self._file_host.release()
        try:
            await exit_task_group(task_group)
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
        video_task_id = path.removeprefix(VIDEO_SUBMIT_PATH + "/")
        if self._task_group is None:
            reply = error_reply(
                500, "FakeKeevx is not running: enter it with `async with FakeKeevx(...)`"
            )
        elif path.startswith(FILES_PATH + "/"):
            await self._file_host.handle(scope, send)
            return
        elif path == UPLOAD_PATH:
            reply = (
                await self._handle_upload(scope, raw_body)
                if method == "POST"
                else method_not_allowed(method, path, "POST")
            )
        elif path == STATE_PATH and method == "GET":
            reply = ok_reply(self.state())
        elif path in (SUBMIT_PATH, VIDEO_SUBMIT_PATH):
            reply = (
                await self._handle_submit(
                    scope, raw_body, "video" if path != SUBMIT_PATH else "image"
                )
                if method == "POST"
                else method_not_allowed(method, path, "POST")
            )
        elif task_id != path and task_id and "/" not in task_id:
            reply = (
                await self._handle_get(scope, task_id, "image")
                if method == "GET"
                else method_not_allowed(method, path, "GET")
            )
        elif video_task_id != path and video_task_id and "/" not in video_task_id:
            reply = (
                await self._handle_get(scope, video_task_id, "video")
                if method == "GET"
                else method_not_allowed(method, path, "GET")
            )
        else:
            reply = error_reply(404, f"not found: {method} {path}")
        await _send_reply(send, reply)

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

    def state(self) -> dict[str, Any]:
        """The counters of submits and every task's prompt, status and callback URL, as
        ``GET /_fake/state`` answers them (for tests reading a fake in another process)."""
        return {
            "submit_calls": self.submit_calls,
            "accepted_submits": self.accepted_submits,
            "tasks": {
                task_id: {
                    "prompt": task.prompt,
                    "status": task.status,
                    "callback_url": task.callback_url,
                }
                for task_id, task in self.tasks.items()
            },
        }

    def _auth_error(self, scope: Scope) -> Reply | None:
        return auth_error(_header(scope, b"authorization"), self.api_key)

    async def _handle_submit(self, scope: Scope, raw_body: bytes, kind: str) -> Reply:
        self.submit_calls += 1
        self.submit_paths.append(scope["path"])
        self.submit_times.append(anyio.current_time())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._work_started()
        try:
            await anyio.sleep(self.latency)
            denied = self._auth_error(scope)
            if denied is not None:
                return denied
            fault = self._faults.take("submit")
            if fault is not None and not fault.create:
                return fault.reply()
            reply = await self._accept_submission(raw_body, kind)
            return reply if fault is None else fault.reply()
        finally:
            self.in_flight -= 1
            self._work_done()

    async def _accept_submission(self, raw_body: bytes, kind: str) -> Reply:
        body = parse_json_object(raw_body)
        if body is None:
            return parameter_error("body must be a JSON object", status=400)
        if kind == "video":
            video = validate_video(body)
            if isinstance(video, tuple):
                return video_error(*video)
            request = video
        else:
            image = validate(body)
            if isinstance(image, str):
                return parameter_error(image)
            request = image
        planned = self._create_tasks(request, kind)
        if self.early_callbacks:
            for batch in self._finish(planned):
                await self._deliver_batch(batch)
        else:
            for item in planned:
                self._scheduler.schedule(item)
        task_ids = sorted((item.task for item in planned), key=lambda task: task.index)
        return ok_reply({"task_ids": [task.task_id for task in task_ids]})

    def _create_tasks(self, request: dict[str, Any], kind: str) -> list[PlannedTask]:
        """Create the request's tasks and decide their fates; the result is in delivery
        order (shuffled when ``shuffle`` is on)."""
        submission = next(self._submissions)
        now = anyio.current_time()
        prompt: str = request["prompt"]
        callback_url: str | None = request["callback_url"]
        scripted_failure = self.fail_if is not None and self.fail_if(prompt)
        scripted_loss = self.lose_if is not None and self.lose_if(prompt)
        planned: list[PlannedTask] = []
        for index in range(request["generate_count"]):
            # The three fate draws are made for every task, whatever the rates are, so
            # that one seed gives the same fates when only a rate changes.
            random_failure = self._rng.random() < self.fail_rate
            lost = self._rng.random() < self.lost_rate
            duplicated = self._rng.random() < self.duplicate_rate
            complete_after = self.video_complete_after if kind == "video" else self.complete_after
            delay = (
                self._rng.uniform(*complete_after)
                if isinstance(complete_after, tuple)
                else complete_after
            )
            video = kind == "video"
            task = FakeTask(
                task_id=(VIDEO_TASK_ID_PREFIX if video else TASK_ID_PREFIX) + uuid.uuid4().hex,
                kind=kind,
                status=PENDING if video else GENERATING,
                processing_at=now + delay / 2 if video else None,
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
            planned.append(PlannedTask(task, failure, submission, delay))
            self._work_started()
        self.accepted_submits += 1
        self._accepted_milestones.count_is(self.accepted_submits)
        if self.shuffle:
            shuffled = planned.copy()
            self._rng.shuffle(shuffled)
            # A shuffle that keeps the order would make the knob a no-op for this request
            # (PlannedTask compares by identity, so this compares the orders).
            planned = shuffled if shuffled != planned else planned[::-1]
        return planned

    async def _handle_upload(self, scope: Scope, raw_body: bytes) -> Reply:
        self.upload_calls += 1
        await anyio.sleep(self.latency)
        denied = self._auth_error(scope)
        if denied is not None:
            return upload_error(denied.status, denied.payload["msg"])
        fault = self._faults.take("upload")
        if fault is not None:
            return fault.reply()
        parts = parse_multipart(_header(scope, b"content-type"), raw_body)
        if parts is None:
            return upload_error(400, "the body must be multipart/form-data")
        files = [part for part in parts if part.name == "file"]
        if not files:
            return upload_error(200, "the part 'file' is required", code=CODE_PARAMETER_ERROR)
        (part, *_) = files
        problem = check_upload(part.filename, part.content)
        if problem is not None:
            return upload_error(200, problem, code=CODE_PARAMETER_ERROR)
        assert part.filename is not None
        file_id = uuid.uuid4().hex
        extension = part.filename.rpartition(".")[2].lower()
        file_name = f"{file_id[:12]}.{extension}"
        stored = StoredFile(file_name, part.content, IMAGE_CONTENT_TYPES[extension])
        self.uploads[file_id] = stored
        path = f"uploads/{file_id}/{file_name}"
        self._file_host.store(path, stored)
        return upload_reply(f"{self.base_url}{FILES_PATH}/{path}", file_id, file_name)

    async def _handle_get(self, scope: Scope, task_id: str, kind: str) -> Reply:
        self.get_calls += 1
        self.get_paths.append(scope["path"])
        self._get_milestones.count_is(self.get_calls)
        self.get_times.append(anyio.current_time())
        await anyio.sleep(self.latency)
        denied = self._auth_error(scope)
        if denied is not None:
            return denied
        fault = self._faults.take("get")
        if fault is not None:
            return fault.reply()
        task = self._registry.get(task_id)
        if task is None or task.kind != kind:  # each endpoint knows its own tasks
            return task_not_found()
        if task.kind == "video":
            if (
                task.status == PENDING
                and task.processing_at is not None
                and anyio.current_time() >= task.processing_at
            ):
                task.status = PROCESSING
            return ok_reply(video_snapshot(task))
        return ok_reply(task_snapshot(task))

    # -- finishing and delivery --------------------------------------------------------

    def _work_started(self) -> None:
        self._pending += 1

    def _work_done(self) -> None:
        self._pending -= 1
        if not self._pending and self._idle is not None:
            self._idle.set()
            self._idle = None

    def _start_deliveries(self, task_group: TaskGroup, due: list[PlannedTask]) -> None:
        """The scheduler's hand-over: finish the due tasks, start their deliveries."""
        for batch in self._finish(due):
            task_group.start_soon(self._deliver_batch, batch)

    def _finish(self, items: Iterable[PlannedTask]) -> list[list[PlannedTask]]:
        """Finish the given tasks; return those to call back, in batches per submission
        (in the given order), so each batch can be delivered in order by one task."""
        now = anyio.current_time()
        batches: dict[int, list[PlannedTask]] = {}
        for item in items:
            item.finish(now, self.image_base_url)
            if item.calls_back:
                batches.setdefault(item.submission, []).append(item)
            else:
                self._work_done()
        return list(batches.values())

    async def _deliver_batch(self, batch: list[PlannedTask]) -> None:
        try:
            await self._deliverer.deliver_in_order([item.task for item in batch])
        finally:
            for _ in batch:
                self._work_done()

    def _recipient(self) -> Recipient:
        if self._callback_target is not None:
            return self._callback_target
        return self.callback_client or self._owned_client

    def _delivered(self, task: FakeTask) -> None:
        self.callbacks_sent += 1
        self._callback_milestones.count_is(self.callbacks_sent)

    def _delivery_failed(self, task: FakeTask, reason: str) -> None:
        self.delivery_failures.append((task.task_id, reason))
