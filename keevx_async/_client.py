"""``AsyncKeevx``: the client that composes the parts.

It owns the HTTP client, the concurrency limit, the throttle (pace and 429 pause), the
callback signer and the task registry; the parts do not know the client.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import anyio
import attrs
import httpx

from ._batch import DEFAULT_MAX_PENDING, Batch, as_request, collect_aligned
from ._exceptions import (
    APIError,
    AuthenticationError,
    CallbackAuthError,
    CallbackError,
    KeevxError,
    RateLimitError,
    RouterError,
    ServerError,
    TransportError,
    UnknownTaskError,
)
from ._models import (
    FINISHED_OK,
    CallbackOutcome,
    CallbackPayload,
    ImageRequest,
    ImageResult,
    TaskSnapshot,
    check_http_url,
)
from ._receiver import DEFAULT_MAX_BODY_SIZE, CallbackApp
from ._reconcile import LOOKUPS_IN_FLIGHT, Reconciler
from ._registry import (
    DEFAULT_EARLY_MAX_AGE,
    DEFAULT_MAX_EARLY,
    TaskRegistry,
)
from ._router import CallbackRouter, LocalRouter, decode_record
from ._server import CallbackServer
from ._task import Submission, Task, wait_all
from ._throttle import Throttle, backoff_delay, parse_retry_after
from ._tokens import CallbackSigner, attach_token, token_from_url
from ._transports import FanoutClient, FanoutTransport
from ._version import __version__
from ._wire import (
    Envelope,
    WireFormatError,
    decode_callback,
    decode_envelope,
    decode_snapshot,
    decode_task_ids,
    encode_request,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
    from types import TracebackType

    from anyio.abc import TaskGroup
    from typing_extensions import Self

    from ._types import CallbackTokenIn

__all__ = ["DEFAULT_BASE_URL", "AsyncKeevx", "ClientStats"]

logger = logging.getLogger("keevx_async")

DEFAULT_BASE_URL: Final = "https://api.keevx.cn"
"""The mainland service, the default. The international one is ``https://api.keevx.com``."""
_SUBMIT_PATH: Final = "/v1/image_generate"
# Exceptions raised before a request left this machine: safe to retry, nothing created.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Also never sent, but retrying cannot help: a URL or request this machine cannot send.
_UNSENDABLE: Final = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
# Headroom in the pool beyond the submit limit, for lookups running beside full fan-out.
_POOL_HEADROOM: Final = LOOKUPS_IN_FLIGHT


@attrs.frozen
class ClientStats:
    """A snapshot of what a client has done (``client.stats``), for operators and tests.

    Attributes:
        submitted: requests accepted by the service (successful submits).
        submit_errors: submits that raised.
        retries: HTTP attempts repeated under the retry policy (submits and lookups).
        rate_limited: replies that paused the whole client (429, or 503 with
            ``Retry-After``).
        tasks_created: task IDs received.
        resolved_by_callback: tasks finished by a callback.
        resolved_by_lookup: tasks finished by ``retrieve``.
        lookups: GET requests answered (``retrieve`` calls that returned, the
            sweeper's included).
        lookup_errors: lookups of overdue tasks that failed (retried later).
        overdue_scheduled: planned lookups of tasks whose callback may still come (a
            submission's tasks share one entry until their first lookup).
        callbacks_rejected: callbacks refused for a missing, invalid or foreign token.
        callbacks_malformed: callbacks refused for a malformed body.
        callbacks_buffered: early callbacks kept for a task not registered yet.
        callbacks_duplicate: callbacks for a task already finished (no change).
        callbacks_evicted: early callbacks dropped (buffer full or too old).
        callbacks_forwarded: callbacks for tasks this client does not wait for,
            recorded by the router for the process that does (or will).
        router_errors: callbacks refused (503) because the router could not record
            them.
        pending: tasks registered and not finished now.
        buffered: early callbacks held now.
    """

    submitted: int
    submit_errors: int
    retries: int
    rate_limited: int
    tasks_created: int
    resolved_by_callback: int
    resolved_by_lookup: int
    lookups: int
    lookup_errors: int
    overdue_scheduled: int
    callbacks_rejected: int
    callbacks_malformed: int
    callbacks_buffered: int
    callbacks_duplicate: int
    callbacks_evicted: int
    callbacks_forwarded: int
    router_errors: int
    pending: int
    buffered: int


@attrs.define
class _Counters:
    submitted: int = 0
    submit_errors: int = 0
    retries: int = 0
    rate_limited: int = 0
    tasks_created: int = 0
    resolved_by_lookup: int = 0
    lookups: int = 0
    callbacks_rejected: int = 0
    callbacks_malformed: int = 0
    callbacks_forwarded: int = 0
    router_errors: int = 0


