"""Durable runs: the journal's states, resume, replay and errors, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import psycopg
import pytest
from journal_support import break_results_table, journal_factory, postgres_schema
from wiring import API_KEY, fake_in_thread

import keevx_async as kx
from keevx_async.testing import FakeKeevx
from keevx_async.testing._file_host import png_bytes

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
def make_journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    with journal_factory(request.param, tmp_path) as factory:
        yield factory


def _fake(**options: Any) -> FakeKeevx:
    settings: dict[str, Any] = {"api_key": API_KEY, "seed": 7, "complete_after": 0.001}
    settings.update(options)
    return FakeKeevx(**settings)


async def _drain(batch: kx.Batch) -> list[kx.Task]:
    return [task async for task in batch]


def _prompts(tasks: list[kx.Task]) -> list[str]:
    return sorted(task.request.prompt for task in tasks)


# --- states, resume, replay ---------------------------------------------------------


async def test_a_finished_run_resumes_by_replaying_with_no_network_call(make_journal: Any) -> None:
    requests = [kx.ImageRequest(f"prompt {i}", generate_count=2) for i in range(6)]
    async with _fake() as fake, fake.client() as client:
        async with client.batch(requests, journal=make_journal()) as batch:
            first = await _drain(batch)
        assert len(first) == 12
        assert not any(task.replayed for task in first)
        submits, gets = fake.accepted_submits, fake.get_calls
        journal = make_journal()
        async with client.batch(requests, journal=journal) as batch:
            again = await _drain(batch)
        assert (fake.accepted_submits, fake.get_calls) == (submits, gets)
        assert batch.replayed == 12
        assert all(task.replayed for task in again)
        assert {t.task_id: t.result().image_url for t in again} == {
            t.task_id: t.result().image_url for t in first
        }
        assert {(t.task_id, t.request, t.index) for t in again} == {
            (t.task_id, t.request, t.index) for t in first
        }
    summary = await journal.summary()
    assert summary == {
        "sending": 0,
        "submitted": 6,
        "refused": 0,
        "unknown": 0,
        "succeeded": 12,
        "failed": 0,
        "downloaded": 0,
    }
    results = [result async for result in journal.results(page_size=5)]
    assert sorted(r.task_id for r in results) == sorted(t.task_id or "" for t in first)
    assert all(r.succeeded and r.request["prompt"].startswith("prompt") for r in results)


async def test_failed_tasks_are_recorded_and_replayed_as_failures(make_journal: Any) -> None:
    async with _fake(fail_rate=1.0) as fake, fake.client() as client:
        async with client.batch(["a", "b"], journal=make_journal()) as batch:
            await _drain(batch)
        async with client.batch(["a", "b"], journal=make_journal()) as batch:
            again = await _drain(batch)
    assert all(task.replayed for task in again)
    assert all(isinstance(task.exception(), kx.TaskFailedError) for task in again)
    summary = await make_journal().summary()
    assert (summary["failed"], summary["succeeded"]) == (2, 0)


async def test_identity_by_content_survives_reordering_and_added_lines(make_journal: Any) -> None:
    async with _fake() as fake, fake.client() as client:
        async with client.batch(["a", "b", "b", "c"], journal=make_journal()) as batch:
            await _drain(batch)
        assert fake.accepted_submits == 4
        async with client.batch(["c", "new", "b", "a", "b", "b"], journal=make_journal()) as batch:
            again = await _drain(batch)
        assert fake.accepted_submits == 6  # "new" and the third "b" only
    assert batch.replayed == 4
    assert _prompts([t for t in again if not t.replayed]) == ["b", "new"]


async def test_custom_id_round_trip_and_never_sent(make_journal: Any) -> None:
    requests = [kx.ImageRequest("same", custom_id=f"row-{i}") for i in range(3)]
    async with _fake() as fake, fake.client() as client:
        async with client.batch(requests, journal=make_journal()) as batch:
            first = await _drain(batch)
        assert sorted(t.custom_id or "" for t in first) == ["row-0", "row-1", "row-2"]
        assert all(t.result().custom_id == t.custom_id for t in first)
        assert all("custom_id" not in task.body for task in fake.tasks.values())
        # Reordered: the custom_id, not the position or content, is the identity.
        async with client.batch(requests[::-1], journal=make_journal()) as batch:
            again = await _drain(batch)
        assert fake.accepted_submits == 3
    assert {t.custom_id: t.task_id for t in again} == {t.custom_id: t.task_id for t in first}
    results = [r async for r in make_journal().results()]
    assert sorted(r.custom_id or "" for r in results) == ["row-0", "row-1", "row-2"]
    assert {r.identity for r in results} == {"id:row-0", "id:row-1", "id:row-2"}


async def test_a_duplicate_custom_id_is_refused_naming_it(make_journal: Any) -> None:
    requests = [kx.ImageRequest("x", custom_id="dup"), kx.ImageRequest("y", custom_id="dup")]
    async with _fake() as fake, fake.client() as client:
        async with client.batch(requests, journal=make_journal()) as batch:
            seen = []
            with pytest.raises(kx.InvalidRequestError, match="'dup'") as caught:
                async for task in batch:
                    seen.append(task)
    assert caught.value.field == "custom_id"
    assert _prompts(seen) == ["x"]  # the first was still run and reported
    assert fake.accepted_submits == 1


def test_custom_id_is_checked() -> None:
    with pytest.raises(kx.InvalidRequestError) as caught:
        kx.ImageRequest("x", custom_id="")
    assert caught.value.field == "custom_id"
    with pytest.raises(kx.InvalidRequestError):
        kx.ImageRequest("x", custom_id="x" * 257)
    with pytest.raises(kx.InvalidRequestError):
        kx.ImageRequest("x", custom_id=5)  # type: ignore[arg-type]
    assert kx.ImageRequest("x", custom_id="x" * 256).custom_id == "x" * 256


async def test_unfinished_tasks_are_reattached_and_looked_up_at_once(make_journal: Any) -> None:
    requests = [kx.ImageRequest(f"p{i}") for i in range(4)]
    async with _fake(lost_rate=1.0) as fake:
        async with fake.client(reconcile_after=None) as client:
            async with client.batch(requests, journal=make_journal()) as batch:
                while batch.submitted < 4:  # noqa: ASYNC110 - a batch has no event for it
                    await anyio.sleep(0.001)
            # Left with every task unfinished (no callback came).
        summary = await make_journal().summary()
        assert (summary["submitted"], summary["succeeded"]) == (4, 0)
        await fake.wait_idle()
        async with fake.client() as client:  # reconcile_after: the default 300 s
            with anyio.fail_after(10):
                async with client.batch(requests, journal=make_journal()) as batch:
                    again = await _drain(batch)
        assert fake.accepted_submits == 4
        assert fake.get_calls >= 4
    assert all(t.exception() is None and not t.replayed for t in again)
    assert (await make_journal().summary())["succeeded"] == 4


async def test_unknown_outcomes_are_reported_not_resent_unless_asked(make_journal: Any) -> None:
    async with _fake() as fake, fake.client() as client:
        fake.inject(500, create=True)  # billed, but no task IDs came back
        async with client.batch(["a"], journal=make_journal()) as batch:
            (first,) = await _drain(batch)
        assert first.exception() is not None
        assert first.exception().maybe_created  # type: ignore[union-attr]
        assert (await make_journal().summary())["unknown"] == 1
        async with client.batch(["a"], journal=make_journal()) as batch:
            (again,) = await _drain(batch)
        assert again.task_id is None
        error = again.exception()
        assert isinstance(error, kx.UnknownOutcomeError)
        assert error.maybe_created
        assert error.request == kx.ImageRequest("a")
        assert fake.submit_calls == 1
        async with client.batch(["a"], journal=make_journal(), resubmit_unknown=True) as batch:
            (resent,) = await _drain(batch)
        assert resent.exception() is None
        assert fake.submit_calls == 2


async def test_refused_requests_are_sent_again(make_journal: Any) -> None:
    async with _fake() as fake, fake.client(max_retries=0) as client:
        fake.inject(400)
        async with client.batch(["a"], journal=make_journal()) as batch:
            (first,) = await _drain(batch)
        assert isinstance(first.exception(), kx.APIError)
        assert (await make_journal().summary())["refused"] == 1
        async with client.batch(["a"], journal=make_journal()) as batch:
            (again,) = await _drain(batch)
        assert again.exception() is None
    assert (await make_journal().summary())["submitted"] == 1


async def test_generate_many_with_a_journal(make_journal: Any) -> None:
    async with _fake() as fake, fake.client() as client:
        first = await client.generate_many(["a", "b"], journal=make_journal())
        again = await client.generate_many(["a", "b"], journal=make_journal())
        assert fake.accepted_submits == 2
    assert [[r.task_id for r in rs] for rs in again] == [  # type: ignore[union-attr]
        [r.task_id for r in rs]  # type: ignore[union-attr]
        for rs in first
    ]


# --- downloads --------------------------------------------------------------------


async def test_downloads_are_recorded_and_never_repeated(make_journal: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with _fake() as fake, fake.client() as client:
        async with client.batch(["a", "b"], journal=make_journal(), download_to=out) as batch:
            first = await _drain(batch)
        files = fake.file_requests
        assert files == 2
        async with client.batch(["a", "b"], journal=make_journal(), download_to=out) as batch:
            again = await _drain(batch)
        assert fake.file_requests == files
    assert {t.result().path for t in again} == {t.result().path for t in first}
    assert all(t.replayed and t.result().path.exists() for t in again)
    assert (await make_journal().summary())["downloaded"] == 2


async def test_a_replayed_result_without_its_file_is_downloaded(
    make_journal: Any, tmp_path: Path
) -> None:
    async with _fake() as fake, fake.client() as client:
        async with client.batch(["a"], journal=make_journal()) as batch:
            await _drain(batch)
        async with client.batch(["a"], journal=make_journal(), download_to=tmp_path) as batch:
            (again,) = await _drain(batch)
        assert fake.file_requests == 1
    path = again.result().path
    assert again.replayed
    assert path is not None
    assert path.exists()
    assert (await make_journal().summary())["downloaded"] == 1


# --- callbacks --------------------------------------------------------------------


async def _post(client: kx.AsyncKeevx, url: str | None, body: bytes) -> httpx.Response:
    assert url is not None  # every submit of these tests has a callback URL
    transport = httpx.ASGITransport(app=client.callback_app)
    async with httpx.AsyncClient(transport=transport) as http:
        return await http.post(url, content=body)


def _callback(task: Any) -> bytes:
    data = {
        "task_id": task.task_id,
        "status": "SUCCEEDED",
        "image_url": f"https://images.example.test/{task.task_id}.png",
        "error_message": "",
    }
    return json.dumps(
        {"code": 0, "msg": "ok", "task_type": "image_generate", "data": data}
    ).encode()


async def test_a_callback_is_answered_only_once_its_result_is_committed(
    make_journal: Any,
) -> None:
    async with (
        _fake(lost_rate=1.0) as fake,
        fake.client(deliver_callbacks=False, reconcile_after=None) as client,
        client.batch(["a", "b"], journal=make_journal()) as batch,
    ):
        while batch.submitted < 2:  # noqa: ASYNC110 - a batch has no event for it
            await anyio.sleep(0.001)
        tasks = list(fake.tasks.values())
        response = await _post(client, tasks[0].callback_url, _callback(tasks[0]))
        assert response.status_code == 200
        # Answered: so it is durable, visible to any other reader already.
        committed = [r.task_id async for r in make_journal().results()]
        assert committed == [tasks[0].task_id]
        # The journal breaks: the next callback is answered 503, so it comes again.
        break_results_table(make_journal())
        response = await _post(client, tasks[1].callback_url, _callback(tasks[1]))
        assert response.status_code == 503
        with pytest.raises(kx.JournalError):
            await _drain(batch)


async def test_the_run_keeps_its_callback_secret(make_journal: Any) -> None:
    async with _fake(lost_rate=1.0) as fake:
        async with (
            fake.client(deliver_callbacks=False, reconcile_after=None) as client,
            client.batch(["a", "b"], journal=make_journal()) as batch,
        ):
            while batch.submitted < 2:  # noqa: ASYNC110 - a batch has no event for it
                await anyio.sleep(0.001)
        # A new process (a new random secret) resumes the run, and the callbacks sent
        # to the URLs of the first still verify.
        async with (
            fake.client(deliver_callbacks=False, reconcile_after=None) as client,
            client.batch(["a", "b"], journal=make_journal()) as batch,
        ):
            while batch.in_flight < 2:  # noqa: ASYNC110 - a batch has no event for it
                await anyio.sleep(0.001)
            for task in fake.tasks.values():
                response = await _post(client, task.callback_url, _callback(task))
                assert response.status_code == 200
            resumed = await _drain(batch)
        assert all(t.exception() is None for t in resumed)
        assert client.stats.resolved_by_callback == 2


async def test_a_secret_of_the_users_is_not_replaced(make_journal: Any) -> None:
    async with _fake() as fake, fake.client(callback_secret="mine") as client:
        for _ in range(2):
            async with client.batch(["a"], journal=make_journal()) as batch:
                await _drain(batch)
        await client.submit(kx.ImageRequest("after the runs"))
        url = next(t.callback_url for t in fake.tasks.values() if t.prompt == "after the runs")
        # Still signed with the user's secret: another process sharing it verifies it.
        async with fake.client(callback_secret="mine", deliver_callbacks=False) as other:
            outcome = await other.feed_callback(_callback(fake.tasks[_id(url, fake)]), url=url)
    assert outcome is kx.CallbackOutcome.BUFFERED


def _id(url: str | None, fake: FakeKeevx) -> str:
    return next(task_id for task_id, task in fake.tasks.items() if task.callback_url == url)


# --- one runner at a time ---------------------------------------------------------


async def test_a_second_runner_is_refused_at_once(make_journal: Any) -> None:
    async with make_journal() as held, _fake() as fake, fake.client() as client:
        assert isinstance(held, kx.Journal)
        with pytest.raises(kx.JournalLockedError, match="another runner"):
            async with client.batch(["a"], journal=make_journal()):
                pass
        # Reading works meanwhile.
        assert (await make_journal().summary())["submitted"] == 0
    async with _fake() as fake, fake.client() as client:
        async with client.batch(["a"], journal=make_journal()) as batch:
            await _drain(batch)  # released


# --- SQLite files that cannot serve -------------------------------------------------


async def test_a_corrupt_file_gives_a_clear_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    async with _fake() as fake, fake.client() as client:
        with pytest.raises(kx.JournalError, match="not a database") as caught:
            async with client.batch(["a"], journal=path):
                pass
    assert str(path) in str(caught.value)
    assert caught.value.journal == str(path)
    assert caught.value.__cause__ is None
    assert fake.submit_calls == 0


async def test_a_sqlite_journal_reads_plainly_through_its_views(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    async with _fake(fail_if=lambda prompt: prompt == "b") as fake, fake.client() as client:
        async with client.batch(["a", "b"], journal=path, download_to=tmp_path) as batch:
            await _drain(batch)
    connection = sqlite3.connect(path)
    try:
        states = connection.execute(
            "SELECT state, count(*) FROM request_states GROUP BY state"
        ).fetchall()
        saved = connection.execute(
            "SELECT status, path IS NOT NULL FROM task_results ORDER BY status"
        ).fetchall()
    finally:
        connection.close()
    assert states == [("submitted", 2)]
    assert saved == [("FAILED", 0), ("SUCCEEDED", 1)]


async def test_a_journal_missing_its_tables_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 1")
    connection.close()
    async with _fake() as fake, fake.client() as client:
        for _ in range(2):  # the first runner released its lock
            with pytest.raises(kx.JournalError, match="no such table") as caught:
                async with client.batch(["a"], journal=path):
                    pass
            assert not isinstance(caught.value, kx.JournalLockedError)
    with pytest.raises(kx.JournalError, match=str(path)):
        await kx.SQLiteJournal(path).summary()


async def test_an_open_journal_reads_through_its_own_connection(make_journal: Any) -> None:
    async with make_journal() as journal:
        assert (await journal.summary())["succeeded"] == 0
        assert [result async for result in journal.results()] == []


async def test_a_newer_schema_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    async with _fake() as fake, fake.client() as client:
        with pytest.raises(kx.JournalError, match="schema version 99") as caught:
            async with client.batch(["a"], journal=path):
                pass
    assert str(path) in str(caught.value)


def _read_only(*paths: Path, on: bool) -> None:
    """Make files (and directories) read-only, or writable again. As root, permissions
    do not stop a write: the immutable attribute does."""
    root = os.geteuid() == 0
    if root and not on:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)  # noqa: S603,S607
    for path in paths:
        path.chmod((stat.S_IRUSR | stat.S_IXUSR) if on else stat.S_IRWXU)
    if root and on:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True)  # noqa: S603,S607


@pytest.mark.parametrize("directory_too", [False, True])
async def test_a_read_only_file_gives_a_clear_error(tmp_path: Path, directory_too: bool) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    path = directory / "run.db"
    async with _fake() as fake, fake.client() as client:
        async with client.batch(["a"], journal=path) as batch:
            await _drain(batch)
        (directory / "run.db-lock").unlink()
        read_only = (path, directory) if directory_too else (path,)
        _read_only(*read_only, on=True)
        try:
            with pytest.raises(kx.JournalError) as caught:
                async with client.batch(["b"], journal=path):
                    pass
        finally:
            _read_only(*read_only, on=False)
        assert fake.accepted_submits == 1
    assert str(path) in str(caught.value)
    assert caught.value.__cause__ is None
    if not directory_too:
        assert "permissions" in str(caught.value)


async def test_a_missing_directory_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "run.db"
    with pytest.raises(kx.JournalError, match="does not exist") as caught:
        async with kx.SQLiteJournal(path):
            pass
    assert str(path) in str(caught.value)
    with pytest.raises(kx.JournalError, match="directory"):
        await kx.SQLiteJournal(tmp_path).summary()


async def test_reading_a_missing_or_empty_file_gives_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(kx.JournalError, match="cannot open it"):
        await kx.SQLiteJournal(missing).summary()
    assert not missing.exists()  # reading never creates a journal
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(kx.JournalError, match="empty or not a journal"):
        await kx.SQLiteJournal(empty).summary()


async def test_a_newer_postgres_schema_gives_a_clear_error() -> None:
    with postgres_schema() as dsn:
        await kx.PostgresJournal(dsn, run="r").summary()  # creates the tables
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("UPDATE keevx_runs SET schema_version = 99")
        with pytest.raises(kx.JournalError, match="schema version 99"):
            async with kx.PostgresJournal(dsn, run="r"):
                pass


async def test_identity_of_local_files_is_their_content(make_journal: Any, tmp_path: Path) -> None:
    first, second = tmp_path / "one.png", tmp_path / "two.png"
    first.write_bytes(png_bytes("vase"))
    second.write_bytes(png_bytes("vase"))
    async with _fake() as fake, fake.client() as client:
        request = kx.ImageRequest("like this", reference_images=[first])
        async with client.batch([request], journal=make_journal()) as batch:
            await _drain(batch)
        # The same bytes under another name: the same request.
        moved = kx.ImageRequest("like this", reference_images=[second])
        async with client.batch([moved], journal=make_journal()) as batch:
            (again,) = await _drain(batch)
        assert again.replayed
        assert fake.accepted_submits == 1
        # A file gone by the time the run reads it: the input's error, naming the field.
        second.unlink()
        async with client.batch([moved], journal=make_journal()) as batch:
            with pytest.raises(kx.InvalidRequestError, match="cannot read") as caught:
                await _drain(batch)
    assert caught.value.field == "reference_images[0]"


def test_journal_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        kx.SQLiteJournal(tmp_path / "a.db", synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kx.SQLiteJournal("")
    with pytest.raises(TypeError):
        kx.PostgresJournal("", run="x")
    with pytest.raises(ValueError, match="run"):
        kx.PostgresJournal("postgresql://x", run="")
    assert "a.db" in repr(kx.SQLiteJournal(tmp_path / "a.db"))
    assert "'x'" in repr(kx.PostgresJournal("postgresql://x", run="x"))


async def test_a_journal_of_the_wrong_type_is_refused() -> None:
    async with _fake() as fake, fake.client() as client:
        with pytest.raises(TypeError, match="journal must be"):
            client.batch(["a"], journal=42)  # type: ignore[arg-type]


async def test_an_unreachable_postgres_gives_a_clear_error() -> None:
    journal = kx.PostgresJournal("host=127.0.0.1 port=1 user=postgres dbname=test", run="r")
    with pytest.raises(kx.JournalError, match="cannot connect") as caught:
        await journal.open()
    assert "'r'" in str(caught.value)


async def test_postgres_runs_share_tables_but_not_rows() -> None:
    with postgres_schema() as dsn:
        async with _fake() as fake, fake.client() as client:
            for run in ("one", "two"):
                async with client.batch(["a"], journal=kx.PostgresJournal(dsn, run=run)) as b:
                    await _drain(b)
            assert fake.accepted_submits == 2
        assert (await kx.PostgresJournal(dsn, run="one").summary())["submitted"] == 1


def test_the_sync_client_runs_a_journal(tmp_path: Path) -> None:
    with fake_in_thread() as (fake, _portal):
        with kx.Keevx(api_key=API_KEY, base_url=fake.base_url) as client:
            with client.batch(["a"], journal=tmp_path / "run.db") as batch:
                first = list(batch)
            with client.batch(["a"], journal=tmp_path / "run.db") as batch:
                assert [task.replayed for task in batch] == [True]
            assert batch.replayed == 1
            again = client.generate_many(["a"], journal=tmp_path / "run.db")
        assert fake.accepted_submits == 1
    assert not first[0].replayed
    assert first[0].custom_id is None
    assert again[0][0].task_id == first[0].task_id  # type: ignore[union-attr]


async def test_a_task_re_attached_by_id_is_looked_up_at_once() -> None:
    request = kx.ImageRequest("a fox")
    async with _fake(lost_rate=1.0) as fake:
        async with fake.client(reconcile_after=None) as client:
            submission = await client.submit(request)
        await fake.wait_idle()  # finished, its callback lost
        async with fake.client() as client:  # reconcile_after: the default 300 s
            task = await client.task(submission.task_ids[0], request=request)
            with anyio.fail_after(10):
                result = await task
        assert result.task_id == submission.task_ids[0]
        assert fake.get_calls == 1


async def test_a_cancelled_run_leaves_a_journal_that_resumes(make_journal: Any) -> None:
    prompts = [f"p{i}" for i in range(8)]
    async with _fake(lost_rate=1.0, latency=0.005) as fake:
        async with fake.client(reconcile_after=None) as client:
            with anyio.fail_after(10), anyio.CancelScope() as scope:
                async with client.batch(prompts, journal=make_journal(), concurrency=2) as batch:
                    while batch.submitted < 3:  # noqa: ASYNC110 - a batch has no event for it
                        await anyio.sleep(0.001)
                    scope.cancel()
                    await anyio.sleep_forever()
        fake.lost_rate = 0.0  # the new submits' callbacks come; the old ones were lost
        async with fake.client() as client:
            with anyio.fail_after(10):
                async with client.batch(prompts, journal=make_journal()) as batch:
                    tasks = await _drain(batch)
        created = Counter(task.prompt for task in fake.tasks.values())
    assert sorted(task.request.prompt for task in tasks) == sorted(prompts)
    for task in tasks:
        error = task.exception()
        assert error is None or isinstance(error, kx.UnknownOutcomeError), error
    assert max(created.values()) == 1  # nothing paid twice


# --- videos ---------------------------------------------------------------------------


def _video(prompt: str, **fields: Any) -> kx.VideoRequest:
    fields.setdefault("image_url", "https://images.example.test/start.png")
    return kx.VideoRequest(prompt, **fields)


async def test_a_mixed_run_replays_each_task_as_its_own_kind(make_journal: Any) -> None:
    requests: list[kx.ImageRequest | kx.VideoRequest] = [
        kx.ImageRequest("a still", generate_count=2),
        _video("a clip", duration=6, generate_count=2),
        _video("many", image_url=None, reference_images=["https://x.test/a.png"], custom_id="v"),
    ]
    async with _fake(video_complete_after=0.001) as fake, fake.client() as client:
        async with client.batch(requests, journal=make_journal()) as batch:
            first = await _drain(batch)
        calls = (fake.accepted_submits, fake.get_calls)
        async with client.batch(requests, journal=make_journal()) as batch:
            again = await _drain(batch)
        assert (fake.accepted_submits, fake.get_calls) == calls
    assert all(task.replayed for task in again)

    def outcomes(tasks: list[kx.Task]) -> dict[str | None, tuple[Any, ...]]:
        return {
            task.task_id: (type(task.result()), task.request, task.index, task.result().url)
            for task in tasks
        }

    assert outcomes(again) == outcomes(first)
    videos = {t.task_id: t.result() for t in first if isinstance(t.request, kx.VideoRequest)}
    assert len(videos) == 3
    for task in again:
        result = task.result()
        if isinstance(result, kx.VideoResult):
            original = videos[task.task_id]
            assert task.task_id is not None
            assert task.task_id.startswith("i2v-")
            assert (result.video_url, result.duration, result.width, result.height) == (
                original.video_url,
                original.duration,
                original.width,
                original.height,
            )
            assert result.duration == (6 if task.request.prompt == "a clip" else 8)
    assert [t.custom_id for t in again if t.custom_id] == ["v"]
    exported = [result async for result in make_journal().results()]
    assert {r.task_type for r in exported} == {"image_generate", "image_to_video"}
    assert {r.task_id: r.url for r in exported} == {
        task_id: url for task_id, (_, _, _, url) in outcomes(first).items()
    }


async def test_unfinished_video_tasks_are_looked_up_on_the_video_endpoint(
    make_journal: Any,
) -> None:
    requests = [_video(f"clip {i}") for i in range(3)]
    async with _fake(lost_rate=1.0, video_complete_after=0.001) as fake:
        async with fake.client(reconcile_after=None) as client:
            async with client.batch(requests, journal=make_journal()) as batch:
                while batch.submitted < 3:  # noqa: ASYNC110 - a batch has no event for it
                    await anyio.sleep(0.001)
        await fake.wait_idle()
        async with fake.client() as client:
            with anyio.fail_after(10):
                async with client.batch(requests, journal=make_journal()) as batch:
                    again = await _drain(batch)
        assert fake.accepted_submits == 3
        assert fake.get_paths
        assert all(path.startswith("/v1/image_to_video/") for path in fake.get_paths)
    assert sorted(type(t.result()).__name__ for t in again) == ["VideoResult"] * 3
    assert not any(t.replayed for t in again)


async def test_a_video_start_frame_on_disk_is_identified_by_content(
    make_journal: Any, tmp_path: Path
) -> None:
    frame = tmp_path / "start.png"
    frame.write_bytes(png_bytes("start"))
    async with _fake(video_complete_after=0.001) as fake, fake.client() as client:
        async with client.batch([_video("go", image_url=frame)], journal=make_journal()) as batch:
            await _drain(batch)
        copy = tmp_path / "copy.png"
        copy.write_bytes(png_bytes("start"))
        moved = _video("go", image_url=copy)
        async with client.batch([moved], journal=make_journal()) as batch:
            (again,) = await _drain(batch)
        assert again.replayed
        assert fake.accepted_submits == 1
        copy.unlink()  # gone by the time the run reads it: the input's error, naming the field
        async with client.batch([moved], journal=make_journal()) as batch:
            with pytest.raises(kx.InvalidRequestError, match="cannot read") as caught:
                await _drain(batch)
    assert caught.value.field == "image_url"
