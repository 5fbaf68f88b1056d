"""Scripted HTTP faults: error replies queued by ``FakeKeevx.inject``, taken in order per route.

The service's hard answers (a 429 with ``Retry-After``, a 5xx, the ambiguous 5xx after the
tasks were created) are rare in production and must be exact in a test: "the next two
submits get 429" and nothing else. A queue of faults, each good for a number of requests
to one route, says precisely that, and keeps the request handlers free of fault logic.
"""

from __future__ import annotations

from typing import Literal

import attrs

from keevx_async.testing._rules import Reply, error_reply, format_retry_after, upload_error

__all__ = ["Fault", "FaultScript", "Route"]

Route = Literal["submit", "get", "upload", "file"]
"""The endpoint a fault applies to (``"file"``: the file host, every file it serves)."""
ROUTES = ("submit", "get", "upload", "file")


@attrs.define
class Fault:
    """An error reply for the next ``times`` requests to ``route``."""

    status: int
    times: int
    retry_after: float | str | None
    create: bool
    """Submit only: create the request's tasks although the reply is the error."""
    route: Route

    def reply(self) -> Reply:
        """The fault as the service would send it (an upload in its own envelope)."""
        message = f"injected fault: HTTP {self.status}"
        reply = (
            upload_error(self.status, message)
            if self.route == "upload"
            else error_reply(self.status, message)
        )
        if self.retry_after is not None:
            reply.headers.append(
                (b"retry-after", format_retry_after(self.retry_after).encode("latin-1"))
            )
        return reply


class FaultScript:
    """The queued faults, consumed in order, one request at a time."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(
        self,
        status: int,
        *,
        times: int,
        retry_after: float | str | None,
        create: bool,
        route: Route,
    ) -> None:
        """Queue a fault; ``ValueError`` if it could never apply."""
        if route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(map(repr, ROUTES))}, not {route!r}")
        if create and route != "submit":
            raise ValueError("create=True only applies to route='submit'")
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        self._faults.append(Fault(status, times, retry_after, create, route))

    def take(self, route: Route) -> Fault | None:
        """The fault for this request to ``route``, if one is queued (using one of its
        ``times``)."""
        for fault in self._faults:
            if fault.route == route:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                return fault
        return None
