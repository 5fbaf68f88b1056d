"""The HTTP engine: every call the SDK makes to the service goes through `HTTPEngine.send`.

It owns what all endpoints share: the API headers, the per-attempt timeout, the client's
throttle (``max_per_second`` pace and the 429 pause), the retry policy, and reading a reply
into its envelope or the error it stands for. Endpoints (submits, lookups, later uploads
and video tasks) are a URL and a body plus two facts about the call:

* ``retry_safe``: the call creates nothing billable (a GET, an upload), so any transient
  failure may be retried; a submit (``retry_safe=False``) is retried only when the service
  provably did not act on it, and an ambiguous failure raises with ``maybe_created=True``;
* ``paced``: ``max_per_second`` applies (submits).

The policy itself is two small pure functions, `decide_on_error` and `decide_on_status`,
apart from the loop that applies them (as openai-python keeps ``_should_retry`` apart from
its retry loop): the table in shared/API.md "Retries" is tested against them case by case.
"""

from __future__ import annotations

import enum
import logging
import platform
from typing import TYPE_CHECKING, Final

import anyio
import attrs
import httpx

from ._exceptions import (
    APIError,
    AuthenticationError,
    RateLimitError,
    ServerError,
    TransportError,
)
from ._reconcile import LOOKUPS_IN_FLIGHT
from ._throttle import Throttle, backoff_delay, parse_retry_after
from ._transports import FanoutClient, FanoutTransport
from ._transports.aiohttp import AiohttpTransport
from ._transports.fanout_client import attempt_deadline
from ._transports.pool import OneShotBody
from ._transports.sharded import ShardedTransport
from ._version import __version__
from ._wire import Envelope, WireFormatError, decode_envelope

if TYPE_CHECKING:
    from ._kinds import AnyRequest
    from ._stats import Counters

__all__ = [
    "Action",
    "Decision",
    "HTTPEngine",
    "build_http_client",
    "decide_on_error",
    "decide_on_status",
]

logger = logging.getLogger("keevx_async")

# Exceptions raised before a request left this machine: safe to retry, nothing created.
NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Also never sent, but retrying cannot help: a URL or request this machine cannot send.
UNSENDABLE: Final = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
# Headroom in the pool beyond the submit limit, for lookups running beside full fan-out.
POOL_HEADROOM: Final = LOOKUPS_IN_FLIGHT


class Action(enum.Enum):
    """What the send loop does after one attempt."""

    RETURN = "return"
    """The reply is the answer (2xx): read its envelope."""
    RETRY = "retry"
    """Send again, after ``Decision.wait`` (or after the client's pause)."""
    RAISE = "raise"
    """Give up: raise the error the attempt stands for."""


@attrs.frozen
class Decision:
    """The retry policy's verdict on one attempt.

    Attributes:
        action: return, retry or raise.
        wait: seconds to sleep before the retry (``RETRY`` only; ``0`` when the client's
            pause already makes the retry wait).
        pause: seconds every request of the client must wait from now (a 429, or a 503
            with ``Retry-After``): set whatever the action, since it is a signal to the
            whole client.
        maybe_created: for ``RAISE``: whether the service may have acted on the call.
        error_class: for ``RAISE`` after a status: the error to raise (``None``: the
            class the status maps to).
        note: for ``RAISE``: why, when the status alone does not say it.
    """

    action: Action
    wait: float = 0.0
    pause: float | None = None
    maybe_created: bool = False
    error_class: type[APIError] | None = None
    note: str | None = None


_RETURN: Final = Decision(Action.RETURN)


def decide_on_error(
    error: httpx.TransportError,
    *,
    retry_safe: bool,
    attempt: int,
    max_retries: int,
    backoff: float,
) -> Decision:
    """The verdict on an attempt that raised ``error`` (no reply came).

    ``attempt`` counts the retries made so far; ``backoff`` is the wait a retry would
    take (exponential with jitter, computed by the caller).
    """
    not_sent = isinstance(error, NOT_SENT)
    if (not_sent or retry_safe) and attempt < max_retries:
        return Decision(Action.RETRY, wait=backoff)
    ambiguous = not (retry_safe or not_sent or isinstance(error, UNSENDABLE))
    return Decision(Action.RAISE, maybe_created=ambiguous)


