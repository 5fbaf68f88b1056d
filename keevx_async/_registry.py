"""The task registry: task ID -> pending task, plus the callbacks that came too early.

It is the one place a verified callback meets its task. It is synchronous (nothing here
awaits), so a callback is applied atomically with respect to the event loop: no task is
ever seen half-registered or half-resolved.

Memory stays flat in a long-running app: a task leaves ``pending`` the moment it finishes
(or is abandoned, or is garbage-collected because nobody holds it any more); early
callbacks are bounded in count and age; finished task IDs are remembered in a bounded
window only, to answer duplicates.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

import attrs

from ._exceptions import CallbackAuthError, KeevxError
from ._hints import Hint
from ._models import CallbackOutcome, CallbackPayload
from ._stats import Counters

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._task import Task
from ._types import MAX_GENERATE_COUNT, UNFINISHED_STATUSES

__all__ = ["TaskRegistry"]

logger = logging.getLogger("keevx_async")

DEFAULT_MAX_EARLY: Final = 10_000
DEFAULT_EARLY_MAX_AGE: Final = 600.0
DEFAULT_REMEMBER_DONE: Final = 10_000
#: A submission never has more tasks than this, so never more early callbacks either.
_MAX_EARLY_PER_SUBMISSION: Final = MAX_GENERATE_COUNT
#: An early callback still unclaimed after this many seconds (or half its maximum age)
#: is unusual: a submit reply comes far sooner. The likely causes are named in a hint.
UNCLAIMED_HINT_AFTER: Final = 30.0


@attrs.define
class _Early:
    payload: CallbackPayload
    arrived: float


def _forgetter(
    pending: dict[str, weakref.KeyedRef[str, Task]],
) -> Callable[[weakref.KeyedRef[str, Task]], None]:
    """The callback dropping a collected task's entry (if it still is that task's)."""

    def forget(ref: weakref.KeyedRef[str, Task]) -> None:
        # A replaced or removed entry drops its reference, which then never fires: the
        # check only guards the entry of a successor, should that ever change.
        if pending.get(ref.key) is ref:  # pragma: no branch
            del pending[ref.key]

    return forget


class TaskRegistry:
    """Maps task IDs to waiting tasks and applies callbacks to them.

    Args:
        max_early: the most early callbacks kept at once; the oldest is evicted (and
            logged) to make room.
        early_max_age: seconds an early callback is kept before it is dropped (logged).
        remember_done: how many finished task IDs, and how many registered submissions,
            are remembered to answer duplicates and refuse callbacks that do not belong.
        clock: a monotonic clock (seconds).
        counters: where the callbacks it applies are counted (the client's own, shared
            with its other parts; a fresh one by default).
        verify: called with a task re-attached by ID alone when a finished callback
            with a token arrives for it: no token can be checked against such a task,
            so the callback is not applied and the task's result must come from a
            lookup, which ``verify`` starts.
    """

    def __init__(
        self,
        *,
        max_early: int = DEFAULT_MAX_EARLY,
        early_max_age: float = DEFAULT_EARLY_MAX_AGE,
        remember_done: int = DEFAULT_REMEMBER_DONE,
        clock: Callable[[], float] = time.monotonic,
        counters: Counters | None = None,
        verify: Callable[[Task], None] | None = None,
    ) -> None:
        if max_early < 0:
            raise ValueError(f"max_early_callbacks must be >= 0; got {max_early}")
        if early_max_age <= 0:
            raise ValueError(f"early_callback_max_age must be > 0; got {early_max_age}")
        # task_id -> weak reference to its task: a task nobody holds any more is dropped
        # by the reference's callback. (A WeakValueDictionary, without its Python-level
        # method calls on the hot path.)
        self._pending: dict[str, weakref.KeyedRef[str, Task]] = {}
        self._forget_collected = _forgetter(self._pending)
        # (task_id, submission_id) -> callback; submission_id None when not verified.
        self._early: OrderedDict[tuple[str, str | None], _Early] = OrderedDict()
        self._early_per_submission: dict[str | None, int] = {}
        # task_id -> submission_id of tasks that finished or were abandoned.
        self._done: OrderedDict[str, str | None] = OrderedDict()
        # submission_id -> its task IDs, for submissions whose reply has registered them: a
        # token of such a submission is good for those tasks only, whatever became of them.
        self._submissions: OrderedDict[str, tuple[str | None, ...]] = OrderedDict()
        self._max_early = max_early
        self._early_max_age = early_max_age
        self._hint_after = min(UNCLAIMED_HINT_AFTER, early_max_age / 2)
        self._unclaimed_hint = Hint(
            "a callback for task %s has waited %.0f s for its task, and no task of this "
            "process has that ID: if several processes serve the callback URL (uvicorn or "
            "gunicorn --workers N), callbacks reach the wrong one: share a "
            "kx.RedisRouter between them. Otherwise another deployment sends its "
            "callbacks here (a callback URL shared by two apps)"
        )
        self._remember_done = remember_done
        self._clock = clock
        self.counters = Counters() if counters is None else counters
        self._verify = verify
        # Set by close(): what a task tracked from then on ends with at once.
        self._closed_error: Callable[[Task], KeevxError] | None = None

    @property
    def pending_count(self) -> int:
        """Tasks registered and not finished yet."""
        return len(self._pending)

    @property
    def early_count(self) -> int:
        """Early callbacks kept, waiting for their task to be registered."""
        self._expire_early(self._clock())
        return len(self._early)

    @property
    def check_interval(self) -> float:
        """How often `check_early` should run for its hint to come in time."""
        return self._hint_after / 2

    def check_early(self) -> None:
        """Drop early callbacks past their age and hint at ones long unclaimed. Also done
        by every callback and registration; a client calls it now and then besides, so
        that a process that gets no more work still says what it holds."""
        self._expire_early(self._clock())

    def get(self, task_id: str) -> Task | None:
        """The pending task with this ID, if any."""
        ref = self._pending.get(task_id)
        return None if ref is None else ref()

    # --- registering ------------------------------------------------------------------

    def register(self, tasks: Sequence[Task]) -> None:
        """Start tracking ``tasks`` (all of one submission) and apply early callbacks."""
        now = self._clock()
        self._expire_early(now)
        submission_id = tasks[0].submission_id if tasks else None
        if submission_id is not None:
            # A tuple: a submission has at most eight tasks, and a frozenset of one costs
            # four times as much memory.
            self._submissions[submission_id] = tuple(t.task_id for t in tasks if t.task_id)
            if len(self._submissions) > self._remember_done:
                self._submissions.popitem(last=False)
        for task in tasks:
            self._track(task)
        # What is left under this submission can never apply: its tasks are all known now.
        if submission_id is not None and self._early_per_submission.get(submission_id):
            for key in [key for key in self._early if key[1] == submission_id]:
                self._take_early(key)

    def _take_early(self, key: tuple[str, str | None]) -> _Early | None:
        early = self._early.pop(key, None)
        if early is not None:
            self._count_early(key[1], -1)
        return early

    def _count_early(self, submission_id: str | None, change: int) -> int:
        count = self._early_per_submission.get(submission_id, 0) + change
        if count:
            self._early_per_submission[submission_id] = count
        else:
            self._early_per_submission.pop(submission_id, None)
        return count

    def attach(self, task: Task) -> None:
        """Start tracking one task re-attached by ID (``client.task``); apply an early
        callback kept for it.

        Unlike `register`, it binds nothing about the task's submission: its other
        tasks may be waited for elsewhere.
        """
        self._expire_early(self._clock())
        self._track(task)

    def _track(self, task: Task) -> None:
        """Make ``task`` pending, and apply the early callback kept for it, if any."""
        task_id = task.task_id
        assert task_id is not None  # only submitted tasks are tracked
        if self._closed_error is not None:
            # A submit reply that arrived as the client closed: nothing would finish it.
            task._finish(None, self._closed_error(task))
            return
        self._pending[task_id] = weakref.KeyedRef(task, self._forget_collected, task_id)
        submission_id = task.submission_id
        early = self._take_early((task_id, submission_id))
        if early is None and submission_id is not None:
            early = self._take_early((task_id, None))
        if early is not None:
            self._resolve(task, early.payload)
            self.counters.resolved_by_callback += 1

    def close(self, error: Callable[[Task], KeevxError]) -> int:
        """Finish every pending task with ``error(task)``, and so any task tracked from
        now on; drop the early callbacks. How many pending tasks were finished."""
        self._closed_error = error
        tasks = self.pending_tasks()
        for task in tasks:
            self.abandon(task)
        self._pending.clear()
        self._early.clear()
        self._early_per_submission.clear()
        for task in tasks:
            task._finish(None, error(task))
        return len(tasks)

    def pending_tasks(self) -> list[Task]:
        """The tasks registered and not finished (nor collected) now."""
        return [task for ref in list(self._pending.values()) if (task := ref()) is not None]

    def abandon(self, task: Task) -> None:
        """Stop tracking an unfinished task nobody will wait for any more."""
        task_id = task.task_id
        if task_id is not None and self.get(task_id) is task:
            del self._pending[task_id]
            self._remember(task_id, task.submission_id)

    # --- applying callbacks -----------------------------------------------------------

    def apply(self, payload: CallbackPayload, submission_id: str | None) -> CallbackOutcome:
        """Apply a callback whose token was issued for ``submission_id``.

        ``submission_id`` is ``None`` for trusted sources (a lookup made with our API key,
        or a client with ``verify_callbacks=False``): such a payload fits any submission.

        Raises:
            CallbackAuthError: the token belongs to another submission than the task's.
                Nothing changed.
        """
        task_id = payload.task_id
        ref = self._pending.get(task_id)
        task = None if ref is None else ref()
        if task is None:
            return self._apply_unknown(payload, submission_id)
        owner = task.submission_id
        if submission_id is not None and owner is not None and owner != submission_id:
            self._reject_foreign(task_id)
        if payload.status in UNFINISHED_STATUSES:
            task.status = payload.status
            return CallbackOutcome.PROGRESS
        if owner is None and submission_id is not None:
            return self._unverifiable(task)
        # _resolve and _remember, inline: every callback takes this path.
        del self._pending[task_id]
        done = self._done
        done[task_id] = task.submission_id
        if len(done) > self._remember_done:
            done.popitem(last=False)
        self.counters.resolved_by_callback += 1
        task._apply(payload)
        return CallbackOutcome.RESOLVED

    def _unverifiable(self, task: Task) -> CallbackOutcome:
        # A task re-attached by ID alone: its submission is unknown, so a token (valid for
        # some submission of this app, maybe leaked) cannot show the callback is its own.
        # The body is not trusted: the result comes from a lookup, made with our API key.
        logger.info(
            "a callback for task %s, re-attached by ID alone, is confirmed by a lookup "
            "before its result is used",
            task.task_id,
        )
        if self._verify is not None:
            self._verify(task)
        return CallbackOutcome.PROGRESS

    def settle(self, task: Task, payload: CallbackPayload) -> bool:
        """Finish ``task`` from a finished snapshot its lookup returned (trusted: the
        lookup was made with our API key); whether it was still pending here."""
        if self.get(payload.task_id) is not task:
            return False
        self._resolve(task, payload)
        self.counters.resolved_by_lookup += 1
        return True

    def _apply_unknown(
        self, payload: CallbackPayload, submission_id: str | None
    ) -> CallbackOutcome:
        task_id = payload.task_id
        if submission_id is not None:
            known = self._submissions.get(submission_id)
            if known is not None:
                if task_id not in known:
                    self._reject_foreign(task_id)
                # Its task finished, was given up or dropped by its owner: nothing to do.
                self.counters.callbacks_duplicate += 1
                return CallbackOutcome.DUPLICATE
        if task_id in self._done:
            owner = self._done[task_id]
            if submission_id is not None and owner is not None and owner != submission_id:
                self._reject_foreign(task_id)
            self.counters.callbacks_duplicate += 1
            return CallbackOutcome.DUPLICATE
        if not payload.done:
            # Nothing to keep: a finished callback will follow.
            return CallbackOutcome.PROGRESS
        key = (task_id, submission_id)
        now = self._clock()
        self._expire_early(now)
        if key in self._early:
            self.counters.callbacks_duplicate += 1
            return CallbackOutcome.BUFFERED
        if (
            submission_id is not None
            and self._early_per_submission.get(submission_id, 0) >= _MAX_EARLY_PER_SUBMISSION
        ):
            # More than the submission can have tasks: a leaked token being replayed.
            self.counters.callbacks_rejected += 1
            logger.warning(
                "rejected an early callback for task %s: too many for its token", task_id
            )
            raise CallbackAuthError(
                f"callback for task {task_id}: its token already has "
                f"{_MAX_EARLY_PER_SUBMISSION} early callbacks, as many as a submission has tasks"
            )
        if self._max_early == 0:
            self._evict(key, "early-callback buffer is disabled (max_early_callbacks=0)")
            return CallbackOutcome.BUFFERED
        while len(self._early) >= self._max_early:
            oldest = next(iter(self._early))
            self._take_early(oldest)
            self._evict(oldest, f"early-callback buffer is full ({self._max_early})")
        self._early[key] = _Early(payload, now)
        self._count_early(submission_id, +1)
        self.counters.callbacks_buffered += 1
        return CallbackOutcome.BUFFERED

    def _reject_foreign(self, task_id: str) -> None:
        self.counters.callbacks_rejected += 1
        logger.warning(
            "rejected a callback for task %s: its token was issued for another submission",
            task_id,
        )
        raise CallbackAuthError(
            f"callback for task {task_id} carries a token issued for another submission"
        )

    def _resolve(self, task: Task, payload: CallbackPayload) -> None:
        """Finish a pending task (callers have just found it in ``_pending``)."""
        task_id = payload.task_id
        del self._pending[task_id]
        self._remember(task_id, task.submission_id)
        task._apply(payload)

    def _remember(self, task_id: str, submission_id: str | None) -> None:
        done = self._done
        done[task_id] = submission_id
        if len(done) > self._remember_done:
            done.popitem(last=False)

    def _evict(self, key: tuple[str, str | None], why: str) -> None:
        self.counters.callbacks_evicted += 1
        logger.warning("dropped an early callback for task %s: %s", key[0], why)

    def _expire_early(self, now: float) -> None:
        early = self._early
        limit = now - self._early_max_age
        while early:
            key, oldest = next(iter(early.items()))
            if oldest.arrived > limit:
                if now - oldest.arrived >= self._hint_after:
                    self._unclaimed_hint.say(key[0], now - oldest.arrived)
                break
            self._take_early(key)
            self.counters.callbacks_unclaimed += 1
            self._unclaimed_hint.say(key[0], now - oldest.arrived)
            self._evict(key, f"its task was not registered within {self._early_max_age:g} s")
