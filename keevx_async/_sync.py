"""``Keevx``: the synchronous client, one ``AsyncKeevx`` on an event loop in a thread.

Scripts, notebooks and WSGI views cannot ``await``. ``Keevx`` starts an event loop
(asyncio or trio) in a thread of its own, behind an anyio blocking portal, builds and
enters one `AsyncKeevx` there, and runs each method call on that loop: the async client
stays the one implementation; this module only carries calls across threads and back.

- Calls may come from any number of threads at once (a threaded WSGI server); each blocks
  its own thread only. A call from the loop's own thread would wait for itself, so it
  raises ``RuntimeError`` instead.
- A call interrupted in its thread (Ctrl-C: ``KeyboardInterrupt``) cancels its work on
  the loop and lets the interrupt through at once.
- An async context manager (the client itself, a batch, the callback server) is entered
  and left by one task on the loop (`_Hosted`): anyio and trio tie a task group to the
  task that opened it.
- A client nobody closed is closed, with a warning, when it is collected or at
  interpreter exit, within a bound: its thread never outlives the interpreter or holds
  up its exit.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, NoReturn, TypeVar, cast, overload

import anyio
import anyio.to_thread
import attrs
from anyio.from_thread import BlockingPortal

from ._batch import DEFAULT_MAX_PENDING
from ._checks import check_seconds
from ._client import AsyncKeevx
from ._exceptions import ClientClosedError
from ._kinds import AnyRequest
from ._receiver import DEFAULT_MAX_BODY_SIZE
from ._registry import DEFAULT_EARLY_MAX_AGE, DEFAULT_MAX_EARLY

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
    from contextlib import AbstractAsyncContextManager, AbstractContextManager
    from pathlib import Path
    from types import TracebackType

    import httpx
    from typing_extensions import Self

    from ._batch import Batch
    from ._exceptions import KeevxError
    from ._journal import Journal
    from ._kinds import AnyResult, VideoRequest, VideoResult
    from ._models import (
        CallbackOutcome,
        ImageRequest,
        ImageResult,
        TaskRequest,
        TaskSnapshot,
        UploadedFile,
    )
    from ._router import CallbackRouter
    from ._server import CallbackServer
    from ._stats import ClientStats
    from ._task import Task
    from ._types import CallbackTokenIn

    ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]

__all__ = ["Keevx", "SyncBatch", "SyncSubmission", "SyncTask"]

logger = logging.getLogger("keevx_async")

_T = TypeVar("_T")

Backend = Literal["asyncio", "trio"]

EXIT_CLOSE_TIMEOUT: Final = 10.0
"""Seconds a forgotten client gets to close at interpreter exit before its (daemon)
thread is left to end with the interpreter."""

_NO_EXC: Final[ExcInfo] = (None, None, None)


class _End:
    """The end of a sync input, read in a worker thread."""


_END: Final = _End()


def _closed_error() -> RuntimeError:
    # The same error as a closed AsyncKeevx's.
    return RuntimeError("this Keevx is closed: make a new one")


# --- the event loop thread -------------------------------------------------------------


def _start_loop_thread(backend: str) -> tuple[BlockingPortal, threading.Thread]:
    """An event loop running a blocking portal in a new daemon thread.

    Like ``anyio.from_thread.start_blocking_portal``, but the thread is ours, so that
    closing can bound the wait for it (at interpreter exit).
    """
    started: concurrent.futures.Future[BlockingPortal] = concurrent.futures.Future()

    async def serve_portal() -> None:
        async with BlockingPortal() as portal:
            started.set_result(portal)
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(serve_portal, backend=backend)
        except BaseException as exc:  # pragma: no cover - anyio's own failure: never lost
            if started.done():
                logger.exception("the event loop of a Keevx client failed")
            else:
                started.set_exception(exc)

    thread = threading.Thread(target=run, name=f"keevx-{backend}-loop", daemon=True)
    thread.start()
    return started.result(), thread


class _Runner:
    """One entered `AsyncKeevx` on an event loop in a thread; every call goes through it.

    Holds no reference to the `Keevx` that owns it, so that a forgotten client can be
    collected and its finalizer (which calls `close_forgotten`) can run.
    """

    def __init__(
        self,
        backend: str,
        make_client: Callable[[], AsyncKeevx],
        injected: Sequence[httpx.AsyncClient | None],
    ) -> None:
        self.closed = False
        self._stopped = False
        self._close_lock = threading.Lock()
        # A forked child has a copy of this object but not the thread: see `start`.
        self._pid = os.getpid()
        # Blocks open on the loop (batches, callback servers): left before the client.
        self.open_blocks: set[_Hosted[Any]] = set()
        self.open_blocks_lock = threading.Lock()
        # The caller's HTTP clients (http_client, download_client): closed with the loop.
        self._injected = [http for http in injected if http is not None]
        self._portal, self._thread = _start_loop_thread(backend)
        self._loop_thread_id = self._thread.ident
        try:
            # Built on its loop: what it makes there (locks, its HTTP client) belongs there.
            self.client: AsyncKeevx = self._portal.call(make_client)
        except BaseException:
            self._stop_loop(None)
            raise
        self._entered = _Hosted(self, self.client)
        try:
            self._entered.__enter__()
        except BaseException:
            self.closed = True
            try:
                self.wait(self.start(self.client.aclose, when_closed=True))
            finally:
                self._stop_loop(None)
            raise

    # --- calls ------------------------------------------------------------------------

    def in_loop_thread(self) -> bool:
        """Whether the calling thread is the one running the client's event loop."""
        return threading.get_ident() == self._loop_thread_id

    def start(
        self, func: Callable[[], object], *, when_closed: bool = False
    ) -> concurrent.futures.Future[Any]:
        """Start ``func`` (a coroutine function or a plain one) on the loop.

        Raises:
            RuntimeError: called from the loop's own thread; or the client is closed
                (unless ``when_closed``: closing uses the loop until it stops).
        """
        if self.in_loop_thread():
            raise RuntimeError(
                "a Keevx method was called from the client's own event loop thread, "
                "where it would wait for itself forever: call it from another thread, "
                "or use an AsyncKeevx (with await) in async code"
            )
        if self.closed and not when_closed:
            raise _closed_error()
        if os.getpid() != self._pid:  # pragma: no cover - in a forked child (not measured)
            raise RuntimeError(
                "this Keevx was made in another process, before a fork (a WSGI server's "
                "main process, say); its event loop thread did not come along: make the "
                "client in each worker process (uWSGI: lazy-apps; gunicorn: no --preload)"
            )
        try:
            return self._portal.start_task_soon(func)
        except RuntimeError:  # pragma: no cover - a race with close() in another thread
            if self.closed:  # closed meanwhile: its loop no longer takes calls
                raise _closed_error() from None
            raise

    def wait(self, future: concurrent.futures.Future[_T]) -> _T:
        """The outcome of a call started with `start`, waited for in this thread.

        Raises:
            ClientClosedError: the client was closed (from another thread) first.
            KeyboardInterrupt: (or any interrupt of this thread) the call is cancelled.
        """
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            # Only the loop stopping cancels a call (an interrupted wait returns first).
            raise ClientClosedError(task_id=None) from None
        except BaseException:
            # Ctrl-C while this thread waits: the work on the loop stops too. (A call
            # that raised is done already, and cancelling it changes nothing.)
            future.cancel()
            raise

    def run(self, func: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``func()`` on the loop and return its result, from any other thread."""
        return cast("_T", self.wait(self.start(func)))

    def run_sync(self, func: Callable[[], _T]) -> _T:
        """Call ``func()`` on the loop and return its result, from any other thread."""
        return cast("_T", self.wait(self.start(func)))

    # --- closing ----------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Leave the client's ``async with``, stop the loop, join its thread.

        Idempotent and thread-safe; from the loop's own thread it only starts closing
        (on a thread of its own: waiting there would wait for itself).
        """
        if self.in_loop_thread():
            self.closed = True
            threading.Thread(target=self.close, name="keevx-close", daemon=True).start()
            return
        with self._close_lock:
            self.closed = True  # from here on, new calls are refused
            if self._stopped or os.getpid() != self._pid:  # (no thread to stop in a fork)
                return
            try:
                # A batch (or server) still open is left first, while the client's HTTP
                # pool is open: its requests in flight end and their connections close
                # with it, instead of being cut off by the pool closing under them.
                with self.open_blocks_lock:
                    blocks = list(self.open_blocks)
                for block in blocks:
                    with contextlib.suppress(Exception):
                        block.leave(_NO_EXC, timeout)
                # Every unfinished task ends with ClientClosedError: its waiters wake.
                self._entered.leave(_NO_EXC, timeout)
                for http in self._injected:
                    # Its connections belong to this loop: nobody else can close them.
                    self.start(http.aclose, when_closed=True).result(timeout)
            except concurrent.futures.TimeoutError:  # pragma: no cover - at exit, a hung close
                logger.warning("a Keevx client did not close within %s s", timeout)
            finally:
                # Once, whatever happened above: what still runs is cancelled there.
                self._stopped = True
                self._stop_loop(timeout)

    def _stop_loop(self, timeout: float | None) -> None:
        """Cancel what still runs on the loop (calls, batches, servers), stop it, join."""
        try:
            self._portal.start_task_soon(self._portal.stop, True).result(timeout)
        except RuntimeError:  # pragma: no cover - stopped already (a close interrupted before)
            pass
        except concurrent.futures.TimeoutError:  # pragma: no cover - at exit, a hung loop
            logger.warning("the event loop of a Keevx client did not stop within %s s", timeout)
        self._thread.join(timeout)

    def close_forgotten(self) -> None:
        """The finalizer of a `Keevx`: close it if nobody did, and say so."""
        if not self.closed and os.getpid() == self._pid:  # pragma: no branch
            logger.warning(
                "a keevx_async.Keevx was not closed: close it with client.close(), or use "
                "`with kx.Keevx() as client:`; closing it now"
            )
        self.close(EXIT_CLOSE_TIMEOUT)


class _Hosted(Generic[_T]):
    """An async context manager entered and left by one task on the client's loop.

    anyio and trio tie a task group to the task that entered it, so one task runs the
    whole ``async with``, waiting between ``__aenter__`` and ``__aexit__`` for the sync
    block to end. When the loop stops first (the client closed), that task is cancelled
    and leaves the block then.
    """

    def __init__(self, runner: _Runner, async_cm: AbstractAsyncContextManager[_T]) -> None:
        self._runner = runner
        self._async_cm = async_cm
        self._entered: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._host: concurrent.futures.Future[bool | None] | None = None
        self._leave: anyio.Event | None = None
        self._exc_info: ExcInfo = _NO_EXC

    async def _run(self) -> bool | None:
        leave = self._leave = anyio.Event()
        try:
            value = await self._async_cm.__aenter__()
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):  # pragma: no cover - a race
                self._entered.cancel()  # with close(): the enter ends as the client closed
            else:
                self._entered.set_exception(exc)
            raise
        self._entered.set_result(value)
        try:
            await leave.wait()
        finally:
            # Not shielded: the block's own task groups are entered outside any scope of
            # ours. The client is left by `leave`; a batch or a server left by the loop
            # stopping is cancelled, and ends its work all the same.
            result = await self._async_cm.__aexit__(*self._exc_info)
        return result

    def __enter__(self) -> _T:
        if self._host is not None:
            raise RuntimeError("this context manager runs once")
        runner = self._runner
        self._host = host = runner.start(self._run)
        if cast("object", self._async_cm) is not runner.client:  # a batch, a server
            with runner.open_blocks_lock:
                runner.open_blocks.add(self)
        try:
            concurrent.futures.wait((self._entered, host), return_when="FIRST_COMPLETED")
        except BaseException:  # pragma: no cover - interrupted: the block is left at once
            host.cancel()
            raise
        if self._entered.done():  # pragma: no branch - the host settles it before ending
            return runner.wait(self._entered)
        runner.wait(host)  # pragma: no cover - raises: the host ended without entering
        raise AssertionError("unreachable")  # pragma: no cover

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return self.leave((exc_type, exc, tb))

    def leave(self, exc_info: ExcInfo, timeout: float | None = None) -> bool | None:
        """Let the host task leave the block, and wait until it has."""
        host, leave = self._host, self._leave
        if host is None or leave is None:
            raise RuntimeError("this context manager was not entered")
        with self._runner.open_blocks_lock:
            self._runner.open_blocks.discard(self)
        self._exc_info = exc_info
        if not host.done():
            # A RuntimeError: the loop stopped, and the host was cancelled with it.
            with contextlib.suppress(RuntimeError):
                self._runner.start(leave.set, when_closed=True)
        try:
            return host.result(timeout)
        except concurrent.futures.CancelledError:
            return None  # left when the client closed