def decide_on_status(
    status: int,
    retry_after: float | None,
    *,
    retry_after_sent: bool,
    retry_safe: bool,
    attempt: int,
    max_retries: int,
    max_retry_wait: float,
    backoff: float,
) -> Decision:
    """The verdict on a reply with HTTP ``status``.

    ``retry_after`` is the ``Retry-After`` header's wait, when it was sent and readable;
    ``retry_after_sent`` whether the header was sent at all. A 429, or a 503 with
    ``Retry-After`` (readable or not), pauses the whole client (the service did not
    act on it, whatever the call). A retry-safe call is retried after any 5xx. A
    call that is not retry-safe and got any other reply but a 2xx raises; a 5xx (or a
    reply that is neither 2xx nor 4xx) is ambiguous there: ``maybe_created``.
    """
    if 200 <= status < 300:
        return _RETURN
    throttled = status == 429 or (status == 503 and retry_after_sent)
    if not (throttled or (retry_safe and status >= 500)):
        ambiguous = not retry_safe and (status >= 500 or status < 400)
        return Decision(Action.RAISE, maybe_created=ambiguous)
    wait = retry_after if retry_after is not None else backoff
    pause = wait if throttled else None
    if retry_after is not None and retry_after > max_retry_wait:
        return Decision(
            Action.RAISE,
            pause=pause,
            error_class=RateLimitError,
            note=f"the service asked to wait {retry_after:g} s, more than "
            f"max_retry_wait={max_retry_wait:g}",
        )
    if attempt >= max_retries:
        return Decision(Action.RAISE, pause=pause)
    # A throttled retry waits in the client's pause, with every other request.
    return Decision(Action.RETRY, wait=0.0 if throttled else wait, pause=pause)


def build_http_client(max_concurrency: int, timeout: httpx.Timeout) -> httpx.AsyncClient:
    """The client's own HTTP client, built for fan-out.

    Sized so a full fan-out never waits for a connection; the transport is picked at the
    first request (aiohttp on asyncio when installed, else sharded httpx pools).
    """
    connections = max_concurrency + POOL_HEADROOM
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return FanoutClient(timeout=timeout, limits=limits, transport=FanoutTransport(limits=limits))


