"""Durable runs: a journal records what a batch sent and what came back.

`Journal` is the small interface both backends share (`SQLiteJournal`,
`PostgresJournal`): the async side (group commit, waiting for durability) lives here,
each backend brings the few blocking calls its database needs, run on a worker thread
one at a time (``anyio.to_thread`` under one ``CapacityLimiter``), so asyncio and trio
share one code path.

Writes are queued and committed by a single writer task, one transaction per group:
whatever was queued while the previous group committed goes into the next one. A
caller that must not go on before its record is durable (a submit about to be sent, a
result about to be answered 200 or yielded) waits for its group; the rest is written
behind.

`JournalRun` is the run logic a batch uses: the request identities, the state loaded
at the start, the records, the callback secret kept in the journal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import attrs

from ._exceptions import InvalidRequestError, JournalError, TaskFailedError
from ._kinds import kind_of
from ._models import FINISHED_OK, is_local, make_callback_payload

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anyio.abc import TaskStatus
    from typing_extensions import Self

    from ._kinds import AnyRequest, AnyResult
    from ._task import Task

__all__ = [
    "REFUSED",
    "SENDING",
    "SUBMITTED",
    "UNKNOWN",
    "Journal",
    "JournalResult",
    "JournalRun",
    "as_journal",
]

logger = logging.getLogger("keevx_async")

SENDING: Final = "sending"
"""Recorded before the submit is sent: its outcome is unknown until the next state."""
SUBMITTED: Final = "submitted"
"""The service replied with task IDs (recorded with them)."""
REFUSED: Final = "refused"
"""The submit failed and created nothing (``maybe_created=False``): sent again on resume."""
UNKNOWN: Final = "unknown"
"""The submit failed with ``maybe_created=True``: never sent again unless asked."""

STATES: Final = (SENDING, SUBMITTED, REFUSED, UNKNOWN)

_T = TypeVar("_T")

# A record, as the writer hands it to a backend (one transaction per list of them):
# ("sending", identity, custom_id, body, position)
# ("state", identity, state)
# ("submitted", identity, submission_id, task_ids_json)
# ("result", task_id, identity, index, status, url, error_message, task_type, raw)
# ("download", task_id, path)
# ("meta", key, value)
Record = tuple[Any, ...]


@attrs.frozen
class JournalResult:
    """One finished task as its journal recorded it (see `Journal.results`).

    Attributes:
        task_id: the service's task ID.
        identity: the identity of its request in the run (its ``custom_id``, else a
            digest of its content and its occurrence number).
        custom_id: the request's ``custom_id``, if it had one.
        request: the request's submit body as recorded (without ``callback_url``; local
            files by their SHA-256).
        index: the task's position among its request's task IDs.
        status: ``"SUCCEEDED"``, or the status it failed with.
        url: the result file's URL, an image's or a video's (empty for a failure).
        error_message: why it failed (empty for a success).
        task_type: the callback's ``task_type``.
        raw: the callback's (or lookup's) ``data`` object.
        path: the file it was saved to by ``download_to``, if it was.
    """

    task_id: str
    identity: str
    custom_id: str | None
    request: Mapping[str, Any] = attrs.field(repr=False)
    index: int
    status: str
    url: str
    error_message: str
    task_type: str
    raw: Mapping[str, Any] = attrs.field(repr=False)
    path: Path | None

    @property
    def succeeded(self) -> bool:
        """Whether the task produced an image."""
        return self.status == FINISHED_OK


@attrs.define(slots=True)
class RequestEntry:
    """A request's record, as a run loads it at its start."""

    state: str
    submission_id: str | None
    task_ids: tuple[str, ...]


@attrs.define(slots=True)
class StoredResult:
    """A task's recorded result, as a run loads it at its start."""

    index: int
    status: str
    url: str
    error_message: str
    task_type: str
    raw: str
    path: str | None


