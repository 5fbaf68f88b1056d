"""``Batch``: submit many requests while their results stream in.

One task group per batch owns everything the batch runs: the producer that reads the
requests lazily, the submits in flight (at most ``concurrency``), and a single timer for
per-task timeouts. Tasks report their completion through a slot (``Task._sink``), not
through per-task closures or watcher tasks, so a batch of a hundred thousand tasks costs
a hundred thousand ``Task`` objects and nothing more.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import TYPE_CHECKING, Final, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from ._checks import check_int, check_seconds
from ._exceptions import (
    DownloadError,
    JournalError,
    KeevxError,
    TaskTimeoutError,
    UnknownOutcomeError,
)
from ._journal import SENDING, SUBMITTED, UNKNOWN, JournalRun, RequestEntry, replayed_task
from ._kinds import is_request
from ._models import ImageRequest, TaskRequest
from ._task import LookupDriver, Submission, Task
from ._taskgroups import enter_task_group, exit_task_group

logger = logging.getLogger("keevx_async")

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from typing_extensions import Self

    from ._kinds import AnyRequest, AnyResult

__all__ = ["DEFAULT_MAX_PENDING", "Batch", "as_request", "collect_aligned"]

DEFAULT_MAX_PENDING: Final = 10_000
# A resumed run replays finished requests without a checkpoint; it lets the event loop
# run once per this many.
_REPLAY_CHECKPOINT: Final = 256

_T = TypeVar("_T")

RequestSource = Iterable[TaskRequest | str] | AsyncIterable[TaskRequest | str]


async def _aiterate(source: Iterable[_T] | AsyncIterable[_T]) -> AsyncGenerator[_T, None]:
    if isinstance(source, AsyncIterable):
        async for item in source:
            yield item
    else:
        for item in source:
            yield item


def as_request(item: object, position: int) -> AnyRequest:
    """An item of a batch's input as a request: a request of any kind (an ImageRequest,
    a VideoRequest), or a prompt string (an ImageRequest with defaults)."""
    if is_request(item):
        return item  # type: ignore[return-value] # a request of a known kind
    if isinstance(item, str):
        return ImageRequest(item)
    raise TypeError(
        f"requests[{position}] must be an ImageRequest, a VideoRequest or a prompt string; "
        f"got {type(item).__name__}"
    )


def _unexpected(exc: Exception) -> KeevxError:
    error = KeevxError(f"the submit failed unexpectedly: {exc!r}")
    error.maybe_created = True
    error.__cause__ = exc
    return error


class Batch:
    """A running batch; get one from ``AsyncKeevx.batch``. Iterate it for finished tasks.

    ``async for task in batch`` yields every task once, as it finishes (success,
    failure or timeout), and every request that could not be submitted as a task with
    ``task_id=None``. The loop ends when every request was read, submitted and finished.

    The counters are live, for progress displays: ``requests_read``, ``submitting``,
    ``submitted`` and ``submit_failed`` count requests; ``in_flight``, ``pending`` and
    ``yielded`` count tasks, and with ``download_to`` so do ``saving``, ``saved`` and
    ``save_failed``; with a journal, ``replayed`` counts the finished tasks read back from
    it.

    With ``download_to``, a successful task is yielded once its image is saved
    (``task.result().path``), or with the
    [`DownloadError`][keevx_async.DownloadError] that kept it from being saved (its
    ``result`` keeps the image's result). Downloads run in the batch's task group beside
    the submits, so a slow file host delays only its own tasks.

    Memory is bounded by the tasks in flight: the input is read only as submit slots free
    up, and not at all while ``max_pending`` tasks are submitted but not yet yielded.

    Raises (from the ``async for``):
        TypeError, InvalidRequestError: an item of ``requests`` is not a valid request,
            or any error the input raised. Reading stops there; every request read
            before it is still submitted, finished and yielded, and then the error is
            raised.
    """

    def __init__(
        self,
        requests: RequestSource,
        *,
        submit: Callable[[AnyRequest], Awaitable[Submission]],
        abandon: Callable[[Task], None],
        lookups: LookupDriver | None = None,
        concurrency: int,
        timeout: float | None,
        max_pending: int = DEFAULT_MAX_PENDING,
        save: Callable[[AnyResult], Awaitable[AnyResult]] | None = None,
        savers: int = 1,
        journal: JournalRun | None = None,
        resume: Callable[[Sequence[Task]], Awaitable[None]] | None = None,
        journaled: Callable[[int], None] | None = None,
    ) -> None:
        timeout = check_seconds("timeout", timeout, none_ok=True)
        self._max_pending = check_int("max_pending", max_pending, minimum=1)
        self._requests = requests
        self._submit = submit
        self._abandon = abandon
        self._lookups = lookups
        self._concurrency = concurrency
        self._timeout = timeout
        self._save = save
        self._journal = journal
        self._resume_tasks = resume
        self._journaled = journaled
        self._journal_error: JournalError | None = None
        # Finished tasks whose record the journal is committing (yielded once it is).
        self._committing = 0
        self._saving = 0
        # Finished tasks whose image is to be saved, taken in turn by at most `savers`
        # tasks of the batch: no task per image, however many finish at once.
        self._to_save: deque[Task] = deque()
        self._savers = 0
        self._max_savers = check_int("savers", savers, minimum=1)
        self._completed: deque[Task] = deque()
        self._outstanding: set[Task] = set()
        self._deadlines: deque[tuple[float, Task]] = deque()
        self._submitting = 0
        self._input_done = False
        self._input_error: BaseException | None = None
        self._wakeup: anyio.Event | None = None
        self._timer_wakeup: anyio.Event | None = None
        self._room: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self.requests_read = 0
        """Requests read from the input so far."""
        self.submitted = 0
        """Requests the service accepted."""
        self.submit_failed = 0
        """Requests whose submit failed (each yielded as a task with ``task_id=None``)."""
        self.yielded = 0
        """Tasks yielded so far."""
        self.saved = 0
        """Images saved by ``download_to`` so far."""
        self.save_failed = 0
        """Images whose download failed (each task yielded with a ``DownloadError``)."""
        self.replayed = 0
        """Finished tasks a journaled run read back from its journal (no network call)."""

    @property
    def in_flight(self) -> int:
        """Tasks submitted and not finished yet."""
        return len(self._outstanding)

    @property
    def pending(self) -> int:
        """Tasks submitted and not yielded yet (finished or not, being saved included)."""
        return len(self._outstanding) + self._saving + self._committing + len(self._completed)

    @property
    def saving(self) -> int:
        """Finished tasks whose image ``download_to`` is saving right now."""
        return self._saving

    @property
    def submitting(self) -> int:
        """Requests whose submit is under way (at most the batch's concurrency)."""
        return self._submitting

    # --- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("a batch runs once: make a new one with client.batch(...)")
        self._task_group = task_group = await enter_task_group()
        run = self._journal
        if run is not None:
            await task_group.start(run.journal._writer)
            try:
                await run.start()
            except BaseException:
                self._task_group = None
                await exit_task_group(task_group)
                raise
            if self._journaled is not None:
                self._journaled(1)
        task_group.start_soon(self._produce)
        if self._lookups is not None and not self._lookups.hosted:
            # A client that is not entered: the batch makes its lookups while it runs.
            task_group.start_soon(self._lookups.drive)
        if self._timeout is not None:
            task_group.start_soon(self._expire_overdue, self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        task_group = self._task_group
        assert task_group is not None
        run = self._journal
        try:
            if run is not None:
                # What the run recorded behind (task IDs, results) is written first.
                await run.journal._drain()
            await exit_task_group(task_group)  # children never raise
        finally:
            self._release()
            if run is not None:
                if self._journaled is not None:
                    self._journaled(-1)
                await run.finish()
        return None

    def _release(self) -> None:
        for task in self._outstanding:
            task._sink = None
            self._abandon(task)
            if self._journal is not None:
                self._journal.forget(task)
        self._outstanding.clear()
        self._deadlines.clear()
        self._completed.clear()
        self._to_save.clear()

    # --- iteration --------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Task:
        if self._task_group is None:
            raise RuntimeError("iterate a batch inside `async with client.batch(...) as batch:`")
        while True:
            if self._journal_error is not None:
                # The run can no longer record what happens: nothing more is reported
                # done that a crash could lose.
                raise self._journal_error
            if self._completed:
                self.yielded += 1
                if self._room is not None:
                    self._room.set()
                return self._completed.popleft()
            if (
                self._input_done
                and not self._submitting
                and not self._outstanding
                and not self._saving
                and not self._committing
            ):
                if self._input_error is not None:
                    # Only now: every request read before the bad one has been reported.
                    raise self._input_error
                raise StopAsyncIteration
            # Consumers share one event: several tasks may iterate the same batch.
            if self._wakeup is None or self._wakeup.is_set():
                self._wakeup = anyio.Event()
            await self._wakeup.wait()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def task_done(self, task: Task) -> None:
        """Collect a finished task (called by the task itself)."""
        self._outstanding.discard(task)
        self._collect(task)

    def _collect(self, task: Task) -> None:
        """A finished task: to be yielded now, or once its image is saved; in a
        journaled run, once its result is committed."""
        run = self._journal
        if run is not None and not task.replayed and run.records(task):
            group = run.result(task)
            task._durable = group
            self._committing += 1
            group.then(self._committed, task)
            return
        self._collect_recorded(task)

    def _committed(self, task: Task, error: JournalError | None) -> None:
        self._committing -= 1
        task._durable = None
        if error is not None:
            self._journal_error = error
            self._wake()
        else:
            self._collect_recorded(task)

    def _collect_recorded(self, task: Task) -> None:
        if self._save is None or task._result is None or task._result.path is not None:
            self._completed.append(task)
            self._wake()
            return
        self._to_save.append(task)
        self._saving += 1
        if self._savers < self._max_savers:
            assert self._task_group is not None
            self._savers += 1
            self._task_group.start_soon(self._saver, self._save)

    async def _saver(self, save: Callable[[AnyResult], Awaitable[AnyResult]]) -> None:
        try:
            while self._to_save:
                task = self._to_save.popleft()
                assert task._result is not None
                await self._save_one(save, task, task._result)
        finally:
            self._savers -= 1

    # --- background work (all in the batch's task group) ------------------------------

    async def _produce(self) -> None:
        task_group = self._task_group
        assert task_group is not None
        # A semaphore, not a CapacityLimiter: the slot is released by the submitting task.
        slots = anyio.Semaphore(self._concurrency)
        position = 0
        holding = False  # a slot taken and not handed to a submit yet
        run = self._journal
        try:
            async with aclosing(_aiterate(self._requests)) as items:
                while True:
                    # Read no further while too many tasks wait to be yielded: a slow loop
                    # body then holds the input back instead of filling memory.
                    while self.pending >= self._max_pending:
                        self._room = anyio.Event()
                        await self._room.wait()
                    # Take a slot before reading: input is consumed only as fast as it is sent.
                    if not holding:
                        await slots.acquire()
                        holding = True
                    try:
                        item = await items.__anext__()
                    except StopAsyncIteration:
                        break
                    request = as_request(item, position)
                    self.requests_read += 1
                    if run is None:
                        self._submitting += 1
                        task_group.start_soon(self._submit_one, request, position, slots)
                    else:
                        identity, body = await run.identify(request)
                        if self._replay(request, position, run.entry(identity)):
                            # Finished before: no submit, the slot is kept for the next.
                            position += 1
                            if position % _REPLAY_CHECKPOINT == 0:
                                await anyio.lowlevel.checkpoint()
                            continue
                        self._submitting += 1
                        task_group.start_soon(
                            self._submit_one, request, position, slots, identity, body
                        )
                    holding = False
                    position += 1
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, never swallowed
            self._input_error = exc
        finally:
            if holding:
                slots.release()
            self._input_done = True
            self._wake()

    async def _submit_one(
        self,
        request: AnyRequest,
        position: int,
        slots: anyio.Semaphore,
        identity: str | None = None,
        body: str = "",
    ) -> None:
        run = self._journal
        try:
            if run is not None and identity is not None:
                entry = run.entry(identity)
                if entry is not None and entry.state == SUBMITTED:
                    await self._resume(request, position, identity, entry)
                    return
                if (
                    entry is not None
                    and entry.state in (SENDING, UNKNOWN)
                    and not run.resubmit_unknown
                ):
                    self.submit_failed += 1
                    error = UnknownOutcomeError(request=request, identity=identity)
                    self._fail(request, position, error)
                    return
                await run.sending(identity, request, body, position)
            await self._submit_recorded(request, position, run, identity)
        except JournalError as exc:
            self._journal_error = exc
        finally:
            self._submitting -= 1
            slots.release()
            self._wake()

    def _fail(self, request: AnyRequest, position: int, error: KeevxError) -> None:
        failed = Task._not_submitted(request, error)
        failed.position = position
        self._completed.append(failed)

    def _replay(self, request: AnyRequest, position: int, entry: RequestEntry | None) -> bool:
        """Yield a request's tasks from the journal if every one of them finished before;
        whether it did."""
        run = self._journal
        if entry is None or entry.state != SUBMITTED or run is None:
            return False
        stored = [run.stored_result(task_id) for task_id in entry.task_ids]
        if any(result is None for result in stored):
            return False
        for task_id, result in zip(entry.task_ids, stored, strict=True):
            assert result is not None  # checked above
            task = replayed_task(Task, task_id, request, result)
            task.position = position
            self.replayed += 1
            self._collect_recorded(task)
        return True

    async def _resume(
        self, request: AnyRequest, position: int, identity: str, entry: RequestEntry
    ) -> None:
        """A request submitted before: its finished tasks replayed from the journal, the
        others re-attached by ID (and looked up at once)."""
        run = self._journal
        assert run is not None
        unfinished: list[Task] = []
        for index, task_id in enumerate(entry.task_ids):
            stored = run.stored_result(task_id)
            if stored is not None:
                task = replayed_task(Task, task_id, request, stored)
                task.position = position
                self.replayed += 1
                self._collect_recorded(task)
            else:
                task = Task(
                    task_id,
                    request,
                    index,
                    submission_id=entry.submission_id,
                    lookups=self._lookups,
                )
                unfinished.append(task)
        if unfinished:
            run.attach(identity, unfinished)
            if self._resume_tasks is not None:
                await self._resume_tasks(unfinished)
            self._accept(unfinished, position)

    async def _submit_recorded(
        self,
        request: AnyRequest,
        position: int,
        run: JournalRun | None,
        identity: str | None,
    ) -> None:
        try:
            submission = await self._submit(request)
        except Exception as exc:  # reported as this request's error, below
            if not isinstance(exc, KeevxError):
                # A bug, or a transport of the caller's failing with an error of its own:
                # this request's error, reported like any other. The other requests go on
                # (their tasks may be paid for); whether this one reached the service is
                # unknown.
                logger.exception(
                    "submitting request %d failed unexpectedly; the batch goes on", position
                )
                exc = _unexpected(exc)
            self.submit_failed += 1
            if run is not None and identity is not None:
                run.failed(identity, exc.maybe_created)
            self._fail(request, position, exc)
        else:
            self.submitted += 1
            if run is not None and identity is not None:
                tasks = submission.tasks
                run.submitted(identity, tasks[0].submission_id if tasks else None, tasks)
            self._accept(submission.tasks, position)

    def _accept(self, tasks: Sequence[Task], position: int) -> None:
        """Wait for the tasks of a submission (or a resumed one) to finish."""
        if tasks:
            deadline = None if self._timeout is None else anyio.current_time() + self._timeout
            for task in tasks:
                task.position = position
                if task.done():  # an early callback was waiting for it
                    self._collect(task)
                    continue
                task._sink = self
                self._outstanding.add(task)
                if deadline is not None:
                    self._deadlines.append((deadline, task))
            self._compact_deadlines()
            if self._timer_wakeup is not None:
                self._timer_wakeup.set()

    async def _save_one(
        self,
        save: Callable[[AnyResult], Awaitable[AnyResult]],
        task: Task,
        result: AnyResult,
    ) -> None:
        try:
            saved = await save(result)
        except Exception as exc:  # the task's error, below
            if not isinstance(exc, DownloadError):
                # A bug: still this task's error, with its result kept.
                logger.exception("saving the file of task %s failed unexpectedly", task.task_id)
                error = DownloadError(
                    f"saving the file failed unexpectedly: {exc!r}",
                    url=result.url,
                    result=result,
                )
                error.__cause__ = exc
                exc = error
            self.save_failed += 1
            task._settle_file(None, exc)
        else:
            self.saved += 1
            task._settle_file(saved, None)
            if self._journal is not None:
                self._saving -= 1
                self._committing += 1
                self._journal.downloaded(saved).then(self._committed_file, task)
                return
        self._saving -= 1
        self._completed.append(task)
        self._wake()

    def _committed_file(self, task: Task, error: JournalError | None) -> None:
        self._committing -= 1
        if error is not None:
            self._journal_error = error
        else:
            self._completed.append(task)
        self._wake()

    def _compact_deadlines(self) -> None:
        # Finished tasks leave the queue only from its front; drop the rest of them now and
        # then, so the queue (and the results it holds) stays proportional to the tasks
        # in flight rather than to throughput times timeout.
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(self._outstanding) + 64:
            live = [entry for entry in deadlines if not entry[1].done()]
            deadlines.clear()
            deadlines.extend(live)

    async def _expire_overdue(self, timeout: float) -> None:
        # Deadlines are appended in time order (reply time + a constant), so the
        # earliest is always at the front: one sleeping loop serves every task.
        deadlines = self._deadlines
        while True:
            while deadlines and deadlines[0][1].done():
                deadlines.popleft()
            if not deadlines:
                self._timer_wakeup = anyio.Event()
                await self._timer_wakeup.wait()
                continue
            deadline, task = deadlines[0]
            delay = deadline - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
                continue
            deadlines.popleft()
            self._abandon(task)
            if self._journal is not None:
                self._journal.forget(task)
            task._finish(
                None, TaskTimeoutError(task_id=task.task_id, timeout=timeout, request=task.request)
            )


async def collect_aligned(batch: Batch) -> list[list[AnyResult | KeevxError]]:
    """Drain ``batch`` into a list aligned with its input (see ``generate_many``)."""
    by_position: dict[int, list[tuple[int, AnyResult | KeevxError]]] = {}
    async for task in batch:
        error = task.exception()
        outcome: AnyResult | KeevxError = task.result() if error is None else error
        assert task.position is not None  # set by the batch for every task it yields
        by_position.setdefault(task.position, []).append((task.index, outcome))
    return [
        [outcome for _, outcome in sorted(by_position[position], key=lambda pair: pair[0])]
        for position in range(len(by_position))
    ]