class HTTPEngine:
    """Sends the SDK's calls to the service: headers, timeouts, throttle and retries.

    Args:
        api_key: sent as ``Authorization: Bearer``.
        base_url: the service's base URL, without a trailing slash.
        http: the ``httpx.AsyncClient`` to send through.
        owns_http: whether `aclose` closes ``http``.
        timeout: per attempt.
        throttle: the client's pace and pause.
        max_retries: retries per call.
        max_retry_wait: the longest ``Retry-After`` (or pause) slept through.
        counters: where retries and pauses are counted.
    """

    __slots__ = (
        "_counters",
        "_deadline",
        "_headers",
        "_owns_http",
        "_throttle",
        "_timeout",
        "base_url",
        "http",
        "max_retries",
        "max_retry_wait",
    )

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        http: httpx.AsyncClient,
        owns_http: bool,
        timeout: httpx.Timeout,
        throttle: Throttle,
        max_retries: int,
        max_retry_wait: float,
        counters: Counters,
    ) -> None:
        self.base_url = base_url
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.http = http
        self._owns_http = owns_http
        self._timeout = timeout
        # Each attempt runs in a cancel scope of this many seconds; None once the
        # transport is known to bound the whole attempt itself (the SDK's aiohttp
        # transport does, at no cost), or when a phase of the timeout is unlimited.
        self._deadline = attempt_deadline(timeout)
        self._throttle = throttle
        self._counters = counters
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "User-Agent": (
                f"keevx-async/{__version__} httpx/{httpx.__version__} "
                f"python/{platform.python_version()}"
            ),
            "Accept": "application/json",
            "Content-Type": "application/json",
        }

    def url(self, path: str) -> str:
        """The full URL of an endpoint ``path`` (``/v1/...``).

        Keep the result for a fixed endpoint: the client's HTTP layer reuses what it
        parsed of a URL while the same string object comes back.
        """
        return self.base_url + path

    async def aclose(self) -> None:
        """Close the HTTP client if it is ours (an injected one is left open)."""
        if self._owns_http:
            with anyio.CancelScope(shield=True):
                await self.http.aclose()

    async def send(
        self,
        method: str,
        url: str,
        content: bytes | None,
        *,
        retry_safe: bool,
        paced: bool,
        request: AnyRequest | None = None,
        task_id: str | None = None,
        content_type: str | None = None,
    ) -> httpx.Response:
        """One logical call under the retry policy; returns the final 2xx response.

        ``content_type`` replaces the JSON one (an upload's multipart body).

        Raises:
            APIError: an error status (its subclass by status), or a ``Retry-After``
                longer than ``max_retry_wait``
                ([`RateLimitError`][keevx_async.RateLimitError]).
            TransportError: the exchange failed.
            Both carry ``maybe_created`` as the policy decided it.
        """
        attempt = 0
        headers = self._headers
        if content_type is not None:
            headers = {**headers, "Content-Type": content_type}
        while True:
            self._check_pause(request, task_id)
            await self._throttle.before_attempt(paced=paced)
            try:
                if self._deadline is None:
                    response = await self._attempt(method, url, content, headers)
                else:
                    response = await self._bounded_attempt(method, url, content, headers)
            except anyio.get_cancelled_exc_class():
                if not retry_safe:
                    # Not an error of ours to raise, but the caller cannot see it otherwise.
                    logger.warning(
                        "a submit was cancelled while its request was in flight: the service "
                        "may have created (and billed) tasks for it"
                    )
                raise
            except httpx.TransportError as exc:
                decision = decide_on_error(
                    exc,
                    retry_safe=retry_safe,
                    attempt=attempt,
                    max_retries=self.max_retries,
                    backoff=backoff_delay(attempt),
                )
                if decision.action is Action.RAISE:
                    raise TransportError(
                        f"{method} {url} failed: {describe(exc)}",
                        request=request,
                        task_id=task_id,
                        maybe_created=decision.maybe_created,
                    ) from exc
                attempt += 1
                self._counters.retries += 1
                logger.warning(
                    "retrying %s %s in %.2f s (retry %d of %d): %s",
                    method, url, decision.wait, attempt, self.max_retries, describe(exc),
                )  # fmt: skip
                await anyio.sleep(decision.wait)
                continue
            status = response.status_code
            if 200 <= status < 300:
                return response  # the common case, without building a decision
            retry_after_header = response.headers.get("retry-after")
            retry_after = parse_retry_after(retry_after_header)
            decision = decide_on_status(
                status,
                retry_after,
                retry_after_sent=retry_after_header is not None,
                retry_safe=retry_safe,
                attempt=attempt,
                max_retries=self.max_retries,
                max_retry_wait=self.max_retry_wait,
                backoff=backoff_delay(attempt),
            )
            if decision.pause is not None:
                self._counters.rate_limited += 1
                self._throttle.pause(decision.pause, f"HTTP {status} from {method} {url}")
            if decision.action is Action.RAISE:
                raise status_error(
                    response,
                    request,
                    task_id,
                    maybe_created=decision.maybe_created,
                    retry_after=retry_after,
                    note=decision.note,
                    error_class=decision.error_class,
                )
            attempt += 1
            self._counters.retries += 1
            if decision.wait:
                await anyio.sleep(decision.wait)
            logger.warning(
                "retrying %s %s after HTTP %d (retry %d of %d)",
                method, url, status, attempt, self.max_retries,
            )  # fmt: skip

    async def _attempt(
        self, method: str, url: str, content: bytes | None, headers: dict[str, str]
    ) -> httpx.Response:
        """One attempt through ``http``; its body sent without an async generator (see
        `OneShotBody`) whoever built the client."""
        http = self.http
        if type(http) is FanoutClient:  # builds its requests with one already
            return await http.request(
                method, url, content=content, headers=headers, timeout=self._timeout
            )
        request = http.build_request(
            method, url, content=content, headers=headers, timeout=self._timeout
        )
        if content:
            request.stream = OneShotBody(content)
        return await http.send(request)

    async def _bounded_attempt(
        self, method: str, url: str, content: bytes | None, headers: dict[str, str]
    ) -> httpx.Response:
        """One attempt within ``_deadline`` seconds, reply body included (httpx bounds
        each phase and each read, not the whole: a trickled reply would never time out)."""
        deadline = self._deadline
        assert deadline is not None
        with anyio.move_on_after(deadline) as scope:
            try:
                return await self._attempt(method, url, content, headers)
            finally:
                if _keeps_deadline(self.http):  # known once the first request chose it
                    self._deadline = None
        assert scope.cancelled_caught  # pragma: no branch (the only way here)
        # Ambiguous like any read timeout: the request may have reached the service.
        raise httpx.ReadTimeout(f"the attempt took longer than {deadline:g} s (timeout)")

    def _check_pause(self, request: AnyRequest | None, task_id: str | None) -> None:
        paused_for = self._throttle.paused_for
        if paused_for > self.max_retry_wait:
            # The service asked the whole client to wait longer than we may sleep.
            raise RateLimitError(
                f"not sent: the client is paused for another {paused_for:.3g} s by the "
                f"service's Retry-After, more than max_retry_wait={self.max_retry_wait:g}",
                request=request,
                task_id=task_id,
                retry_after=paused_for,
            )


