"""Which async library runs the calling task: asyncio or trio, the two the SDK serves.

The transports, the callback server, the Redis router and the demo each pick an
implementation by it; they ask here, one way, so they always agree.
"""

from __future__ import annotations

import asyncio

__all__ = ["running_on_asyncio"]


def running_on_asyncio() -> bool:
    """Whether the calling task runs on asyncio (else on trio: the two backends we serve)."""
    # Not sniffio: it is not among our dependencies. Under trio no asyncio loop runs here,
    # and under trio's guest mode on an asyncio loop the current task is not an asyncio task.
    try:
        return asyncio.current_task() is not None
    except RuntimeError:
        return False
