"""The retry policy (_http.py), case by case: the table of shared/API.md "Retries".

Each row is one attempt's outcome and the verdict the policy must give. The send loop
around it is exercised end to end against FakeKeevx in test_client.py and
test_throttle.py; here the decisions are pinned without any I/O.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import keevx_async as kx
from keevx_async._http import Action, Decision, decide_on_error, decide_on_status

BACKOFF = 0.25  # what the caller computed for this attempt
MAX_RETRIES = 3
MAX_RETRY_WAIT = 60.0

SUBMIT = {"retry_safe": False}  # a POST that creates billable tasks
LOOKUP = {"retry_safe": True}  # a GET (or an upload): nothing billable is created

_REQUEST = httpx.Request("POST", "https://api.keevx.test/v1/image_generate")


def _error(cls: type[httpx.TransportError]) -> httpx.TransportError:
    return cls("boom", request=_REQUEST)


RETRY_AFTER_BACKOFF = Decision(Action.RETRY, wait=BACKOFF)


@pytest.mark.parametrize(
    ("call", "error", "attempt", "expected"),
    [
        # Never sent: retried, also for a submit; after the last retry, nothing created.
        pytest.param(SUBMIT, httpx.ConnectError, 0, RETRY_AFTER_BACKOFF, id="submit-refused"),
        pytest.param(SUBMIT, httpx.ConnectTimeout, 1, RETRY_AFTER_BACKOFF, id="submit-conn-to"),
        pytest.param(SUBMIT, httpx.PoolTimeout, 2, RETRY_AFTER_BACKOFF, id="submit-pool-to"),
        pytest.param(
            SUBMIT,
            httpx.ConnectError,
            MAX_RETRIES,
            Decision(Action.RAISE),
            id="submit-refused-last",
        ),
        # Maybe acted on: a submit is never retried, and says it may have created tasks.
        pytest.param(
            SUBMIT,
            httpx.ReadTimeout,
            0,
            Decision(Action.RAISE, maybe_created=True),
            id="submit-read-timeout",
        ),
        pytest.param(
            SUBMIT,
            httpx.RemoteProtocolError,
            0,
            Decision(Action.RAISE, maybe_created=True),
            id="submit-disconnected",
        ),
        pytest.param(
            SUBMIT,
            httpx.WriteError,
            0,
            Decision(Action.RAISE, maybe_created=True),
            id="submit-write-error",
        ),
        pytest.param(
            SUBMIT, httpx.ReadError, 0, Decision(Action.RAISE, maybe_created=True), id="submit-read"
        ),
        # Never sendable: no retry can help, and nothing left this machine.
        pytest.param(
            SUBMIT, httpx.UnsupportedProtocol, 0, Decision(Action.RAISE), id="submit-bad-scheme"
        ),
        pytest.param(
            SUBMIT, httpx.LocalProtocolError, 0, Decision(Action.RAISE), id="submit-local-proto"
        ),
        # A lookup is safe to retry on any transient failure.
        pytest.param(LOOKUP, httpx.ReadTimeout, 0, RETRY_AFTER_BACKOFF, id="lookup-read-to"),
        pytest.param(LOOKUP, httpx.ConnectError, 2, RETRY_AFTER_BACKOFF, id="lookup-refused"),
        pytest.param(
            LOOKUP, httpx.ReadTimeout, MAX_RETRIES, Decision(Action.RAISE), id="lookup-read-to-last"
        ),
    ],
)
def test_decision_after_a_transport_error(
    call: dict[str, Any], error: type[httpx.TransportError], attempt: int, expected: Decision
) -> None:
    decision = decide_on_error(
        _error(error), attempt=attempt, max_retries=MAX_RETRIES, backoff=BACKOFF, **call
    )
    assert decision == expected


TOO_LONG = "the service asked to wait 120 s, more than max_retry_wait=60"


@pytest.mark.parametrize(
    ("call", "status", "retry_after", "attempt", "expected"),
    [
        pytest.param(SUBMIT, 200, None, 0, Decision(Action.RETURN), id="submit-200"),
        pytest.param(LOOKUP, 204, None, 0, Decision(Action.RETURN), id="lookup-204"),
        # 429: the whole client pauses (Retry-After, else the backoff); the retry waits
        # in that pause, not in a sleep of its own.
        pytest.param(
            SUBMIT, 429, None, 0, Decision(Action.RETRY, pause=BACKOFF), id="submit-429-no-header"
        ),
        pytest.param(
            SUBMIT, 429, 2.0, 1, Decision(Action.RETRY, pause=2.0), id="submit-429-retry-after"
        ),
        pytest.param(
            SUBMIT,
            429,
            120.0,
            0,
            Decision(Action.RAISE, pause=120.0, error_class=kx.RateLimitError, note=TOO_LONG),
            id="submit-429-too-long",
        ),
        pytest.param(
            SUBMIT, 429, 2.0, MAX_RETRIES, Decision(Action.RAISE, pause=2.0), id="submit-429-last"
        ),
        # 503 with Retry-After: the service did not act on it; the same as a 429.
        pytest.param(
            SUBMIT, 503, 1.0, 0, Decision(Action.RETRY, pause=1.0), id="submit-503-retry-after"
        ),
        # Ambiguous: the body was sent and the service failed; never retried for a submit.
        pytest.param(
            SUBMIT, 503, None, 0, Decision(Action.RAISE, maybe_created=True), id="submit-503"
        ),
        pytest.param(
            SUBMIT, 500, None, 0, Decision(Action.RAISE, maybe_created=True), id="submit-500"
        ),
        pytest.param(
            SUBMIT, 502, None, 0, Decision(Action.RAISE, maybe_created=True), id="submit-502"
        ),
        pytest.param(
            SUBMIT, 504, 5.0, 0, Decision(Action.RAISE, maybe_created=True), id="submit-504"
        ),
        pytest.param(
            SUBMIT, 302, None, 0, Decision(Action.RAISE, maybe_created=True), id="submit-302"
        ),
        # Refusals: nothing created.
        pytest.param(SUBMIT, 400, None, 0, Decision(Action.RAISE), id="submit-400"),
        pytest.param(SUBMIT, 401, None, 0, Decision(Action.RAISE), id="submit-401"),
        pytest.param(SUBMIT, 403, None, 0, Decision(Action.RAISE), id="submit-403"),
        pytest.param(SUBMIT, 404, None, 0, Decision(Action.RAISE), id="submit-404"),
        # A lookup retries any 5xx, sleeping Retry-After or the backoff.
        pytest.param(LOOKUP, 500, None, 0, Decision(Action.RETRY, wait=BACKOFF), id="lookup-500"),
        pytest.param(LOOKUP, 502, 3.0, 1, Decision(Action.RETRY, wait=3.0), id="lookup-502-ra"),
        pytest.param(LOOKUP, 503, None, 2, Decision(Action.RETRY, wait=BACKOFF), id="lookup-503"),
        pytest.param(LOOKUP, 500, None, MAX_RETRIES, Decision(Action.RAISE), id="lookup-500-last"),
        pytest.param(
            LOOKUP,
            500,
            120.0,
            0,
            Decision(Action.RAISE, error_class=kx.RateLimitError, note=TOO_LONG),
            id="lookup-500-too-long",
        ),
        pytest.param(LOOKUP, 404, None, 0, Decision(Action.RAISE), id="lookup-404"),
        pytest.param(LOOKUP, 429, None, 0, Decision(Action.RETRY, pause=BACKOFF), id="lookup-429"),
        pytest.param(
            LOOKUP,
            503,
            120.0,
            0,
            Decision(Action.RAISE, pause=120.0, error_class=kx.RateLimitError, note=TOO_LONG),
            id="lookup-503-too-long",
        ),
    ],
)
def test_decision_after_a_status(
    call: dict[str, Any],
    status: int,
    retry_after: float | None,
    attempt: int,
    expected: Decision,
) -> None:
    decision = decide_on_status(
        status,
        retry_after,
        retry_after_sent=retry_after is not None,
        attempt=attempt,
        max_retries=MAX_RETRIES,
        max_retry_wait=MAX_RETRY_WAIT,
        backoff=BACKOFF,
        **call,
    )
    assert decision == expected


def test_a_503_with_an_unreadable_retry_after_still_pauses_the_client() -> None:
    # The header says the service did not act on it, even when its value is garbage.
    decision = decide_on_status(
        503,
        None,
        retry_after_sent=True,
        retry_safe=False,
        attempt=0,
        max_retries=MAX_RETRIES,
        max_retry_wait=MAX_RETRY_WAIT,
        backoff=BACKOFF,
    )
    assert decision == Decision(Action.RETRY, pause=BACKOFF)
