"""When the fake's tasks finish: one timer loop for every task, earliest first.

A fake under load holds thousands of tasks at once; one background task per task would
make the emulator the slowest part of a benchmark. The scheduler keeps the planned tasks in
a heap by due time and one loop sleeps until the head is due, woken early only when a new
task becomes the head. It knows nothing of what finishing means: it hands the due tasks to
the callable it runs with. Tasks still waiting when the loop stops stay in the heap and
finish when it runs again.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING, NoReturn

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

    from keevx_async.testing._task import PlannedTask

__all__ = ["Scheduler"]


class Scheduler:
    """Hands planned tasks to ``on_due`` once their due time has come."""

    def __init__(self) -> None:
        # (due time, tie-breaker, task), earliest first.
        self._due: list[tuple[float, int, PlannedTask]] = []
        self._sequence = itertools.count()
        # Set while `run` sleeps: a push that makes an earlier task the head interrupts it.
        self._wakeup: anyio.Event | None = None

    def schedule(self, item: PlannedTask) -> None:
        """Plan ``item`` to be handed over at ``item.due``."""
        entry = (item.due, next(self._sequence), item)
        heapq.heappush(self._due, entry)
        if self._due[0] is entry and self._wakeup is not None:
            self._wakeup.set()

    async def run(self, on_due: Callable[[list[PlannedTask]], None]) -> NoReturn:
        """Hand due tasks to ``on_due`` (in due order, each batch at once) until cancelled."""
        try:
            while True:
                now = anyio.current_time()
                due: list[PlannedTask] = []
                while self._due and self._due[0][0] <= now:
                    due.append(heapq.heappop(self._due)[2])
                if due:
                    on_due(due)
                self._wakeup = anyio.Event()
                with anyio.move_on_after(self._due[0][0] - now if self._due else math.inf):
                    await self._wakeup.wait()
        finally:
            # The event belongs to this run's event loop; the next run makes its own.
            self._wakeup = None
