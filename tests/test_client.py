"""AsyncKeevx against FakeKeevx: submits, results, retries, callbacks, lookups."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import itertools
import json
import logging
import random
import time
import warnings
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from wiring import (
    API_KEY,
    CALLBACK_URL,
    ScriptedApp,
    callback_body,
    closed_port,
    ok_reply,
    scripted_client,
    wired,
)

import keevx_async as kx
from keevx_async.testing import FakeKeevx, serve_asgi

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keevx_async._types import CallbackTokenIn

pytestmark = pytest.mark.anyio


# --- submitting and mapping ----------------------------------------------------------


async def test_generate_returns_one_result_per_task_in_task_order() -> None:
    async with wired() as (fake, client):
        request = kx.ImageRequest("a red fox", generate_count=3)
        results = await client.generate(request)
    assert [r.index for r in results] == [0, 1, 2]
    assert {r.task_id for r in results} == set(fake.tasks)
    for result in results:
        assert result.request is request
        assert result.image_url == fake.tasks[result.task_id].image_url
        assert fake.tasks[result.task_id].index == result.index
        assert result.status == "SUCCEEDED"
        assert result.task_type == "image_generate"
        assert result.raw["task_id"] == result.task_id


async def test_submit_returns_tasks_in_service_order() -> None:
    async with wired() as (fake, client):
        submission = await client.submit(kx.ImageRequest("a boat", generate_count=4))
        assert submission.task_ids == tuple(t.task_id for t in submission.tasks)
        assert [t.index for t in submission.tasks] == [0, 1, 2, 3]
        results = [await task for task in submission.tasks]
    assert [r.task_id for r in results] == list(submission.task_ids)
    assert all(fake.tasks[tid].index == i for i, tid in enumerate(submission.task_ids))


async def test_fan_out_maps_every_task_id_to_its_request() -> None:
    rng = random.Random(7)
    requests = [kx.ImageRequest(f"prompt {i}", generate_count=rng.randint(1, 8)) for i in range(60)]
    async with wired({"complete_after": (0.0, 0.02), "shuffle": True}, max_concurrency=8) as (
        fake,
        client,
    ):
        async with anyio.create_task_group() as tg:
            outcomes: dict[int, list[kx.ImageResult]] = {}

            async def run(position: int, request: kx.ImageRequest) -> None:
                outcomes[position] = await client.generate(request)

            for position, request in enumerate(requests):
                tg.start_soon(run, position, request)
    assert sum(len(r) for r in outcomes.values()) == sum(r.generate_count for r in requests)
    assert len(fake.tasks) == sum(r.generate_count for r in requests)
    for position, results in outcomes.items():
        assert len(results) == requests[position].generate_count
        for index, result in enumerate(results):
            served = fake.tasks[result.task_id]
            assert served.prompt == requests[position].prompt
            assert served.index == index == result.index
            assert result.request is requests[position]
            assert result.image_url == served.image_url


async def test_concurrency_limit_is_never_exceeded_at_the_server() -> None:
    async with wired({"latency": 0.02}, max_concurrency=4) as (fake, client):
        async with anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(client.submit, kx.ImageRequest(f"p{i}"))
    assert fake.submit_calls == 24
    assert fake.max_in_flight == 4


async def test_max_per_second_spaces_submits_evenly() -> None:
    rate = 40.0
    async with wired(max_per_second=rate, max_concurrency=8) as (fake, client):
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(client.submit, kx.ImageRequest(f"p{i}"))
    times = sorted(fake.submit_times)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 12
    # Smooth pacing: no two submits closer than the interval (less scheduler jitter).
    assert min(gaps) >= 0.8 / rate
    assert times[-1] - times[0] >= 11 * 0.95 / rate


async def test_request_callback_url_overrides_client_default() -> None:
    async with wired() as (fake, client):
        await client.generate(kx.ImageRequest("x", callback_url="https://other.example.test/cb"))
    (task,) = fake.tasks.values()
    assert task.callback_url is not None
    assert task.callback_url.startswith("https://other.example.test/cb?keevx_token=")


async def test_users_query_string_survives_the_token() -> None:
    async with wired(callback_url="https://app.example.test/cb?tenant=7&x=a%20b") as (
        fake,
        client,
    ):
        await client.generate(kx.ImageRequest("x"))
    (task,) = fake.tasks.values()
    assert task.callback_url is not None
    assert task.callback_url.startswith("https://app.example.test/cb?tenant=7&x=a%20b&keevx_token=")


async def test_path_token_placement_resolves_tasks() -> None:
    async with wired(callback_token_in="path") as (fake, client):
        results = await client.generate(kx.ImageRequest("x", generate_count=2))
    assert len(results) == 2
    for task in fake.tasks.values():
        assert task.callback_url is not None
        parts = urlsplit(task.callback_url)
        assert parts.query == ""
        assert parts.path.startswith("/keevx/callback/")
        assert "." in parts.path.rsplit("/", 1)[1]


async def test_submit_refuses_anything_but_an_image_request() -> None:
    async with wired() as (fake, client):
        with pytest.raises(TypeError, match="ImageRequest"):
            await client.submit("a prompt")  # type: ignore[call-overload]
    assert fake.submit_calls == 0


async def test_bearer_auth_and_user_agent_are_sent() -> None:
    app = ScriptedApp(ok_reply("i2is-1"))
    async with scripted_client(app) as client:
        await client.submit(kx.ImageRequest("x"))
    method, path, headers, body = app.requests[0]
    assert (method, path) == ("POST", "/v1/image_generate")
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert headers["user-agent"].startswith(f"keevx-async/{kx.__version__} ")
    assert headers["content-type"] == "application/json"
    assert b'"prompt":"x"' in body


async def test_no_callback_url_sends_none_and_warns_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEEVX_CALLBACK_URL", raising=False)
    caplog.set_level(logging.WARNING, logger="keevx_async")
    async with wired(callback_url=None) as (fake, client):
        await client.submit(kx.ImageRequest("a"))
        await client.submit(kx.ImageRequest("b"))
        await fake.wait_idle()
    assert all(task.callback_url is None for task in fake.tasks.values())
    assert fake.callbacks_sent == 0
    warnings = [r for r in caplog.records if "no callback_url" in r.getMessage()]
    assert len(warnings) == 1


# --- callbacks: order, duplicates, loss, failure ----------------------------------------


async def test_callback_before_reply_resolves_task() -> None:
    async with wired({"early_callbacks": True}) as (fake, client):
        results = await client.generate(kx.ImageRequest("early", generate_count=3))
        stats = client.stats
    assert {r.task_id for r in results} == set(fake.tasks)
    assert stats.callbacks_buffered == 3
    assert stats.resolved_by_callback == 3
    assert stats.pending == stats.buffered == 0


async def test_duplicate_callbacks_change_nothing() -> None:
    async with wired({"duplicate_rate": 1.0}) as (fake, client):
        results = await client.generate(kx.ImageRequest("twice", generate_count=4))
        await fake.wait_idle()
        stats = client.stats
    assert fake.callbacks_sent == 8
    assert stats.resolved_by_callback == 4
    assert stats.callbacks_duplicate == 4
    assert [r.image_url for r in results] == [fake.tasks[r.task_id].image_url for r in results]


async def test_shuffled_callbacks_resolve_the_right_tasks() -> None:
    async with wired({"shuffle": True, "complete_after": (0.0, 0.03)}) as (fake, client):
        results = await client.generate(kx.ImageRequest("shuffle", generate_count=8))
    for index, result in enumerate(results):
        assert result.index == index
        assert fake.tasks[result.task_id].index == index
        assert result.image_url.endswith(f"/{result.task_id}.png")


async def test_failed_task_raises_task_failed_error_with_details() -> None:
    async with wired({"fail_if": lambda prompt: "forbidden" in prompt}) as (fake, client):
        request = kx.ImageRequest("something forbidden", generate_count=2)
        with pytest.raises(kx.TaskFailedError) as caught:
            await client.generate(request)
        assert client.stats.pending == 0
    error = caught.value
    assert error.task_id in fake.tasks
    assert error.status == "FAILED"
    assert error.error_message == fake.tasks[error.task_id].error_message != ""
    assert error.request is request
    assert error.task_id in str(error)


async def test_unknown_finished_status_is_a_failure_that_keeps_its_status() -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app) as client:
        submission = await client.submit(kx.ImageRequest("x"))
        (task,) = submission.tasks
        url = _callback_url(app)
        outcome = await client.feed_callback(
            callback_body("i2is-a", "CANCELLED", error_message="user cancelled"), url=url
        )
    assert outcome is kx.CallbackOutcome.RESOLVED
    error = task.exception()
    assert isinstance(error, kx.TaskFailedError)
    assert (error.status, error.error_message) == ("CANCELLED", "user cancelled")
    assert task.status == "CANCELLED"


async def test_progress_callback_updates_status_without_finishing() -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app) as client:
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        url = _callback_url(app)
        body = callback_body("i2is-a", "PROCESSING", image_url="")
        assert await client.feed_callback(body, url=url) is kx.CallbackOutcome.PROGRESS
        assert task.status == "PROCESSING"
        assert not task.done()
        assert await client.feed_callback(callback_body("i2is-a"), url=url) is (
            kx.CallbackOutcome.RESOLVED
        )
    assert task.result().image_url == "https://images.example.test/i2is-a.png"


async def test_unknown_task_type_and_extra_fields_are_kept() -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app) as client:
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        body = (
            b'{"code":0,"msg":"ok","task_type":"image_to_image","data":{"task_id":"i2is-a",'
            b'"status":"SUCCEEDED","image_url":"https://i/x.png","error_message":"",'
            b'"seed":42,"cost":{"credits":3}}}'
        )
        await client.feed_callback(body, url=_callback_url(app))
    result = task.result()
    assert result.task_type == "image_to_image"
    assert result.raw["seed"] == 42
    assert result.raw["cost"] == {"credits": 3}


async def test_lost_callback_times_out_and_the_task_stays_resolvable() -> None:
    async with wired({"lost_rate": 1.0}) as (fake, client):
        (task,) = (await client.submit(kx.ImageRequest("lost"))).tasks
        await fake.wait_idle()
        with pytest.raises(kx.TaskTimeoutError) as caught:
            await task.wait(timeout=0.05)
        assert caught.value.task_id == task.task_id
        assert not task.done()
        assert client.stats.pending == 1
        snapshot = await client.retrieve(task.task_id or "")
        assert snapshot.done
        result = await task
        stats = client.stats
    assert result.image_url == snapshot.image_url == fake.tasks[result.task_id].image_url
    assert stats.resolved_by_lookup == 1
    assert stats.pending == 0
    assert fake.callbacks_sent == 0


async def test_generate_timeout_raises_and_releases_the_tasks() -> None:
    async with wired({"lost_rate": 1.0}) as (_, client):
        with pytest.raises(kx.TaskTimeoutError):
            await client.generate(kx.ImageRequest("lost", generate_count=2), timeout=0.05)
        assert client.stats.pending == 0


async def test_cancelled_generate_leaks_nothing() -> None:
    async with wired({"lost_rate": 1.0}) as (_, client):
        with anyio.move_on_after(0.1) as scope:
            await client.generate(kx.ImageRequest("never", generate_count=3))
        assert scope.cancelled_caught
        stats = client.stats
    assert stats.pending == 0
    assert stats.buffered == 0


async def test_cancelled_waiter_leaves_the_task_pending_and_resolvable() -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app) as client:
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        with anyio.move_on_after(0.02):
            await task
        assert client.stats.pending == 1
        await client.feed_callback(callback_body("i2is-a"), url=_callback_url(app))
        assert client.stats.pending == 0
    assert (await task).task_id == "i2is-a"


async def test_dropped_task_leaves_the_registry() -> None:
    app = ScriptedApp(ok_reply("i2is-a", "i2is-b"))
    async with scripted_client(app) as client:
        await client.submit(kx.ImageRequest("x", generate_count=2))
        # Nobody holds the submission any more: its tasks leave the registry.
        assert client.stats.pending == 0


# --- callback authenticity -------------------------------------------------------------


@pytest.mark.parametrize("token_in", ["query", "path"])
async def test_forged_callbacks_change_nothing(token_in: CallbackTokenIn) -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app, callback_token_in=token_in) as client:
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        real_url = _callback_url(app)
        forged_urls = [
            None,
            CALLBACK_URL,
            CALLBACK_URL + "?keevx_token=abc.def",
            CALLBACK_URL + "/abc.def",
            real_url[:-2] + ("AA" if not real_url.endswith("AA") else "BB"),
        ]
        for url in forged_urls:
            with pytest.raises(kx.CallbackAuthError):
                await client.feed_callback(callback_body("i2is-a"), url=url)
        assert not task.done()
        assert client.stats.callbacks_rejected == len(forged_urls)
        assert client.stats.buffered == 0
        await client.feed_callback(callback_body("i2is-a"), url=real_url)
    assert task.result().task_id == "i2is-a"


async def test_a_token_from_a_process_with_another_secret_names_the_likely_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Workers without a shared KEEVX_CALLBACK_SECRET each draw their own: a callback
    # reaching another worker is refused, and the log says why, once a minute.
    caplog.set_level(logging.WARNING, logger="keevx_async")
    async with (
        wired(callback_secret="one") as (fake, issuer),
        fake.client(callback_secret="another", deliver_callbacks=False) as other,
    ):
        submission = await issuer.submit(kx.ImageRequest("a fox"))
        url = fake.tasks[submission.task_ids[0]].callback_url
        assert url is not None
        for _ in range(3):
            with pytest.raises(kx.CallbackAuthError):
                await other.feed_callback(callback_body(submission.task_ids[0]), url=url)
        # A token of another shape (not this SDK's) is no secret mismatch.
        with pytest.raises(kx.CallbackAuthError):
            await other.feed_callback(
                callback_body("i2is-x"), url=f"{CALLBACK_URL}?keevx_token=x.y"
            )
    hints = [r for r in caplog.records if "KEEVX_CALLBACK_SECRET" in r.getMessage()]
    assert len(hints) == 1
    assert other.stats.callbacks_rejected == 4
    assert other.stats.callbacks_wrong_secret == 3  # the one of another shape is not


@pytest.mark.parametrize(
    "callback_url",
    [
        "http://localhost:8000/keevx/callback",
        "http://127.0.0.1:8000/keevx/callback",
        "http://192.168.1.20/keevx/callback",
        "http://[::1]:8000/keevx/callback",
        "http://app.localhost/cb",
    ],
)
async def test_a_callback_url_the_service_cannot_reach_is_named(
    callback_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Found with the README quick start: a callback URL where nothing could reach it
    # returned after 300.7 s with no log line at all.
    caplog.set_level(logging.WARNING, logger="keevx_async")
    async with wired(callback_url=callback_url) as (_fake, client):
        for prompt in ("a fox", "a hen"):
            await client.submit(kx.ImageRequest(prompt))
    hints = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert len(hints) == 1  # once per client
    assert callback_url in hints[0]
    assert "tunnel" in hints[0]


@pytest.mark.parametrize(
    ("base_url", "callback_url"),
    [
        ("http://127.0.0.1:9000", "http://127.0.0.1:8000/cb"),  # the service is local too
        ("https://api.keevx.cn", "https://app.example.com/cb"),
        ("https://api.keevx.cn", "http://8.8.8.8/cb"),
    ],
)
async def test_a_reachable_callback_url_is_not_flagged(
    base_url: str, callback_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keevx_async")
    async with FakeKeevx() as fake, fake.http_client() as http:
        async with kx.AsyncKeevx(
            api_key="k", base_url=base_url, http_client=http, callback_url=callback_url
        ) as client:
            await client.submit(kx.ImageRequest("a fox"))
    assert not [r for r in caplog.records if "cannot reach" in r.getMessage()]


@pytest.mark.parametrize("token_in", ["query", "path"])
async def test_cross_submission_callback_is_refused(token_in: CallbackTokenIn) -> None:
    app = ScriptedApp(ok_reply("i2is-a"), ok_reply("i2is-b"))
    async with scripted_client(app, callback_token_in=token_in) as client:
        (task_a,) = (await client.submit(kx.ImageRequest("a"))).tasks
        url_a = _callback_url(app, 0)
        (task_b,) = (await client.submit(kx.ImageRequest("b"))).tasks
        url_b = _callback_url(app, 1)
        with pytest.raises(kx.CallbackAuthError, match="another submission"):
            await client.feed_callback(callback_body("i2is-b"), url=url_a)
        assert not task_b.done()
        assert await client.feed_callback(callback_body("i2is-b"), url=url_b) is (
            kx.CallbackOutcome.RESOLVED
        )
        # A finished task's ID is remembered with its submission too.
        with pytest.raises(kx.CallbackAuthError):
            await client.feed_callback(callback_body("i2is-b"), url=url_a)
        assert not task_a.done()
    # Never resolved by the other submission's callback: it ended when the client closed.
    assert isinstance(task_a.exception(), kx.ClientClosedError)


async def test_registered_submissions_token_is_refused_for_tasks_not_its_own() -> None:
    app = ScriptedApp(ok_reply("i2is-a"), ok_reply("i2is-b"))
    async with scripted_client(app) as client:
        await client.submit(kx.ImageRequest("a"))
        url_a = _callback_url(app, 0)
        # A callback for a task not known yet, carrying submission A's (valid) token: A's
        # reply named its tasks, so this cannot be one of them and is not even buffered.
        with pytest.raises(kx.CallbackAuthError):
            await client.feed_callback(callback_body("i2is-b"), url=url_a)
        assert client.stats.buffered == 0
        (task_b,) = (await client.submit(kx.ImageRequest("b"))).tasks
        assert not task_b.done()
        await client.feed_callback(callback_body("i2is-b"), url=_callback_url(app, 1))
    assert task_b.result().task_id == "i2is-b"


async def test_a_leaked_token_cannot_flood_the_early_buffer() -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app, max_early_callbacks=50) as client:
        await client.submit(kx.ImageRequest("old"))
        leaked = _callback_url(app, 0)
        refused = 0
        for i in range(200):
            try:
                await client.feed_callback(callback_body(f"i2is-forged-{i}"), url=leaked)
            except kx.CallbackAuthError:
                refused += 1
        stats = client.stats
    assert refused == 200 == stats.callbacks_rejected
    assert (stats.buffered, stats.callbacks_evicted) == (0, 0)


async def test_callback_of_a_dropped_submission_changes_nothing() -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app) as client:
        await client.submit(kx.ImageRequest("dropped"))  # nobody keeps the tasks
        outcome = await client.feed_callback(callback_body("i2is-a"), url=_callback_url(app))
        stats = client.stats
    assert outcome is kx.CallbackOutcome.DUPLICATE
    assert (stats.buffered, stats.pending) == (0, 0)


async def test_malformed_callback_raises_and_changes_nothing() -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app) as client:
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        url = _callback_url(app)
        bodies: list[bytes | str] = [
            b"not json",
            b"[]",
            b'{"code":0}',
            b'{"data":{"status":"SUCCEEDED","image_url":"u"}}',
            '{"data":{"task_id":"i2is-a","status":"SUCCEEDED"}}',
            b'{"data":{"task_id":"i2is-a","status":7}}',
        ]
        fields = []
        for body in bodies:
            with pytest.raises(kx.CallbackError) as caught:
                await client.feed_callback(body, url=url)
            assert not isinstance(caught.value, kx.CallbackAuthError)
            fields.append(caught.value.field)
        assert not task.done()
        assert client.stats.callbacks_malformed == len(bodies)
    assert fields == [None, None, "data", "data.task_id", "data.image_url", "data.status"]


async def test_feed_callback_takes_bytes_text_and_mappings() -> None:
    app = ScriptedApp(ok_reply("i2is-a", "i2is-b", "i2is-c"))
    async with scripted_client(app) as client:
        tasks = (await client.submit(kx.ImageRequest("x", generate_count=3))).tasks
        url = _callback_url(app)
        await client.feed_callback(callback_body("i2is-a"), url=url)
        await client.feed_callback(callback_body("i2is-b").decode(), url=url)
        await client.feed_callback(json.loads(callback_body("i2is-c")), url=url)
    assert [t.result().task_id for t in tasks] == ["i2is-a", "i2is-b", "i2is-c"]


async def test_unverified_client_accepts_callbacks_without_token() -> None:
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app, verify_callbacks=False) as client:
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        assert "keevx_token" not in _callback_url(app)
        assert await client.feed_callback(callback_body("i2is-a")) is kx.CallbackOutcome.RESOLVED
    assert task.done()


async def test_shared_secret_lets_another_client_verify_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEEVX_CALLBACK_SECRET", "shared-secret")
    app = ScriptedApp(ok_reply("i2is-a"))
    async with scripted_client(app) as worker_a:
        await worker_a.submit(kx.ImageRequest("x"))
        url = _callback_url(app)
    async with scripted_client(app) as worker_b:
        # Worker B never saw the submission: the token verifies, the callback waits.
        assert await worker_b.feed_callback(callback_body("i2is-a"), url=url) is (
            kx.CallbackOutcome.BUFFERED
        )
    async with scripted_client(app, callback_secret="other") as worker_c:
        with pytest.raises(kx.CallbackAuthError):
            await worker_c.feed_callback(callback_body("i2is-a"), url=url)


# --- retries and errors ------------------------------------------------------------------


async def test_429_then_success_creates_the_tasks_once() -> None:
    async with wired() as (fake, client):
        fake.inject(429, retry_after=0.05)
        results = await client.generate(kx.ImageRequest("x", generate_count=2))
    assert fake.submit_calls == 2
    assert fake.accepted_submits == 1
    assert len(fake.tasks) == 2
    assert {r.task_id for r in results} == set(fake.tasks)


async def test_retry_after_pauses_the_whole_client() -> None:
    pause = 0.3
    async with wired(max_concurrency=8) as (fake, client):
        fake.inject(429, retry_after=pause)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.submit, kx.ImageRequest("first"))
            # All in-process: once every task is blocked, the 429 has been answered and
            # the first submit sleeps out the pause.
            await anyio.wait_all_tasks_blocked()
            for i in range(5):
                tg.start_soon(client.submit, kx.ImageRequest(f"other {i}"))
    first, *rest = fake.submit_times
    assert len(rest) == 6
    # Nothing reached the service while the Retry-After ran.
    assert min(rest) - first >= pause * 0.9
    assert fake.accepted_submits == 6


async def test_retry_after_as_http_date_is_honoured() -> None:
    async with wired() as (fake, client):
        when = email.utils.formatdate(time.time() + 1, usegmt=True)
        fake.inject(429, retry_after=when)
        started = anyio.current_time()
        await client.submit(kx.ImageRequest("x"))
        waited = anyio.current_time() - started
    assert fake.submit_calls == 2
    assert fake.accepted_submits == 1
    assert waited > 0  # the date is at most one second away, floored to whole seconds


async def test_retry_after_beyond_max_retry_wait_raises_at_once() -> None:
    async with wired(max_retry_wait=10) as (fake, client):
        fake.inject(429, retry_after=120)
        with pytest.raises(kx.RateLimitError) as caught:
            await client.submit(kx.ImageRequest("x"))
    error = caught.value
    assert error.retry_after == 120
    assert error.maybe_created is False
    assert error.status_code == 429
    assert "max_retry_wait" in str(error)
    assert fake.submit_calls == 1


async def test_a_too_long_retry_after_holds_back_the_whole_client() -> None:
    requests = [kx.ImageRequest(f"p{i}") for i in range(20)]
    async with wired(max_concurrency=4, max_retry_wait=60) as (fake, client):
        fake.inject(429, retry_after=120, times=100)
        results = await client.generate_many(requests)
        stats = client.stats
    # Only submits already in flight when the 429 came met it; the rest were never sent.
    assert 1 <= fake.submit_calls <= 4
    assert all(isinstance(r[0], kx.RateLimitError) for r in results)
    errors = [r[0] for r in results if isinstance(r[0], kx.RateLimitError)]
    assert all(e.retry_after is not None and e.retry_after > 60 for e in errors)
    assert all(e.maybe_created is False for e in errors)
    assert stats.rate_limited == fake.submit_calls


async def test_spent_retries_still_pause_the_client() -> None:
    async with wired(max_retries=0, max_retry_wait=60) as (fake, client):
        fake.inject(429, retry_after=0.3)
        with pytest.raises(kx.RateLimitError):
            await client.submit(kx.ImageRequest("first"))
        started = anyio.current_time()
        await client.submit(kx.ImageRequest("second"))
    assert fake.submit_times[1] - fake.submit_times[0] >= 0.25
    assert anyio.current_time() - started > 0.2


async def test_503_asking_for_too_long_a_wait_is_a_rate_limit_error() -> None:
    async with wired(max_retry_wait=10) as (fake, client):
        fake.inject(503, retry_after=120)
        with pytest.raises(kx.RateLimitError) as caught:
            await client.submit(kx.ImageRequest("x"))
    assert caught.value.status_code == 503
    assert caught.value.retry_after == 120
    assert caught.value.maybe_created is False


async def test_rate_limit_retries_are_bounded() -> None:
    async with wired(max_retries=2) as (fake, client):
        fake.inject(429, retry_after=0.01, times=5)
        with pytest.raises(kx.RateLimitError) as caught:
            await client.submit(kx.ImageRequest("x"))
    assert fake.submit_calls == 3
    assert fake.accepted_submits == 0
    assert caught.value.maybe_created is False
    stats = client.stats
    assert (stats.submit_errors, stats.retries, stats.rate_limited) == (1, 2, 3)


async def test_503_with_retry_after_is_retried() -> None:
    async with wired() as (fake, client):
        fake.inject(503, retry_after=0.01)
        await client.submit(kx.ImageRequest("x"))
    assert fake.submit_calls == 2
    assert fake.accepted_submits == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_ambiguous_server_error_is_not_retried(status: int) -> None:
    async with wired() as (fake, client):
        fake.inject(status, create=True)
        with pytest.raises(kx.ServerError) as caught:
            await client.submit(kx.ImageRequest("x", generate_count=2))
        await fake.wait_idle()
    error = caught.value
    assert error.maybe_created is True
    assert error.status_code == status
    assert "may have created" in str(error)
    assert fake.submit_calls == 1
    assert fake.accepted_submits == 1  # the service did bill it: no second submit


async def test_read_timeout_after_sending_is_ambiguous() -> None:
    # The reply takes far longer than the timeout; the timeout is long enough for the
    # request to arrive on a busy machine (0.2 s was not, with two test runs at once).
    async with FakeKeevx(api_key=API_KEY, latency=3.0) as fake, fake.serve() as server:
        async with kx.AsyncKeevx(api_key=API_KEY, base_url=server.url, timeout=1.5) as client:
            with pytest.raises(kx.TransportError) as caught:
                await client.submit(kx.ImageRequest("x"))
        assert fake.submit_calls == 1
    assert caught.value.maybe_created is True
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


async def test_connection_refused_is_retried_then_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="keevx_async")
    port = closed_port()
    async with kx.AsyncKeevx(
        api_key=API_KEY, base_url=f"http://127.0.0.1:{port}", max_retries=2
    ) as client:
        with pytest.raises(kx.TransportError) as caught:
            await client.submit(kx.ImageRequest("x"))
    assert caught.value.maybe_created is False
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    retries = [r for r in caplog.records if r.getMessage().startswith("retrying POST")]
    assert len(retries) == 2
    # Plain words on every transport: no "ssl:default" (aiohttp's) for plain http.
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "ssl" not in str(caught.value)


async def test_business_error_keeps_code_and_msg() -> None:
    refusal: tuple[int, object, dict[str, str]] = (
        200,
        {"code": 530003, "msg": "task creation failed", "data": None},
        {},
    )
    app = ScriptedApp(refusal)
    async with scripted_client(app) as client:
        with pytest.raises(kx.APIError) as caught:
            await client.submit(kx.ImageRequest("x"))
    error = caught.value
    assert type(error) is kx.APIError
    assert (error.code, error.msg, error.status_code) == (530003, "task creation failed", 200)
    assert error.maybe_created is False
    assert error.request == kx.ImageRequest("x")
    assert len(app.requests) == 1


@pytest.mark.parametrize(
    ("status", "error_type", "maybe_created"),
    [
        (400, kx.APIError, False),
        (401, kx.AuthenticationError, False),
        (403, kx.AuthenticationError, False),
        (404, kx.APIError, False),
        (418, kx.APIError, False),
        (500, kx.ServerError, True),
        (599, kx.ServerError, True),
        (302, kx.APIError, True),
    ],
)
async def test_http_status_maps_to_error(
    status: int, error_type: type[kx.APIError], maybe_created: bool
) -> None:
    app = ScriptedApp((status, b"<html>nope</html>", {}))
    async with scripted_client(app) as client:
        with pytest.raises(error_type) as caught:
            await client.submit(kx.ImageRequest("x"))
    assert type(caught.value) is error_type
    assert caught.value.status_code == status
    assert caught.value.code == status
    assert caught.value.maybe_created is maybe_created
    assert len(app.requests) == 1


async def test_wrong_api_key_raises_authentication_error() -> None:
    async with FakeKeevx(api_key="right") as fake, fake.http_client() as http:
        async with kx.AsyncKeevx(
            api_key="wrong", base_url=fake.base_url, http_client=http
        ) as client:
            with pytest.raises(kx.AuthenticationError) as caught:
                await client.submit(kx.ImageRequest("x"))
    assert caught.value.status_code == 401
    assert caught.value.maybe_created is False


@pytest.mark.parametrize(
    "reply",
    [
        b"not json",
        b'{"code": 0, "msg": "ok"}',
        b'{"code": 0, "msg": "ok", "data": {"task_ids": []}}',
        b'{"code": 0, "msg": "ok", "data": {"task_ids": ["a", 5]}}',
        b'{"code": 0, "msg": "ok", "data": {"task_ids": ["a", "a"]}}',
        b'{"msg": "no code"}',
        b'{"code": 0, "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ],
    ids=["not json", "no data", "no ids", "id not a string", "repeated id", "no code", "nested"],
)
async def test_unreadable_submit_reply_is_ambiguous(reply: bytes) -> None:
    app = ScriptedApp((200, reply, {}))
    async with scripted_client(app) as client:
        with pytest.raises(kx.APIError) as caught:
            await client.submit(kx.ImageRequest("x"))
    assert caught.value.maybe_created is True
    assert "unreadable" in str(caught.value)


# --- retrieve ----------------------------------------------------------------------------


async def test_retrieve_reports_a_running_then_finished_task() -> None:
    async with wired({"complete_after": 0.2, "lost_rate": 1.0}) as (fake, client):
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        assert task.task_id is not None
        running = await client.retrieve(task.task_id)
        assert (running.status, running.done) == ("GENERATING", False)
        assert not task.done()
        await fake.wait_idle()
        finished = await client.retrieve(task.task_id)
    assert finished.done
    assert finished.thumbnail_url == fake.tasks[task.task_id].thumbnail_url
    assert task.result().image_url == finished.image_url
    assert task.result().task_type == "image_generate"


async def test_retrieve_resolves_a_failed_task_with_its_error() -> None:
    async with wired({"fail_rate": 1.0, "lost_rate": 1.0}) as (fake, client):
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        await fake.wait_idle()
        snapshot = await client.retrieve(task.task_id or "")
    error = task.exception()
    assert isinstance(error, kx.TaskFailedError)
    assert error.error_message == snapshot.error_message != ""


async def test_retrieve_unknown_task_raises_with_code() -> None:
    async with wired() as (_, client):
        with pytest.raises(kx.APIError) as caught:
            await client.retrieve("i2is-nope")
    assert caught.value.code == 110002
    assert caught.value.task_id == "i2is-nope"


async def test_retrieve_retries_transient_failures() -> None:
    async with wired({"lost_rate": 1.0}) as (fake, client):
        (task,) = (await client.submit(kx.ImageRequest("x"))).tasks
        await fake.wait_idle()
        fake.inject(500, route="get", times=2)
        snapshot = await client.retrieve(task.task_id or "")
    assert snapshot.done
    assert fake.get_calls == 3
    assert (client.stats.retries, client.stats.rate_limited) == (2, 0)


async def test_retrieve_of_a_task_nobody_waits_for_changes_nothing() -> None:
    async with wired({"lost_rate": 1.0}) as (fake, client):
        task_id = (await client.submit(kx.ImageRequest("x"))).task_ids[0]
        # The submission was dropped, so nothing waits for the task any more.
        await fake.wait_idle()
        snapshot = await client.retrieve(task_id)
        stats = client.stats
    assert snapshot.done
    assert (stats.pending, stats.buffered, stats.resolved_by_lookup) == (0, 0, 0)


@pytest.mark.parametrize(
    "data",
    [None, [], {"task_id": "i2is-a"}, {"task_id": "i2is-a", "status": ""}],
)
async def test_unreadable_task_reply_raises_api_error(data: object) -> None:
    app = ScriptedApp((200, {"code": 0, "msg": "ok", "data": data}, {}))
    async with scripted_client(app) as client:
        with pytest.raises(kx.APIError, match="unreadable task reply") as caught:
            await client.retrieve("i2is-a")
    assert caught.value.task_id == "i2is-a"
    assert caught.value.maybe_created is False


async def test_retrieve_refuses_an_empty_task_id() -> None:
    async with wired() as (fake, client):
        with pytest.raises(ValueError, match="task_id"):
            await client.retrieve("")
    assert fake.get_calls == 0


@pytest.mark.parametrize("task_id", ["\ud800", "i2is-\udfff-1"])
async def test_a_task_id_with_a_lone_surrogate_is_refused_before_anything_is_sent(
    task_id: str,
) -> None:
    async with wired() as (fake, client):
        with pytest.raises(kx.InvalidRequestError, match="lone surrogate") as caught:
            await client.retrieve(task_id)
        assert caught.value.field == "task_id"
        with pytest.raises(kx.InvalidRequestError, match="lone surrogate"):
            await client.task(task_id, request=kx.ImageRequest("a fox"))
        assert client.stats.pending == 0
    assert fake.get_calls == 0


# --- construction ------------------------------------------------------------------------


def test_missing_api_key_raises_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEVX_API_KEY", raising=False)
    with pytest.raises(kx.AuthenticationError, match="KEEVX_API_KEY"):
        kx.AsyncKeevx()


def test_environment_supplies_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEVX_API_KEY", "env-key")
    monkeypatch.setenv("KEEVX_BASE_URL", "https://api.keevx.com/")
    monkeypatch.setenv("KEEVX_CALLBACK_URL", "https://hooks.example.test/cb")
    client = kx.AsyncKeevx()
    assert client.base_url == "https://api.keevx.com"
    assert client.callback_url == "https://hooks.example.test/cb"
    monkeypatch.delenv("KEEVX_BASE_URL")
    assert kx.AsyncKeevx().base_url == kx.DEFAULT_BASE_URL == "https://api.keevx.cn"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"max_per_second": 0}, "max_per_second"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retry_wait": -1}, "max_retry_wait"),
        ({"reconcile_after": 0}, "reconcile_after"),
        ({"max_callback_body": 0}, "max_callback_body"),
        ({"callback_token_in": "header"}, "callback_token_in"),
        ({"callback_url": "/relative"}, "callback_url"),
        ({"base_url": "ftp://x"}, "base_url"),
        ({"callback_secret": ""}, "callback_secret"),
        ({"callback_secret": []}, "callback_secret"),
    ],
)
def test_bad_options_raise_naming_the_option(options: dict[str, object], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        kx.AsyncKeevx(api_key="k", **options)  # type: ignore[arg-type]


async def test_own_http_client_is_closed_and_injected_one_is_not() -> None:
    async with kx.AsyncKeevx(api_key="k") as own:
        pass
    assert own._engine.http.is_closed
    async with httpx.AsyncClient() as http:
        async with kx.AsyncKeevx(api_key="k", http_client=http):
            pass
        assert not http.is_closed
    await own.aclose()  # closing twice is harmless
    assert "api.keevx.cn" in repr(own)
    with pytest.raises(RuntimeError, match="closed"):
        await own.submit(kx.ImageRequest("x"))
    with pytest.raises(RuntimeError, match="closed"):
        await own.retrieve("i2is-a")


@pytest.mark.parametrize("how", ["async with", "aclose"])
async def test_tasks_unfinished_when_the_client_closes_end_with_client_closed_error(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keevx_async")
    async with kx.testing.FakeKeevx(complete_after=1e9) as fake:
        async with fake.http_client() as http:
            client = kx.AsyncKeevx(
                api_key="test", base_url=fake.base_url, callback_url=CALLBACK_URL, http_client=http
            )
            if how == "async with":
                async with client:
                    submission = await client.submit(kx.ImageRequest("a fox", generate_count=3))
            else:
                submission = await client.submit(kx.ImageRequest("a fox", generate_count=3))
                await client.aclose()
    for task in submission.tasks:
        with anyio.fail_after(1):  # before the fix, this waited forever
            with pytest.raises(kx.ClientClosedError, match="re-attach") as caught:
                await task
        assert caught.value.task_id == task.task_id
        assert caught.value.request == submission.request
    assert client.stats.pending == 0
    assert "closed with 3 task(s) unfinished" in caplog.text


async def test_a_reply_arriving_as_the_client_closes_ends_its_tasks_too() -> None:
    async with kx.testing.FakeKeevx(complete_after=1e9, latency=0.2) as fake:
        async with fake.http_client() as http:
            client = kx.AsyncKeevx(
                api_key="test", base_url=fake.base_url, callback_url=CALLBACK_URL, http_client=http
            )
            submissions: list[kx.Submission] = []

            async def submit() -> None:
                submissions.append(await client.submit(kx.ImageRequest("late")))

            async with anyio.create_task_group() as tg:
                tg.start_soon(submit)
                await anyio.wait_all_tasks_blocked()
                # The submit is at the service, in its latency: no task exists yet.
                assert (fake.submit_calls, fake.accepted_submits) == (1, 0)
                await client.aclose()
            assert fake.accepted_submits == 1
    (submission,) = submissions
    assert isinstance(submission.tasks[0].exception(), kx.ClientClosedError)
    assert client.stats.pending == 0


async def test_cancelled_submit_in_flight_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keevx_async")
    async with wired({"latency": 5.0}) as (fake, client):
        with anyio.move_on_after(0.05):
            await client.submit(kx.ImageRequest("x"))
        assert fake.submit_calls == 1
    assert any("may have created" in r.getMessage() for r in caplog.records)


# --- over real loopback sockets ----------------------------------------------------------


async def test_end_to_end_over_loopback_http() -> None:
    async with FakeKeevx(api_key=API_KEY, complete_after=(0.0, 0.02), seed=5) as fake:
        async with fake.serve() as api:
            client = kx.AsyncKeevx(api_key=API_KEY, base_url=api.url, max_concurrency=4)
            async with client, serve_asgi(client.callback_app) as receiver:
                client.callback_url = f"{receiver.url}/keevx/callback?tenant=1"
                requests = [kx.ImageRequest(f"p{i}", generate_count=1 + i % 3) for i in range(9)]
                results = await client.generate_many(requests, timeout=10)
                await fake.wait_idle()
    assert fake.delivery_failures == []
    for request, outcome in zip(requests, results, strict=True):
        assert len(outcome) == request.generate_count
        for index, result in enumerate(outcome):
            assert isinstance(result, kx.ImageResult)
            assert fake.tasks[result.task_id].prompt == request.prompt
            assert result.index == index
    for task in fake.tasks.values():
        assert task.callback_url is not None
        assert parse_qs(urlsplit(task.callback_url).query)["tenant"] == ["1"]


def _callback_url(app: ScriptedApp, position: int = 0) -> str:
    """The callback URL (token included) the client sent in its ``position``-th submit."""
    url: str = json.loads(app.requests[position][3])["callback_url"]
    return url


# --- lifetime across tasks (notebook cells) -------------------------------------------


async def test_a_client_closes_from_another_task_while_entered() -> None:
    """``aclose()`` from any task: the entered client's work stops, its waiters end."""
    async with FakeKeevx(lose_if=lambda prompt: True) as fake, fake.http_client() as http:
        client = kx.AsyncKeevx(
            api_key="k",
            base_url=fake.base_url,
            http_client=http,
            callback_url="https://app.example.test/cb",
        )
        errors: list[BaseException] = []
        waiting = anyio.Event()

        async def waiter(task: kx.Task) -> None:
            waiting.set()
            try:
                await task
            except kx.ClientClosedError as exc:
                errors.append(exc)

        async with client:
            task = (await client.submit(kx.ImageRequest("never called back"))).tasks[0]
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter, task)
                await waiting.wait()
                async with anyio.create_task_group() as closer:
                    closer.start_soon(client.aclose)  # another task than the entering one
        assert [type(e) for e in errors] == [kx.ClientClosedError]
        assert client.stats.pending == 0
        with pytest.raises(RuntimeError, match="closed"):
            await client.submit(kx.ImageRequest("after close"))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_client_entered_in_one_cell_is_left_in_another() -> None:
    """A notebook runs each cell in a task of its own (asyncio): ``await
    client.__aenter__()`` in one cell and ``await client.__aexit__(...)`` in a later one
    used to raise "Attempted to exit cancel scope in a different task"."""
    holder: dict[str, Any] = {}
    async with FakeKeevx() as fake, fake.http_client() as http:

        async def enter() -> None:
            client = kx.AsyncKeevx(api_key="k", base_url=fake.base_url, http_client=http)
            holder["client"] = await client.__aenter__()

        async def use() -> None:
            holder["images"] = await holder["client"].generate(kx.ImageRequest("a fox"))

        async def leave() -> None:
            await holder["client"].__aexit__(None, None, None)

        for cell in (enter, use, leave):
            await asyncio.get_running_loop().create_task(cell())
    [image] = holder["images"]
    assert fake.tasks[image.task_id].prompt == "a fox"
    client = holder["client"]
    assert client.stats.pending == 0
    assert client._reconciler is not None
    assert not client._reconciler.running  # the sweeper stopped with the client


