"""Every error the SDK raises, in one tree.

```
KeevxError
├── InvalidRequestError          (also a ValueError) a request broke a rule before sending
├── APIError                     the service answered with an error
│   ├── AuthenticationError      HTTP 401 / 403
│   ├── RateLimitError           HTTP 429, or a Retry-After longer than max_retry_wait
│   └── ServerError              HTTP 5xx
├── TransportError               (also a ConnectionError) the HTTP exchange itself failed
├── TaskFailedError              a task finished with a status other than SUCCEEDED
├── TaskTimeoutError             a task did not finish within the wait's timeout
├── ClientClosedError            the client closed before the task finished
├── TaskPendingError             ``Task.result()`` asked of a task that is not done
├── CallbackError                (also a ValueError) a callback body is malformed
│   └── CallbackAuthError        a callback without a valid token for its task
├── RouterError                  (also a ConnectionError) the callback router's store failed
├── UnknownTaskError             (also a LookupError) ``client.task()`` of a task nobody knows
├── DownloadError                a result file could not be downloaded and saved
├── UnknownOutcomeError          a journaled request whose submit outcome is unknown
└── JournalError                 a run's journal could not be opened, read or written
    └── JournalLockedError       another runner holds the run's journal
```

Errors raised by ``submit`` carry ``maybe_created``: ``True`` when the service may have
created (and billed) tasks although no task IDs came back, so the caller knows a blind
resubmit could pay twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

    from ._kinds import AnyRequest, AnyResult

__all__ = [
    "APIError",
    "AuthenticationError",
    "CallbackAuthError",
    "CallbackError",
    "DownloadError",
    "InvalidRequestError",
    "JournalError",
    "JournalLockedError",
    "KeevxError",
    "RateLimitError",
    "RouterError",
    "ServerError",
    "TaskFailedError",
    "TaskPendingError",
    "TaskTimeoutError",
    "TransportError",
    "UnknownOutcomeError",
    "UnknownTaskError",
]


class KeevxError(Exception):
    """Base class of every error raised by keevx_async.

    ``maybe_created`` is ``False`` here; the submit errors that could hide billed tasks
    ([`APIError`][keevx_async.APIError], [`TransportError`][keevx_async.TransportError]) set it per
    instance.
    """

    maybe_created: bool = False


class InvalidRequestError(KeevxError, ValueError):
    """A request broke one of the service's rules; nothing was sent.

    ``field`` names the offending field (``"prompt"``, ``"reference_images[2]"``, ...).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class APIError(KeevxError):
    """The service answered with an error: an HTTP error status or a business ``code != 0``.

    Attributes:
        code: the service's business code (``100001`` parameter error, ``110002`` task not
            found, ...) or the HTTP status when the reply had no readable code.
        msg: the service's own explanation.
        status_code: the HTTP status of the reply (``200`` for business errors).
        request: the [`ImageRequest`][keevx_async.ImageRequest] that was being submitted, if any.
        task_id: the task being looked up, for errors of ``retrieve``.
        response: the ``httpx.Response``, when there was one.
        maybe_created: whether the service may have created tasks for the request.
        retry_after: the wait in seconds the service asked for (``Retry-After``), if any.
    """

    def __init__(
        self,
        msg: str,
        *,
        code: int | None = None,
        status_code: int | None = None,
        request: AnyRequest | None = None,
        task_id: str | None = None,
        response: httpx.Response | None = None,
        maybe_created: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.msg = msg
        self.retry_after = retry_after
        self.code = code
        self.status_code = status_code
        self.request = request
        self.task_id = task_id
        self.response = response
        self.maybe_created = maybe_created
        super().__init__(self._sentence())

    def _sentence(self) -> str:
        parts = [self.msg]
        details = []
        if self.code is not None:
            details.append(f"code {self.code}")
        if self.status_code is not None:
            details.append(f"HTTP {self.status_code}")
        if self.task_id is not None:
            details.append(f"task {self.task_id}")
        if details:
            parts.append(f"({', '.join(details)})")
        if self.maybe_created:
            parts.append(
                "- the service may have created (and billed) tasks for this request; "
                "check before resubmitting"
            )
        return " ".join(parts)


class AuthenticationError(APIError):
    """The API key is missing, wrong or not allowed (HTTP 401/403, or no key at all)."""


class RateLimitError(APIError):
    """The service is rate limiting this client (HTTP 429), or asked for a longer wait
    (``Retry-After``) than ``max_retry_wait`` allows.

    ``retry_after`` is the wait asked for, in seconds, when the service said one. Raised
    once retries are spent, or at once when the wait exceeds ``max_retry_wait``: then the
    whole client stays paused for that wait, and its other submits raise this error too
    instead of being sent.
    """


class ServerError(APIError):
    """The service failed (HTTP 5xx)."""


class TransportError(KeevxError, ConnectionError):
    """The HTTP exchange failed: connection refused, timeout, broken connection.

    ``__cause__`` holds the underlying ``httpx`` exception. ``maybe_created`` is ``True``
    when the request body may have reached the service (a read timeout after sending).
    """

    def __init__(
        self,
        message: str,
        *,
        request: AnyRequest | None = None,
        task_id: str | None = None,
        maybe_created: bool = False,
    ) -> None:
        self.request = request
        self.task_id = task_id
        self.maybe_created = maybe_created
        if maybe_created:
            message += (
                " - the service may have created (and billed) tasks for this request; "
                "check before resubmitting"
            )
        super().__init__(message)


class TaskFailedError(KeevxError):
    """A task finished without an image.

    Attributes:
        task_id: the task's ID.
        status: the finished status the service reported (``"FAILED"`` or another one).
        error_message: the service's explanation, possibly empty.
        request: the [`ImageRequest`][keevx_async.ImageRequest] that created the task.
    """

    def __init__(
        self,
        *,
        task_id: str,
        status: str,
        error_message: str,
        request: AnyRequest | None = None,
    ) -> None:
        self.task_id = task_id
        self.status = status
        self.error_message = error_message
        self.request = request
        reason = error_message or "no error message given"
        super().__init__(f"task {task_id} finished with status {status}: {reason}")


class TaskTimeoutError(KeevxError, TimeoutError):
    """A task did not finish within the wait's timeout.

    After ``task.wait(timeout)`` the task is unchanged: a later callback still resolves
    it, and a later ``await task`` can still get its result. A batch or ``generate`` that
    times out gives the task up instead (its late callback changes nothing); its
    ``task_id`` is here to look it up with ``retrieve``.
    """

    def __init__(
        self, *, task_id: str | None, timeout: float, request: AnyRequest | None = None
    ) -> None:
        self.task_id = task_id
        self.timeout = timeout
        self.request = request
        super().__init__(f"task {task_id} did not finish within {timeout:g} seconds")


class ClientClosedError(KeevxError):
    """The client closed before this task finished, so nothing will finish it here.

    Every unfinished task of a client ends with this error when the client closes: none
    waits forever. The task itself may still finish at the service: re-attach to it with
    ``client.task(task_id, request=...)`` on an open client (its callback, or a lookup,
    then finishes it), or look it up with ``retrieve``.

    A call of the synchronous [`Keevx`][keevx_async.Keevx] still running when the client
    is closed from another thread ends with it too, with ``task_id`` ``None``.
    """

    def __init__(self, *, task_id: str | None, request: AnyRequest | None = None) -> None:
        self.task_id = task_id
        self.request = request
        if task_id is None:
            message = (
                "the client was closed while this call was running; what it had "
                "submitted may still run at the service"
            )
        else:
            message = (
                f"the client closed before task {task_id} finished; to get its result, "
                f"re-attach with client.task({task_id!r}, request=...) on an open client"
            )
        super().__init__(message)


class TaskPendingError(KeevxError):
    """``Task.result()`` or ``Task.exception()`` was called before the task finished."""

    def __init__(self, task_id: str | None) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} has not finished yet; await it first")


