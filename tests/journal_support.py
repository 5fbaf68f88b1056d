"""Journals for tests: a SQLite file in a temporary directory, or a PostgreSQL run in a
schema of its own (created for the test, dropped after it)."""

from __future__ import annotations

import contextlib
import uuid
from typing import TYPE_CHECKING

import psycopg

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A DSN whose connections use a fresh schema; the schema is dropped afterwards."""
    schema = f"keevx_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{POSTGRES} options=-csearch_path={schema}"
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextlib.contextmanager
def journal_factory(kind: str, tmp_path: Path) -> Iterator[Callable[[], kx.Journal]]:
    """A maker of journal objects, each for the same run (one per runner or reader)."""
    if kind == "sqlite":
        path = tmp_path / "run.db"
        yield lambda: kx.SQLiteJournal(path)
        return
    with postgres_schema() as dsn:
        yield lambda: kx.PostgresJournal(dsn, run="test-run")


def break_results_table(journal: kx.Journal) -> None:
    """Drop the results table from another connection: the runner's next write fails."""
    if isinstance(journal, kx.SQLiteJournal):
        import sqlite3  # noqa: PLC0415

        database = sqlite3.connect(journal.path, isolation_level=None)
        try:
            database.execute("DROP TABLE results")
        finally:
            database.close()
        return
    assert isinstance(journal, kx.PostgresJournal)
    with psycopg.connect(journal.dsn, autocommit=True) as connection:
        connection.execute("DROP TABLE keevx_results")
