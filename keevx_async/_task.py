"""Tasks: one generated image each, resolved when its callback is fed in.

A [`Task`][keevx_async.Task] costs a few slots until somebody waits on it; the anyio ``Event`` a
waiter
sleeps on is created by the first wait and dropped by the last, so a hundred thousand
pending tasks nobody is awaiting yet cost no events and no background tasks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol

import anyio
import attrs

from ._checks import check_seconds
from ._exceptions import KeevxError, TaskFailedError, TaskPendingError, TaskTimeoutError
from ._kinds import RESULT_BUILDERS, AnyRequest, kind_of
from ._models import FINISHED_OK, CallbackPayload

if TYPE_CHECKING:
    from collections.abc import Generator, Sequence
    from types import TracebackType

    from typing_extensions import Self, TypeVar

    # A task of unknown kind (a batch's, a re-attached one) may give a result of any
    # kind: its results are typed Any, so code written for images type-checks as before.
    ResultT = TypeVar("ResultT", covariant=True, default=Any)  # noqa: PLC0105
else:
    from typing import TypeVar

    ResultT = TypeVar("ResultT", covariant=True)  # noqa: PLC0105

__all__ = ["SUBMIT_FAILED", "CompletionSink", "LookupDriver", "Submission", "Task", "wait_all"]

SUBMIT_FAILED = "SUBMIT_FAILED"
"""``Task.status`` of a request that could not be submitted (its ``task_id`` is ``None``)."""


class CompletionSink(Protocol):
    """Something told when a task finishes (a batch collecting completions)."""

    def task_done(self, task: Task) -> None:
        """Called once, synchronously, right after ``task`` finished."""


class LookupDriver(Protocol):
    """The lookups of a client's overdue tasks (its `Reconciler`), as a waiter sees them."""

    @property
    def hosted(self) -> bool:
        """Whether the client's own task group runs the lookups (it is entered)."""

    async def drive(self) -> None:
        """Run the lookups in the calling task while no other task does; until cancelled."""


async def _wait_for(event: anyio.Event, lookups: LookupDriver | None) -> None:
    """Wait for ``event``; on a client that is not entered, drive its lookups meanwhile,
    so a task whose callback never comes is still looked up while somebody waits."""
    if lookups is None or lookups.hosted:
        await event.wait()
        return
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(lookups.drive)
        await event.wait()
        task_group.cancel_scope.cancel()


