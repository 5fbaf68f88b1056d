"""How the fake calls back: POST each finished task's callback, or hand it to a sink, and
try failed deliveries again when asked.

Delivery is where a receiver under test meets the service's hard cases (a callback twice,
a receiver that answers 503 or raises), so it is kept in one place with one rule for what
counts: a delivery succeeded when the sink returned or the receiver answered 2xx, and
every other outcome is a failure with a reason, recorded and never raised. The deliverer
does not decide which tasks are called back or when; it is given their callbacks, one
submission at a time, so a submission's callbacks arrive in the order they were planned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import anyio
import httpx

from keevx_async.testing._rules import callback_body

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from keevx_async.testing._task import FakeTask

__all__ = ["CallbackDeliverer", "CallbackSink", "DeliveryKnobs", "Recipient"]


class CallbackSink(Protocol):
    """Anything [`FakeKeevx.deliver_into`][keevx_async.testing.FakeKeevx.deliver_into] can hand
    callbacks to (e.g. the SDK client).
    """

    async def feed_callback(self, body: bytes, /, *, url: str) -> object:
        """Take one callback: the exact body bytes and the URL it would be POSTed to."""
        ...


Recipient = CallbackSink | httpx.AsyncClient | None
"""Where a callback goes: handed to a sink, POSTed with a client, or nowhere (a failure)."""


class DeliveryKnobs(Protocol):
    """The knobs delivery reads, live, at each batch and each attempt."""

    delivery_concurrency: int
    redeliveries: int
    redeliver_after: float


class CallbackDeliverer:
    """Delivers callbacks with at most ``knobs.delivery_concurrency`` batches in flight.

    ``recipient()`` is asked before every attempt, so a change of target applies at once;
    ``on_delivered`` and ``on_failed`` hear of every outcome (a duplicate is two
    deliveries, a redelivery one more attempt). Make it inside a running event loop.
    """

    def __init__(
        self,
        knobs: DeliveryKnobs,
        *,
        recipient: Callable[[], Recipient],
        on_delivered: Callable[[FakeTask], None],
        on_failed: Callable[[FakeTask, str], None],
    ) -> None:
        self._knobs = knobs
        self._recipient = recipient
        self._on_delivered = on_delivered
        self._on_failed = on_failed
        self._limiter = anyio.CapacityLimiter(knobs.delivery_concurrency)

    async def deliver_in_order(self, tasks: Sequence[FakeTask]) -> None:
        """Call back ``tasks`` one after another (a ``duplicated`` one twice)."""
        # The knob may have changed since the last batch.
        self._limiter.total_tokens = self._knobs.delivery_concurrency
        async with self._limiter:
            for task in tasks:
                for _ in range(2 if task.duplicated else 1):
                    await self._deliver(task)

    async def _deliver(self, task: FakeTask) -> None:
        body = callback_body(task)
        attempt = 0
        while True:
            try:
                failure = await _send(self._recipient(), task.callback_url or "", body)
            # A receiver's failure is what the fake is for: record it, never crash on it.
            except Exception as exc:  # noqa: BLE001
                failure = f"{type(exc).__name__}: {exc}"
            if failure is None:
                task.callbacks_sent += 1
                self._on_delivered(task)
                return
            self._on_failed(task, failure)
            if attempt >= self._knobs.redeliveries:
                return
            await anyio.sleep(self._knobs.redeliver_after * 2**attempt)
            attempt += 1


async def _send(recipient: Recipient, url: str, body: bytes) -> str | None:
    """Deliver one callback body; the reason it failed, or None."""
    if recipient is None:
        return "no HTTP client for callbacks: the fake is not running"
    if isinstance(recipient, httpx.AsyncClient):
        response = await recipient.post(
            url, content=body, headers={"content-type": "application/json"}
        )
        return None if response.is_success else f"HTTP {response.status_code}"
    await recipient.feed_callback(body, url=url)
    return None
