"""``PostgresJournal``: a run's journal on PostgreSQL (psycopg 3, extra ``postgres``).

A sync connection used by one call at a time on a worker thread (see `Journal`), so
asyncio and trio share one code path. Its tables live in the connection's default
schema, one row set per run. One runner per run: the runner's session holds
``pg_try_advisory_lock`` on a key derived from the run's name, so a second runner is
refused at once, and a runner that dies releases the run as soon as PostgreSQL sees
its connection close.
"""

from __future__ import annotations

import hashlib
import json
import logging
from itertools import groupby
from typing import TYPE_CHECKING, Any, Final

from ._exceptions import JournalError, JournalLockedError
from ._journal import STATES, Journal, RequestEntry, StoredResult

if TYPE_CHECKING:
    from ._journal import Record

__all__ = ["PostgresJournal"]

logger = logging.getLogger("keevx_async")

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS keevx_runs (
        run TEXT PRIMARY KEY,
        schema_version INTEGER NOT NULL,
        callback_secret TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS keevx_requests (
        run TEXT NOT NULL,
        identity TEXT NOT NULL,
        state TEXT NOT NULL,
        custom_id TEXT,
        body TEXT NOT NULL,
        position BIGINT NOT NULL,
        submission_id TEXT,
        task_ids TEXT,
        PRIMARY KEY (run, identity)
    )""",
    """CREATE TABLE IF NOT EXISTS keevx_results (
        run TEXT NOT NULL,
        task_id TEXT NOT NULL,
        identity TEXT NOT NULL,
        idx INTEGER NOT NULL,
        status TEXT NOT NULL,
        url TEXT NOT NULL,
        error_message TEXT NOT NULL,
        task_type TEXT NOT NULL,
        raw TEXT NOT NULL,
        path TEXT,
        PRIMARY KEY (run, task_id)
    )""",
)

_WRITES: Final = {
    "sending": (
        "INSERT INTO keevx_requests (run, identity, state, custom_id, body, position) "
        "VALUES (%s, %s, 'sending', %s, %s, %s) ON CONFLICT (run, identity) DO UPDATE SET "
        "state = 'sending', position = excluded.position, submission_id = NULL, "
        "task_ids = NULL"
    ),
    "state": "UPDATE keevx_requests SET state = %(b)s WHERE run = %(r)s AND identity = %(a)s",
    "submitted": (
        "UPDATE keevx_requests SET state = 'submitted', submission_id = %(b)s, "
        "task_ids = %(c)s WHERE run = %(r)s AND identity = %(a)s"
    ),
    "result": (
        "INSERT INTO keevx_results (run, task_id, identity, idx, status, url, "
        "error_message, task_type, raw) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (run, task_id) DO NOTHING"
    ),
    "download": "UPDATE keevx_results SET path = %(b)s WHERE run = %(r)s AND task_id = %(a)s",
    "meta": "UPDATE keevx_runs SET callback_secret = %(b)s WHERE run = %(r)s AND %(a)s <> ''",
}
_NAMED: Final = frozenset(("state", "submitted", "download", "meta"))

_RESULTS_PAGE: Final = (
    "SELECT r.task_id, r.task_id, r.identity, q.custom_id, q.body, r.idx, r.status, r.url, "
    "r.error_message, r.task_type, r.raw, r.path FROM keevx_results r "
    "LEFT JOIN keevx_requests q ON q.run = r.run AND q.identity = r.identity "
    "WHERE r.run = %s AND r.task_id > %s ORDER BY r.task_id LIMIT %s"
)


def _lock_key(run: str) -> int:
    """The advisory lock key of a run: a signed 64-bit number from its name."""
    digest = hashlib.sha256(b"keevx_async journal\0" + run.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _import_psycopg() -> Any:
    try:
        import psycopg  # noqa: PLC0415 - the optional extra, only when used
    except ImportError:  # pragma: no cover - the test environment has the extra
        raise ImportError(
            "PostgresJournal needs psycopg 3: pip install 'keevx-async[postgres]'"
        ) from None
    return psycopg


class PostgresJournal(Journal):
    """A run's journal on PostgreSQL, for runs that must survive the machine.

    Needs the ``keevx-async[postgres]`` extra (psycopg 3). The tables
    (``keevx_runs``, ``keevx_requests``, ``keevx_results``) are created in the
    connection's default schema; many runs share them, one row set each. One runner per
    run at a time: a second raises
    [`JournalLockedError`][keevx_async.JournalLockedError] at once. Inspect it with
    ``psql``: ``select state, count(*) from keevx_requests where run = 'catalog'
    group by state``.

    Args:
        dsn: a libpq connection string or URL (``postgresql://user@host/db``).
        run: the run's name: the same name resumes the run.

    Raises:
        TypeError, ValueError: ``dsn`` or ``run`` is not a non-empty string.
    """

    def __init__(self, dsn: str, *, run: str) -> None:
        super().__init__()
        if not isinstance(dsn, str) or not dsn:
            raise TypeError(f"dsn must be a non-empty string; got {dsn!r}")
        if not isinstance(run, str) or not run:
            raise ValueError(f"run must be a non-empty string; got {run!r}")
        self.dsn = dsn
        """The connection string."""
        self.run = run
        """The run's name."""
        self._connection: Any = None
        self._lock_held: int | None = None
        self._psycopg = _import_psycopg()
        self._database_errors = (self._psycopg.Error,)

    def __repr__(self) -> str:
        return f"<PostgresJournal run={self.run!r}>"

    @property
    def name(self) -> str:
        """The run's name, for messages."""
        return f"run {self.run!r} (PostgreSQL)"

    # --- the backend's calls (worker thread) ------------------------------------------

    def _open_sync(self, *, lock: bool) -> None:
        psycopg = self._psycopg
        try:
            connection = psycopg.connect(self.dsn, autocommit=True)
        except psycopg.Error as exc:
            raise self._error("connect", exc) from None
        try:
            if lock:
                self._lock(connection)
            self._prepare(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def _lock(self, connection: Any) -> None:
        try:
            # The run's key in its schema: the same run name in two schemas is two runs.
            schema = connection.execute("SELECT current_schema()").fetchone()[0]
            key = _lock_key(f"{schema}\0{self.run}")
            locked = connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
        except self._psycopg.Error as exc:
            raise self._error("lock it", exc) from None
        if not locked:
            raise JournalLockedError(
                f"journal {self.name} is in use by another runner (one runner per "
                "run at a time): wait for it to end, or name another run",
                journal=self.name,
            )
        self._lock_held = key

    def _prepare(self, connection: Any) -> None:
        psycopg = self._psycopg
        try:
            with connection.transaction():
                # Serialise the creation of the tables between runners of several runs.
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(""),))
                for statement in _SCHEMA:
                    connection.execute(statement)
                connection.execute(
                    "INSERT INTO keevx_runs (run, schema_version) VALUES (%s, %s) "
                    "ON CONFLICT (run) DO NOTHING",
                    (self.run, SCHEMA_VERSION),
                )
                version = connection.execute(
                    "SELECT schema_version FROM keevx_runs WHERE run = %s", (self.run,)
                ).fetchone()[0]
        except psycopg.Error as exc:
            raise self._error("open it", exc) from None
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.name} has schema version {version}, newer than this "
                f"keevx_async knows ({SCHEMA_VERSION}): open it with a newer keevx_async",
                journal=self.name,
            )

    def _connected(self) -> Any:
        assert self._connection is not None, "opened by the caller"
        return self._connection

    def _close_sync(self) -> None:
        connection, self._connection = self._connection, None
        key, self._lock_held = self._lock_held, None
        if connection is None:
            return
        try:
            if key is not None:
                # Released now: the server ends a closed session a little later, and a
                # runner starting right after must find the run free.
                connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except self._psycopg.Error as exc:
            # A broken connection: closing it ends the session, and the lock with it.
            logger.debug("journal %s: unlocking failed (%s); closing releases it", self.name, exc)
        finally:
            connection.close()

    def _write_sync(self, records: list[Record]) -> None:
        connection = self._connected()
        run = self.run
        try:
            with connection.transaction(), connection.cursor() as cursor:
                for kind, group in groupby(records, key=lambda record: record[0]):
                    if kind in _NAMED:
                        params: list[Any] = [
                            {"r": run, "a": r[1], "b": r[2], "c": r[3] if len(r) > 3 else None}
                            for r in group
                        ]
                    else:
                        params = [(run, *r[1:]) for r in group]
                    cursor.executemany(_WRITES[kind], params)
        except self._psycopg.Error as exc:
            raise self._error("write to it", exc) from None

    def _load_sync(self) -> tuple[dict[str, RequestEntry], dict[str, StoredResult]]:
        connection = self._connected()
        entries = {
            identity: RequestEntry(
                state, submission_id, tuple(json.loads(task_ids)) if task_ids else ()
            )
            for identity, state, submission_id, task_ids in connection.execute(
                "SELECT identity, state, submission_id, task_ids FROM keevx_requests "
                "WHERE run = %s",
                (self.run,),
            )
        }
        results = {
            row[0]: StoredResult(*row[1:])
            for row in connection.execute(
                "SELECT task_id, idx, status, url, error_message, task_type, raw, "
                "path FROM keevx_results WHERE run = %s",
                (self.run,),
            )
        }
        return entries, results

    def _meta_sync(self, key: str) -> str | None:
        assert key == "callback_secret"  # the only one kept
        row = (
            self._connected()
            .execute("SELECT callback_secret FROM keevx_runs WHERE run = %s", (self.run,))
            .fetchone()
        )
        return None if row is None or row[0] is None else str(row[0])

    def _summary_sync(self) -> dict[str, int]:
        connection = self._connected()
        counts = dict.fromkeys((*STATES, "succeeded", "failed", "downloaded"), 0)
        for state, count in connection.execute(
            "SELECT state, count(*) FROM keevx_requests WHERE run = %s GROUP BY state",
            (self.run,),
        ):
            counts[state] = count
        row = connection.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'SUCCEEDED'), count(path) "
            "FROM keevx_results WHERE run = %s",
            (self.run,),
        ).fetchone()
        counts["succeeded"] = row[1]
        counts["failed"] = row[0] - row[1]
        counts["downloaded"] = row[2]
        return counts

    def _results_sync(self, after: Any, limit: int) -> list[tuple[Any, ...]]:
        page = (self.run, after or "", limit)
        return list(self._connected().execute(_RESULTS_PAGE, page).fetchall())
