"""Task groups that live from an object's ``__aenter__`` to its ``__aexit__``.

The client, a batch and the callback server each own background tasks for exactly the
life of their ``async with`` block, so they enter a task group in ``__aenter__`` and leave
it in ``__aexit__``, by hand. The two functions here are that by-hand part, written once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

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
    instead of wrapped in an exception group; the tasks' own errors still propagate.
    """
    if cancel:
        task_group.cancel_scope.cancel()
    if shield:
        task_group.cancel_scope.shield = True
    await task_group.__aexit__(None, None, None)