class _ReadInThread:
    """An async iterator over a sync iterable, each ``next()`` in a worker thread.

    A generator, a file or a database cursor may block: read on the event loop, it would
    hold up every callback and lookup meanwhile.
    """

    __slots__ = ("_items", "_iterator")

    def __init__(self, items: Iterable[Any]) -> None:
        self._items = items
        self._iterator: Iterator[Any] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = await anyio.to_thread.run_sync(iter, self._items)
        item = await anyio.to_thread.run_sync(next, self._iterator, _END)
        if item is _END:
            raise StopAsyncIteration
        return item


def _readable_on_loop(requests: Iterable[TaskRequest | str]) -> Any:
    """``requests`` as the async client reads them: a sequence as is, else in threads."""
    if isinstance(requests, Sequence):
        return requests
    return _ReadInThread(requests)


# --- what sync code gets back ----------------------------------------------------------


class SyncTask:
    """A [`Task`][keevx_async.Task] for synchronous code: the same task, waited on with
    a blocking `wait` instead of ``await``.

    [`Keevx`][keevx_async.Keevx] hands these out (from ``submit``, ``batch`` and ``task``);
    never make one yourself. ``done()``, ``result()`` and ``exception()`` never block and
    need no event loop: they work the same after the client closed.

    Attributes:
        task_id: the service's task ID, ``None`` for a request that was never submitted.
        request: the request ([`ImageRequest`][keevx_async.ImageRequest] or
            [`VideoRequest`][keevx_async.VideoRequest]) that created the task.
        index: the task's position among its request's task IDs (0-based).
        status: the last status heard (``"GENERATING"`` until a result says more).
        position: in a batch, the position of the task's request in the batch's input
            (0-based; ``None`` outside a batch).
    """

    __slots__ = ("_client", "_task")

    def __init__(self, task: Task, client: Keevx) -> None:
        self._task = task
        # The client lives while its tasks do: a task is never left without its loop.
        self._client = client

    def __repr__(self) -> str:
        return "<Sync" + repr(self._task)[1:]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SyncTask) and other._task is self._task

    def __hash__(self) -> int:
        return id(self._task)

    @property
    def task_id(self) -> str | None:
        """The service's task ID, ``None`` for a request that was never submitted."""
        return self._task.task_id

    @property
    def request(self) -> AnyRequest:
        """The request that created the task."""
        return self._task.request

    @property
    def custom_id(self) -> str | None:
        """The request's ``custom_id``."""
        return self._task.request.custom_id

    @property
    def index(self) -> int:
        """The task's position among its request's task IDs (0-based)."""
        return self._task.index

    @property
    def status(self) -> str:
        """The last status heard."""
        return self._task.status

    @property
    def position(self) -> int | None:
        """In a batch, the position of the task's request in the input; else ``None``."""
        return self._task.position

    @property
    def replayed(self) -> bool:
        """Whether a resumed journaled run read the task back from its journal."""
        return self._task.replayed

    def done(self) -> bool:
        """Whether the task has finished, successfully or not. Never blocks."""
        return self._task.done()

    def result(self) -> Any:
        """The task's result (an [`ImageResult`][keevx_async.ImageResult] or a
        [`VideoResult`][keevx_async.VideoResult]). Never blocks.

        Raises:
            TaskFailedError: the task finished without an image (and the other errors
                of [`Task.result`][keevx_async.Task.result]).
            TaskPendingError: the task has not finished yet.
        """
        return self._task.result()

    def exception(self) -> KeevxError | None:
        """The task's error, or ``None`` if it succeeded. Never blocks.

        Raises:
            TaskPendingError: the task has not finished yet.
        """
        return self._task.exception()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the task finishes and return its result.

        Args:
            timeout: the most seconds to wait; ``None`` waits for as long as it takes.

        Raises:
            TaskTimeoutError: not finished within ``timeout``; the task is unchanged and
                can be waited for again.
            TaskFailedError: the task finished without an image (and the other errors
                of `result`).
            ClientClosedError: the client closed before the task finished.
        """
        timeout = check_seconds("timeout", timeout, none_ok=True, zero_ok=True)
        task = self._task
        if task.done():
            return task.result()
        try:
            return self._client._runner.run(functools.partial(task.wait, timeout))
        except ClientClosedError:
            # Ended by the close (every unfinished task is): its own error says which.
            return task.result()


@attrs.frozen
class SyncSubmission:
    """What one successful [`Keevx.submit`][keevx_async.Keevx.submit] created: the
    request and one [`SyncTask`][keevx_async.SyncTask] per task ID.

    ``task_ids`` and ``tasks`` are in the service's order, so ``tasks[i].index == i``.
    """

    request: AnyRequest
    task_ids: tuple[str, ...]
    tasks: tuple[SyncTask, ...] = attrs.field(eq=False, repr=False)


class SyncBatch:
    """A running batch for synchronous code; get one from
    [`Keevx.batch`][keevx_async.Keevx.batch].

    Use it as a context manager and iterate it: ``for task in batch`` yields every
    [`SyncTask`][keevx_async.SyncTask] once, as it finishes, in completion order, exactly
    as [`Batch`][keevx_async.Batch] does for ``async for``. Leaving the block cancels
    what is unfinished. The live counters are those of `Batch`.
    """

    __slots__ = ("_batch", "_client", "_hosted")

    def __init__(self, batch: Batch, client: Keevx) -> None:
        self._batch = batch
        self._client = client
        self._hosted: _Hosted[Batch] | None = None

    def __repr__(self) -> str:
        batch = self._batch
        return (
            f"<SyncBatch read={batch.requests_read} submitted={batch.submitted} "
            f"in_flight={batch.in_flight} yielded={batch.yielded}>"
        )

    def __enter__(self) -> Self:
        """Start submitting (in the client's event loop); the results stream in."""
        if self._hosted is not None:
            raise RuntimeError("a batch runs once: make a new one with client.batch(...)")
        hosted = _Hosted(self._client._runner, self._batch)
        hosted.__enter__()
        self._hosted = hosted
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel what is unfinished and wait until it is."""
        assert self._hosted is not None
        self._hosted.leave((exc_type, exc, tb))

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> SyncTask:
        """The next finished task; blocks until there is one.

        Raises:
            TypeError, InvalidRequestError: an item of the input is not a valid request
                (raised once every request read before it was reported; see `Batch`).
        """
        if self._hosted is None:
            raise RuntimeError("iterate a batch inside `with client.batch(...) as batch:`")
        try:
            task = self._client._runner.run(self._batch.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None
        return SyncTask(task, self._client)

    @property
    def requests_read(self) -> int:
        """Requests read from the input so far."""
        return self._batch.requests_read

    @property
    def submitting(self) -> int:
        """Requests whose submit is under way."""
        return self._batch.submitting

    @property
    def submitted(self) -> int:
        """Requests the service accepted."""
        return self._batch.submitted

    @property
    def submit_failed(self) -> int:
        """Requests whose submit failed (each yielded as a task with ``task_id=None``)."""
        return self._batch.submit_failed

    @property
    def in_flight(self) -> int:
        """Tasks submitted and not finished yet."""
        return self._batch.in_flight

    @property
    def pending(self) -> int:
        """Tasks submitted and not yielded yet (finished or not)."""
        return self._batch.pending

    @property
    def yielded(self) -> int:
        """Tasks yielded so far."""
        return self._batch.yielded

    @property
    def replayed(self) -> int:
        """Finished tasks a journaled run read back from its journal (no network call)."""
        return self._batch.replayed


# --- the client ------------------------------------------------------------------------


class Keevx:
    """The synchronous client: [`AsyncKeevx`][keevx_async.AsyncKeevx]'s options and
    methods, for code that cannot ``await`` (scripts, notebooks, WSGI views).

    It runs one `AsyncKeevx` on an event loop in a thread of its own (an anyio blocking
    portal; ``backend`` picks asyncio or trio), entered for the client's whole life, so
    tasks whose callback does not come are looked up (see ``reconcile_after``): with no
    ``callback_url`` at all, results arrive by lookups alone. For callbacks without a web
    app, use `serve_callbacks`; in a WSGI app, hand each callback POST to
    `feed_callback`. Close it when done, with ``with`` or `close`:

    ```python
    import keevx_async as kx

    with kx.Keevx() as client:  # no await: a script, a notebook cell, a Flask view
        images = client.generate(kx.ImageRequest("a lighthouse at dawn"))
    ```

    Every method may be called from many threads at once (a threaded WSGI server); each
    call blocks its own thread only. Calling one from the client's own event loop thread
    raises ``RuntimeError`` (it would wait for itself). Ctrl-C in a blocked call cancels
    that call. A client nobody closed is closed, with a warning, when it is garbage
    collected or at interpreter exit.

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
        http_client: an ``httpx.AsyncClient`` to send through. It runs on the client's
            own event loop, in the client's thread: use it nowhere else. Unlike
            ``AsyncKeevx``, `close` closes it too: its connections belong to that loop,
            which ends with the client.
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
            Lookups run for the client's whole life.
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
        download_client: an ``httpx.AsyncClient`` for fetching result files; no API
            header is ever added to it. Like ``http_client`` it runs on the client's own
            event loop, and `close` closes it. Default: one of the client's own.
        backend: the event loop of the client's thread: ``"asyncio"`` or ``"trio"``.

    Raises:
        AuthenticationError, InvalidRequestError, TypeError, ValueError: an option is
            wrong (as for ``AsyncKeevx``); nothing is left running then.
        ImportError: ``backend="trio"`` without trio installed.
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
        max_uploads: int = 4,
        max_downloads: int = 8,
        download_client: httpx.AsyncClient | None = None,
        backend: Backend = "asyncio",
    ) -> None:
        if backend not in ("asyncio", "trio"):
            raise ValueError(f"backend must be 'asyncio' or 'trio'; got {backend!r}")
        if backend == "trio":
            try:
                import trio  # noqa: PLC0415, F401 - needed only here
            except ImportError as exc:
                raise ImportError("backend='trio' needs trio: pip install trio") from exc
        make_client = functools.partial(
            AsyncKeevx,
            api_key=api_key,
            base_url=base_url,
            callback_url=callback_url,
            max_concurrency=max_concurrency,
            max_per_second=max_per_second,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
            timeout=timeout,
            http_client=http_client,
            callback_secret=callback_secret,
            verify_callbacks=verify_callbacks,
            callback_token_in=callback_token_in,
            reconcile_after=reconcile_after,
            reconcile_per_second=reconcile_per_second,
            max_early_callbacks=max_early_callbacks,
            early_callback_max_age=early_callback_max_age,
            max_callback_body=max_callback_body,
            router=router,
            max_uploads=max_uploads,
            max_downloads=max_downloads,
            download_client=download_client,
        )
        self.backend: Backend = backend
        """The event loop of the client's thread."""
        self._runner = _Runner(backend, make_client, (http_client, download_client))
        self._async = self._runner.client
        self._finalizer = weakref.finalize(self, self._runner.close_forgotten)

    def __repr__(self) -> str:
        state = " closed" if self._runner.closed else ""
        return f"<Keevx base_url={self.base_url!r} backend={self.backend!r}{state}>"

    @property
    def base_url(self) -> str:
        """The service's base URL."""
        return self._async.base_url

    @property
    def callback_url(self) -> str | None:
        """Where the service is asked to call back (inside `serve_callbacks`: there)."""
        return self._async.callback_url

    @property
    def max_concurrency(self) -> int:
        """Submissions in flight at once, shared by every method."""
        return self._async.max_concurrency

    # --- lifetime ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        """Return the client (open already); leaving the block closes it."""
        if self._runner.closed:
            raise _closed_error()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the client: every unfinished task ends with
        [`ClientClosedError`][keevx_async.ClientClosedError] (so does a call still
        running in another thread), lookups stop, open batches and `serve_callbacks`
        servers end, HTTP connections close, and the event loop's thread ends.

        Idempotent, and may be called from any thread (from the client's own event loop
        thread, closing starts and the call returns at once).
        """
        self._runner.close()
        self._finalizer.detach()

    # --- submitting -------------------------------------------------------------------

    def submit(self, request: TaskRequest) -> SyncSubmission:
        """Submit one request: one HTTP call, under the client's concurrency limit.

        Returns a [`SyncSubmission`][keevx_async.SyncSubmission] whose tasks finish as
        their results arrive; wait for them with `SyncTask.wait`.

        Raises:
            APIError: the service refused or failed (``maybe_created`` says whether
                tasks may exist anyway).
            TransportError: the exchange failed (``maybe_created`` likewise).
            TypeError: ``request`` is no request (of a kind this SDK knows).
        """
        submission = self._runner.run(functools.partial(self._async.submit, request))
        return SyncSubmission(
            request=submission.request,
            task_ids=submission.task_ids,
            tasks=tuple(SyncTask(task, self) for task in submission.tasks),
        )

    @overload
    def generate(
        self, request: ImageRequest, *, timeout: float | None = None
    ) -> list[ImageResult]: ...
    @overload
    def generate(
        self, request: VideoRequest, *, timeout: float | None = None
    ) -> list[VideoResult]: ...
    @overload
    def generate(
        self, request: TaskRequest, *, timeout: float | None = None
    ) -> list[AnyResult]: ...
    def generate(self, request: TaskRequest, *, timeout: float | None = None) -> list[Any]:
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
            ClientClosedError: the client was closed (from another thread) meanwhile.
        """
        return self._runner.run(functools.partial(self._async.generate, request, timeout=timeout))

    def batch(
        self,
        requests: Iterable[TaskRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        download_to: str | os.PathLike[str] | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_unknown: bool = False,
    ) -> SyncBatch:
        """A [`SyncBatch`][keevx_async.SyncBatch]: submit many requests while their
        results stream in.

        Use it as a context manager; nothing starts before the block is entered.

        ```python
        with client.batch(prompts, timeout=600) as batch:
            for task in batch:  # in completion order
                if task.exception() is None:
                    print(task.request.prompt, task.result().image_url)
        ```

        ``requests`` (an iterable of requests, image and video ones mixed as you like,
        or of prompt strings) is read lazily, as submit slots free up: a list or tuple on the
        client's event loop, any other iterable (a generator, a file, a database
        cursor) one item at a time in a worker thread, so a slow read never holds up
        the loop. ``for task in batch`` yields every [`SyncTask`][keevx_async.SyncTask]
        as it finishes; a request whose submit failed yields one task with
        ``task_id=None`` whose ``result()`` raises the submission error. Leaving the
        block cancels what is unfinished.

        Args:
            concurrency: submits in flight for this batch (never more than the client's
                ``max_concurrency``); default the client's.
            timeout: the most seconds to wait for each task after its submit reply; a
                task not done by then is yielded with
                [`TaskTimeoutError`][keevx_async.TaskTimeoutError].
            max_pending: the most tasks submitted and not yet yielded; reading the input
                pauses there, so a slow loop body cannot make memory grow with the input.
            download_to: a directory: each successful task is yielded once its file is
                saved there (``task.result().path``); a failed download yields the task
                with its [`DownloadError`][keevx_async.DownloadError].
            journal: the run's durable record, a path or a
                [`Journal`][keevx_async.Journal]: run the same input again after a crash
                and it resumes (see [`AsyncKeevx.batch`][keevx_async.AsyncKeevx.batch]).
            resubmit_unknown: with ``journal``, send requests whose outcome is unknown
                again, at the risk of paying twice.
        """
        running = self._runner.run_sync(
            functools.partial(
                self._async.batch,
                _readable_on_loop(requests),
                concurrency=concurrency,
                timeout=timeout,
                max_pending=max_pending,
                download_to=download_to,
                journal=journal,
                resubmit_unknown=resubmit_unknown,
            )
        )
        return SyncBatch(running, self)

    @overload
    def generate_many(
        self,
        requests: Iterable[ImageRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        download_to: str | os.PathLike[str] | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_unknown: bool = False,
    ) -> list[list[ImageResult | KeevxError]]: ...
    @overload
    def generate_many(
        self,
        requests: Iterable[TaskRequest | str],
        *,
        concurrency: int | None = None,
        timeout: float | None = None,
        download_to: str | os.PathLike[str] | None = None,
        journal: str | os.PathLike[str] | Journal | None = None,
        resubmit_unknown: bool = False,
    ) -> list[list[AnyResult | KeevxError]]: ...
    def generate_many(
        self,
        requests: Iterable[TaskRequest | str],
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
        ``requests`` is read as by `batch`; with ``download_to``, each result is saved
        there first (``result.path``), as by `batch`; with ``journal``, the run is
        durable and resumes, as by `batch`.

        Raises:
            TypeError, InvalidRequestError: an item is not a valid request. A list (any
                sequence) is checked whole first, so then nothing was sent.
        """
        return self._runner.run(
            functools.partial(
                self._async.generate_many,
                _readable_on_loop(requests),
                concurrency=concurrency,
                timeout=timeout,
                download_to=download_to,
                journal=journal,
                resubmit_unknown=resubmit_unknown,
            )
        )

    # --- files ------------------------------------------------------------------------

    def upload(
        self, file: str | os.PathLike[str] | bytes, *, filename: str | None = None
    ) -> UploadedFile:
        """Upload a local image and return its URL, as
        [`AsyncKeevx.upload`][keevx_async.AsyncKeevx.upload] does (``submit`` uploads
        the local files of a request by itself).

        Raises:
            InvalidRequestError: not an image the service takes (type, size), or
                ``bytes`` without ``filename``.
            APIError, TransportError: the upload failed after retries.
        """
        return self._runner.run(functools.partial(self._async.upload, file, filename=filename))

    def download(
        self,
        result_or_url: AnyResult | str,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
    ) -> Path:
        """Save a result file under ``dest`` (a directory or a file path) and return its
        path, as [`AsyncKeevx.download`][keevx_async.AsyncKeevx.download] does: streamed
        to a temporary file, checked, renamed into place; never with the API key.

        ```python
        [image] = client.generate(kx.ImageRequest("a red fox"))
        path = client.download(image, "out/")  # out/<task_id>.png
        ```

        Raises:
            DownloadError: the file could not be fetched (``status_code``; a 403/404
                says the URL may have expired).
        """
        return self._runner.run(
            functools.partial(self._async.download, result_or_url, dest, overwrite=overwrite)
        )

    # --- looking up -------------------------------------------------------------------

    def retrieve(self, task_id: str) -> TaskSnapshot:
        """Look up one task's state with the GET endpoint (safe to retry, no side effects).

        A finished snapshot of a task this client is waiting for resolves that task,
        exactly as its callback would.

        Raises:
            APIError: the service answered with an error (``code`` 110002: not found).
            TransportError: the exchange failed after retries.
        """
        return self._runner.run(functools.partial(self._async.retrieve, task_id))

    def task(self, task_id: str, *, request: AnyRequest | None = None) -> SyncTask:
        """The [`SyncTask`][keevx_async.SyncTask] with this ID: re-attach to a task by
        its ID, as [`AsyncKeevx.task`][keevx_async.AsyncKeevx.task] does.

        ```python
        task = client.task(task_id, request=request)  # after a restart, say
        image = task.wait(timeout=60)
        ```

        Raises:
            UnknownTaskError: neither this client, nor the router, nor ``request`` tells
                the task's request.
            RouterError: the router's store could not be read.
        """
        task = self._runner.run(functools.partial(self._async.task, task_id, request=request))
        return SyncTask(task, self)

    # --- callbacks --------------------------------------------------------------------

    def feed_callback(
        self, body: bytes | str | Mapping[str, Any], *, url: str | None = None
    ) -> CallbackOutcome:
        """Apply one callback the service POSTed to your ``callback_url``: call it from
        the callback route of a WSGI app (see
        [`AsyncKeevx.feed_callback`][keevx_async.AsyncKeevx.feed_callback]).

        Args:
            body: the POST body, as bytes, text or an already parsed mapping.
            url: the full URL the callback was POSTed to (it carries the token).

        Raises:
            CallbackAuthError: no valid token for the task (``url`` missing included).
            CallbackError: the body is malformed. In both cases nothing changed.
            RouterError: the callback is for a task of another process and the router
                could not record it: answer 503 so that the service delivers it again.
        """
        return self._runner.run(functools.partial(self._async.feed_callback, body, url=url))

    @property
    def callback_app(self) -> NoReturn:
        """Not on the synchronous client: it raises ``AttributeError``.

        An ASGI app runs on its server's event loop, and this client's tasks live on
        the client's own loop. Use `serve_callbacks` (it serves the client's callback
        app on that loop), or hand each callback POST of your web app to
        `feed_callback`. An ASGI app should use ``AsyncKeevx`` on its own loop.
        """
        raise AttributeError(
            "Keevx has no callback_app (an ASGI app would run on another event loop than "
            "the client's): use client.serve_callbacks(), or pass each callback POST to "
            "client.feed_callback(body, url=...); in an ASGI app, use AsyncKeevx"
        )

    def serve_callbacks(
        self,
        host: str = "127.0.0.1",
        port: int = 8787,
        *,
        public_url: str | None = None,
        shutdown_grace: float = 5.0,
    ) -> AbstractContextManager[CallbackServer]:
        """Receive callbacks on a real HTTP server run by the client, for scripts and
        notebooks with no web app (see
        [`AsyncKeevx.serve_callbacks`][keevx_async.AsyncKeevx.serve_callbacks]).

        Needs the ``keevx-async[server]`` extra. Use it as a context manager: the server
        is listening when the block starts (on the client's event loop), and while the
        block runs the client asks the service to call back at ``public_url`` (default:
        the bound address). Leaving the block finishes the callbacks in flight and frees
        the port.

        ```python
        with kx.Keevx() as client, client.serve_callbacks(port=0) as server:
            print("callbacks go to", server.url)
            images = client.generate(kx.ImageRequest("a lighthouse at dawn"))
        ```
        """
        server = self._runner.run_sync(
            functools.partial(
                self._async.serve_callbacks,
                host,
                port,
                public_url=public_url,
                shutdown_grace=shutdown_grace,
            )
        )
        return _Hosted(self._runner, server)

    # --- observing --------------------------------------------------------------------

    @property
    def stats(self) -> ClientStats:
        """Counters and gauges of this client, as a frozen snapshot (also once closed)."""
        runner = self._runner
        # On the loop's own thread, or once it stopped, nothing else runs on the loop.
        if runner.closed or runner.in_loop_thread():
            return self._async.stats
        return runner.run_sync(lambda: self._async.stats)