class _Group:
    """The records committed in one transaction, and who waits for them."""

    __slots__ = ("callbacks", "error", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: JournalError | None = None
        self.callbacks: list[tuple[Callable[[Any, JournalError | None], None], Any]] = []

    def then(self, callback: Callable[[_T, JournalError | None], None], arg: _T) -> None:
        """Call ``callback(arg, error)`` once the group committed (or failed)."""
        self.callbacks.append((callback, arg))

    def finish(self, error: JournalError | None) -> None:
        self.error = error
        self.event.set()
        for callback, arg in self.callbacks:
            callback(arg, error)
        self.callbacks.clear()

    async def wait(self) -> None:
        """Wait until the group is durable.

        Raises:
            JournalError: it could not be written.
        """
        await self.event.wait()
        if self.error is not None:
            raise self.error

    async def wait_then(self, value: _T) -> _T:
        """Wait until the group is durable, then ``value``."""
        await self.wait()
        return value


class Journal:
    """One run's durable record: what was sent, what came back, what was saved.

    The interface both backends share; use [`SQLiteJournal`][keevx_async.SQLiteJournal]
    (a path given to ``batch(..., journal=...)`` means one) or
    [`PostgresJournal`][keevx_async.PostgresJournal]. A batch opens the journal on entry
    (taking its run's lock: one runner at a time) and closes it on exit, unless it was
    opened already (``async with journal:``).

    Reading works at any time, also while another process runs the batch:

    ```python
    journal = kx.SQLiteJournal("run.db")
    print(await journal.summary())  # {'sending': 0, 'submitted': 19990, ...}
    async for result in journal.results():
        print(result.custom_id, result.task_id, result.url)
    ```
    """

    def __init__(self) -> None:
        self._limiter = anyio.CapacityLimiter(1)
        self._queue: list[Record] = []
        self._group = _Group()
        self._wakeup: anyio.Event | None = None
        self._writing = False
        self._writer_running = False
        self._idle: anyio.Event | None = None
        self._opened = False

    _database_errors: tuple[type[Exception], ...] = ()
    """The errors of the backend's database driver, turned into `JournalError`."""

    @property
    def name(self) -> str:
        """What the journal is, for messages: its file, or its run."""
        raise NotImplementedError

    def _error(self, doing: str, exc: BaseException) -> JournalError:
        cause = str(exc).strip() or type(exc).__name__
        return JournalError(f"journal {self.name}: cannot {doing}: {cause}", journal=self.name)

    # --- the backend's blocking calls (on a worker thread, one at a time) ---------------

    def _open_sync(self, *, lock: bool) -> None:
        raise NotImplementedError

    def _close_sync(self) -> None:
        raise NotImplementedError

    def _write_sync(self, records: list[Record]) -> None:
        raise NotImplementedError

    def _load_sync(self) -> tuple[dict[str, RequestEntry], dict[str, StoredResult]]:
        raise NotImplementedError

    def _meta_sync(self, key: str) -> str | None:
        raise NotImplementedError

    def _summary_sync(self) -> dict[str, int]:
        raise NotImplementedError

    def _results_sync(self, after: Any, limit: int) -> list[tuple[Any, ...]]:
        """A page of results after the cursor ``after`` (``None``: from the start), each
        row its cursor value first, then the fields of a `JournalResult`."""
        raise NotImplementedError

    async def _call(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        def call() -> _T:
            try:
                return function(*args, **kwargs)
            except self._database_errors as exc:
                # Never a driver's traceback: the journal, and what went wrong.
                raise self._error("read it", exc) from None

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    # --- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the journal for a runner: create its tables, take its run's lock.

        Raises:
            JournalLockedError: another runner holds the run.
            JournalError: the journal cannot be opened (the message names it and why).
        """
        if not self._opened:
            await self._call(self._open_sync, lock=True)
            self._opened = True

    async def close(self) -> None:
        """Write what is queued, release the lock, close the connection."""
        if self._opened:
            self._opened = False
            with anyio.CancelScope(shield=True):
                await self._call(self._close_sync)

    async def __aenter__(self) -> Self:
        """Open the journal (see `open`)."""
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the journal (see `close`)."""
        await self.close()

    async def _read(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run a read, opening the journal for it (without its lock) if it is closed."""
        if self._opened:
            return await self._call(function, *args)

        def read() -> _T:
            self._open_sync(lock=False)
            try:
                return function(*args)
            finally:
                self._close_sync()

        return await self._call(read)

    # --- reading ----------------------------------------------------------------------

    async def summary(self) -> dict[str, int]:
        """Counts by state: requests ``sending``, ``submitted``, ``refused``, ``unknown``;
        tasks ``succeeded``, ``failed`` (finished) and ``downloaded``.

        Raises:
            JournalError: the journal cannot be read.
        """
        return await self._read(self._summary_sync)

    async def results(self, *, page_size: int = 1000) -> AsyncIterator[JournalResult]:
        """Every finished task's result, in the order recorded, read a page at a time
        (for exports).

        Raises:
            JournalError: the journal cannot be read.
        """
        after = None
        while True:
            rows = await self._read(self._results_sync, after, page_size)
            for row in rows:
                yield _journal_result(row[1:])
            if len(rows) < page_size:
                return
            after = rows[-1][0]

    # --- writing (the run's) ----------------------------------------------------------

    def _record(self, record: Record) -> _Group:
        """Queue a record; the group it will be committed in."""
        self._queue.append(record)
        if self._wakeup is not None:
            self._wakeup.set()
        return self._group

    async def _writer(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit the queued records, a group at a time, until cancelled."""
        self._writer_running = True
        task_status.started()
        try:
            while True:
                if not self._queue:
                    if self._idle is not None:
                        self._idle.set()
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                records, group = self._queue, self._group
                self._queue, self._group = [], _Group()
                error = None
                self._writing = True
                try:
                    await self._call(self._write_sync, records)
                except JournalError as exc:
                    error = exc
                finally:
                    # Also when cancelled: a write that began always ends (a worker
                    # thread is not interrupted), so its waiters learn how.
                    self._writing = False
                    if error is not None:
                        logger.error("the journal %s could not be written: %s", self.name, error)
                    group.finish(error)
        finally:
            self._writer_running = False
            if self._queue:
                # Never committed: whoever waits for these must not wait forever.
                self._queue = []
                self._group.finish(
                    JournalError(
                        f"journal {self.name}: the run stopped before these records were committed",
                        journal=self.name,
                    )
                )
                self._group = _Group()
            if self._idle is not None:
                self._idle.set()

    async def _drain(self) -> None:
        """Wait until every queued record is committed (while the writer runs)."""
        with anyio.CancelScope(shield=True):
            while (self._queue or self._writing) and self._writer_running:
                self._idle = anyio.Event()
                await self._idle.wait()


def summarize(entries: dict[str, RequestEntry], results: dict[str, StoredResult]) -> dict[str, int]:
    """`Journal.summary`'s counts, from a journal's loaded state."""
    counts = dict.fromkeys((*STATES, "succeeded", "failed", "downloaded"), 0)
    for entry in entries.values():
        counts[entry.state] += 1
    for stored in results.values():
        counts["succeeded" if stored.status == FINISHED_OK else "failed"] += 1
        counts["downloaded"] += stored.path is not None
    return counts


def _journal_result(row: tuple[Any, ...]) -> JournalResult:
    (task_id, identity, custom_id, body, index, status, url, error, task_type, raw, path) = row
    return JournalResult(
        task_id=task_id,
        identity=identity,
        custom_id=custom_id,
        request=json.loads(body) if body else {},
        index=index,
        status=status,
        url=url,
        error_message=error,
        task_type=task_type,
        raw=json.loads(raw) if raw else {},
        path=None if path is None else Path(path),
    )


def as_journal(journal: object) -> Journal:
    """``batch(..., journal=...)``: a `Journal`, or a path meaning a `SQLiteJournal`."""
    if isinstance(journal, Journal):
        return journal
    if isinstance(journal, (str, os.PathLike)):
        from ._journal_sqlite import SQLiteJournal  # noqa: PLC0415 - only when asked for

        return SQLiteJournal(journal)
    raise TypeError(
        f"journal must be a path or a Journal (SQLiteJournal, PostgresJournal); "
        f"got {type(journal).__name__}"
    )


def _file_digest(path: str, field: str) -> str:
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise InvalidRequestError(
            f"{field}: cannot read {path!r}: {exc.strerror or exc}", field=field
        ) from None
    return "sha256:" + digest.hexdigest()


_SECRET_KEY: Final = "callback_secret"


class JournalRun:
    """What a batch does with its journal: identities, state, records.

    Args:
        journal: the run's journal.
        owns: close the journal when the run ends (it was opened for the run).
        resubmit_unknown: send ``sending``/``unknown`` requests again.
        adopt_secret: the client's callback signer's (signing key, adopt) when the
            user set no callback secret: the run keeps its secret in the journal.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        resubmit_unknown: bool,
        adopt_secret: tuple[bytes, Callable[[bytes], None]] | None,
    ) -> None:
        self.journal = journal
        self.resubmit_unknown = resubmit_unknown
        self._adopt_secret = adopt_secret
        self._owns = False
        self._entries: dict[str, RequestEntry] = {}
        self._results: dict[str, StoredResult] = {}
        self._occurrences: dict[str, int] = {}
        self._custom_ids: set[str] = set()
        self._identities: dict[int, str] = {}  # id(task) -> its request's identity
        self.replayed = 0

    async def start(self) -> None:
        """Open the journal (unless open), load its state, settle the callback secret."""
        journal = self.journal
        if not journal._opened:
            await journal.open()
            self._owns = True
        try:
            self._entries, self._results = await journal._call(journal._load_sync)
            if self._adopt_secret is not None:
                key, adopt = self._adopt_secret
                stored = await journal._call(journal._meta_sync, _SECRET_KEY)
                if stored is None:
                    await journal._record(("meta", _SECRET_KEY, key.hex())).wait_then(None)
                else:
                    adopt(bytes.fromhex(stored))
        except BaseException:
            await self.finish()
            raise

    async def finish(self) -> None:
        """Close the journal if the run opened it."""
        if self._owns:
            self._owns = False
            await self.journal.close()

    # --- identities -------------------------------------------------------------------

    async def identify(self, request: AnyRequest) -> tuple[str, str]:
        """The request's identity in the run, and its recorded body.

        Raises:
            InvalidRequestError: its ``custom_id`` was seen before in this run, or one
                of its local files cannot be read.
        """
        kind = kind_of(request)
        images = kind.images(request)
        if any(is_local(image) for _, image in images):
            urls = [
                await anyio.to_thread.run_sync(_file_digest, os.fspath(image), field)
                if is_local(image)
                else str(image)
                for field, image in images
            ]
            body = kind.encode(request, None, urls).decode()
        else:
            body = kind.encode(request, None, None).decode()
        custom_id = request.custom_id
        if custom_id is not None:
            if custom_id in self._custom_ids:
                raise InvalidRequestError(
                    f"custom_id {custom_id!r} appears twice in this run: a journal needs "
                    "every custom_id unique in its run",
                    field="custom_id",
                )
            self._custom_ids.add(custom_id)
            return "id:" + custom_id, body
        digest = hashlib.sha256(body.encode()).hexdigest()
        occurrence = self._occurrences.get(digest, 0)
        self._occurrences[digest] = occurrence + 1
        return f"sha256:{digest}#{occurrence}", body

    def entry(self, identity: str) -> RequestEntry | None:
        """What the journal held for this request when the run started."""
        return self._entries.get(identity)

    def stored_result(self, task_id: str) -> StoredResult | None:
        """The recorded result of a task, if it finished before the run started."""
        return self._results.get(task_id)

    # --- records ----------------------------------------------------------------------

    async def sending(self, identity: str, request: AnyRequest, body: str, position: int) -> None:
        """Record (durably) that the request is about to be sent."""
        await self.journal._record(("sending", identity, request.custom_id, body, position)).wait()

    def submitted(self, identity: str, submission_id: str | None, tasks: Sequence[Task]) -> None:
        """Record the task IDs of a submit reply (written behind)."""
        for task in tasks:
            self._identities[id(task)] = identity
        task_ids = json.dumps([task.task_id for task in tasks])
        self.journal._record(("submitted", identity, submission_id, task_ids))

    def attach(self, identity: str, tasks: Sequence[Task]) -> None:
        """Tasks of a resumed request, whose results are recorded under ``identity``."""
        for task in tasks:
            self._identities[id(task)] = identity

    def failed(self, identity: str, maybe_created: bool) -> None:
        """Record a failed submit: ``unknown`` if it may have created tasks, else
        ``refused`` (written behind)."""
        self.journal._record(("state", identity, UNKNOWN if maybe_created else REFUSED))

    @staticmethod
    def records(task: Task) -> bool:
        """Whether a finished task's outcome is a result to record (a success or a
        failure of the service's; not a timeout or a closed client)."""
        return task._result is not None or isinstance(task._error, TaskFailedError)

    def result(self, task: Task) -> _Group:
        """Queue a finished task's result; the group it commits in."""
        identity = self._identities.pop(id(task), "")
        result = task._result
        if result is not None:
            record = (
                "result",
                task.task_id,
                identity,
                task.index,
                result.status,
                result.url,
                "",
                result.task_type,
                _dump_raw(result.raw),
            )
        else:
            error = task._error
            assert isinstance(error, TaskFailedError)
            record = (
                "result",
                task.task_id,
                identity,
                task.index,
                error.status,
                "",
                error.error_message or "",
                kind_of(task.request).task_type,
                "",
            )
        return self.journal._record(record)

    def downloaded(self, result: AnyResult) -> _Group:
        """Queue the file a result was saved to; the group it commits in."""
        return self.journal._record(("download", result.task_id, os.fspath(result.path or "")))

    def forget(self, task: Task) -> None:
        """A task whose result will not be recorded (timed out, left)."""
        self._identities.pop(id(task), None)


def _dump_raw(raw: Mapping[str, Any]) -> str:
    # A callback's or lookup's data: decoded JSON, its top level made read-only.
    return json.dumps(dict(raw), ensure_ascii=False, separators=(",", ":"))


def replayed_task(
    task_class: type[Task],
    task_id: str,
    request: AnyRequest,
    stored: StoredResult,
) -> Task:
    """A finished task read back from the journal (``replayed`` True)."""
    task = task_class(task_id, request, stored.index, status=stored.status)
    task.replayed = True
    if stored.status == FINISHED_OK:
        raw: MappingProxyType[str, Any] = MappingProxyType(
            json.loads(stored.raw) if stored.raw else {}
        )
        # Rebuilt as its callback would have been: the kind reads its fields from ``raw``.
        payload = make_callback_payload(
            task_id, stored.status, stored.url, "", stored.task_type, 0, "", raw
        )
        result = kind_of(request).result(payload, request, stored.index)
        task._result = attrs.evolve(result, path=Path(stored.path)) if stored.path else result
    else:
        task._error = TaskFailedError(
            task_id=task_id,
            status=stored.status,
            error_message=stored.error_message,
            request=request,
        )
    return task