class Task(Generic[ResultT]):
    """One task of a submission: one image (or video) being generated.

    A task is finished by its callback (or by ``retrieve``), by a batch's timeout, or at
    creation when its request could not be submitted (then ``task_id`` is ``None``).

    ``await task`` (or ``await task.wait(timeout)``) returns the result
    ([`ImageResult`][keevx_async.ImageResult] for an image request,
    [`VideoResult`][keevx_async.VideoResult] for a video request) or raises the task's
    error; ``done()``, ``result()`` and ``exception()`` never block.
    Waiting is cancellation-safe: a cancelled waiter leaves the task as it was.

    Attributes:
        task_id: the service's task ID, ``None`` for a request that was never submitted.
        request: the request ([`ImageRequest`][keevx_async.ImageRequest] or
            [`VideoRequest`][keevx_async.VideoRequest]) that created the task.
        index: the task's position among its request's task IDs (0-based).
        status: the last status heard (``"GENERATING"`` until a callback says more).
        position: in a batch, the position of the task's request in the batch's input
            (0-based; ``None`` outside a batch). Tasks of one request share it.
        submission_id: the ID the client gave the submission (bound to its callback
            token); ``None`` where callbacks are not verified.
        replayed: ``True`` for a task a resumed journaled run read back from its journal,
            finished, with no network call (see ``batch(..., journal=...)``).
    """

    __slots__ = (
        "__weakref__",
        "_durable",
        "_error",
        "_error_tb",
        "_lookups",
        "_result",
        "_sink",
        "_waiters",
        "index",
        "position",
        "replayed",
        "request",
        "status",
        "submission_id",
        "task_id",
    )

    def __init__(
        self,
        task_id: str | None,
        request: AnyRequest,
        index: int = 0,
        *,
        status: str = "GENERATING",
        submission_id: str | None = None,
        lookups: LookupDriver | None = None,
    ) -> None:
        self.task_id = task_id
        self.request = request
        self.index = index
        self.status = status
        self.submission_id = submission_id
        self._result: ResultT | None = None
        self._error: KeevxError | None = None
        self._error_tb: TracebackType | None = None
        self._waiters: list[anyio.Event] | None = None
        self._sink: CompletionSink | None = None
        self._lookups = lookups
        self.position: int | None = None
        self.replayed = False
        # The journal commit its result waits for, while a journaled batch records it
        # (a callback is answered only once that commit is done).
        self._durable: Any = None

    @classmethod
    def _not_submitted(cls, request: AnyRequest, error: KeevxError) -> Self:
        """A finished task standing for a request whose submit failed."""
        task = cls(None, request, 0, status=SUBMIT_FAILED)
        task._error = error
        task._error_tb = error.__traceback__
        return task

    def __repr__(self) -> str:
        return f"<Task {self.task_id} #{self.index} {self.status}{' done' if self.done() else ''}>"

    # --- reading ----------------------------------------------------------------------

    @property
    def custom_id(self) -> str | None:
        """The request's ``custom_id`` (the caller's own identifier)."""
        return self.request.custom_id

    def done(self) -> bool:
        """Whether the task has finished, successfully or not."""
        return self._result is not None or self._error is not None

    def result(self) -> ResultT:
        """The task's result (its image or video). Never blocks.

        Raises:
            TaskFailedError: the task finished without an image.
            TaskTimeoutError: a batch stopped waiting for it.
            KeevxError: for a request that could not be submitted, the submission error.
            TaskPendingError: the task has not finished yet.
        """
        if self._result is not None:
            return self._result
        if self._error is not None:
            self._raise_error()
        raise TaskPendingError(self.task_id)

    def exception(self) -> KeevxError | None:
        """The task's error, or ``None`` if it succeeded. Never blocks.

        Raises:
            TaskPendingError: the task has not finished yet.
        """
        if not self.done():
            raise TaskPendingError(self.task_id)
        return self._error

    async def wait(self, timeout: float | None = None) -> ResultT:
        """Wait until the task finishes and return its image.

        Args:
            timeout: the most seconds to wait; ``None`` waits for as long as it takes.

        Raises:
            TaskTimeoutError: not finished within ``timeout``. The task is unchanged and
                can still be resolved and awaited later.
            TaskFailedError: the task finished without an image (and the other errors of
                `result`).
        """
        timeout = check_seconds("timeout", timeout, none_ok=True, zero_ok=True)
        if not self.done():
            event = anyio.Event()
            self._add_waiter(event)
            try:
                with anyio.move_on_after(timeout):
                    await _wait_for(event, self._lookups)
            finally:
                self._forget_waiter(event)
            if not self.done():
                raise TaskTimeoutError(
                    task_id=self.task_id, timeout=timeout or 0.0, request=self.request
                )
        return self.result()

    def __await__(self) -> Generator[Any, None, ResultT]:
        return self.wait().__await__()

    def _raise_error(self) -> NoReturn:
        error = self._error
        assert error is not None
        # Each raise would add frames to the one stored error; start from the original.
        raise error.with_traceback(self._error_tb)

    def _add_waiter(self, event: anyio.Event) -> None:
        if self._waiters is None:
            self._waiters = [event]
        else:
            self._waiters.append(event)

    def _forget_waiter(self, event: anyio.Event) -> None:
        waiters = self._waiters
        if waiters is not None:
            waiters.remove(event)
            if not waiters:
                self._waiters = None

    # --- finishing (called by the registry and by batches) -----------------------------

    def _finish(self, result: Any, error: KeevxError | None) -> None:
        self._result = result
        self._error = error
        self._error_tb = None if error is None else error.__traceback__
        if self._waiters is not None:
            for event in self._waiters:
                event.set()
        sink = self._sink
        if sink is not None:
            self._sink = None
            sink.task_done(self)

    def _settle_file(self, result: Any, error: KeevxError | None) -> None:
        """Replace a finished task's outcome by its saved file's: the result with its
        ``path``, or the error that kept it from being saved (a batch's ``download_to``).
        Its waiters were woken when it finished; nothing is told again."""
        self._result = result
        self._error = error
        self._error_tb = None if error is None else error.__traceback__

    def _apply(self, payload: CallbackPayload) -> None:
        """Finish the task from a finished callback or snapshot (first one wins)."""
        status = self.status = payload.status
        if status == FINISHED_OK:
            request = self.request
            # The kind's result builder, by the request's exact type (a subclass of a
            # request type finds its kind the longer way).
            build = RESULT_BUILDERS.get(type(request)) or kind_of(request).result
            self._finish(build(payload, request, self.index), None)
        else:
            error = TaskFailedError(
                task_id=payload.task_id,
                status=payload.status,
                error_message=payload.error_message,
                request=self.request,
            )
            self._finish(None, error)


@attrs.frozen
class Submission(Generic[ResultT]):
    """What one successful submit created: the request and one task per task ID.

    ``task_ids`` and ``tasks`` are in the service's order, so ``tasks[i].index == i``.
    """

    request: AnyRequest
    task_ids: tuple[str, ...]
    tasks: tuple[Task[ResultT], ...] = attrs.field(eq=False, repr=False)


async def wait_all(tasks: Sequence[Task[ResultT]], timeout: float | None) -> list[ResultT]:
    """Wait for every task; return their results in order, or raise the first error.

    The first error is raised as soon as it is known, not after the tasks before it.

    Raises:
        TaskTimeoutError: for the first unfinished task once ``timeout`` seconds passed.
    """
    deadline = math.inf if timeout is None else anyio.current_time() + timeout
    while True:
        unfinished = []
        for task in tasks:
            if task._error is not None:
                task._raise_error()
            if task._result is None:
                unfinished.append(task)
        if not unfinished:
            return [task.result() for task in tasks]
        # One event shared by all unfinished tasks wakes us at the next completion.
        event = anyio.Event()
        for task in unfinished:
            task._add_waiter(event)
        try:
            with anyio.move_on_after(deadline - anyio.current_time()):
                await _wait_for(event, unfinished[0]._lookups)
        finally:
            for task in unfinished:
                task._forget_waiter(event)
        if not event.is_set():
            first = unfinished[0]
            raise TaskTimeoutError(
                task_id=first.task_id, timeout=timeout or 0.0, request=first.request
            )
