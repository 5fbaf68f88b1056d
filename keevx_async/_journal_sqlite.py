"""``SQLiteJournal``: a run's journal in one SQLite file (stdlib ``sqlite3``, WAL).

One connection, used by one call at a time on a worker thread; one transaction per
group of records (see `Journal`). One runner per file at a time: the runner holds an
exclusive ``flock`` on ``<file>-lock`` (released by the OS if the process dies). The
schema version is kept in ``PRAGMA user_version``; a newer one is refused, never
guessed at.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import sys
from itertools import groupby
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, Literal

from ._exceptions import JournalError, JournalLockedError
from ._journal import Journal, RequestEntry, StoredResult, summarize

if TYPE_CHECKING:
    from ._journal import Record

__all__ = ["SQLiteJournal"]

SCHEMA_VERSION: Final = 1

# Append-only: every record is a new row, so a commit writes a few pages at the end of
# each table instead of updating rows in place all over a B-tree. The state of a request
# is its last row; a task's result is its first.
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS requests (
        seq INTEGER PRIMARY KEY,
        identity TEXT NOT NULL,
        state TEXT NOT NULL,
        custom_id TEXT,
        body TEXT,
        position INTEGER,
        submission_id TEXT,
        task_ids TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS requests_identity ON requests (identity)",
    """CREATE TABLE IF NOT EXISTS results (
        seq INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL,
        identity TEXT NOT NULL,
        idx INTEGER NOT NULL,
        status TEXT NOT NULL,
        url TEXT NOT NULL,
        error_message TEXT NOT NULL,
        task_type TEXT NOT NULL,
        raw TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS downloads (
        seq INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL,
        path TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS downloads_task_id ON downloads (task_id)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # For people inspecting a journal with the sqlite3 shell.
    """CREATE VIEW IF NOT EXISTS request_states AS
        SELECT r.identity, r.state, s.custom_id, s.body, s.position, r.submission_id,
            r.task_ids
        FROM requests r LEFT JOIN requests s ON s.seq = (
            SELECT max(seq) FROM requests WHERE identity = r.identity AND state = 'sending'
        )
        WHERE r.seq = (SELECT max(seq) FROM requests WHERE identity = r.identity)""",
    """CREATE VIEW IF NOT EXISTS task_results AS
        SELECT r.task_id, r.identity, r.idx, r.status, r.url, r.error_message,
            r.task_type, r.raw,
            (SELECT path FROM downloads d WHERE d.task_id = r.task_id
             ORDER BY d.seq DESC LIMIT 1) AS path
        FROM results r""",
)

# Each kind of record: the INSERT's head, and one row's values.
_INSERTS: Final = {
    "sending": (
        "INSERT INTO requests (identity, state, custom_id, body, position) VALUES ",
        "(?, 'sending', ?, ?, ?)",
    ),
    "state": ("INSERT INTO requests (identity, state) VALUES ", "(?, ?)"),
    "submitted": (
        "INSERT INTO requests (identity, state, submission_id, task_ids) VALUES ",
        "(?, 'submitted', ?, ?)",
    ),
    "result": (
        (
            "INSERT INTO results (task_id, identity, idx, status, url, error_message, "
            "task_type, raw) VALUES "
        ),
        "(?, ?, ?, ?, ?, ?, ?, ?)",
    ),
    "download": ("INSERT INTO downloads (task_id, path) VALUES ", "(?, ?)"),
    "meta": ("INSERT OR REPLACE INTO meta (key, value) VALUES ", "(?, ?)"),
}
# Rows per statement: well under SQLite's 32,766 parameters.
_ROWS_PER_INSERT: Final = 256


@functools.lru_cache(maxsize=64)
def _insert(kind: str, rows: int) -> str:
    """One INSERT of ``rows`` records of a kind: the writer thread takes the GIL back once
    per statement, not once per row (as ``executemany`` does), which matters while the
    event loop keeps it busy."""
    head, values = _INSERTS[kind]
    return head + ",".join([values] * rows)


_RESULTS_PAGE: Final = (
    "SELECT r.seq, r.task_id, r.identity, s.custom_id, s.body, r.idx, r.status, "
    "r.url, r.error_message, r.task_type, r.raw, "
    "(SELECT path FROM downloads d WHERE d.task_id = r.task_id ORDER BY d.seq DESC LIMIT 1) "
    "FROM results r LEFT JOIN requests s ON s.seq = ("
    "SELECT max(seq) FROM requests WHERE identity = r.identity AND state = 'sending') "
    "WHERE r.seq > ? ORDER BY r.seq LIMIT ?"
)


def _lock(handle: IO[bytes]) -> bool:
    """Take an exclusive lock on ``handle`` without waiting; whether it was free."""
    if sys.platform == "win32":  # pragma: no cover - POSIX CI
        import msvcrt  # noqa: PLC0415

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl  # noqa: PLC0415

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class SQLiteJournal(Journal):
    """A run's journal in a SQLite file: what ``batch(..., journal="run.db")`` means.

    stdlib ``sqlite3`` in WAL mode, off the event loop on a worker thread, records
    grouped into transactions. One runner per file at a time (a second gets
    [`JournalLockedError`][keevx_async.JournalLockedError]); reading
    (`summary`, `results`) works meanwhile. Its tables are append-only; inspect it with
    the ``sqlite3`` shell through its views ``request_states`` and ``task_results``:
    ``sqlite3 run.db "select state, count(*) from request_states group by state"``.

    Args:
        path: the journal file (created if missing; its directory must exist).
        synchronous: SQLite's ``synchronous`` setting. ``"NORMAL"`` (the default) in
            WAL mode survives a crash of the process; ``"FULL"`` also a power loss or
            an OS crash, at the cost of an fsync per group.

    Raises:
        ValueError: ``synchronous`` is neither ``"NORMAL"`` nor ``"FULL"``.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    ) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"path must be a file path (str or path object); got {path!r}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL'; got {synchronous!r}")
        self.path = Path(path)
        """The journal file."""
        self.synchronous = synchronous
        """SQLite's ``synchronous`` setting for the journal."""
        self._connection: sqlite3.Connection | None = None
        self._database_errors = (sqlite3.Error,)
        self._lock_file: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<SQLiteJournal {os.fspath(self.path)!r}>"

    @property
    def name(self) -> str:
        """The journal file, for messages."""
        return os.fspath(self.path)

    def _error(self, doing: str, exc: BaseException) -> JournalError:
        error = super()._error(doing, exc)
        if "not a database" in str(exc):
            error.args = (f"{error} (a corrupt journal, or another kind of file)",)
        elif "readonly" in str(exc):
            error.args = (f"{error} (check the permissions of the file and its directory)",)
        return error

    # --- the backend's calls (worker thread) ------------------------------------------

    def _open_sync(self, *, lock: bool) -> None:
        path = self.path
        if not path.parent.is_dir():
            raise JournalError(
                f"journal {self.name}: cannot open it: the directory {os.fspath(path.parent)!r} "
                "does not exist",
                journal=self.name,
            )
        if path.is_dir():
            raise JournalError(
                f"journal {self.name}: cannot open it: it is a directory", journal=self.name
            )
        if lock:
            self._take_lock()
        # A reader opens the file read-only: reading never creates a journal.
        target = path if lock else f"{path.absolute().as_uri()}?mode=ro"
        try:
            connection = sqlite3.connect(
                target, check_same_thread=False, isolation_level=None, timeout=30.0, uri=not lock
            )
        except sqlite3.Error as exc:
            self._release_lock()
            raise self._error("open it", exc) from None
        try:
            self._prepare(connection, write=lock)
        except BaseException:
            connection.close()
            self._release_lock()
            raise
        self._connection = connection

    def _take_lock(self) -> None:
        lock_path = Path(os.fspath(self.path) + "-lock")
        try:
            handle = lock_path.open("ab")
        except OSError as exc:
            raise self._error(f"create its lock file {os.fspath(lock_path)!r}", exc) from None
        if not _lock(handle):
            handle.close()
            raise JournalLockedError(
                f"journal {self.name} is in use by another runner (one runner per journal "
                "at a time): wait for it to end, or use another journal file",
                journal=self.name,
            )
        self._lock_file = handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def _prepare(self, connection: sqlite3.Connection, *, write: bool) -> None:
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.name} has schema version {version}, newer than this "
                    f"keevx_async knows ({SCHEMA_VERSION}): open it with a newer keevx_async",
                    journal=self.name,
                )
            if not write:
                if version == 0:
                    raise JournalError(
                        f"journal {self.name} is empty or not a journal: no run has "
                        "written to it yet",
                        journal=self.name,
                    )
                return
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute(f"PRAGMA synchronous = {self.synchronous}")
            connection.execute("BEGIN IMMEDIATE")
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # A write even with nothing to create: a journal that cannot be written fails
            # here, before anything is sent, not at its first record.
            connection.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('opened_at', datetime('now'))"
            )
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._error("open it", exc) from None

    def _connected(self) -> sqlite3.Connection:
        assert self._connection is not None, "opened by the caller"
        return self._connection

    def _close_sync(self) -> None:
        connection, self._connection = self._connection, None
        try:
            if connection is not None:
                connection.close()
        finally:
            self._release_lock()

    def _write_sync(self, records: list[Record]) -> None:
        connection = self._connected()
        try:
            connection.execute("BEGIN")
            for kind, group in groupby(records, key=lambda record: record[0]):
                rows = [record[1:] for record in group]
                for first in range(0, len(rows), _ROWS_PER_INSERT):
                    chunk = rows[first : first + _ROWS_PER_INSERT]
                    params = [value for row in chunk for value in row]
                    connection.execute(_insert(kind, len(chunk)), params)
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise self._error("write to it", exc) from None

    def _load_sync(self) -> tuple[dict[str, RequestEntry], dict[str, StoredResult]]:
        connection = self._connected()
        entries: dict[str, RequestEntry] = {}
        for identity, state, submission_id, task_ids in connection.execute(
            "SELECT identity, state, submission_id, task_ids FROM requests ORDER BY seq"
        ):
            ids = tuple(json.loads(task_ids)) if task_ids else ()
            entries[identity] = RequestEntry(state, submission_id, ids)
        results: dict[str, StoredResult] = {}
        for task_id, index, status, url, error, task_type, raw in connection.execute(
            "SELECT task_id, idx, status, url, error_message, task_type, raw "
            "FROM results ORDER BY seq"
        ):
            if task_id not in results:  # the first result of a task is its result
                results[task_id] = StoredResult(index, status, url, error, task_type, raw, None)
        for task_id, path in connection.execute("SELECT task_id, path FROM downloads ORDER BY seq"):
            stored = results.get(task_id)
            if stored is not None:
                stored.path = path
        return entries, results

    def _meta_sync(self, key: str) -> str | None:
        row = self._connected().execute("SELECT value FROM meta WHERE key = ?", (key,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    def _summary_sync(self) -> dict[str, int]:
        entries, results = self._load_sync()
        return summarize(entries, results)

    def _results_sync(self, after: Any, limit: int) -> list[tuple[Any, ...]]:
        return self._connected().execute(_RESULTS_PAGE, (after or 0, limit)).fetchall()
