"""Callback intake: where a result, by callback, by router or by lookup, meets its task.

`CallbackIntake` holds the parts a result passes through, in the order it passes them:

1. the token (`CallbackSigner`): issued into each submission's callback URL, checked
   (`authenticate`) before a callback's body is even read;
2. the wire format (`decode_callback`): a malformed body is refused, nothing changed;
3. the registry (`TaskRegistry`): task ID -> waiting task, early callbacks buffered;
4. the router (`CallbackRouter`): a callback for a task another process waits for is
   recorded for it (`forward`), and one recorded by another process for a task of ours
   is delivered here (`deliver_routed`).

``client.feed_callback`` and ``client.callback_app`` both end in `feed`; lookups end in
`settle_lookup`. The intake knows nothing of HTTP or of the client.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._exceptions import (
    CallbackAuthError,
    CallbackError,
    ClientClosedError,
    RouterError,
    UnknownTaskError,
)
from ._hints import Hint
from ._models import FINISHED_OK, CallbackOutcome, CallbackPayload
from ._router import decode_record
from ._task import Task
from ._tokens import attach_token, looks_issued
from ._wire import WireFormatError, decode_callback

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence
    from typing import Any

    from ._kinds import AnyRequest
    from ._models import TaskSnapshot
    from ._registry import TaskRegistry
    from ._router import CallbackRouter
    from ._stats import Counters
    from ._tokens import CallbackSigner
    from ._types import CallbackTokenIn

__all__ = ["CallbackIntake"]

logger = logging.getLogger("keevx_async")


class _RouterHost:
    """What the intake lets its router do (see ``RouterHost``)."""

    __slots__ = ("deliver", "pending_tasks")

    def __init__(
        self, deliver: Callable[[bytes], None], pending_tasks: Callable[[], list[Task]]
    ) -> None:
        self.deliver = deliver
        self.pending_tasks = pending_tasks


def _closed_error(task: Task) -> ClientClosedError:
    return ClientClosedError(task_id=task.task_id, request=task.request)


class CallbackIntake:
    """Authenticates, decodes and applies results; routes those of other processes.

    Args:
        signer: issues and verifies callback tokens.
        registry: the tasks waiting here.
        router: carries callbacks between processes.
        counters: where callbacks are counted.
        verify: refuse callbacks without a valid token.
        token_in: where the token goes in a callback URL (``"query"`` or ``"path"``).
    """

    __slots__ = (
        "_callback_hint",
        "_counters",
        "_journaled",
        "_secret_hint",
        "_shares",
        "registry",
        "router",
        "signer",
        "token_in",
        "verify",
    )

    def __init__(
        self,
        *,
        signer: CallbackSigner,
        registry: TaskRegistry,
        router: CallbackRouter,
        counters: Counters,
        verify: bool,
        token_in: CallbackTokenIn,
    ) -> None:
        self.signer = signer
        self.registry = registry
        self.router = router
        self.verify = verify
        self.token_in: CallbackTokenIn = token_in
        self._counters = counters
        self._secret_hint = Hint(
            "a refused callback token looks like one this SDK issues, but no secret of this "
            "client matches it: do all workers (and deployments) behind the callback URL "
            "share KEEVX_CALLBACK_SECRET? Without it each process draws its own secret"
        )
        self._callback_hint = Hint(
            "task %s was finished by a status lookup: its callback had not come. If "
            "callbacks never arrive, check that the callback URL is reachable from the "
            "service (a public URL routed to client.callback_app) and answers 200"
        )
        self._shares = router.shares_callbacks
        self._journaled = 0  # journaled batches running: their results are committed first

    # --- tasks ------------------------------------------------------------------------

    def issue(self, callback_url: str) -> tuple[str | None, str]:
        """A submission's ID and the callback URL carrying its token (``None`` and the
        URL unchanged when callbacks are not verified)."""
        if not self.verify:
            return None, callback_url
        submission_id, token = self.signer.issue()
        return submission_id, attach_token(callback_url, token, self.token_in)

    def count_journaled(self, change: int) -> None:
        """A journaled batch started (``+1``) or ended (``-1``): while one runs, a
        callback that resolves one of its tasks is answered once the result is
        committed."""
        self._journaled += change

    async def register(self, tasks: Sequence[Task]) -> None:
        """Wait here for the tasks of one submission (and claim them with the router).

        Early callbacks kept for them apply now.
        """
        self.registry.register(tasks)
        if self._shares:
            await self.router.claim(tasks)

    async def reattach(self, task_id: str, request: AnyRequest | None) -> Task:
        """The task with this ID, waiting here: known, recorded by the router, or made
        from ``request`` (see ``client.task``).

        Raises:
            UnknownTaskError: nobody knows the task's request.
            RouterError: the router's store could not be read.
        """
        task = self.registry.get(task_id)
        if task is not None:
            return task
        record = await self.router.find(task_id)
        task = self.registry.get(task_id)  # attached by another caller meanwhile
        if task is not None:
            return task
        known = None if record is None else record.request
        if known is None and request is None:
            raise UnknownTaskError(task_id)
        task = Task(
            task_id,
            known or request,  # type: ignore[arg-type] # one of them is set
            0 if record is None else record.index,
            submission_id=None if record is None else record.submission_id,
        )
        self.registry.attach(task)
        if record is not None and record.result is not None and not task.done():
            self._apply_record(record.result)
        if not task.done() and self._shares:
            await self.router.claim((task,))
        return task

    def abandon(self, task: Task) -> None:
        """Stop waiting for an unfinished task (its wait timed out or was left)."""
        self.registry.abandon(task)
        if self._shares and task.task_id is not None:
            self.router.release(task.task_id)

    def close(self) -> int:
        """End every unfinished task with `ClientClosedError`, and any registered from
        now on (the client is closing); how many were unfinished."""
        tasks = self.registry.pending_tasks()
        count = self.registry.close(_closed_error)
        if self._shares:
            for task in tasks:
                if task.task_id is not None:  # pragma: no branch (pending tasks have one)
                    self.router.release(task.task_id)
        return count

    def is_pending(self, task_id: str) -> bool:
        """Whether a task with this ID waits here."""
        return self.registry.get(task_id) is not None

    def router_host(self) -> _RouterHost:
        """What the router may call back into (`deliver_routed`, the pending tasks)."""
        return _RouterHost(self.deliver_routed, self.registry.pending_tasks)

    # --- callbacks --------------------------------------------------------------------

    def authenticate(self, token: str | None) -> str | None:
        """The submission a callback's token was issued for (``None``: not verified).

        Raises:
            CallbackAuthError: no token, or one this client did not issue.
        """
        if not self.verify:
            return None
        submission_id = self.signer.verify(token)
        if submission_id is None:
            self._counters.callbacks_rejected += 1
            why = "has no token" if not token else "carries an invalid token"
            logger.warning("rejected a callback that %s", why)
            if looks_issued(token):
                # Right shape, a MAC no secret of ours gives: most likely issued by
                # another process of the app, with another secret.
                self._counters.callbacks_wrong_secret += 1
                self._secret_hint.say()
            raise CallbackAuthError(
                f"callback {why}: it was not sent to a callback URL this client issued"
            )
        return submission_id

    def feed(
        self, body: bytes | str | Mapping[str, Any], submission_id: str | None
    ) -> CallbackOutcome | Awaitable[CallbackOutcome]:
        """Apply a callback whose token was verified; an awaitable when it is routed.

        Raises:
            CallbackError: the body is malformed (nothing changed).
            CallbackAuthError: the token belongs to another submission than the task's.
        """
        try:
            payload = decode_callback(body)
        except WireFormatError as exc:
            self._counters.callbacks_malformed += 1
            logger.warning("rejected a malformed callback: %s", exc)
            raise CallbackError(str(exc), field=exc.field) from None
        if not self._shares and not self._journaled:
            return self.registry.apply(payload, submission_id)
        task = self.registry.get(payload.task_id)
        if self._shares and task is None and payload.done:
            return self._forward(payload, submission_id)
        outcome = self.registry.apply(payload, submission_id)
        if outcome is CallbackOutcome.RESOLVED and task is not None:
            if self._shares:
                self.router.finished(payload, task.submission_id)
            durable = task._durable
            if durable is not None:
                # A journaled batch's task: answered once its result is committed.
                awaitable: Awaitable[CallbackOutcome] = durable.wait_then(outcome)
                return awaitable
        return outcome

    async def _forward(
        self, payload: CallbackPayload, submission_id: str | None
    ) -> CallbackOutcome:
        try:
            outcome = await self.router.forward(payload, submission_id)
        except RouterError:
            self._counters.router_errors += 1
            raise
        except CallbackAuthError as exc:
            self._counters.callbacks_rejected += 1
            logger.warning("rejected a callback: %s", exc)
            raise
        self._counters.callbacks_forwarded += 1
        return outcome

    def deliver_routed(self, record: bytes) -> None:
        """Apply a callback the router brought from another process."""
        resolved = self._apply_record(record)
        if resolved is not None:
            self.router.release(resolved)

    def _apply_record(self, record: bytes) -> str | None:
        """Apply a routed callback; the ID of the task it resolved, if it did."""
        try:
            payload, submission_id = decode_record(record)
        except WireFormatError as exc:
            logger.warning("dropped a routed callback that cannot be read: %s", exc)
            return None
        try:
            outcome = self.registry.apply(payload, submission_id)
        except CallbackAuthError:
            return None  # logged and counted by the registry
        return payload.task_id if outcome is CallbackOutcome.RESOLVED else None

    # --- lookups ----------------------------------------------------------------------

    def settle_lookup(self, task_id: str, snapshot: TaskSnapshot) -> None:
        """Resolve a waiting task from a finished snapshot of it (a lookup made with our
        API key needs no token); anything else changes nothing."""
        finished = snapshot.done and (snapshot.status != FINISHED_OK or snapshot.url)
        # Only a task this client waits for is resolved; others are not buffered.
        task = self.registry.get(task_id) if finished and snapshot.task_id == task_id else None
        if task is None:
            return
        payload = CallbackPayload(
            task_id=snapshot.task_id,
            status=snapshot.status,
            image_url=snapshot.image_url,
            error_message=snapshot.error_message,
            task_type=snapshot.task_type,
            raw=snapshot.raw,
        )
        if not self.registry.settle(task, payload):
            return
        if self._shares:
            self.router.finished(payload, task.submission_id)
        if task.submission_id is not None:  # it was sent with a callback URL
            # Once in a while it is the service; every time, the URL.
            self._counters.callbacks_missed += 1
            self._callback_hint.say(task_id)
