"""Reconciliation: tasks whose callback never comes are looked up, sparingly.

Every count here is measured at the fake server (GET requests it received), never by
timing the test.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from wiring import callback_body, wired

import keevx_async as kx
from keevx_async._reconcile import LOOKUPS_IN_FLIGHT, RECHECK_BASE, Reconciler
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import Sequence

    import httpx

pytestmark = pytest.mark.anyio


def is_lost(prompt: str) -> bool:
    return prompt.startswith("lost")


def image_url(fake: FakeKeevx, task_id: str) -> str:
    return f"{fake.image_base_url}/{task_id}.png"


def assert_results_match(
    fake: FakeKeevx,
    requests: Sequence[kx.ImageRequest],
    outcomes: Sequence[Sequence[kx.ImageResult | kx.KeevxError]],
) -> None:
    """Each result belongs to the task the fake created for that request."""
    assert len(outcomes) == len(requests)
    for request, results in zip(requests, outcomes, strict=True):
        assert len(results) == request.generate_count
        for index, result in enumerate(results):
            assert isinstance(result, kx.ImageResult), result
            assert result.request is request
            assert result.index == index
            made = fake.tasks[result.task_id]
            assert made.prompt == request.prompt
            assert made.index == index
            assert result.image_url == image_url(fake, result.task_id)


async def test_lost_callbacks_are_recovered_by_one_lookup_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="keevx_async")
    requests = [
        kx.ImageRequest(f"{'lost' if n % 2 else 'kept'} prompt {n}", generate_count=2)
        for n in range(10)
    ]
    async with wired({"lose_if": is_lost}, reconcile_after=0.5) as (fake, client):
        outcomes = await client.generate_many(requests, timeout=20)
        await fake.wait_idle()
        stats = client.stats
    # Found by trying it as a user: an unreachable callback URL left no log line at all.
    # The first task finished by a lookup says what to check, once (not ten times).
    hints = [r.getMessage() for r in caplog.records if "its callback had not come" in r.msg]
    assert len(hints) == 1
    assert "reachable from the service" in hints[0]

    assert_results_match(fake, requests, outcomes)
    lost = [task for task in fake.tasks.values() if task.lost]
    assert len(lost) == 10
    # The tasks had long finished when their lookup was due: one GET each, no more, and
    # none at all for the tasks whose callback came.
    assert fake.get_calls == 10
    assert stats.resolved_by_lookup == 10
    assert stats.callbacks_missed == 10
    assert stats.resolved_by_callback == 10
    assert stats.lookups == 10
    assert stats.lookup_errors == 0
    assert stats.pending == 0


async def test_a_task_still_running_is_looked_up_again_at_doubling_intervals() -> None:
    # Finishes 0.6 s after creation; lookups come at 0.05, 0.1, 0.2, 0.4, 0.8 s: the last
    # finds it done. A constant 0.05 s interval would have made a dozen GETs.
    async with wired({"lose_if": is_lost, "complete_after": 0.6}, reconcile_after=0.05) as (
        fake,
        client,
    ):
        [result] = await client.generate(kx.ImageRequest("lost slowly"), timeout=20)
        stats = client.stats

    assert result.image_url == image_url(fake, result.task_id)
    assert 2 <= fake.get_calls <= 6
    assert stats.lookups == fake.get_calls
    assert stats.resolved_by_lookup == 1


async def test_a_callback_after_the_lookup_is_a_duplicate() -> None:
    async with wired({"lose_if": is_lost}, reconcile_after=0.05) as (fake, client):
        [result] = await client.generate(kx.ImageRequest("lost once"), timeout=20)
        made = fake.tasks[result.task_id]
        assert made.callback_url is not None
        body = callback_body(result.task_id, image_url=image_url(fake, result.task_id))
        outcome = await client.feed_callback(body, url=made.callback_url)
        stats = client.stats

    assert outcome is kx.CallbackOutcome.DUPLICATE
    assert stats.resolved_by_lookup == 1
    assert stats.resolved_by_callback == 0
    assert stats.callbacks_duplicate == 1


async def test_callbacks_racing_lookups_resolve_every_task_once() -> None:
    # Tasks finish (and call back) anywhere between 0 and 0.15 s while lookups start at
    # 0.05 s: both paths fire for many tasks, each task is resolved exactly once.
    requests = [kx.ImageRequest(f"race {n}", generate_count=4) for n in range(50)]
    fake_options = {"complete_after": (0.0, 0.15)}
    async with wired(fake_options, reconcile_after=0.05, reconcile_per_second=None) as (
        fake,
        client,
    ):
        outcomes = await client.generate_many(requests, timeout=20)
        await fake.wait_idle()
        stats = client.stats

    assert_results_match(fake, requests, outcomes)
    assert stats.resolved_by_callback + stats.resolved_by_lookup == 200
    # Each task was called back once; a callback that found its task already resolved
    # by a lookup changed nothing.
    assert fake.callbacks_sent == 200
    assert stats.callbacks_duplicate == stats.resolved_by_lookup


async def test_without_a_callback_url_every_result_comes_by_lookup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    requests = [kx.ImageRequest(f"no receiver {n}", generate_count=1 + n % 3) for n in range(12)]
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        async with wired(callback_url=None, reconcile_after=0.05) as (fake, client):
            assert client.callback_url is None
            outcomes = await client.generate_many(requests, timeout=20)
            stats = client.stats

    assert_results_match(fake, requests, outcomes)
    assert fake.callbacks_sent == 0
    assert stats.resolved_by_lookup == sum(r.generate_count for r in requests)
    notes = [r.getMessage() for r in caplog.records if "no callback_url" in r.getMessage()]
    assert len(notes) == 1
    assert "status lookups" in notes[0]
    # Sent without a callback URL: no callback was expected, so no hint about one.
    assert not [r for r in caplog.records if "its callback had not come" in r.msg]


async def test_a_plain_script_with_default_settings_gets_its_results() -> None:
    # The defaults: no callback URL and reconcile_after=300 look up after RECHECK_BASE s.
    async with FakeKeevx(complete_after=0.01) as fake, fake.client(callback_url=None) as client:
        with anyio.fail_after(RECHECK_BASE + 20):
            [result] = await client.generate(kx.ImageRequest("a quiet lake"))

    assert result.image_url == image_url(fake, result.task_id)
    assert fake.get_calls == 1


async def test_reconcile_after_none_makes_no_lookup() -> None:
    async with wired({"lose_if": is_lost}, reconcile_after=None) as (fake, client):
        with pytest.raises(kx.TaskTimeoutError):
            await client.generate(kx.ImageRequest("lost forever"), timeout=0.3)
        outcomes = await client.generate_many(["lost too"], timeout=0.2)
        stats = client.stats

    assert isinstance(outcomes[0][0], kx.TaskTimeoutError)
    assert fake.get_calls == 0
    assert stats.lookups == 0
    assert stats.overdue_scheduled == 0


async def test_a_task_whose_wait_timed_out_is_not_looked_up() -> None:
    async with wired({"lose_if": is_lost}, reconcile_after=0.3) as (fake, client):
        with pytest.raises(kx.TaskTimeoutError):
            await client.generate(kx.ImageRequest("lost and abandoned"), timeout=0.05)
        # Well past the due time: the sweeper found no waiter and made no GET.
        await anyio.sleep(0.6)
        stats = client.stats

    assert fake.get_calls == 0
    assert stats.lookups == 0


async def test_overdue_tasks_respect_reconcile_per_second() -> None:
    rate = 200.0
    async with wired(
        {"lose_if": is_lost, "complete_after": 0.0},
        reconcile_after=0.01,
        reconcile_per_second=rate,
        max_concurrency=64,
    ) as (fake, client):
        submissions = []

        async def submit_all(first: int) -> None:
            for n in range(first, 1250, 8):
                request = kx.ImageRequest(f"lost {n}", generate_count=8)
                submissions.append(await client.submit(request))

        async with anyio.create_task_group() as tg:
            for first in range(8):
                tg.start_soon(submit_all, first)
        # 10,000 tasks are overdue now; let the sweeper make enough lookups to show its
        # pace, then close.
        await fake.wait_for_gets(50)
        stats = client.stats

    times = fake.get_times
    assert sum(len(s.tasks) for s in submissions) == 10_000
    assert times, "the sweeper made no lookup at all"
    span = times[-1] - times[0]
    # Started at most `rate` per second (a lookup counts at the fake when it arrives, so
    # allow the few in flight at once), nowhere near the 10,000 that are overdue.
    assert len(times) <= rate * span + 8
    assert len(times) < 1000
    # Each GET the fake answered resolved its task, but for those still in flight when the
    # stats were read.
    assert len(times) - LOOKUPS_IN_FLIGHT <= stats.resolved_by_lookup <= len(times)


async def test_lookups_never_block_submits() -> None:
    async with wired({"lose_if": is_lost}, reconcile_after=0.01, max_concurrency=2) as (
        fake,
        client,
    ):
        # Every lookup fails with a retryable 500 and backs off, holding all its slots.
        fake.inject(500, route="get", times=10_000)
        lost = [await client.submit(kx.ImageRequest(f"lost {n}")) for n in range(20)]
        await fake.wait_for_gets(1)
        assert fake.get_calls > 0
        with anyio.fail_after(10):
            [result] = await client.generate(kx.ImageRequest("kept while lookups fail"))
        stats = client.stats

    assert result.request.prompt == "kept while lookups fail"
    # No lost task was resolved: each ended when the client closed.
    assert all(isinstance(task.exception(), kx.ClientClosedError) for s in lost for task in s.tasks)
    assert stats.retries > 0


async def test_a_lookup_error_is_counted_and_the_task_looked_up_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        async with wired({"lose_if": is_lost}, reconcile_after=0.05) as (fake, client):
            fake.inject(404, route="get", times=2)  # not retried: a 4xx is an answer
            [result] = await client.generate(kx.ImageRequest("lost, then found"), timeout=20)
            stats = client.stats

    assert result.image_url == image_url(fake, result.task_id)
    assert fake.get_calls == 3
    assert stats.lookup_errors == 2
    assert stats.resolved_by_lookup == 1
    failures = [r for r in caplog.records if "looking up overdue task" in r.getMessage()]
    assert len(failures) == 2
    assert result.task_id in failures[0].getMessage()


async def test_a_lookup_honours_the_client_wide_429_pause() -> None:
    async with wired({"lose_if": is_lost}, reconcile_after=0.05) as (fake, client):
        fake.inject(429, route="get", retry_after=0.3)
        [result] = await client.generate(kx.ImageRequest("lost under a 429"), timeout=20)
        stats = client.stats

    assert result.image_url == image_url(fake, result.task_id)
    assert stats.rate_limited == 1
    assert fake.get_calls == 2
    assert fake.get_times[1] - fake.get_times[0] >= 0.3


async def test_the_schedule_forgets_tasks_resolved_by_callback() -> None:
    # Lookups are due in 300 s, but the 3,000 tasks are resolved by callback at once: the
    # schedule is compacted as it grows, so it never holds much more than the pending work.
    async with wired(reconcile_after=300) as (fake, client):
        await client.generate_many([f"prompt {n}" for n in range(3000)], timeout=20)
        stats = client.stats

    assert stats.resolved_by_callback == 3000
    assert 0 < stats.overdue_scheduled < 1024
    assert fake.get_calls == 0


def never_entered(
    fake: FakeKeevx, http: httpx.AsyncClient, *, reconcile_after: float
) -> kx.AsyncKeevx:
    """A client with a callback URL that the test never enters (``async with``)."""
    return kx.AsyncKeevx(
        api_key="k",
        base_url=fake.base_url,
        http_client=http,
        callback_url="https://app.example.test/cb",
        reconcile_after=reconcile_after,
    )


async def test_a_client_not_entered_looks_up_nothing_while_nobody_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with FakeKeevx(lose_if=is_lost) as fake, fake.http_client() as http:
        client = never_entered(fake, http, reconcile_after=0.01)
        with caplog.at_level(logging.WARNING, logger="keevx_async"):
            submission = await client.submit(kx.ImageRequest("lost 1"))
            await anyio.sleep(0.1)
            assert fake.get_calls == 0  # no task of the client's own to run lookups in
            assert client.stats.overdue_scheduled == 1  # but the lookup is planned
            # The first wait makes it: the waiter drives the lookups.
            image = await submission.tasks[0].wait(5)
        await client.aclose()

    assert image.task_id == submission.task_ids[0]
    assert fake.get_calls == 1
    # No log line says lookups will not happen (they do).
    assert not [r for r in caplog.records if "not entered" in r.getMessage()]


@pytest.mark.parametrize("how", ["wait", "generate", "batch"])
async def test_a_client_never_entered_recovers_lost_callbacks_while_awaited(how: str) -> None:
    # Found by trying the Django recipe: a client that is never entered (`async with`)
    # never looked up a lost callback, so the task timed out instead.
    requests = [kx.ImageRequest(f"lost {n}", generate_count=2) for n in range(3)]
    async with FakeKeevx(lose_if=is_lost) as fake, fake.http_client() as http:
        client = never_entered(fake, http, reconcile_after=0.05)
        try:
            with anyio.fail_after(10):
                if how == "wait":
                    outcomes: list[list[kx.ImageResult | kx.KeevxError]] = []
                    for request in requests:
                        submission = await client.submit(request)
                        outcomes.append([await task for task in submission.tasks])
                elif how == "generate":
                    outcomes = [list(await client.generate(r, timeout=10)) for r in requests]
                else:
                    outcomes = await client.generate_many(requests, timeout=10)
            stats = client.stats
        finally:
            await client.aclose()
    assert_results_match(fake, requests, outcomes)
    assert stats.resolved_by_lookup == 6
    assert fake.get_calls == 6


async def test_the_next_waiter_takes_the_lookups_over() -> None:
    """Two tasks awaited in two tasks of the app: when the first waiter stops (its own
    timeout), the second drives the lookups for its task from then on."""
    async with FakeKeevx(lose_if=is_lost, complete_after=0.3) as fake, fake.http_client() as http:
        client = never_entered(fake, http, reconcile_after=0.01)
        first = (await client.submit(kx.ImageRequest("lost first"))).tasks[0]
        second = (await client.submit(kx.ImageRequest("lost second"))).tasks[0]
        gave_up = anyio.Event()
        results: dict[str, kx.ImageResult] = {}

        async def impatient() -> None:
            with pytest.raises(kx.TaskTimeoutError):
                await first.wait(0.05)  # drives the sweeper, then stops
            gave_up.set()

        async def patient() -> None:
            results["second"] = await second.wait(10)

        async with anyio.create_task_group() as tg:
            tg.start_soon(impatient)
            tg.start_soon(patient)
        assert gave_up.is_set()
        # Nobody waits on the first task now; its lookups wait for the next waiter.
        assert not first.done()
        results["first"] = await first.wait(10)
        await client.aclose()

    assert results["second"].task_id == second.task_id
    assert results["first"].task_id == first.task_id
    assert client.stats.resolved_by_lookup == 2


async def test_a_client_used_across_tasks_like_notebook_cells() -> None:
    """A notebook runs each cell in a task of its own: the client is made in one, used
    in the next ones, closed in the last, and never entered."""
    holder: dict[str, Any] = {}
    async with FakeKeevx(lose_if=is_lost) as fake, fake.http_client() as http:

        async def cell_1() -> None:
            holder["client"] = kx.AsyncKeevx(
                api_key="k", base_url=fake.base_url, http_client=http, reconcile_after=0.05
            )  # no callback URL: results come from lookups

        async def cell_2() -> None:
            client = holder["client"]
            holder["images"] = await client.generate(kx.ImageRequest("a cat"), timeout=10)

        async def cell_3() -> None:
            await holder["client"].aclose()

        for cell in (cell_1, cell_2, cell_3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(cell)
    [image] = holder["images"]
    assert fake.tasks[image.task_id].prompt == "a cat"
    assert image.image_url == image_url(fake, image.task_id)


async def test_a_task_nobody_holds_is_not_looked_up() -> None:
    async with wired({"lose_if": is_lost}, reconcile_after=0.01) as (fake, client):
        await client.submit(kx.ImageRequest("lost and dropped"))  # the Submission is dropped
        await anyio.sleep(0.2)
        stats = client.stats

    assert fake.get_calls == 0
    assert stats.pending == 0


async def test_entering_twice_or_after_close_is_refused() -> None:
    async with FakeKeevx() as fake, fake.client() as client:
        with pytest.raises(RuntimeError, match="already entered"):
            await client.__aenter__()
    with pytest.raises(RuntimeError, match="closed"):
        await client.__aenter__()


async def test_leaving_the_client_stops_lookups_in_flight() -> None:
    async with FakeKeevx(lose_if=is_lost, latency=0.0) as fake:
        # A hang guard, not a timing check: a lookup at the server takes 5 s from here on.
        with anyio.fail_after(4):
            async with fake.client(reconcile_after=0.01) as client:
                submission = await client.submit(kx.ImageRequest("lost while closing"))
                fake.latency = 5.0
                await fake.wait_for_gets(1)
        # Leaving the block cancelled the hanging lookup instead of waiting for it.
        assert client.stats.lookups == 0
        # Not resolved by the cancelled lookup: it ended when the client closed.
        assert isinstance(submission.tasks[0].exception(), kx.ClientClosedError)


@pytest.mark.parametrize(
    ("option", "value"),
    [("reconcile_per_second", 0), ("reconcile_per_second", -1.0), ("reconcile_after", 0)],
)
def test_reconcile_options_are_validated(option: str, value: float) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ValueError, match=option):
        kx.AsyncKeevx(api_key="k", **options)


async def test_an_unexpected_lookup_error_never_stops_the_sweeper(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pending = {"a", "b"}
    calls: list[str] = []

    async def lookup(task_id: str) -> None:
        calls.append(task_id)
        if task_id == "a":
            raise ZeroDivisionError("boom")
        pending.discard(task_id)

    reconciler = Reconciler(
        lookup=lookup,
        is_pending=pending.__contains__,
        pending_count=lambda: len(pending),
        after=0.01,
        per_second=None,
    )
    reconciler.schedule(["a"], has_callback=True)  # kept for the first sweeper
    assert reconciler.scheduled == 1
    with caplog.at_level(logging.ERROR, logger="keevx_async"):
        async with anyio.create_task_group() as tg:
            await tg.start(reconciler.host)
            reconciler.schedule(["b"], has_callback=True)
            with anyio.fail_after(5):
                while calls.count("a") < 2:  # noqa: ASYNC110 - polled test observation
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()

    assert "b" not in pending
    assert calls.count("b") == 1
    assert reconciler.counters.lookup_errors >= 2
    assert not reconciler.running
    assert reconciler.scheduled == 1  # "a" is still pending: kept for the next sweeper
    reconciler.close()
    assert reconciler.scheduled == 0
    assert any("unexpectedly" in r.getMessage() for r in caplog.records)