def read_envelope(
    response: httpx.Response,
    *,
    request: AnyRequest | None = None,
    task_id: str | None = None,
    maybe_created: bool,
) -> Envelope:
    """The envelope of a 2xx reply, or the error it stands for.

    Args:
        maybe_created: what an unreadable reply means (``True`` for a submit: the
            service may have created tasks whose IDs we cannot read).

    Raises:
        APIError: the body is not an envelope, or its ``code`` is not 0
            ([`AuthenticationError`][keevx_async.AuthenticationError] for 401/403).
    """
    try:
        envelope = decode_envelope(response.content, "reply")
    except WireFormatError as exc:
        raise APIError(
            f"unreadable reply: {exc}",
            status_code=response.status_code,
            request=request,
            task_id=task_id,
            response=response,
            maybe_created=maybe_created,
        ) from None
    if envelope.code != 0:
        error_class = AuthenticationError if envelope.code in (401, 403) else APIError
        raise error_class(
            envelope.msg or "the service refused the request",
            code=envelope.code,
            status_code=response.status_code,
            request=request,
            task_id=task_id,
            response=response,
        )
    return envelope


def status_error(
    response: httpx.Response,
    request: AnyRequest | None,
    task_id: str | None,
    *,
    maybe_created: bool,
    retry_after: float | None = None,
    note: str | None = None,
    error_class: type[APIError] | None = None,
) -> APIError:
    """The error an HTTP error status stands for, with the body's code and message."""
    status = response.status_code
    code, msg = _code_and_msg(response)
    if note:
        msg = f"{msg}; {note}"
    if error_class is None:
        error_class = _error_class_of(status)
    return error_class(
        msg,
        code=code,
        status_code=status,
        request=request,
        task_id=task_id,
        response=response,
        maybe_created=maybe_created,
        retry_after=retry_after,
    )


def _error_class_of(status: int) -> type[APIError]:
    if status == 429:
        return RateLimitError
    if status in (401, 403):
        return AuthenticationError
    if status >= 500:
        return ServerError
    return APIError


def _code_and_msg(response: httpx.Response) -> tuple[int, str]:
    """The business code and message of an error reply, falling back to the HTTP status."""
    status = response.status_code
    fallback = f"HTTP {status} {response.reason_phrase}".rstrip()
    try:
        envelope = decode_envelope(response.content, "error reply")
    except WireFormatError:
        return status, fallback
    return envelope.code, envelope.msg or fallback


def describe(exc: BaseException) -> str:
    """``ExceptionName: message`` (just the name when the message is empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _keeps_deadline(http: httpx.AsyncClient) -> bool:
    """Whether ``http`` sends through a transport of the SDK's that bounds a whole attempt
    itself (aiohttp's total timeout; the sharded pools' bounded streams): known once a
    request has chosen the transport."""
    transport = getattr(http, "_direct", None)
    chosen = transport.chosen if isinstance(transport, FanoutTransport) else None
    return isinstance(http, FanoutClient) and (
        isinstance(chosen, AiohttpTransport)
        or (isinstance(chosen, ShardedTransport) and chosen.keeps_deadline)
    )
