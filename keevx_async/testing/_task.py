"""A task of the fake service: its public record, its fate, and how it finishes.

[`FakeTask`][keevx_async.testing.FakeTask] is what tests read (``fake.tasks``); a
`PlannedTask` adds what the fake decided for the task when it was created, its fate: when
it finishes, whether it fails, and which submission it belongs to, so that the scheduler and
the deliverer can act on it without knowing the knobs that chose it.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from keevx_async._types import FINISHED_OK
from keevx_async.testing._rules import video_size

__all__ = ["FAILED", "GENERATING", "PENDING", "PROCESSING", "FakeTask", "PlannedTask"]

GENERATING: Final = "GENERATING"
PENDING: Final = "PENDING"
PROCESSING: Final = "PROCESSING"
FAILED: Final = "FAILED"


@attrs.define
class FakeTask:
    """One task created by [`FakeKeevx`][keevx_async.testing.FakeKeevx], with what happened to it
    so far.

    ``body`` is the validated request (defaults filled in, ``reference_images`` cut to
    five); ``index`` is the task's position among its request's task IDs. ``status`` is
    ``"GENERATING"`` (a video task: ``"PENDING"``, then ``"PROCESSING"`` from
    ``processing_at``) until ``finished_at`` is set, then ``"SUCCEEDED"`` or ``"FAILED"``.
    A video task has ``video_url``, ``duration``, ``width`` and ``height`` once it
    succeeded, an image task ``image_url``.
    ``lost`` tasks are never called back; ``duplicated`` ones are called back twice.
    ``callbacks_sent`` counts successful deliveries of this task's callback.
    """

    task_id: str
    prompt: str
    body: dict[str, Any]
    index: int
    callback_url: str | None
    created_at: float
    status: str = GENERATING
    image_url: str = ""
    thumbnail_url: str = ""
    error_message: str = ""
    finished_at: float | None = None
    callbacks_sent: int = 0
    lost: bool = False
    duplicated: bool = False
    kind: str = "image"
    """``"image"`` (``/v1/image_generate``) or ``"video"`` (``/v1/image_to_video``)."""
    video_url: str = ""
    duration: int | None = None
    width: int | None = None
    height: int | None = None
    processing_at: float | None = None
    """A video task's ``PENDING`` turns ``PROCESSING`` at this time."""


@attrs.define(eq=False)
class PlannedTask:
    """A created task and its fate."""

    task: FakeTask
    failure: str | None
    """The ``error_message`` the task will fail with, or ``None`` if it will succeed."""
    submission: int
    """Groups the tasks of one submit, so that they are called back in order."""
    delay: float
    """Seconds from creation until the task finishes."""

    @property
    def due(self) -> float:
        """When the task finishes, on the ``anyio.current_time()`` clock."""
        return self.task.created_at + self.delay

    @property
    def calls_back(self) -> bool:
        """Whether the finished task is to be called back (it has a URL and is not lost)."""
        return self.task.callback_url is not None and not self.task.lost

    def finish(self, now: float, image_base_url: str) -> None:
        """Give the task its result: images under ``image_base_url``, or its failure."""
        task = self.task
        task.finished_at = now
        if self.failure is None:
            task.status = FINISHED_OK
            task.thumbnail_url = f"{image_base_url}/{task.task_id}_thumb.png"
            if task.kind == "video":
                task.video_url = f"{image_base_url}/{task.task_id}.mp4"
                task.duration = task.body["duration"]
                task.width, task.height = video_size(task.body)
            else:
                task.image_url = f"{image_base_url}/{task.task_id}.png"
        else:
            task.status = FAILED
            task.error_message = self.failure
