"""Client-wide flow control: the pace of submits and the pause after a 429.

The concurrency limit itself is a semaphore held by the client around each submit; this
module adds the two rules that apply to the HTTP attempts of the client (the HTTP engine,
``_http.py``, asks before each one), whichever ``submit``, ``generate`` or batch it
belongs to:

* **pace**: with ``max_per_second`` set, attempts start at least ``1 / max_per_second``
  apart: smooth, never a burst;
* **pause**: a 429 (or a 503 with ``Retry-After``) stops every attempt of the client until
  the asked wait is over, so a fan-out backs off as one.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from typing import Final

import anyio

__all__ = ["Throttle", "backoff_delay", "parse_retry_after"]

logger = logging.getLogger("keevx_async")

BACKOFF_BASE: Final = 0.5
BACKOFF_CAP: Final = 8.0


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**attempt)]``."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**attempt)
    return (rng or random).uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Returns ``None`` when the header is absent or unreadable; never a negative wait.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


class Throttle:
    """Paces attempts and holds the client-wide pause. One per client."""

    __slots__ = ("_interval", "_next_slot", "_pace_lock", "_paused_until")

    def __init__(self, max_per_second: float | None) -> None:
        if max_per_second is not None and not max_per_second > 0:
            raise ValueError(f"max_per_second must be > 0 or None; got {max_per_second}")
        self._interval = 0.0 if max_per_second is None else 1.0 / max_per_second
        self._next_slot = -math.inf
        self._paused_until = -math.inf
        # Paced attempts queue here one by one (a fair lock), so a caller cancelled while
        # it waits for its turn leaves no reserved slot behind to slow the others down.
        self._pace_lock = anyio.Lock()

    @property
    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when not paused)."""
        if self._paused_until == -math.inf:
            return 0.0  # never paused, or the pause is over: no clock read on the hot path
        return max(0.0, self._paused_until - anyio.current_time())

    def pause(self, seconds: float, reason: str) -> None:
        """Hold every attempt of the client for ``seconds`` (extends, never shortens)."""
        until = anyio.current_time() + seconds
        if until > self._paused_until:
            self._paused_until = until
            logger.warning("pausing all requests of this client for %.2f s: %s", seconds, reason)

    async def before_attempt(self, *, paced: bool = True) -> None:
        """Wait out the pause, then (when ``paced``) the pace slot; return when the
        attempt may start."""
        await self._wait_unpaused()
        if not (paced and self._interval):
            return
        async with self._pace_lock:
            while True:
                wait = self._next_slot - anyio.current_time()
                if wait > 0:
                    await anyio.sleep(wait)
                await self._wait_unpaused()
                now = anyio.current_time()
                if now >= self._next_slot:
                    # Spaced from the actual start: a late wake-up never makes the next
                    # gap shorter, so the rate is never exceeded in any window.
                    self._next_slot = now + self._interval
                    return

    async def _wait_unpaused(self) -> None:
        if self._paused_until == -math.inf:
            return
        # A deadline that pause() may push back while we sleep: no event to wait for.
        while (wait := self._paused_until - anyio.current_time()) > 0:  # noqa: ASYNC110
            await anyio.sleep(wait)
        self._paused_until = -math.inf  # over: later attempts need not read the clock
