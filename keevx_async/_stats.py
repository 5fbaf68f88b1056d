"""What a client has done, counted in one place.

Every part of a client (the HTTP engine, the callback intake, the registry, the
reconciler) counts into the same `Counters`; ``client.stats`` copies them, with the gauges
read at that moment, into a frozen `ClientStats`.
"""

from __future__ import annotations

import attrs

__all__ = ["ClientStats", "Counters"]


@attrs.frozen
class ClientStats:
    """A snapshot of what a client has done (``client.stats``), for operators and tests.

    Attributes:
        submitted: requests accepted by the service (successful submits).
        submit_errors: submits that raised.
        retries: HTTP attempts repeated under the retry policy (submits and lookups).
        rate_limited: replies that paused the whole client (429, or 503 with
            ``Retry-After``).
        tasks_created: task IDs received.
        resolved_by_callback: tasks finished by a callback.
        resolved_by_lookup: tasks finished by ``retrieve``.
        lookups: GET requests answered (``retrieve`` calls that returned, the
            sweeper's included).
        lookup_errors: lookups of overdue tasks that failed (retried later).
        overdue_scheduled: planned lookups of tasks whose callback may still come (a
            submission's tasks share one entry until their first lookup).
        callbacks_rejected: callbacks refused for a missing, invalid or foreign token.
        callbacks_malformed: callbacks refused for a malformed body.
        callbacks_buffered: early callbacks kept for a task not registered yet.
        callbacks_duplicate: callbacks for a task already finished (no change).
        callbacks_evicted: early callbacks dropped (buffer full or too old).
        callbacks_unclaimed: early callbacks dropped because no task of this process
            claimed them in ``early_callback_max_age`` (callbacks of another process
            or deployment; see Troubleshooting).
        callbacks_wrong_secret: callbacks refused whose token this SDK issued, but with
            another secret (workers not sharing ``KEEVX_CALLBACK_SECRET``).
        callbacks_missed: tasks sent with a callback URL that a lookup finished, their
            callback not having come (is the callback URL reachable?).
        callbacks_forwarded: callbacks for tasks this client does not wait for,
            recorded by the router for the process that does (or will).
        router_errors: callbacks refused (503) because the router could not record
            them.
        pending: tasks registered and not finished now.
        buffered: early callbacks held now.
    """

    submitted: int
    submit_errors: int
    retries: int
    rate_limited: int
    tasks_created: int
    resolved_by_callback: int
    resolved_by_lookup: int
    lookups: int
    lookup_errors: int
    overdue_scheduled: int
    callbacks_rejected: int
    callbacks_malformed: int
    callbacks_buffered: int
    callbacks_duplicate: int
    callbacks_evicted: int
    callbacks_unclaimed: int
    callbacks_wrong_secret: int
    callbacks_missed: int
    callbacks_forwarded: int
    router_errors: int
    pending: int
    buffered: int


@attrs.define
class Counters:
    """The running counts behind `ClientStats` (every field but the gauges ``pending``,
    ``buffered`` and ``overdue_scheduled``), shared by the parts of one client; each part
    increments its own fields."""

    submitted: int = 0
    submit_errors: int = 0
    retries: int = 0
    rate_limited: int = 0
    tasks_created: int = 0
    resolved_by_callback: int = 0
    resolved_by_lookup: int = 0
    lookups: int = 0
    lookup_errors: int = 0
    callbacks_rejected: int = 0
    callbacks_malformed: int = 0
    callbacks_buffered: int = 0
    callbacks_duplicate: int = 0
    callbacks_evicted: int = 0
    callbacks_unclaimed: int = 0
    callbacks_wrong_secret: int = 0
    callbacks_missed: int = 0
    callbacks_forwarded: int = 0
    router_errors: int = 0

    def snapshot(self, *, pending: int, buffered: int, overdue_scheduled: int) -> ClientStats:
        """These counts with the gauges read now, frozen."""
        return ClientStats(
            **attrs.asdict(self),
            pending=pending,
            buffered=buffered,
            overdue_scheduled=overdue_scheduled,
        )