@contextlib.asynccontextmanager
async def _client_on(base_url: str, *, own_http_client: bool) -> AsyncIterator[kx.AsyncKeevx]:
    """A client of ``base_url`` with no retries: its own transport, or a plain
    ``httpx.AsyncClient`` of the caller's."""
    async with contextlib.AsyncExitStack() as stack:
        http = (
            await stack.enter_async_context(httpx.AsyncClient(trust_env=False))
            if own_http_client
            else None
        )
        yield await stack.enter_async_context(
            kx.AsyncKeevx(api_key="k", base_url=base_url, http_client=http, max_retries=0)
        )


@pytest.mark.parametrize("own_http_client", [False, True], ids=["default", "httpx"])
async def test_cancelled_submits_leave_no_resource_warning(own_http_client: bool) -> None:
    """Reported under trio (encode/httpx#3686: a request body's stream left unclosed when
    its send is cancelled). The SDK sends bytes bodies; with ``filterwarnings = error``,
    any ResourceWarning collected here fails the test (pytest's unraisable hook)."""
    async with FakeKeevx(latency=2.0) as fake, fake.serve() as server:
        async with _client_on(server.url, own_http_client=own_http_client) as client:
            async with anyio.create_task_group() as tg:
                for n in range(16):  # max_concurrency: all of them in flight at once
                    tg.start_soon(client.submit, kx.ImageRequest(f"cancelled {n}"))
                with anyio.fail_after(10):
                    while fake.in_flight < 16:  # noqa: ASYNC110 - the fake's own gauge
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()  # every request sent, none answered yet
        assert fake.submit_calls == 16
    gc.collect()


@pytest.mark.parametrize("own_http_client", [False, True], ids=["default", "httpx"])
async def test_submits_cancelled_mid_send_leave_no_unfinished_body_stream(
    own_http_client: bool,
) -> None:
    """Submits cancelled at every point of their send, over and over. httpx sends a body
    from an async generator: a send cancelled midway left it unfinished, and trio warned
    when it was collected ("Async generator 'httpx._content.ByteStream.__aiter__' was
    garbage collected before it had been exhausted", 24 times in 300 rounds here)."""
    caught: list[str] = []
    async with FakeKeevx(latency=0.5) as fake, fake.serve() as server:
        async with _client_on(server.url, own_http_client=own_http_client) as client:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                for round_ in range(120):
                    async with anyio.create_task_group() as tg:
                        for n in range(4):
                            tg.start_soon(client.submit, kx.ImageRequest(f"cut {round_}.{n}"))
                        for _ in range(round_ % 40):  # cut at a different point each round
                            await anyio.lowlevel.checkpoint()
                        tg.cancel_scope.cancel()
                    gc.collect()
            caught = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert fake.submit_calls > 0  # some sends got through before their cut
    assert caught == []
