"""``AsyncKeevx``: the client that composes the parts.

It owns the options and the lifetime (``async with``), and wires the parts together:
the HTTP engine (`_http`: headers, throttle, retries, errors) sends its calls, the
callback intake (`_callbacks`: tokens, registry, router) applies every result, the
reconciler (`_reconcile`) looks up overdue tasks. Here are submit/batch/generate,
retrieve/task and ``stats``; the parts do not know the client.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast, overload
from urllib.parse import quote, urlsplit

if sys.version_info < (3, 11):  # pragma: no cover (the builtin from 3.11 on)
    from exceptiongroup import BaseExceptionGroup

import anyio
import httpx

from ._batch import DEFAULT_MAX_PENDING, Batch, as_request, collect_aligned
from ._callbacks import CallbackIntake
from ._checks import check_bool, check_http_timeout, check_int, check_seconds
from ._exceptions import (
    APIError,
    AuthenticationError,
    InvalidRequestError,
    KeevxError,
)
from ._files import (
    MEDIA_KINDS,
    Downloader,
    Uploader,
    build_download_client,
)
from ._http import HTTPEngine, build_http_client, read_envelope
from ._journal import Journal, JournalRun, as_journal
from ._kinds import KINDS, Kind, VideoRequest, kind_of, kind_of_result, kind_of_task_id
from ._models import (
    CallbackOutcome,
    ImageRequest,
    TaskRequest,
    TaskSnapshot,
    UploadedFile,
    check_http_url,
    check_image_name,
    check_image_size,
    check_local_image,
    check_text,
    is_local,
    is_local_host,
)
from ._receiver import DEFAULT_MAX_BODY_SIZE, CallbackApp
from ._reconcile import Reconciler
from ._registry import (
    DEFAULT_EARLY_MAX_AGE,
    DEFAULT_MAX_EARLY,
    TaskRegistry,
)
from ._router import CallbackRouter, LocalRouter
from ._server import CallbackServer
from ._stats import ClientStats, Counters
from ._task import Submission, Task, wait_all
from ._taskgroups import enter_task_group, exit_task_group
from ._throttle import Throttle
from ._tokens import CallbackSigner, token_from_url
from ._wire import (
    WireFormatError,
    decode_snapshot,
    decode_task_ids,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Iterable, Mapping
    from types import TracebackType

    from anyio.abc import TaskGroup, TaskStatus
    from typing_extensions import Self

    from ._kinds import AnyRequest, AnyResult, VideoResult
    from ._models import ImageResult
    from ._types import CallbackTokenIn

__all__ = ["DEFAULT_BASE_URL", "AsyncKeevx"]

logger = logging.getLogger("keevx_async")

DEFAULT_BASE_URL: Final = "https://api.keevx.cn"
"""The mainland service, the default. The international one is ``https://api.keevx.com``."""


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


