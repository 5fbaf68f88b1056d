"""Task groups that live from an object's ``__aenter__`` to its ``__aexit__``.

The client, a batch and the callback server each own background tasks for exactly the
life of their ``async with`` block, so they enter a task group in ``__aenter__`` and leave
it in ``__aexit__``, by hand. The two functions here are that by-hand part, written once.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import anyio

if sys.version_info < (3, 11):  # pragma: no cover (the builtin from 3.11 on)
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["enter_task_group", "exit_task_group"]


async def enter_task_group() -> TaskGroup:
    """A new task group, entered: leave it with `exit_task_group`."""
    task_group = anyio.create_task_group()
    await task_group.__aenter__()
    return task_group


async def exit_task_group(
    task_group: TaskGroup, *, cancel: bool = True, shield: bool = False
) -> None:
    """Leave a task group entered with `enter_task_group`, once its tasks have ended.

    Args:
        cancel: cancel its tasks first (else wait for them to end by themselves).
        shield: let no outer cancellation cut the wait short (tasks that must finish,
            such as a server freeing its port).

    The exception of the block being left is not handed in, so it propagates as raised
    instead of wrapped in an exception group; the tasks' own errors still propagate. A
    lone ``KeyboardInterrupt`` or ``SystemExit`` that reached a task (trio delivers
    Ctrl-C to whichever task runs) is raised as itself, not in an exception group, so
    that ``except KeyboardInterrupt`` catches it on both backends.
    """
    if cancel:
        task_group.cancel_scope.cancel()
    if shield:
        task_group.cancel_scope.shield = True
    try:
        await task_group.__aexit__(None, None, None)
    except BaseExceptionGroup as group:
        lone = _lone_interrupt(group)
        if lone is None:
            raise
        raise lone from None


def _lone_interrupt(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The group's only exception, if it is a ``KeyboardInterrupt`` or ``SystemExit``
    (however deeply nested)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    if len(leaves) == 1 and isinstance(leaves[0], (KeyboardInterrupt, SystemExit)):
        return leaves[0]
    return None
