"""The safety net for lost callbacks: look up tasks that had no callback in time.

Callbacks are the fast path and cost nothing; the service may still never send one (a
receiver down for a minute, a proxy that ate it), and a script with no public URL gets
none at all. The `Reconciler` is one background sweeper per client: a task still pending
``first_delay`` seconds after its submit reply is looked up once with the GET endpoint;
while it is still generating, again after a doubling interval (capped), until it finishes,
times out (its waiter abandons it) or is dropped (nobody holds it any more).

The sweeper runs in the client's task group while the client is entered (``async with``).
A client that is never entered (a Django view, a notebook cell after cell) still gets its
lookups: whoever waits on one of its tasks drives the sweeper in its own task for as long
as it waits (`Reconciler.drive`), and the next waiter takes over when that one stops, so
the schedule, the pace and the bound are the same either way.

The schedule holds task IDs only, never tasks, so it keeps nothing alive, and one entry
serves every task of a submission until the first lookup. Lookups start at most
``per_second`` per second and at most ``max_in_flight`` at once, whatever the backlog:
100,000 overdue tasks are a steady trickle of GETs, not a flood. A lookup never takes a
submit slot; it honours the client-wide 429 pause through the client's own retry policy.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import TYPE_CHECKING, Final

import anyio

from ._exceptions import KeevxError
from ._stats import Counters
from ._throttle import Throttle

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from anyio.abc import TaskGroup, TaskStatus

__all__ = ["Reconciler"]

logger = logging.getLogger("keevx_async")

#: First lookup of a task whose submission asked for no callback (results only arrive by
#: lookup), and the base of the doubling interval between lookups of a task still running.
RECHECK_BASE: Final = 2.0
#: The longest interval between two lookups of one task (and at most
#: ``RECHECK_CAP_FACTOR * after``, so a short ``after`` keeps the whole schedule short).
RECHECK_CAP: Final = 60.0
RECHECK_CAP_FACTOR: Final = 30.0
#: Lookups in flight at once; the client's connection pool keeps this much headroom
#: beyond its submit limit, so lookups never wait for a submit's connection or vice versa.
LOOKUPS_IN_FLIGHT: Final = 4
#: The schedule is rebuilt without finished tasks when it outgrows the pending tasks by
#: this factor (and holds at least ``_COMPACT_MIN`` entries): its memory follows the work.
_COMPACT_FACTOR: Final = 4
_COMPACT_MIN: Final = 1024


class Reconciler:
    """Schedules and runs the lookups of overdue tasks; one per client.

    Args:
        lookup: looks one task up and resolves it when finished (the client's
            ``retrieve``).
        is_pending: whether a task ID still has a waiting task.
        after: seconds from the submit reply to the first lookup of a task whose
            callback never came.
        pending_count: how many tasks are pending now (bounds the schedule's size).
        per_second: the most lookups started per second (``None``: no pace, only the
            ``max_in_flight`` bound).
        max_in_flight: the most lookups running at once.
        counters: where failed lookups are counted (``lookup_errors``).
    """

    def __init__(
        self,
        *,
        lookup: Callable[[str], Awaitable[object]],
        is_pending: Callable[[str], bool],
        pending_count: Callable[[], int],
        after: float,
        per_second: float | None,
        max_in_flight: int = LOOKUPS_IN_FLIGHT,
        counters: Counters | None = None,
    ) -> None:
        self._lookup = lookup
        self._is_pending = is_pending
        self._pending_count = pending_count
        self.after = after
        # A submission without a callback URL is looked up soon: lookups are its only path.
        self.after_without_callback = min(after, RECHECK_BASE)
        self.recheck_base = min(after, RECHECK_BASE)
        self.recheck_cap = min(RECHECK_CAP, after * RECHECK_CAP_FACTOR)
        self._pace = Throttle(per_second)
        self._slots = anyio.Semaphore(max_in_flight)
        # (due time, tie-breaker, task IDs, lookups made so far), earliest first.
        self._due: list[tuple[float, int, tuple[str, ...], int]] = []
        self._sequence = itertools.count()
        self._wakeup: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self.running = False
        """Whether a sweeper runs now (the client's, or a waiter's)."""
        self.hosted = False
        """Whether the client's own task group runs the sweeper (``async with``)."""
        self.closed = False
        self.counters = Counters() if counters is None else counters

    @property
    def scheduled(self) -> int:
        """Entries in the schedule (a submission's tasks share one until looked up)."""
        return len(self._due)

    def schedule(self, task_ids: Sequence[str], *, has_callback: bool) -> None:
        """Plan the first lookup of a new submission's tasks (made by whichever sweeper
        runs when it is due)."""
        if self.closed or not task_ids:
            return
        delay = self.after if has_callback else self.after_without_callback
        self._push(anyio.current_time() + delay, tuple(task_ids), 0)
        if len(self._due) >= max(_COMPACT_MIN, _COMPACT_FACTOR * self._pending_count()):
            self._compact()

    def look_up_now(self, task_id: str) -> None:
        """Plan a lookup of ``task_id`` before any other (under the same pace and bound)."""
        if not self.closed:
            self._push(anyio.current_time(), (task_id,), 0)

    def close(self) -> None:
        """Forget the schedule and stop the sweeper (the client is closing)."""
        self.closed = True
        self._due.clear()
        if self._wakeup is not None:
            self._wakeup.set()

    def _push(self, due: float, task_ids: tuple[str, ...], lookups: int) -> None:
        entry = (due, next(self._sequence), task_ids, lookups)
        heapq.heappush(self._due, entry)
        if self._due[0] is entry and self._wakeup is not None:
            self._wakeup.set()

    def _compact(self) -> None:
        kept = []
        for due, sequence, task_ids, lookups in self._due:
            waiting = tuple(task_id for task_id in task_ids if self._is_pending(task_id))
            if waiting:
                kept.append((due, sequence, waiting, lookups))
        heapq.heapify(kept)
        self._due = kept

    def _recheck_delay(self, lookups: int) -> float:
        return min(self.recheck_cap, self.recheck_base * 2.0 ** (lookups - 1))

    async def host(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The sweeper of an entered client: runs in its task group until cancelled
        there, and spares the waiters the driving."""
        self.hosted = True
        try:
            await self.drive(task_status=task_status)
        finally:
            self.hosted = False

    async def drive(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the sweeper in the calling task whenever no other task runs it, until
        cancelled or closed. Every waiter of a client that is not entered calls this."""
        task_status.started()
        while not self.closed:
            if self.running:
                if self._stopped is None:
                    self._stopped = anyio.Event()
                await self._stopped.wait()
            else:
                await self._run()

    async def _run(self) -> None:
        """Sleep until the next lookup is due, start it; until cancelled or closed."""
        self.running = True
        try:
            async with anyio.create_task_group() as lookups:
                while not self.closed:
                    entry = await self._next_due()
                    if entry is not None:
                        await self._start(entry, lookups)
        finally:
            self.running = False
            stopped, self._stopped = self._stopped, None
            if stopped is not None:
                stopped.set()

    async def _start(
        self, entry: tuple[float, int, tuple[str, ...], int], lookups: TaskGroup
    ) -> None:
        due, _, task_ids, made = entry
        for started, task_id in enumerate(task_ids):
            if not self._is_pending(task_id):
                continue
            try:
                await self._pace.before_attempt()
                await self._slots.acquire()
            except BaseException:
                # Stopped (a waiter's sweeper ends with its wait): the next sweeper
                # starts where this one stopped.
                self._push(due, task_ids[started:], made)
                raise
            if self._is_pending(task_id):  # a callback may have come meanwhile
                lookups.start_soon(self._look_up, task_id, made + 1)
            else:
                self._slots.release()

    async def _next_due(self) -> tuple[float, int, tuple[str, ...], int] | None:
        """The next entry once it is due; ``None`` when the reconciler was closed."""
        while not self.closed:
            now = anyio.current_time()
            if self._due and self._due[0][0] <= now:
                return heapq.heappop(self._due)
            self._wakeup = anyio.Event()
            with anyio.move_on_after(self._due[0][0] - now if self._due else math.inf):
                await self._wakeup.wait()
            self._wakeup = None
        return None

    async def _look_up(self, task_id: str, lookups: int) -> None:
        try:
            await self._lookup(task_id)
        except anyio.get_cancelled_exc_class():
            # Stopped midway (a waiter's sweeper ends with its wait): the next sweeper
            # looks it up first.
            self._slots.release()
            if self._is_pending(task_id):
                self._push(anyio.current_time(), (task_id,), lookups - 1)
            raise
        except KeevxError as exc:
            # Already retried where a retry could help; the task stays on the schedule.
            self.counters.lookup_errors += 1
            logger.warning("looking up overdue task %s failed: %s", task_id, exc)
        except Exception:
            # Never let one lookup take the sweeper (and the client) down.
            self.counters.lookup_errors += 1
            logger.exception("looking up overdue task %s failed unexpectedly", task_id)
        self._slots.release()
        # A finished snapshot has resolved the task; anything else is looked at again.
        if self._is_pending(task_id):
            due = anyio.current_time() + self._recheck_delay(lookups)
            self._push(due, (task_id,), lookups)