def _check_task_id(task_id: object) -> None:
    if not isinstance(task_id, str) or not task_id:
        raise InvalidRequestError(
            f"task_id must be a non-empty string; got {task_id!r}", field="task_id"
        )
    check_text(task_id, "task_id")


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
        timeout: seconds (or an ``httpx.Timeout``) per HTTP attempt: the whole attempt,
            reply body included (for an ``httpx.Timeout``, its longest phase; none when a
            phase is unlimited), besides httpx's bound on each phase.
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
            Lookups run while the client is entered (``async with``), and otherwise
            while somebody waits on one of its tasks.
        reconcile_per_second: the most lookups started per second (``None``: unpaced;
            never more than 4 at once either way).
        max_early_callbacks: early callbacks kept at most (oldest evicted first).
        early_callback_max_age: seconds an early callback is kept.
        max_callback_body: the largest callback body ``callback_app`` accepts (bytes).
        router: how callbacks reach the process whose task waits for them; default
            [`LocalRouter`][keevx_async.LocalRouter] (this process only). With several
            worker processes behind one callback URL, a
            [`RedisRouter`][keevx_async.RedisRouter] shared by all of them.
        max_uploads: local reference files read and uploaded at once (see `upload`).
        max_downloads: result files downloaded at once (see `download`).
        download_client: an ``httpx.AsyncClient`` for fetching result files (not closed
            by us); no API header is ever added to it. Default: one of the client's own,
            with no headers, following redirects, its pool as large as ``max_downloads``,
            its timeouts ``timeout``'s (each phase, not the whole download).
    """

    def __init__(  # noqa: PLR0915 - checks and wires each option of the API contract
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
        max_uploads: int = 4,
        max_downloads: int = 8,
        download_client: httpx.AsyncClient | None = None,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get("KEEVX_API_KEY")
        if not api_key:
            raise AuthenticationError(
                "no API key: pass api_key= or set the KEEVX_API_KEY environment variable"
            )
        if not isinstance(api_key, str):
            raise TypeError(f"api_key must be a string; got {type(api_key).__name__}")
        if not (api_key.isascii() and api_key.isprintable()) or api_key != api_key.strip():
            # It goes into the Authorization header, which only takes printable ASCII.
            raise ValueError(
                "api_key must be printable ASCII with no surrounding spaces (it goes into "
                "an HTTP header): check for a stray character or newline copied with it"
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
        # Every option is checked here, before anything can be sent (see _checks).
        self.max_concurrency = check_int("max_concurrency", max_concurrency, minimum=1)
        max_per_second = check_seconds("max_per_second", max_per_second, none_ok=True)
        max_retries = check_int("max_retries", max_retries, minimum=0)
        max_retry_wait = check_seconds("max_retry_wait", max_retry_wait, zero_ok=True)
        http_timeout = check_http_timeout(timeout)
        if http_client is not None and not isinstance(http_client, httpx.AsyncClient):
            raise TypeError(
                f"http_client must be an httpx.AsyncClient; got {type(http_client).__name__}"
            )
        verify_callbacks = check_bool("verify_callbacks", verify_callbacks)
        reconcile_after = check_seconds("reconcile_after", reconcile_after, none_ok=True)
        reconcile_per_second = check_seconds(
            "reconcile_per_second", reconcile_per_second, none_ok=True
        )
        max_early_callbacks = check_int("max_early_callbacks", max_early_callbacks, minimum=0)
        early_callback_max_age = check_seconds("early_callback_max_age", early_callback_max_age)
        max_callback_body = check_int("max_callback_body", max_callback_body, minimum=1)
        if router is not None and not isinstance(router, CallbackRouter):
            raise TypeError(
                f"router must be a CallbackRouter (LocalRouter, RedisRouter); "
                f"got {type(router).__name__}"
            )
        _check_file_options(max_uploads, max_downloads, download_client)
        self.router: CallbackRouter = router if router is not None else LocalRouter()
        """Where callbacks for tasks of other processes go (see ``router=``)."""
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.verify_callbacks = verify_callbacks
        self.callback_token_in: CallbackTokenIn = callback_token_in
        self.reconcile_after = reconcile_after
        self._counters = Counters()
        self._limiter = _submit_slots(self.max_concurrency)
        self._engine = HTTPEngine(
            api_key=api_key,
            base_url=self.base_url,
            http=http_client or build_http_client(self.max_concurrency, http_timeout),
            owns_http=http_client is None,
            timeout=http_timeout,
            throttle=Throttle(max_per_second),
            max_retries=max_retries,
            max_retry_wait=self.max_retry_wait,
            counters=self._counters,
        )
        # Each kind's submit URL (its tasks are looked up under it).
        self._submit_urls = {kind.name: self._engine.url(kind.submit_path) for kind in KINDS}
        self._uploader = Uploader(self._engine, max_uploads=max_uploads)
        self._downloader = Downloader(
            download_client or build_download_client(max_downloads, http_timeout),
            owns_http=download_client is None,
            max_downloads=max_downloads,
            max_retries=max_retries,
            max_retry_wait=self.max_retry_wait,
        )
        if callback_secret is None:
            callback_secret = _secret_from_env()
        # Without a secret of the user's, a journaled run keeps its own in the journal.
        self._secret_given = callback_secret is not None
        self._callbacks = CallbackIntake(
            signer=CallbackSigner(callback_secret),
            registry=TaskRegistry(
                max_early=max_early_callbacks,
                early_max_age=early_callback_max_age,
                counters=self._counters,
                verify=self._verify_by_lookup,
            ),
            router=self.router,
            counters=self._counters,
            verify=verify_callbacks,
            token_in=callback_token_in,
        )
        self._reconciler = (
            None
            if reconcile_after is None
            else Reconciler(
                lookup=self.retrieve,
                is_pending=self._callbacks.is_pending,
                pending_count=lambda: self._callbacks.registry.pending_count,
                after=reconcile_after,
                per_second=reconcile_per_second,
                counters=self._counters,
            )
        )
        self._task_group: TaskGroup | None = None
        self._entered_in: int | None = None
        self._background_ended: anyio.Event | None = None
        self._background_scope: anyio.CancelScope | None = None
        self._checked_callback_url: str | None = None
        self._warned: set[str] = set()  # what was warned about once already
        self._closed = False
        self.callback_app: CallbackApp = CallbackApp(
            authenticate=self._callbacks.authenticate,
            feed=self._callbacks.feed,
            max_body_size=max_callback_body,
        )
        """An ASGI app receiving the service's callbacks; mount it at ``callback_url``."""

    def __repr__(self) -> str:
        return f"<AsyncKeevx base_url={self.base_url!r} max_concurrency={self.max_concurrency}>"

    # --- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start the lookup sweeper (see ``reconcile_after``), the router's work and the
        early-callback check, and return the client."""
        self._check_open()
        if self._task_group is not None:
            raise RuntimeError("this AsyncKeevx is already entered: enter it once")
        self._task_group = task_group = await enter_task_group()
        self._entered_in = anyio.get_current_task().id
        self._background_ended = ended = anyio.Event()
        try:
            await task_group.start(self._background, ended)
        except BaseException:
            self._task_group = None
            await exit_task_group(task_group)
            raise
        return self

    async def _background(
        self, ended: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The work of an entered client: the router's, the lookup sweeper, the check of
        early callbacks."""
        try:
            async with anyio.create_task_group() as task_group:
                self._background_scope = task_group.cancel_scope
                if self.router.shares_callbacks:
                    await task_group.start(self.router.run, self._callbacks.router_host())
                if self._reconciler is not None:
                    await task_group.start(self._reconciler.host)
                task_group.start_soon(self._check_early_callbacks)
                task_status.started()
        except BaseExceptionGroup as group:
            # A part that failed to start fails the `async with` as itself.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            ended.set()

    async def _check_early_callbacks(self) -> None:
        registry = self._callbacks.registry
        while True:
            await anyio.sleep(registry.check_interval)
            registry.check_early()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The tasks end first, while the router still runs to release their claims.
        self._end_unfinished_tasks()
        task_group, self._task_group = self._task_group, None
        try:
            if task_group is None:
                pass
            elif anyio.get_current_task().id == self._entered_in:
                await exit_task_group(task_group)
            else:
                # Left in another task than the one that entered it (a notebook runs each
                # cell in a task of its own): stop the work and wait for it to end; the
                # task group itself can only be left by the task that entered it.
                await self._stop_background()
        finally:
            await self.aclose()

    async def _stop_background(self) -> None:
        """Stop the entered client's work and wait until it ended (from any task)."""
        if self._background_scope is not None:
            self._background_scope.cancel()
        if self._background_ended is not None:
            with anyio.CancelScope(shield=True):
                await self._background_ended.wait()

    async def aclose(self) -> None:
        """Close the client, from any task: every unfinished task ends with
        [`ClientClosedError`][keevx_async.ClientClosedError] (none waits forever), the
        lookup sweeper and the router's work stop, and the client's own HTTP connections
        close (an injected ``http_client`` is left open)."""
        if self._task_group is not None:
            await self._stop_background()
        if not self._closed:
            self._closed = True
            if self._reconciler is not None:
                self._reconciler.close()
            self._end_unfinished_tasks()
            try:
                await self._engine.aclose()
            finally:
                await self._downloader.aclose()

    def _verify_by_lookup(self, task: Task) -> None:
        """Look a task up at once: its callback could not be trusted (see the registry)."""
        assert task.task_id is not None  # only submitted tasks get callbacks
        reconciler = self._reconciler
        if reconciler is not None:
            reconciler.look_up_now(task.task_id)
        else:
            logger.warning(
                "task %s was re-attached by ID alone, so its callback is not trusted and "
                "its result must come from a lookup, but this client makes none "
                "(reconcile_after=None): call client.retrieve(%r)",
                task.task_id,
                task.task_id,
            )

    def _end_unfinished_tasks(self) -> None:
        unfinished = self._callbacks.close()
        if unfinished:
            logger.warning(
                "the client closed with %d task(s) unfinished: they end with "
                "ClientClosedError (re-attach with client.task(task_id, request=...) on an "
                "open client to get their results)",
                unfinished,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncKeevx is closed: make a new one")

    # --- submitting -------------------------------------------------------------------

    @overload
    async def submit(self, request: ImageRequest) -> Submission[ImageResult]: ...
    @overload
    async def submit(self, request: VideoRequest) -> Submission[VideoResult]: ...
    @overload
    async def submit(self, request: TaskRequest) -> Submission[AnyResult]: ...
    async def submit(self, request: TaskRequest) -> Submission[Any]:
        """Submit one request: one HTTP call, under the client's concurrency limit.

        An [`ImageRequest`][keevx_async.ImageRequest] goes to the image endpoint, a
        [`VideoRequest`][keevx_async.VideoRequest] to the image-to-video endpoint; their
        tasks are alike, resolved by the same callbacks and lookups, and give an
        [`ImageResult`][keevx_async.ImageResult] or a
        [`VideoResult`][keevx_async.VideoResult].

        Local files among its images are uploaded first, each distinct content once per
        client (see `upload`); the body sent has URLs only, and the submission, its tasks
        and their results keep ``request`` as given.

        Returns a [`Submission`][keevx_async.Submission] whose tasks resolve as their callbacks
        arrive.

        Raises:
            APIError: the service refused or failed (``maybe_created`` says whether
                tasks may exist anyway); also a refused upload (``maybe_created=False``:
                nothing was submitted).
            TransportError: the exchange failed (``maybe_created`` likewise).
            InvalidRequestError: a local reference file changed since the request was
                built and no longer passes the rules.
            TypeError: ``request`` is no request (of a kind this SDK knows).
        """
        try:
            kind = kind_of(request)
        except TypeError as exc:
            raise TypeError(f"submit() {exc}") from None
        return await self._submit(kind, cast("AnyRequest", request))

    async def _submit(self, kind: Kind, request: AnyRequest) -> Submission[Any]:
        self._check_open()
        callback_url = request.callback_url or self.callback_url
        submission_id: str | None = None
        if callback_url is None:
            self._warn_no_callback()
        else:
            if callback_url is not self._checked_callback_url:
                self._checked_callback_url = callback_url
                self._warn_unreachable(callback_url)
            submission_id, callback_url = self._callbacks.issue(callback_url)
        try:
            image_urls = None
            images = kind.images(request)
            if any(is_local(image) for _, image in images):
                image_urls = await self._uploader.image_urls(request, images)
            body = kind.encode(request, callback_url, image_urls)
            async with self._limiter:
                response = await self._engine.send(
                    "POST",
                    self._submit_urls[kind.name],
                    body,
                    retry_safe=False,
                    paced=True,
                    request=request,
                )
            task_ids = _read_task_ids(response, request)
        except KeevxError:
            self._counters.submit_errors += 1
            raise
        tasks = tuple(
            Task(task_id, request, index, submission_id=submission_id, lookups=self._reconciler)
            for index, task_id in enumerate(task_ids)
        )
        await self._callbacks.register(tasks)
        if self._reconciler is not None:
            self._reconciler.schedule(task_ids, has_callback=callback_url is not None)
        self._counters.submitted += 1
        self._counters.tasks_created += len(tasks)
        return Submission(request=request, task_ids=task_ids, tasks=tasks)

    @overload
    async def generate(
        self, request: ImageRequest, *, timeout: float | None = None
    ) -> list[ImageResult]: ...
    @overload
    async def generate(
        self, request: VideoRequest, *, timeout: float | None = None
    ) -> list[VideoResult]: ...
    @overload
    async def generate(
        self, request: TaskRequest, *, timeout: float | None = None
    ) -> list[AnyResult]: ...
    async def generate(self, request: TaskRequest, *, timeout: float | None = None) -> list[Any]:
        """Submit ``request`` and wait for every task of it.

        Args:
            timeout: the most seconds to wait for the tasks after the submit reply.

        Returns:
            one result per task, in task order: an
            [`ImageResult`][keevx_async.ImageResult] each for an image request, a
            [`VideoResult`][keevx_async.VideoResult] each for a video request.

        Raises:
            TaskFailedError: the first task error, as soon as it is known.
            TaskTimeoutError: a task was not finished within ``timeout``.
            APIError, TransportError: the submit failed.
        """
        timeout = check_seconds("timeout", timeout, none_ok=True)  # before paying for it
        submission = await self.submit(request)
        try:
            return await wait_all(submission.tasks, timeout)
        finally:
            for task in submission.tasks:
                if not task.done():
                    self._callbacks.abandon(task)

    def batch(
        self,
        requests: Iterable[TaskRequest | str] | AsyncIterable[TaskRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        download_to: str | os.PathLike[str] | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_unknown: bool = False,
    ) -> Batch:
        """A [`Batch`][keevx_async.Batch]: submit many requests while their results stream in.

        Use it as an async context manager; nothing starts before the block is entered.

        ```python
        async with client.batch(requests, timeout=600) as batch:
            async for task in batch:
                if task.exception() is None:
                    print(task.request.prompt, task.result().image_url)
        ```

        ``requests`` (an iterable or async iterable of requests,
        [`ImageRequest`][keevx_async.ImageRequest] and
        [`VideoRequest`][keevx_async.VideoRequest] mixed as you like, or of prompt strings,
        each an image request with defaults) is read lazily, as submit slots free up.
        ``async for task in batch`` yields every [`Task`][keevx_async.Task] as it
        finishes, in completion order; a request whose submit failed yields one task
        with ``task_id=None`` whose ``result()`` raises the submission error. Leaving the
        block cancels what is unfinished.

        Args:
            concurrency: submits in flight for this batch (never more than the client's
                ``max_concurrency``); default the client's.
            timeout: the most seconds to wait for each task after its submit reply; a
                task not done by then is yielded with
                [`TaskTimeoutError`][keevx_async.TaskTimeoutError].
            max_pending: the most tasks submitted and not yet yielded; reading the input
                pauses there, so a slow loop body cannot make memory grow with the input.
            download_to: a directory (created if missing) to save every successful
                task's image into, as ``{task_id}{ext}`` (see `download`). A task is then
                yielded once its file is saved, with ``task.result().path`` set; a
                download that fails yields the task with a
                [`DownloadError`][keevx_async.DownloadError] as its error, whose
                ``result`` keeps the image's result. Downloads run beside the submits,
                at most ``max_downloads`` at once, and count as pending.
            journal: the run's durable record: a path (a
                [`SQLiteJournal`][keevx_async.SQLiteJournal] file) or a
                [`Journal`][keevx_async.Journal]. Each submit is recorded before it is
                sent, each result before it is yielded (and before its callback is
                answered), each saved file likewise. Running the same input against it
                again resumes: finished tasks are replayed (``task.replayed``) with no
                network call, unfinished ones re-attached and looked up at once,
                requests never sent (or refused) submitted, and requests whose submit
                outcome is unknown yielded with
                [`UnknownOutcomeError`][keevx_async.UnknownOutcomeError]. See the
                [durable runs guide](../guides/durable-runs.md).
            resubmit_unknown: with ``journal``, send requests whose outcome is unknown
                (``sending``/``unknown``) again, at the risk of paying twice.

        Raises:
            NotADirectoryError: ``download_to`` is an existing file.
            TypeError: ``journal`` is neither a path nor a ``Journal``.
        """
        resubmit_unknown = check_bool("resubmit_unknown", resubmit_unknown)
        run = None
        if journal is not None:
            signer = self._callbacks.signer
            run = JournalRun(
                as_journal(journal),
                resubmit_unknown=resubmit_unknown,
                adopt_secret=(
                    None
                    if self._secret_given or not self.verify_callbacks
                    else (signer.signing_key, signer.adopt)
                ),
            )
        limit = (
            self.max_concurrency
            if concurrency is None
            else check_int("concurrency", concurrency, minimum=1)
        )
        save = None
        if download_to is not None:
            directory = _download_directory(download_to)
            downloader = self._downloader

            async def save(result: AnyResult) -> AnyResult:
                return await downloader.save_result(directory, result)

        return Batch(
            requests,
            submit=self.submit,
            abandon=self._callbacks.abandon,
            lookups=self._reconciler,
            concurrency=limit,
            timeout=timeout,
            max_pending=max_pending,
            save=save,
            savers=self._downloader.max_downloads,
            journal=run,
            resume=self._resume_tasks,
            journaled=self._callbacks.count_journaled,
        )

    async def _resume_tasks(self, tasks: Sequence[Task]) -> None:
        """Wait again for the unfinished tasks of a submission a journal recorded: their
        callbacks may have come while nothing listened, so each is looked up at once."""
        await self._callbacks.register(tasks)
        reconciler = self._reconciler
        if reconciler is None:
            logger.warning(
                "a resumed run waits again for %d unfinished task(s), but this client makes "
                "no lookups (reconcile_after=None): each finishes only if its callback comes "
                "again. Give the client a reconcile_after to look them up at once",
                len(tasks),
            )
            return
        for task in tasks:
            assert task.task_id is not None  # recorded with its ID
            reconciler.look_up_now(task.task_id)

    @overload
    async def generate_many(
        self,
        requests: Iterable[ImageRequest | str] | AsyncIterable[ImageRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        download_to: str | os.PathLike[str] | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_unknown: bool = False,
    ) -> list[list[ImageResult | KeevxError]]: ...
    @overload
    async def generate_many(
        self,
        requests: Iterable[TaskRequest | str] | AsyncIterable[TaskRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        download_to: str | os.PathLike[str] | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_unknown: bool = False,
    ) -> list[list[AnyResult | KeevxError]]: ...
    async def generate_many(
        self,
        requests: Iterable[TaskRequest | str] | AsyncIterable[TaskRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        download_to: str | os.PathLike[str] | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_unknown: bool = False,
    ) -> list[list[Any]]:
        """Submit every request and wait for all; a list in, a list out.

        Returns a list aligned with ``requests``: for each, the results in task order,
        with each failed task's error in its place; a request whose submit failed gives
        a one-item list holding the submission error. Never raises for a single task.
        With ``download_to``, every image is saved there as in `batch` (each result's
        ``path`` set; a failed download's [`DownloadError`][keevx_async.DownloadError]
        in its result's place). With ``journal`` (and ``resubmit_unknown``), the run is
        durable and resumes as in `batch`.

        Raises:
            TypeError, InvalidRequestError: an item is not a valid request. A list (any
                sequence) is checked whole first, so then nothing was sent.
            NotADirectoryError: ``download_to`` is an existing file.
        """
        if isinstance(requests, Sequence) and not isinstance(requests, str):
            # A list is checked whole before anything is sent (and paid for).
            requests = [as_request(item, position) for position, item in enumerate(requests)]
        async with self.batch(
            requests,
            concurrency=concurrency,
            timeout=timeout,
            download_to=download_to,
            journal=journal,
            resubmit_unknown=resubmit_unknown,
        ) as running:
            return await collect_aligned(running)

    # --- files ------------------------------------------------------------------------

    async def upload(
        self, file: str | os.PathLike[str] | bytes, *, filename: str | None = None
    ) -> UploadedFile:
        """Upload a local image to the service; its URL can go into ``reference_images``.

        You rarely need this: ``submit`` uploads the local files of a request by itself.
        Each distinct content is uploaded once per client (keyed by its SHA-256), at most
        ``max_uploads`` at once; transient failures are retried (an upload creates no
        task, so retrying is safe).

        ```python
        uploaded = await client.upload(Path("vase.png"))
        request = kx.ImageRequest("a vase like this one", reference_images=[uploaded.url])
        ```

        Args:
            file: a path (``str`` or path object) of a JPG/JPEG/PNG/BMP/WebP/GIF file of
                at most 20 MB, or the image's ``bytes``.
            filename: the name to upload under (required for ``bytes``: its extension
                says the type); for a path, default the file's own name. A content
                uploaded before is not uploaded again, under whatever name.

        Returns:
            the [`UploadedFile`][keevx_async.UploadedFile] (``url``, ``file_id``,
            ``file_name``).

        Raises:
            InvalidRequestError: the file breaks a rule (missing, not a regular file,
                another type, empty, over 20 MB), or ``bytes`` came without a
                ``filename``; nothing was sent.
            APIError, TransportError: the upload failed after retries.
        """
        self._check_open()
        if isinstance(file, (bytes, bytearray, memoryview)):
            if filename is None:
                raise InvalidRequestError(
                    "upload() of bytes needs filename= (e.g. filename='image.png'): its "
                    "extension tells the service the image's type",
                    field="filename",
                )
            name = _check_filename(filename)
            content = bytes(file)
            check_image_size(len(content), "file", name)
            return await self._uploader.upload_bytes(content, name)
        path: object = Path(file) if isinstance(file, str) else file
        checked = check_local_image(path, "file")
        name = Path(checked).name if filename is None else _check_filename(filename)
        return await self._uploader.upload_path(checked, "file", repr(name), filename=name)

    async def download(
        self,
        result_or_url: AnyResult | str,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
    ) -> Path:
        """Download a result's file (or any file URL) and save it; the path written.

        The service keeps result files for about 7 days: download what you keep.

        ```python
        image = (await client.generate(kx.ImageRequest("a red fox")))[0]
        path = await client.download(image, "out/")  # out/i2is-....png
        ```

        The body streams into a temporary file in the target's directory, is fsynced, and
        is renamed into place: a crash never leaves a partial file under the final name.
        The reply must be 200 with an ``image/*`` ``Content-Type`` (``image/*`` or
        ``video/*`` for a URL), and the bytes must match its ``Content-Length``.
        Transient failures (connection errors, timeouts, a body cut short, 5xx, 429
        honouring ``Retry-After``) are retried with backoff up to ``max_retries`` times;
        at most ``max_downloads`` downloads run at once. The request goes through
        ``download_client``, never with the API key or any header of the API's.

        Args:
            result_or_url: an [`ImageResult`][keevx_async.ImageResult] or a
                [`VideoResult`][keevx_async.VideoResult] (its file must come as
                ``image/*`` or ``video/*`` respectively; a video's default extension is
                ``.mp4``), or a file's absolute http(s) URL.
            dest: a directory (an existing one, a ``str`` ending with ``/``, or a path
                whose name has no extension; created if missing), where the file is named
                ``{task_id}{ext}`` (for a URL: its own file name), ``ext`` from the URL,
                else from the ``Content-Type``; or a file path (``out/fox.png``).
            overwrite: fetch and replace an existing file; by default an existing file
                at the target is returned without a request.

        Raises:
            DownloadError: the file could not be fetched or saved (``status_code`` says
                the last HTTP status; a 403/404 says the URL may have expired).
            TypeError: an argument of the wrong type.
            InvalidRequestError: the URL is not an absolute http(s) URL.
        """
        self._check_open()
        overwrite = check_bool("overwrite", overwrite)
        _check_dest("dest", dest)
        kind = kind_of_result(result_or_url)
        if kind is not None:
            result: AnyResult = result_or_url  # type: ignore[assignment] # a result
            return await self._downloader.download(
                result.url,
                dest,
                stem=result.task_id,
                kinds=kind.media_types,
                overwrite=overwrite,
                result=result,
            )
        if not isinstance(result_or_url, str):
            raise TypeError(
                "download() takes an ImageResult, a VideoResult or a URL string; "
                f"got {type(result_or_url).__name__}"
            )
        url = check_http_url(result_or_url, "url")
        return await self._downloader.download(
            url, dest, stem=None, kinds=MEDIA_KINDS, overwrite=overwrite
        )

    # --- looking up -------------------------------------------------------------------

    async def retrieve(self, task_id: str) -> TaskSnapshot:
        """Look up one task's state with the GET endpoint (safe to retry, no side effects).

        A finished snapshot of a task this client is waiting for resolves that task,
        exactly as its callback would. The task is looked up at the endpoint of its kind:
        the kind of the task this client knows by that ID, else the one its ID's prefix
        tells (``i2v-``: a video; ``i2is-`` or any other: an image).

        Raises:
            APIError: the service answered with an error (``code`` 110002: not found).
            TransportError: the exchange failed after retries.
        """
        _check_task_id(task_id)
        self._check_open()
        kind = self._kind_of_task(task_id)
        url = f"{self._submit_urls[kind.name]}/{quote(task_id, safe='')}"
        response = await self._engine.send(
            "GET", url, None, retry_safe=True, paced=False, task_id=task_id
        )
        envelope = read_envelope(response, task_id=task_id, maybe_created=False)
        try:
            snapshot = decode_snapshot(envelope.data, kind.url_field, kind.task_type)
        except WireFormatError as exc:
            raise APIError(
                f"unreadable task reply: {exc}",
                status_code=response.status_code,
                task_id=task_id,
                response=response,
            ) from None
        self._counters.lookups += 1
        self._callbacks.settle_lookup(task_id, snapshot)
        return snapshot

    def _kind_of_task(self, task_id: str) -> Kind:
        """The kind of the task this client knows by that ID, else by the ID's prefix."""
        task = self._callbacks.registry.get(task_id)
        return kind_of_task_id(task_id) if task is None else kind_of(task.request)

    async def task(self, task_id: str, *, request: AnyRequest | None = None) -> Task:
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
        _check_task_id(task_id)
        if request is not None:
            try:
                kind_of(request)
            except TypeError as exc:
                raise TypeError(f"request: {exc}") from None
        self._check_open()
        task = await self._callbacks.reattach(task_id, request)
        if not task.done() and self._reconciler is not None:
            # It may have finished while nobody listened: look it up now, not in
            # reconcile_after seconds.
            task._lookups = self._reconciler
            self._reconciler.look_up_now(task_id)
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
            JournalError: the callback finished a task of a journaled batch and its
                result could not be committed: answer 503 likewise. (With a journal,
                this returns once the result is committed.)
        """
        intake = self._callbacks
        submission_id = intake.authenticate(None if url is None else token_from_url(url))
        outcome = intake.feed(body, submission_id)
        if not isinstance(outcome, CallbackOutcome):
            outcome = await outcome
        return outcome

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
        registry = self._callbacks.registry
        reconciler = self._reconciler
        return self._counters.snapshot(
            pending=registry.pending_count,
            buffered=registry.early_count,
            overdue_scheduled=0 if reconciler is None else reconciler.scheduled,
        )

    # --- warnings ---------------------------------------------------------------------

    def _warn_unreachable(self, callback_url: str) -> None:
        """Warn once per URL when the service cannot reach ``callback_url`` at all: a
        loopback or private address, while the service is not on this network."""
        host = urlsplit(callback_url).hostname or ""
        if (
            is_local_host(host)
            and not is_local_host(urlsplit(self.base_url).hostname or "")
            and "unreachable" not in self._warned
        ):
            self._warned.add("unreachable")
            logger.warning(
                "callback_url %s points at %s, a local address the service cannot reach: "
                "no callback will come, and results only arrive by lookups (after "
                "reconcile_after). Give a public URL that routes to client.callback_app "
                "(in development, a tunnel such as ngrok or cloudflared)",
                callback_url,
                host,
            )

    def _warn_no_callback(self) -> None:
        if "no_callback" not in self._warned:
            self._warned.add("no_callback")
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


def _check_file_options(
    max_uploads: object, max_downloads: object, download_client: object
) -> None:
    check_int("max_uploads", max_uploads, minimum=1)
    check_int("max_downloads", max_downloads, minimum=1)
    if download_client is not None and not isinstance(download_client, httpx.AsyncClient):
        raise TypeError(
            f"download_client must be an httpx.AsyncClient; got {type(download_client).__name__}"
        )


def _check_filename(filename: object) -> str:
    if not isinstance(filename, str) or not filename:
        raise InvalidRequestError(
            f"filename must be a non-empty string; got {filename!r}", field="filename"
        )
    check_text(filename, "filename")
    check_image_name(filename, "filename")
    return filename


def _check_dest(name: str, dest: object) -> None:
    if not isinstance(dest, (str, os.PathLike)) or (isinstance(dest, str) and not dest):
        raise TypeError(
            f"{name} must be a directory or file path (str or path object); got {dest!r}"
        )


def _download_directory(download_to: object) -> Path:
    """``download_to``, checked before anything is sent, as a directory, created."""
    _check_dest("download_to", download_to)
    assert isinstance(download_to, (str, os.PathLike))
    directory = Path(download_to)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            f"download_to must be a directory; {os.fspath(directory)!r} is an existing file"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise type(exc)(
            exc.errno, f"download_to: cannot create the directory ({exc.strerror})", str(directory)
        ) from None
    return directory


def _read_task_ids(response: httpx.Response, request: AnyRequest) -> tuple[str, ...]:
    """The task IDs of a submit reply; an unreadable reply may hide created tasks."""
    envelope = read_envelope(response, request=request, maybe_created=True)
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
