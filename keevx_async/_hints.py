"""Hints: a warning naming the likely cause of a symptom, said once in a while.

What a hint explains is logged or counted every time; the hint itself (what to check)
is said at most once per `HINT_INTERVAL`, so a misconfiguration that refuses a thousand
callbacks a minute adds one line of advice a minute, not a thousand.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Final

__all__ = ["HINT_INTERVAL", "Hint"]

logger = logging.getLogger("keevx_async")

HINT_INTERVAL: Final = 60.0
"""Seconds between two hints at the same likely cause."""


class Hint:
    """A warning naming a likely cause, said at most once per `HINT_INTERVAL`."""

    __slots__ = ("_message", "_said_at")

    def __init__(self, message: str) -> None:
        self._message = message
        self._said_at = -math.inf

    def say(self, *args: object) -> None:
        """Log the warning (with ``args`` for its message), unless said recently."""
        now = time.monotonic()
        if now - self._said_at >= HINT_INTERVAL:
            self._said_at = now
            logger.warning(self._message, *args)
