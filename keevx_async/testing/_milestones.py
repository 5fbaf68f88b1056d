"""Milestones of a count: tasks waiting for a counter to reach a value, woken by whoever
counts.

A test of concurrent code needs to wait for "the fake has accepted five submits", not for a
guessed number of milliseconds that is too short on a loaded machine and too long
everywhere else. Like trio.testing's ``Sequencer``, this turns progress into something to
await: each waiter sleeps on its own event, set by the increment that reaches its target,
with no polling. The count itself stays with its owner (a plain attribute that tests
read); the owner reports every new value.
"""

from __future__ import annotations

import contextlib

import anyio
import anyio.lowlevel

__all__ = ["Milestones"]


class Milestones:
    """Waiters for values of one count."""

    def __init__(self) -> None:
        self._waiters: list[tuple[int, anyio.Event]] = []

    def count_is(self, value: int) -> None:
        """Report the count's new value: wake every waiter whose target it has reached."""
        if not self._waiters:
            return
        still_waiting = []
        for target, event in self._waiters:
            if value >= target:
                event.set()
            else:
                still_waiting.append((target, event))
        self._waiters = still_waiting

    async def wait_for(self, target: int, current: int) -> None:
        """Return once a reported value is at least ``target``; ``current`` is the count
        now (if it is already there, return after a checkpoint)."""
        if current >= target:
            await anyio.lowlevel.checkpoint()
            return
        waiter = (target, anyio.Event())
        self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            # Still listed only if cancelled before the target was reached.
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