class CallbackError(KeevxError, ValueError):
    """A callback body could not be understood. Nothing was changed.

    ``field`` names the offending field (``"data.task_id"``), when one is to blame.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CallbackAuthError(CallbackError):
    """A callback did not carry a valid token for its task. Nothing was changed."""


class RouterError(KeevxError, ConnectionError):
    """The callback router could not reach its store (Redis) to record or read a task.

    A callback that cannot be recorded is refused (``callback_app`` answers 503 with
    ``Retry-After``) so that the service delivers it again: it is never answered 200 and
    then lost. Your own callback route should do the same.
    """


class UnknownTaskError(KeevxError, LookupError):
    """``client.task(task_id)`` of a task that neither this client nor its router knows.

    Pass ``request=`` to attach to it anyway (its result then arrives by callback or by
    lookup).
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(
            f"task {task_id} is not waited for here and the router has no record of it: "
            "pass request= to attach to it anyway"
        )


class DownloadError(KeevxError):
    """A result file could not be downloaded and saved; nothing was left under its name.

    Raised by [`AsyncKeevx.download`][keevx_async.AsyncKeevx.download] once retries
    are spent (or at once for what a retry cannot mend: a 403/404, a wrong
    ``Content-Type``, a file that cannot be written). In a batch with ``download_to=``,
    it is the error of the task whose file failed, and ``result`` keeps the task's
    [`ImageResult`][keevx_async.ImageResult], so the image URL is not lost.

    Attributes:
        url: the URL that was fetched.
        status_code: the HTTP status of the last reply, ``None`` when none came.
        result: the result whose file this was, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status_code: int | None = None,
        result: AnyResult | None = None,
    ) -> None:
        self.url = url
        self.status_code = status_code
        self.result = result
        super().__init__(message)


class UnknownOutcomeError(KeevxError):
    """A journaled request whose submit may have created (and billed) tasks, although no
    task ID was recorded: the run crashed after it was sent, or the submit failed with
    ``maybe_created=True``.

    A resumed run does not send such a request again (that could pay twice): it reports
    it as a task with ``task_id=None`` and this error, unless the batch was given
    ``resubmit_unknown=True``. ``maybe_created`` is always ``True``.

    Attributes:
        request: the request whose outcome is unknown.
        identity: the request's identity in the journal.
    """

    maybe_created = True

    def __init__(self, *, request: AnyRequest, identity: str) -> None:
        self.request = request
        self.identity = identity
        super().__init__(
            f"the submit of request {identity} may have created tasks, but no task ID was "
            "recorded (a crash after it was sent, or an ambiguous failure): it is not sent "
            "again; pass resubmit_unknown=True to send it anyway (and maybe pay twice)"
        )


class JournalError(KeevxError):
    """A run's journal could not be opened, read or written.

    The message names the journal (its file, or its run) and the cause. Within a batch
    a journal that cannot be written stops the run: nothing may be reported done that
    a crash could lose. ``callback_app`` answers a callback it could not record with
    503, so that the service delivers it again.

    Attributes:
        journal: the journal's file path or run name.
    """

    def __init__(self, message: str, *, journal: str) -> None:
        self.journal = journal
        super().__init__(message)


class JournalLockedError(JournalError):
    """Another runner holds the run's journal: one runner per run at a time."""