class _RouterHost:
    """What the client lets its router do (see ``RouterHost``)."""

    __slots__ = ("deliver", "pending_tasks")

    def __init__(
        self, deliver: Callable[[bytes], None], pending_tasks: Callable[[], list[Task]]
    ) -> None:
        self.deliver = deliver
        self.pending_tasks = pending_tasks


def _secret_from_env() -> list[str] | None:
    raw = os.environ.get("KEEVX_CALLBACK_SECRET")
    if not raw:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()] or None


def _submit_slots(count: int) -> anyio.Semaphore | anyio.CapacityLimiter:
    """The client's concurrency limit.

    A semaphore that takes a free slot without a checkpoint (anyio >= 4.7) saves a trip
    through the event loop per submit; the HTTP request right after is a checkpoint anyway.
    """
    try:
        return anyio.Semaphore(count, fast_acquire=True)
    except TypeError:  # pragma: no cover - anyio < 4.7 (nox -s tests_lowest)
        return anyio.CapacityLimiter(count)


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return value


class AsyncKeevx:
    """The async client of the Keevx image generation API (asyncio and trio).

    Submits requests concurrently under ``max_concurrency``, maps every returned task ID
    to the request that created it, and resolves each task when its callback is fed in
    (`feed_callback` or `callback_app`). Use it as an async context manager
    so its HTTP connections are closed:

    ```python
    import keevx_async as kx

    async with kx.AsyncKeevx(callback_url="https://example.com/keevx/callback") as client:
        images = await client.generate(kx.ImageRequest("a lighthouse at dawn"))
    ```

    Args:
        api_key: the API key; default ``$KEEVX_API_KEY``. None at all raises
            [`AuthenticationError`][keevx_async.AuthenticationError] here.
        base_url: default ``$KEEVX_BASE_URL``, else ``https://api.keevx.cn``.
        callback_url: where the service calls back; default ``$KEEVX_CALLBACK_URL``.
            A per-request ``ImageRequest.callback_url`` wins.
        max_concurrency: submissions in flight at once, shared by every method.
        max_per_second: optional cap on submit attempts started per second, evenly
            spaced (no bursts).
        max_retries: retries of attempts the service provably did not act on.
        max_retry_wait: a ``Retry-After`` longer than this raises
            [`RateLimitError`][keevx_async.RateLimitError]
            instead of sleeping.
        timeout: seconds (or an ``httpx.Timeout``) per HTTP attempt.
        http_client: an ``httpx.AsyncClient`` to send through (not closed by us).
        callback_secret: the secret (or secrets, newest first) of callback tokens;
            default ``$KEEVX_CALLBACK_SECRET`` (comma-separated), else random per client.
            Share it across the processes of one app.
        verify_callbacks: refuse callbacks without a valid token. Turn off only where
            something else authenticates callbacks.
        callback_token_in: ``"query"`` or ``"path"``: where the token goes in the URL.
        reconcile_after: seconds from a task's submit reply without its callback before
            it is looked up with the GET endpoint (then again after a doubling interval
            while it is still running); ``None`` never looks up. A submission without a
            callback URL is looked up after ``min(reconcile_after, 2)`` seconds.
            Lookups run while the client is entered (``async with``).
        reconcile_per_second: the most lookups started per second (``None``: unpaced;
            never more than 4 at once either way).
        max_early_callbacks: early callbacks kept at most (oldest evicted first).
        early_callback_max_age: seconds an early callback is kept.
        max_callback_body: the largest callback body ``callback_app`` accepts (bytes).
        router: how callbacks reach the process whose task waits for them; default
            [`LocalRouter`][keevx_async.LocalRouter] (this process only). With several
            worker processes behind one callback URL, a
            [`RedisRouter`][keevx_async.RedisRouter] shared by all of them.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        callback_url: str | None = None,
        max_concurrency: int = 16,
        max_per_second: float | None = None,
        max_retries: int = 3,
        max_retry_wait: float = 60.0,
        timeout: float | httpx.Timeout = 30.0,
        http_client: httpx.AsyncClient | None = None,
        callback_secret: str | bytes | Sequence[str | bytes] | None = None,
        verify_callbacks: bool = True,
        callback_token_in: CallbackTokenIn = "query",
        reconcile_after: float | None = 300.0,
        reconcile_per_second: float | None = 10.0,
        max_early_callbacks: int = DEFAULT_MAX_EARLY,
        early_callback_max_age: float = DEFAULT_EARLY_MAX_AGE,
        max_callback_body: int = DEFAULT_MAX_BODY_SIZE,
        router: CallbackRouter | None = None,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get("KEEVX_API_KEY")
        if not api_key:
            raise AuthenticationError(
                "no API key: pass api_key= or set the KEEVX_API_KEY environment variable"
            )
        base_url = base_url or os.environ.get("KEEVX_BASE_URL") or DEFAULT_BASE_URL
        self.base_url: str = check_http_url(base_url, "base_url").rstrip("/")
        callback_url = callback_url or os.environ.get("KEEVX_CALLBACK_URL") or None
        self.callback_url: str | None = (
            None if callback_url is None else check_http_url(callback_url, "callback_url")
        )
        if callback_token_in not in ("query", "path"):
            raise ValueError(
                f"callback_token_in must be 'query' or 'path'; got {callback_token_in!r}"
            )
        self.max_concurrency = _positive_int("max_concurrency", max_concurrency)
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0; got {max_retries!r}")
        if not max_retry_wait >= 0:
            raise ValueError(f"max_retry_wait must be >= 0; got {max_retry_wait!r}")
        if reconcile_after is not None and not reconcile_after > 0:
            raise ValueError(f"reconcile_after must be > 0 or None; got {reconcile_after!r}")
        if reconcile_per_second is not None and not reconcile_per_second > 0:
            raise ValueError(
                f"reconcile_per_second must be > 0 or None; got {reconcile_per_second!r}"
            )
        if max_callback_body < 1:
            raise ValueError(f"max_callback_body must be >= 1; got {max_callback_body!r}")
        if router is not None and not isinstance(router, CallbackRouter):
            raise TypeError(
                f"router must be a CallbackRouter (LocalRouter, RedisRouter); "
                f"got {type(router).__name__}"
            )
        self.router: CallbackRouter = router if router is not None else LocalRouter()
        """Where callbacks for tasks of other processes go (see ``router=``)."""
        self._shares = self.router.shares_callbacks
        self.max_retries = max_retries
        self.max_retry_wait = float(max_retry_wait)
        self.verify_callbacks = verify_callbacks
        self.callback_token_in: CallbackTokenIn = callback_token_in
        self.reconcile_after = reconcile_after
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._throttle = Throttle(max_per_second)
        self._limiter = _submit_slots(self.max_concurrency)
        self._signer = CallbackSigner(
            callback_secret if callback_secret is not None else _secret_from_env()
        )
        self._registry = TaskRegistry(
            max_early=max_early_callbacks, early_max_age=early_callback_max_age
        )
        self._counters = _Counters()
        self._reconciler = (
            None
            if reconcile_after is None
            else Reconciler(
                lookup=self.retrieve,
                is_pending=self._is_pending,
                pending_count=lambda: self._registry.pending_count,
                after=reconcile_after,
                per_second=reconcile_per_second,
            )
        )
        self._task_group: TaskGroup | None = None
        self._warned_not_entered = False
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "User-Agent": (
                f"keevx-async/{__version__} httpx/{httpx.__version__} "
                f"python/{platform.python_version()}"
            ),
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self._submit_url = self.base_url + _SUBMIT_PATH
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else self._build_http_client()
        self._warned_no_callback = False
        self._closed = False
        self.callback_app: CallbackApp = CallbackApp(
            authenticate=self._authenticate,
            feed=self._feed_verified,
            max_body_size=max_callback_body,
        )
        """An ASGI app receiving the service's callbacks; mount it at ``callback_url``."""

    def _build_http_client(self) -> httpx.AsyncClient:
        # Sized so a full fan-out never waits for a connection; the transport is picked at
        # the first request (aiohttp on asyncio when installed, else sharded httpx pools).
        connections = self.max_concurrency + _POOL_HEADROOM
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return FanoutClient(
            timeout=self._timeout, limits=limits, transport=FanoutTransport(limits=limits)
        )

    def __repr__(self) -> str:
        return f"<AsyncKeevx base_url={self.base_url!r} max_concurrency={self.max_concurrency}>"

    # --- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start the lookup sweeper (see ``reconcile_after``) and the router's work,
        and return the client."""
        self._check_open()
        if self._task_group is not None:
            raise RuntimeError("this AsyncKeevx is already entered: enter it once")
        if self._reconciler is not None or self._shares:
            task_group = anyio.create_task_group()
            await task_group.__aenter__()
            self._task_group = task_group
            try:
                if self._shares:
                    host = _RouterHost(self._deliver_routed, self._registry.pending_tasks)
                    await task_group.start(self.router.run, host)
                if self._reconciler is not None:
                    await task_group.start(self._reconciler.run)
            except BaseException:
                self._task_group = None
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        try:
            if task_group is not None:
                task_group.cancel_scope.cancel()
                # The block's own exception is not passed in: it propagates as raised.
                await task_group.__aexit__(None, None, None)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop the lookup sweeper and close the client's own HTTP connections (an
        injected ``http_client`` is left open)."""
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
        if not self._closed:
            self._closed = True
            if self._owns_http:
                with anyio.CancelScope(shield=True):
                    await self._http.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncKeevx is closed: make a new one")

    # --- submitting -------------------------------------------------------------------

    async def submit(self, request: ImageRequest) -> Submission:
        """Submit one request: one HTTP call, under the client's concurrency limit.

        Returns a [`Submission`][keevx_async.Submission] whose tasks resolve as their callbacks
        arrive.

        Raises:
            APIError: the service refused or failed (``maybe_created`` says whether
                tasks may exist anyway).
            TransportError: the exchange failed (``maybe_created`` likewise).
            TypeError: ``request`` is not an [`ImageRequest`][keevx_async.ImageRequest].
        """
        if not isinstance(request, ImageRequest):
            raise TypeError(f"submit() takes an ImageRequest; got {type(request).__name__}")
        self._check_open()
        callback_url = request.callback_url or self.callback_url
        submission_id: str | None = None
        if callback_url is None:
            self._warn_no_callback()
        elif self.verify_callbacks:
            submission_id, token = self._signer.issue()
            callback_url = attach_token(callback_url, token, self.callback_token_in)
        body = encode_request(request, callback_url)
        try:
            async with self._limiter:
                response = await self._send("POST", self._submit_url, body, request=request)
            task_ids = self._read_task_ids(response, request)
        except KeevxError:
            self._counters.submit_errors += 1
            raise
        tasks = tuple(
            Task(task_id, request, index, submission_id=submission_id)
            for index, task_id in enumerate(task_ids)
        )
        self._registry.register(tasks)
        if self._shares:
            await self.router.claim(tasks)
        if self._reconciler is not None:
            if self._reconciler.running:
                self._reconciler.schedule(task_ids, has_callback=callback_url is not None)
            else:
                self._warn_not_entered()
        self._counters.submitted += 1
        self._counters.tasks_created += len(tasks)
        return Submission(request=request, task_ids=task_ids, tasks=tasks)

    async def generate(
        self, request: ImageRequest, *, timeout: float | None = None
    ) -> list[ImageResult]:
        """Submit ``request`` and wait for every task of it.

        Args:
            timeout: the most seconds to wait for the tasks after the submit reply.

        Returns:
            one [`ImageResult`][keevx_async.ImageResult] per task, in task order.

        Raises:
            TaskFailedError: the first task error, as soon as it is known.
            TaskTimeoutError: a task was not finished within ``timeout``.
            APIError, TransportError: the submit failed.
        """
        submission = await self.submit(request)
        try:
            return await wait_all(submission.tasks, timeout)
        finally:
            for task in submission.tasks:
                if not task.done():
                    self._abandon(task)

    def batch(
        self,
        requests: Iterable[ImageRequest | str] | AsyncIterable[ImageRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Batch:
        """A [`Batch`][keevx_async.Batch]: submit many requests while their results stream in.

        Use it as an async context manager; nothing starts before the block is entered.

        ```python
        async with client.batch(requests, timeout=600) as batch:
            async for task in batch:
                if task.exception() is None:
                    print(task.request.prompt, task.result().image_url)
        ```

        ``requests`` (an iterable or async iterable of [`ImageRequest`][keevx_async.ImageRequest],
        or of prompt
        strings) is read lazily, as submit slots free up. ``async for task in batch``
        yields every [`Task`][keevx_async.Task] as it finishes, in completion order; a request whose
        submit failed yields one task with ``task_id=None`` whose ``result()`` raises the
        submission error. Leaving the block cancels what is unfinished.

        Args:
            concurrency: submits in flight for this batch (never more than the client's
                ``max_concurrency``); default the client's.
            timeout: the most seconds to wait for each task after its submit reply; a
                task not done by then is yielded with
                [`TaskTimeoutError`][keevx_async.TaskTimeoutError].
            max_pending: the most tasks submitted and not yet yielded; reading the input
                pauses there, so a slow loop body cannot make memory grow with the input.
        """
        limit = (
            self.max_concurrency
            if concurrency is None
            else _positive_int("concurrency", concurrency)
        )
        return Batch(
            requests,
            submit=self.submit,
            abandon=self._abandon,
            concurrency=limit,
            timeout=timeout,
            max_pending=max_pending,
        )

    async def generate_many(
        self,
        requests: Iterable[ImageRequest | str] | AsyncIterable[ImageRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
    ) -> list[list[ImageResult | KeevxError]]:
        """Submit every request and wait for all; a list in, a list out.

        Returns a list aligned with ``requests``: for each, the results in task order,
        with each failed task's error in its place; a request whose submit failed gives
        a one-item list holding the submission error. Never raises for a single task.

        Raises:
            TypeError, InvalidRequestError: an item is not a valid request. A list (any
                sequence) is checked whole first, so then nothing was sent.
        """
        if isinstance(requests, Sequence) and not isinstance(requests, str):
            # A list is checked whole before anything is sent (and paid for).
            requests = [as_request(item, position) for position, item in enumerate(requests)]
        async with self.batch(requests, concurrency=concurrency, timeout=timeout) as running:
            return await collect_aligned(running)

    # --- looking up -------------------------------------------------------------------

    async def retrieve(self, task_id: str) -> TaskSnapshot:
        """Look up one task's state with the GET endpoint (safe to retry, no side effects).

        A finished snapshot of a task this client is waiting for resolves that task,
        exactly as its callback would.

        Raises:
            APIError: the service answered with an error (``code`` 110002: not found).
            TransportError: the exchange failed after retries.
        """
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id must be a non-empty string; got {task_id!r}")
        self._check_open()
        url = f"{self._submit_url}/{quote(task_id, safe='')}"
        response = await self._send("GET", url, None, task_id=task_id)
        envelope = self._read_envelope(response, None, task_id=task_id, maybe_created=False)
        try:
            snapshot = decode_snapshot(envelope.data)
        except WireFormatError as exc:
            raise APIError(
                f"unreadable task reply: {exc}",
                status_code=response.status_code,
                task_id=task_id,
                response=response,
            ) from None
        self._counters.lookups += 1
        finished = snapshot.done and (snapshot.status != FINISHED_OK or snapshot.image_url)
        # Only a task this client waits for is resolved; others are not buffered.
        task = self._registry.get(task_id) if finished and snapshot.task_id == task_id else None
        if task is not None:
            payload = CallbackPayload(
                task_id=snapshot.task_id,
                status=snapshot.status,
                image_url=snapshot.image_url,
                error_message=snapshot.error_message,
                raw=snapshot.raw,
            )
            if self._registry.apply(payload, None) is CallbackOutcome.RESOLVED:
                self._counters.resolved_by_lookup += 1
                if self._shares:
                    self.router.finished(payload, task.submission_id)
        return snapshot

    async def task(self, task_id: str, *, request: ImageRequest | None = None) -> Task:
        """The [`Task`][keevx_async.Task] with this ID: re-attach to a task by its ID.

        A task this client waits for is returned as it is. Otherwise the router is asked
        what it knows: with a [`RedisRouter`][keevx_async.RedisRouter], the request that
        created the task and, if it has finished, its result, so the task may come back
        done already. Otherwise the task waits here for its callback (routed to this
        process from now on) or, if none comes, for a lookup (see ``reconcile_after``).

        ```python
        task = await client.task(task_id)  # in any worker, after any restart
        image = await task.wait(timeout=60)
        ```

        Args:
            task_id: the task ID, as the submit returned it.
            request: the request to attach the task with when the router has no record
                of it (always, with the default [`LocalRouter`][keevx_async.LocalRouter]).

        Raises:
            UnknownTaskError: neither this client, nor the router, nor ``request`` tells
                the task's request.
            RouterError: the router's store could not be read.
        """
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id must be a non-empty string; got {task_id!r}")
        if request is not None and not isinstance(request, ImageRequest):
            raise TypeError(f"request must be an ImageRequest; got {type(request).__name__}")
        self._check_open()
        task = self._registry.get(task_id)
        if task is not None:
            return task
        record = await self.router.find(task_id)
        task = self._registry.get(task_id)  # attached by another caller meanwhile
        if task is not None:
            return task
        known = None if record is None else record.request
        if known is None and request is None:
            raise UnknownTaskError(task_id)
        task = Task(
            task_id,
            known or request,  # type: ignore[arg-type] # one of them is set
            0 if record is None else record.index,
            submission_id=None if record is None else record.submission_id,
        )
        self._registry.attach(task)
        if record is not None and record.result is not None and not task.done():
            self._apply_record(record.result)
        if not task.done():
            if self._shares:
                await self.router.claim((task,))
            if self._reconciler is not None and self._reconciler.running:
                self._reconciler.schedule((task_id,), has_callback=True)
        return task

    # --- callbacks --------------------------------------------------------------------

    async def feed_callback(
        self, body: bytes | str | Mapping[str, Any], *, url: str | None = None
    ) -> CallbackOutcome:
        """Apply one callback the service POSTed to your ``callback_url``.

        Args:
            body: the POST body, as bytes, text or an already parsed mapping.
            url: the full URL the callback was POSTed to (it carries the token).

        Returns:
            what the callback did; ``FORWARDED`` (or ``BUFFERED``) when the router
            recorded it for another process.

        Raises:
            CallbackAuthError: no valid token for the task (``url`` missing included).
            CallbackError: the body is malformed. In both cases nothing changed.
            RouterError: the callback is for a task of another process and the router
                could not record it: answer 503 so that the service delivers it again.
        """
        submission_id = self._authenticate(None if url is None else token_from_url(url))
        outcome = self._feed_verified(body, submission_id)
        if not isinstance(outcome, CallbackOutcome):
            outcome = await outcome
        return outcome

    def _authenticate(self, token: str | None) -> str | None:
        if not self.verify_callbacks:
            return None
        submission_id = self._signer.verify(token)
        if submission_id is None:
            self._counters.callbacks_rejected += 1
            why = "has no token" if not token else "carries an invalid token"
            logger.warning("rejected a callback that %s", why)
            raise CallbackAuthError(
                f"callback {why}: it was not sent to a callback URL this client issued"
            )
        return submission_id

    def _feed_verified(
        self, body: bytes | str | Mapping[str, Any], submission_id: str | None
    ) -> CallbackOutcome | Awaitable[CallbackOutcome]:
        """Apply a callback whose token was verified; an awaitable when it is routed."""
        try:
            payload = decode_callback(body)
        except WireFormatError as exc:
            self._counters.callbacks_malformed += 1
            logger.warning("rejected a malformed callback: %s", exc)
            raise CallbackError(str(exc), field=exc.field) from None
        if not self._shares:
            return self._registry.apply(payload, submission_id)
        task = self._registry.get(payload.task_id)
        if task is None and payload.done:
            return self._forward(payload, submission_id)
        outcome = self._registry.apply(payload, submission_id)
        if outcome is CallbackOutcome.RESOLVED and task is not None:
            self.router.finished(payload, task.submission_id)
        return outcome

    async def _forward(
        self, payload: CallbackPayload, submission_id: str | None
    ) -> CallbackOutcome:
        try:
            outcome = await self.router.forward(payload, submission_id)
        except RouterError:
            self._counters.router_errors += 1
            raise
        except CallbackAuthError as exc:
            self._counters.callbacks_rejected += 1
            logger.warning("rejected a callback: %s", exc)
            raise
        self._counters.callbacks_forwarded += 1
        return outcome

    def _deliver_routed(self, record: bytes) -> None:
        """Apply a callback the router brought from another process."""
        resolved = self._apply_record(record)
        if resolved is not None:
            self.router.release(resolved)

    def _apply_record(self, record: bytes) -> str | None:
        """Apply a routed callback; the ID of the task it resolved, if it did."""
        try:
            payload, submission_id = decode_record(record)
        except WireFormatError as exc:
            logger.warning("dropped a routed callback that cannot be read: %s", exc)
            return None
        try:
            outcome = self._registry.apply(payload, submission_id)
        except CallbackAuthError:
            return None  # logged and counted by the registry
        return payload.task_id if outcome is CallbackOutcome.RESOLVED else None

    def _abandon(self, task: Task) -> None:
        """Stop waiting for an unfinished task (its wait timed out or was left)."""
        self._registry.abandon(task)
        if self._shares and task.task_id is not None:
            self.router.release(task.task_id)

    def serve_callbacks(
        self,
        host: str = "127.0.0.1",
        port: int = 8787,
        *,
        public_url: str | None = None,
        shutdown_grace: float = 5.0,
    ) -> CallbackServer:
        """Receive callbacks on a real HTTP server of our own, for scripts with no web app.

        Needs the ``keevx-async[server]`` extra. Use it as an async context manager:
        the server is listening before the block runs, and while the block runs the
        client asks the service to call back at ``public_url`` (default: the bound
        address). Leaving the block finishes the callbacks in flight and frees the port.

        ```python
        async with kx.AsyncKeevx() as client, client.serve_callbacks(port=0) as server:
            print("callbacks go to", server.url)
            images = await client.generate(kx.ImageRequest("a lighthouse at dawn"))
        ```

        Args:
            host: the address to bind.
            port: the port to bind; ``0`` picks a free one (see ``server.url``).
            public_url: the URL the service must call, when it differs from the bound
                address (a tunnel, a reverse proxy).
            shutdown_grace: seconds a callback still arriving when the block exits gets
                to finish; after that it is refused with 503 (and not applied), so the
                service can deliver it again.
        """
        return _ClientCallbackServer(
            self, host=host, port=port, public_url=public_url, shutdown_grace=shutdown_grace
        )

    # --- observing --------------------------------------------------------------------

    @property
    def stats(self) -> ClientStats:
        """Counters and gauges of this client, as a frozen snapshot."""
        registry = self._registry
        counts = registry.counters
        return ClientStats(
            submitted=self._counters.submitted,
            submit_errors=self._counters.submit_errors,
            retries=self._counters.retries,
            rate_limited=self._counters.rate_limited,
            tasks_created=self._counters.tasks_created,
            resolved_by_callback=counts.resolved - self._counters.resolved_by_lookup,
            resolved_by_lookup=self._counters.resolved_by_lookup,
            lookups=self._counters.lookups,
            lookup_errors=0 if self._reconciler is None else self._reconciler.lookup_errors,
            overdue_scheduled=0 if self._reconciler is None else self._reconciler.scheduled,
            # Bad tokens are refused here; tokens of the wrong submission by the registry.
            callbacks_rejected=self._counters.callbacks_rejected + counts.rejected,
            callbacks_malformed=self._counters.callbacks_malformed,
            callbacks_buffered=counts.buffered,
            callbacks_duplicate=counts.duplicates,
            callbacks_evicted=counts.evicted,
            callbacks_forwarded=self._counters.callbacks_forwarded,
            router_errors=self._counters.router_errors,
            pending=registry.pending_count,
            buffered=registry.early_count,
        )

    # --- HTTP -------------------------------------------------------------------------

    def _warn_no_callback(self) -> None:
        if not self._warned_no_callback:
            self._warned_no_callback = True
            if self._reconciler is None:
                logger.warning(
                    "no callback_url is configured and reconcile_after=None: the service "
                    "will not call back, and results only arrive through retrieve()"
                )
            else:
                logger.warning(
                    "no callback_url is configured: the service will not call back, so "
                    "results come from status lookups (GET), the first %.3g s after each "
                    "submit, then at doubling intervals",
                    self._reconciler.after_without_callback,
                )

    def _warn_not_entered(self) -> None:
        if not self._warned_not_entered:
            self._warned_not_entered = True
            logger.warning(
                "this AsyncKeevx is not entered (`async with`), so tasks whose callback "
                "never comes are not looked up: they wait until their timeout"
            )

    def _is_pending(self, task_id: str) -> bool:
        return self._registry.get(task_id) is not None

    async def _send(
        self,
        method: str,
        url: str,
        content: bytes | None,
        *,
        request: ImageRequest | None = None,
        task_id: str | None = None,
    ) -> httpx.Response:
        """One logical call with the retry policy; returns the final response.

        A POST is retried only when the service provably did not act on it; a GET (no
        side effects) on any transient failure.
        """
        idempotent = method == "GET"
        what = f"{method} {url}"
        attempt = 0
        while True:
            paused_for = self._throttle.paused_for
            if paused_for > self.max_retry_wait:
                # The service asked the whole client to wait longer than we may sleep.
                raise RateLimitError(
                    f"not sent: the client is paused for another {paused_for:.3g} s by the "
                    f"service's Retry-After, more than max_retry_wait={self.max_retry_wait:g}",
                    request=request,
                    task_id=task_id,
                    retry_after=paused_for,
                )
            # max_per_second paces submits; every attempt honours the 429 pause.
            await self._throttle.before_attempt(paced=not idempotent)
            try:
                response = await self._http.request(
                    method, url, content=content, headers=self._headers, timeout=self._timeout
                )
            except anyio.get_cancelled_exc_class():
                if not idempotent:
                    # Not an error of ours to raise, but the caller cannot see it otherwise.
                    logger.warning(
                        "a submit was cancelled while its request was in flight: the service "
                        "may have created (and billed) tasks for it"
                    )
                raise
            except httpx.TransportError as exc:
                not_sent = isinstance(exc, _NOT_SENT)
                if (not_sent or idempotent) and attempt < self.max_retries:
                    delay = backoff_delay(attempt)
                    attempt += 1
                    self._counters.retries += 1
                    logger.warning(
                        "retrying %s in %.2f s (retry %d of %d): %s",
                        what, delay, attempt, self.max_retries, _describe(exc),
                    )  # fmt: skip
                    await anyio.sleep(delay)
                    continue
                maybe_created = not (idempotent or not_sent or isinstance(exc, _UNSENDABLE))
                raise TransportError(
                    f"{what} failed: {_describe(exc)}",
                    request=request,
                    task_id=task_id,
                    maybe_created=maybe_created,
                ) from exc
            status = response.status_code
            throttled = status == 429 or (status == 503 and "retry-after" in response.headers)
            if not (throttled or (idempotent and status >= 500)):
                return response
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            delay = retry_after if retry_after is not None else backoff_delay(attempt)
            if throttled:
                # A signal to the whole client, whether or not this call tries again.
                self._counters.rate_limited += 1
                self._throttle.pause(delay, f"HTTP {status} from {what}")
            if retry_after is not None and retry_after > self.max_retry_wait:
                raise self._status_error(
                    response, request, task_id, maybe_created=False, retry_after=retry_after,
                    note=f"the service asked to wait {retry_after:g} s, more than "
                    f"max_retry_wait={self.max_retry_wait:g}",
                    error_class=RateLimitError,
                )  # fmt: skip
            if attempt >= self.max_retries:
                raise self._status_error(
                    response, request, task_id, maybe_created=False, retry_after=retry_after
                )
            attempt += 1
            self._counters.retries += 1
            if not throttled:
                await anyio.sleep(delay)
            logger.warning(
                "retrying %s after HTTP %d (retry %d of %d)",
                what,
                status,
                attempt,
                self.max_retries,
            )

    def _read_task_ids(self, response: httpx.Response, request: ImageRequest) -> tuple[str, ...]:
        envelope = self._read_envelope(response, request, task_id=None, maybe_created=True)
        try:
            return decode_task_ids(envelope.data)
        except WireFormatError as exc:
            raise APIError(
                f"unreadable submit reply: {exc}",
                code=envelope.code,
                status_code=response.status_code,
                request=request,
                response=response,
                maybe_created=True,
            ) from None

    def _read_envelope(
        self,
        response: httpx.Response,
        request: ImageRequest | None,
        *,
        task_id: str | None,
        maybe_created: bool,
    ) -> Envelope:
        """The reply's envelope, or the error it stands for.

        ``maybe_created`` is what an unreadable 2xx reply means for a submit.
        """
        status = response.status_code
        if not 200 <= status < 300:
            ambiguous = maybe_created and (status >= 500 or status < 400)
            raise self._status_error(response, request, task_id, maybe_created=ambiguous)
        try:
            envelope = decode_envelope(response.content, "reply")
        except WireFormatError as exc:
            raise APIError(
                f"unreadable reply: {exc}",
                status_code=status,
                request=request,
                task_id=task_id,
                response=response,
                maybe_created=maybe_created,
            ) from None
        if envelope.code != 0:
            error_class = AuthenticationError if envelope.code in (401, 403) else APIError
            raise error_class(
                envelope.msg or "the service refused the request",
                code=envelope.code,
                status_code=status,
                request=request,
                task_id=task_id,
                response=response,
            )
        return envelope

    def _status_error(
        self,
        response: httpx.Response,
        request: ImageRequest | None,
        task_id: str | None,
        *,
        maybe_created: bool,
        retry_after: float | None = None,
        note: str | None = None,
        error_class: type[APIError] | None = None,
    ) -> APIError:
        status = response.status_code
        code, msg = _code_and_msg(response)
        if note:
            msg = f"{msg}; {note}"
        if error_class is None:
            if status == 429:
                error_class = RateLimitError
            elif status in (401, 403):
                error_class = AuthenticationError
            elif status >= 500:
                error_class = ServerError
            else:
                error_class = APIError
        return error_class(
            msg,
            code=code,
            status_code=status,
            request=request,
            task_id=task_id,
            response=response,
            maybe_created=maybe_created,
            retry_after=retry_after,
        )


class _ClientCallbackServer(CallbackServer):
    """A `CallbackServer` of ``client.callback_app`` that, while it serves, is where the
    client asks the service to call back."""

    def __init__(self, client: AsyncKeevx, **options: Any) -> None:
        super().__init__(client.callback_app, **options)
        self._client = client
        self._previous_callback_url: str | None = None
        self._pointed = False

    async def __aenter__(self) -> Self:
        """Check the client is open, start the server, point ``callback_url`` at it."""
        self._client._check_open()
        await super().__aenter__()
        self._previous_callback_url = self._client.callback_url
        self._client.callback_url = self.public_url
        self._pointed = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Put the previous ``callback_url`` back (unless the block changed it), then stop."""
        if self._pointed:
            self._pointed = False
            if self._client.callback_url == self.public_url:
                self._client.callback_url = self._previous_callback_url
        await super().__aexit__(exc_type, exc, tb)


def _code_and_msg(response: httpx.Response) -> tuple[int, str]:
    """The business code and message of an error reply, falling back to the HTTP status."""
    status = response.status_code
    fallback = f"HTTP {status} {response.reason_phrase}".rstrip()
    try:
        envelope = decode_envelope(response.content, "error reply")
    except WireFormatError:
        return status, fallback
    return envelope.code, envelope.msg or fallback


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
