"""Callback routers: how a callback reaches the process whose task is waiting for it.

One process needs nothing more than the client's own registry: a callback fed to the
client resolves the client's task. A web app with several worker processes does: the
service POSTs each callback to whichever worker the load balancer picks, while the task
waiting for it lives in the worker that submitted it. A router carries the callback
across.

- [`LocalRouter`][keevx_async.LocalRouter] (the default) shares nothing: a callback for
  a task of another process is buffered here as an early callback, and is lost to that
  process.
- [`RedisRouter`][keevx_async.RedisRouter] records every such callback in Redis (with a
  TTL) and notifies the worker that owns the task, which resolves it at once; a callback
  for a task that no live worker owns is kept until a client asks for that task again
  with [`AsyncKeevx.task`][keevx_async.AsyncKeevx.task].

A router is pluggable: subclass [`CallbackRouter`][keevx_async.CallbackRouter] to carry
callbacks over another store.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, ClassVar, Protocol

import attrs

from ._kinds import AnyRequest, kind_named, kind_of
from ._wire import WireFormatError, decode_callback, load_json

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anyio.abc import TaskStatus

    from ._models import CallbackOutcome, CallbackPayload
    from ._task import Task

__all__ = [
    "CallbackRouter",
    "LocalRouter",
    "RouterHost",
    "TaskRecord",
    "decode_record",
    "decode_request_record",
    "encode_record",
    "encode_request_record",
]


class RouterHost(Protocol):
    """What a router may ask of the client it serves (given to `CallbackRouter.run`)."""

    def deliver(self, record: bytes) -> None:
        """Apply a routed callback (a record made by `encode_record`) to a task here.

        Synchronous and never raising: a record that does not fit is logged and dropped.
        """

    def pending_tasks(self) -> list[Task]:
        """The tasks this client is waiting for now."""


@attrs.frozen
class TaskRecord:
    """What a router knows about one task (see `CallbackRouter.find`).

    Attributes:
        task_id: the task's ID.
        request: the request that created it, when the submitting client recorded it.
        index: the task's position among its request's task IDs.
        submission_id: the submission its callback token belongs to (``None``: unknown or
            callbacks not verified). Keep it with the claim: a task re-attached without
            it cannot have a callback's token checked against it, so its result is taken
            from a lookup, never from a callback body.
        result: the recorded callback of the finished task (an `encode_record` record),
            or ``None`` while no result is recorded.
    """

    task_id: str
    request: AnyRequest | None = None
    index: int = 0
    submission_id: str | None = None
    result: bytes | None = None


def encode_record(payload: CallbackPayload, submission_id: str | None) -> bytes:
    """A finished callback as bytes a router stores and sends (`decode_record` reads it).

    ``submission_id`` is the submission whose token the callback carried (``None`` for a
    trusted source): the owner checks it against its task, as for a callback of its own.
    """
    data = dict(payload.raw)
    data.update(
        task_id=payload.task_id,
        status=payload.status,
        image_url=payload.image_url,
        error_message=payload.error_message,
    )
    record = {"sub": submission_id, "task_type": payload.task_type, "data": data}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def decode_record(record: bytes | str) -> tuple[CallbackPayload, str | None]:
    """The callback and submission ID of a record made by `encode_record`.

    Raises:
        WireFormatError: the record is not one `encode_record` made.
    """
    value = load_json(record, "routed callback")
    if not isinstance(value, dict) or not isinstance(value.get("data"), dict):
        raise WireFormatError("a routed callback must be an object with a 'data' object")
    submission_id = value.get("sub")
    if submission_id is not None and not isinstance(submission_id, str):
        raise WireFormatError("'sub' of a routed callback must be a string", field="sub")
    body = {"code": 0, "msg": "ok", "task_type": value.get("task_type"), "data": value["data"]}
    return decode_callback(body), submission_id or None


def encode_request_record(request: AnyRequest) -> tuple[str, str]:
    """A request as a router stores it: its kind's name, and its submit body (with its
    own callback URL if it had one, never a token) plus its ``custom_id``, which no
    submit body carries."""
    kind = kind_of(request)
    body = json.loads(kind.encode(request, request.callback_url, None))
    if request.custom_id is not None:
        body["custom_id"] = request.custom_id
    return kind.name, json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def decode_request_record(text: str | bytes, kind: str | None = None) -> AnyRequest | None:
    """The request a router stored with `encode_request_record` (``kind``: the kind's
    name it stored, ``None`` for an image), or ``None`` if it cannot be read."""
    try:
        value = load_json(text, "request record")
        if not isinstance(value, dict):
            return None
        custom_id = value.pop("custom_id", None)
        request: AnyRequest = kind_named(kind).decode_request(value)
        return request if custom_id is None else attrs.evolve(request, custom_id=custom_id)
    except (ValueError, TypeError):
        return None


class CallbackRouter:
    """Carries callbacks between the processes of one app (the interface).

    The client calls these methods; a router never calls the client except through the
    [`RouterHost`][keevx_async.RouterHost] given to `run`. The in-process default,
    [`LocalRouter`][keevx_async.LocalRouter], does nothing at all.

    A router whose `shares_callbacks` is true receives, through `forward`, every finished
    callback for a task this client is not waiting for, and must either record it
    durably (then return) or raise [`RouterError`][keevx_async.RouterError], which
    refuses the callback with 503 so the service can deliver it again.
    """

    shares_callbacks: ClassVar[bool] = False
    """Whether callbacks for tasks this client does not know go through `forward`
    (else they are buffered in the client as early callbacks)."""

    async def run(self, host: RouterHost, *, task_status: TaskStatus[None]) -> None:
        """Work in the background while the client is entered (``async with``).

        Call ``task_status.started()`` once ready to route; the client cancels this
        when it exits.
        """
        task_status.started()

    async def claim(self, tasks: Sequence[Task]) -> None:
        """This client waits for ``tasks`` (just submitted, or re-attached): route their
        callbacks here from now on.

        Awaited by ``submit`` before it returns: keep it short, never raise, and do not
        let cancellation cut it short (the tasks exist and are billed). When the store
        is unreachable, queue the claims for later and return.
        """

    def finished(self, payload: CallbackPayload, submission_id: str | None) -> None:
        """A task of this client finished here (its callback or a lookup): record the
        result for the other processes. Must not block."""

    def release(self, task_id: str) -> None:
        """This client stopped waiting for the task (finished by a routed callback, or
        given up): stop routing its callbacks here. Must not block."""

    async def forward(self, payload: CallbackPayload, submission_id: str | None) -> CallbackOutcome:
        """Record a finished callback for a task this client does not wait for, and
        notify its owner.

        Returns:
            ``FORWARDED`` when a live owner was notified, ``BUFFERED`` when it is kept
            for an owner to come.

        Raises:
            RouterError: it could not be recorded (the callback gets 503).
            CallbackAuthError: its token belongs to another submission than the task's.
        """
        raise NotImplementedError(f"{type(self).__name__} does not share callbacks")

    async def find(self, task_id: str) -> TaskRecord | None:
        """What the router knows of a task (``None``: nothing).

        Raises:
            RouterError: the router's store cannot be read.
        """
        return None


class LocalRouter(CallbackRouter):
    """The default router: callbacks stay in the process that receives them.

    Right for one process, or for several processes each receiving its own callbacks
    (each with its own callback URL). Behind a load balancer that spreads callbacks over
    workers, use [`RedisRouter`][keevx_async.RedisRouter].
    """

    def __repr__(self) -> str:
        return "LocalRouter()"
