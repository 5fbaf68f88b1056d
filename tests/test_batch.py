"""Batches and generate_many: streaming, laziness, failure isolation, cleanup."""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import httpx
import pytest
from wiring import wired

import keevx_async as kx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.anyio


async def test_batch_yields_every_task_once_with_its_request() -> None:
    rng = random.Random(3)
    requests = [kx.ImageRequest(f"p{i}", generate_count=rng.randint(1, 8)) for i in range(30)]
    seen: dict[str, kx.Task] = {}
    async with wired({"complete_after": (0.0, 0.02)}, max_concurrency=6) as (fake, client):
        async with client.batch(requests) as batch:
            async for task in batch:
                assert task.done()
                assert task.task_id is not None
                assert task.task_id not in seen
                seen[task.task_id] = task
        assert (batch.requests_read, batch.submitted, batch.submit_failed) == (30, 30, 0)
        assert batch.yielded == len(seen) == sum(r.generate_count for r in requests)
        assert batch.in_flight == 0
    assert set(seen) == set(fake.tasks)
    for task_id, task in seen.items():
        assert fake.tasks[task_id].prompt == task.request.prompt
        assert fake.tasks[task_id].index == task.index
        assert task.result().image_url == fake.tasks[task_id].image_url


async def test_results_stream_while_the_batch_still_submits() -> None:
    requests = [kx.ImageRequest(f"p{i}") for i in range(40)]
    async with wired({"latency": 0.005, "complete_after": 0.0}, max_concurrency=2) as (_, client):
        async with client.batch(requests) as batch:
            read_at_first_result = None
            async for _task in batch:
                if read_at_first_result is None:
                    read_at_first_result = batch.requests_read
    assert read_at_first_result is not None
    assert read_at_first_result < len(requests)


async def test_input_is_read_lazily_no_further_than_the_free_slots() -> None:
    pulled = 0

    def prompts() -> Iterator[str]:
        nonlocal pulled
        for i in range(200):
            pulled += 1
            yield f"prompt {i}"

    concurrency = 3
    async with wired({"latency": 0.002}, max_concurrency=16) as (_, client):
        async with client.batch(prompts(), concurrency=concurrency) as batch:
            async for _task in batch:
                # Never more read than submitted, failed, or in one of the free slots.
                unsent = pulled - batch.submitted - batch.submit_failed
                assert unsent <= concurrency
                assert batch.requests_read == pulled
    assert pulled == 200
    assert batch.yielded == 200


async def test_a_slow_consumer_holds_the_input_back() -> None:
    requests = [kx.ImageRequest(f"p{i}") for i in range(100)]
    max_pending, concurrency = 6, 2
    async with wired(max_concurrency=8) as (fake, client):
        async with client.batch(
            requests, concurrency=concurrency, max_pending=max_pending
        ) as batch:
            await fake.wait_for_submits(max_pending)  # the batch has filled its bound...
            await anyio.wait_all_tasks_blocked()  # ...and the replies are in
            # Nothing was yielded yet: reading stopped at the bound (plus the open slots).
            assert batch.pending >= max_pending
            assert batch.requests_read <= max_pending + concurrency
            read_before = batch.requests_read
            tasks = [task async for task in batch]
    assert read_before < 100
    assert len(tasks) == 100
    assert batch.pending == 0


async def test_several_consumers_share_one_batch() -> None:
    seen: list[list[str]] = [[], [], []]
    async with wired({"complete_after": (0.0, 0.05)}) as (_, client):
        async with client.batch([f"p{i}" for i in range(30)]) as batch:

            async def consume(worker: int) -> None:
                async for task in batch:
                    seen[worker].append(task.request.prompt)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for worker in range(3):
                        tg.start_soon(consume, worker)
    prompts = [prompt for worker in seen for prompt in worker]
    assert sorted(prompts) == sorted(f"p{i}" for i in range(30))


async def test_async_iterable_input() -> None:
    async def requests() -> AsyncIterator[kx.ImageRequest]:
        for i in range(10):
            await anyio.lowlevel.checkpoint()
            yield kx.ImageRequest(f"p{i}", generate_count=2)

    async with wired() as (fake, client):
        async with client.batch(requests()) as batch:
            tasks = [task async for task in batch]
    assert len(tasks) == 20 == len(fake.tasks)
    assert {t.task_id for t in tasks} == set(fake.tasks)


async def test_failed_submit_is_yielded_as_a_task_without_id() -> None:
    requests = [kx.ImageRequest(f"p{i}") for i in range(5)]
    async with wired(max_concurrency=1) as (fake, client):
        fake.inject(400)
        async with client.batch(requests) as batch:
            tasks = [task async for task in batch]
    failed = [t for t in tasks if t.task_id is None]
    assert len(failed) == 1
    assert failed[0].request is requests[0]
    assert failed[0].status == "SUBMIT_FAILED"
    error = failed[0].exception()
    assert isinstance(error, kx.APIError)
    assert error.status_code == 400
    with pytest.raises(kx.APIError):
        failed[0].result()
    assert len(tasks) == 5
    assert batch.submit_failed == 1


async def test_task_failures_are_isolated() -> None:
    requests = [kx.ImageRequest("ok 1"), kx.ImageRequest("bad 2"), kx.ImageRequest("ok 3")]
    async with wired({"fail_if": lambda prompt: prompt.startswith("bad")}) as (_, client):
        async with client.batch(requests) as batch:
            outcomes = {task.request.prompt: task.exception() async for task in batch}
    assert outcomes["ok 1"] is None
    assert outcomes["ok 3"] is None
    assert isinstance(outcomes["bad 2"], kx.TaskFailedError)


async def test_batch_timeout_yields_overdue_tasks_with_task_timeout_error() -> None:
    async with wired({"lost_rate": 1.0}) as (fake, client):
        requests = [kx.ImageRequest(f"p{i}", generate_count=2) for i in range(4)]
        async with client.batch(requests, timeout=0.05) as batch:
            tasks = [task async for task in batch]
        stats = client.stats
        await fake.wait_idle()
    assert len(tasks) == 8
    for task in tasks:
        error = task.exception()
        assert isinstance(error, kx.TaskTimeoutError)
        assert error.task_id == task.task_id
        assert error.timeout == 0.05
    assert stats.pending == 0


async def test_yielded_tasks_are_not_kept_alive_by_a_long_timeout() -> None:
    alive: list[weakref.ref[kx.Task]] = []
    async with wired({"complete_after": 0.0}, max_concurrency=8) as (_, client):
        async with client.batch([f"p{i}" for i in range(600)], timeout=3600) as batch:
            async for task in batch:
                alive.append(weakref.ref(task))
            del task
            gc.collect()
            # Inside the block, before the batch lets go of everything on exit.
            still_alive = sum(1 for ref in alive if ref() is not None)
    assert len(alive) == 600
    assert still_alive <= 64 + 2 * 8


async def test_late_callback_after_batch_timeout_is_a_duplicate() -> None:
    async with wired({"complete_after": 0.3}) as (fake, client):
        async with client.batch([kx.ImageRequest("slow")], timeout=0.05) as batch:
            (task,) = [t async for t in batch]
        assert isinstance(task.exception(), kx.TaskTimeoutError)
        await fake.wait_idle()
        stats = client.stats
    assert fake.callbacks_sent == 1
    assert stats.callbacks_duplicate == 1
    assert stats.buffered == 0


async def test_leaving_the_block_early_cancels_and_leaks_nothing() -> None:
    requests = [kx.ImageRequest(f"p{i}", generate_count=3) for i in range(50)]
    async with wired({"complete_after": (0.0, 0.05)}, max_concurrency=4) as (fake, client):
        async with client.batch(requests) as batch:
            async for _task in batch:
                break
        stats = client.stats
        await fake.wait_idle()
        after = client.stats
    assert batch.requests_read < 50
    assert stats.pending == 0
    assert stats.buffered == 0
    assert after.pending == 0
    assert after.buffered == 0  # late callbacks of cancelled tasks are not kept


async def test_cancelling_a_running_batch_leaks_nothing() -> None:
    requests = [kx.ImageRequest(f"p{i}", generate_count=2) for i in range(30)]

    async def cancel_once_submitted(batch: kx.Batch, scope: anyio.CancelScope) -> None:
        while batch.submitted < 5:  # noqa: ASYNC110 - a batch has no event for it
            await anyio.sleep(0.001)
        scope.cancel()

    async with wired({"lost_rate": 1.0}, max_concurrency=4) as (_, client):
        with anyio.CancelScope() as scope:
            async with client.batch(requests) as batch, anyio.create_task_group() as tg:
                tg.start_soon(cancel_once_submitted, batch, scope)
                async for _task in batch:
                    pass
        assert scope.cancelled_caught
        assert batch.submitted >= 5
        assert batch.yielded == 0
        assert client.stats.pending == 0
        assert client.stats.tasks_created >= 10


async def test_exception_in_the_block_propagates_unwrapped() -> None:
    async with wired() as (_, client):
        with pytest.raises(LookupError, match="mine"):
            async with client.batch([kx.ImageRequest("x")]) as batch:
                async for _task in batch:
                    raise LookupError("mine")
        assert client.stats.pending == 0


@pytest.mark.parametrize(("bad", "error"), [(42, TypeError), ("", kx.InvalidRequestError)])
async def test_invalid_input_item_stops_the_batch_with_a_clear_error(
    bad: object, error: type[Exception]
) -> None:
    items: list[object] = ["fine", bad, "never read"]
    yielded: list[str] = []
    async with wired({"complete_after": 0.05}) as (fake, client):
        with pytest.raises(error, match=r"prompt|requests\[1\]"):
            async with client.batch(items) as batch:  # type: ignore[arg-type]
                async for task in batch:
                    yielded.append(task.result().image_url)
        assert client.stats.pending == 0
    # The request read before the bad one was still finished and reported.
    assert len(yielded) == 1
    assert batch.requests_read == 1
    assert fake.accepted_submits == 1


async def test_input_that_fails_midway_still_reports_what_it_gave() -> None:
    def prompts() -> Iterator[str]:
        yield "one"
        yield "two"
        raise OSError("the database went away")

    async with wired({"complete_after": 0.05}) as (_, client):
        seen: list[str] = []
        with pytest.raises(OSError, match="database"):
            async with client.batch(prompts()) as batch:
                async for task in batch:
                    seen.append(task.request.prompt)
    assert sorted(seen) == ["one", "two"]


async def test_generate_many_checks_a_whole_list_before_sending() -> None:
    async with wired() as (fake, client):
        with pytest.raises(kx.InvalidRequestError, match="prompt"):
            await client.generate_many(["fine", "x" * 1001, "also fine"])
    assert fake.submit_calls == 0


async def test_batch_concurrency_is_capped_at_the_server() -> None:
    async with wired({"latency": 0.01}, max_concurrency=16) as (fake, client):
        async with client.batch([f"p{i}" for i in range(20)], concurrency=2) as batch:
            async for _task in batch:
                assert batch.submitting <= 2
    assert fake.max_in_flight == 2
    assert batch.submitting == 0


class BreaksOnce(httpx.AsyncBaseTransport):
    """The fake's transport, except that one submit fails with an error that is not
    httpx's (a bug in a transport of the caller's, not a network fault)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, breaks_at: int) -> None:
        self.inner = inner
        self.breaks_at = breaks_at
        self.posts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posts += 1
            if self.posts == self.breaks_at:
                raise RuntimeError("transport bug")
        return await self.inner.handle_async_request(request)


async def test_unexpected_error_in_one_submit_is_that_requests_error_and_the_batch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prompts = [f"p{i}" for i in range(11)]
    async with kx.testing.FakeKeevx(complete_after=0.001, seed=7) as fake:
        transport = BreaksOnce(httpx.ASGITransport(app=fake), breaks_at=6)
        async with (
            httpx.AsyncClient(transport=transport) as http,
            kx.AsyncKeevx(
                api_key="test",
                base_url=fake.base_url,
                callback_url="https://app.example.test/cb",
                http_client=http,
            ) as client,
        ):
            fake.deliver_into(client)
            async with client.batch(prompts, concurrency=1) as batch:
                tasks = [task async for task in batch]
    # Ten requests were accepted (and paid for): every one of their tasks is yielded.
    succeeded = {task.request.prompt: task.result().task_id for task in tasks if task.task_id}
    assert len(succeeded) == 10 == fake.accepted_submits
    assert set(succeeded.values()) == set(fake.tasks)
    # The sixth request is reported as its own failure, with the cause kept.
    (failed,) = [task for task in tasks if task.task_id is None]
    assert failed.request.prompt == "p5"
    assert failed.position == 5
    error = failed.exception()
    assert type(error) is kx.KeevxError
    assert error.maybe_created is True
    assert isinstance(error.__cause__, RuntimeError)
    assert "transport bug" in str(error)
    assert batch.submit_failed == 1
    assert batch.submitted == 10
    assert "submitting request 5 failed unexpectedly" in caplog.text
    assert client.stats.pending == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ctrl_c_in_a_submit_surfaces_as_keyboard_interrupt_not_a_group(backend: str) -> None:
    # Found by adversarial testing: under trio, KeyboardInterrupt raised in a submit came
    # out of the batch grouped in a BaseExceptionGroup, so `except KeyboardInterrupt`
    # missed it. A real SIGINT, in a process of its own.
    script = Path(__file__).with_name("interrupted_batch.py")
    done = subprocess.run(  # noqa: S603 (our own interpreter and script)
        [sys.executable, str(script), backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in (
        "KeyboardInterrupt in the program",
        "KeyboardInterrupt from the runner",  # asyncio: its runner turns SIGINT into this
    ), done.stdout + done.stderr


async def test_batch_refuses_bad_options() -> None:
    async with wired() as (_, client):
        with pytest.raises(ValueError, match="concurrency"):
            async with client.batch([], concurrency=0):
                pass
        with pytest.raises(ValueError, match="timeout"):
            async with client.batch([], timeout=0):
                pass
        with pytest.raises(ValueError, match="max_pending"):
            async with client.batch([], max_pending=0):
                pass
        async with client.batch([]) as empty:
            assert [t async for t in empty] == []


async def test_a_batch_must_be_entered_once_before_iterating() -> None:
    async with wired() as (_, client):
        batch = client.batch(["x"])
        with pytest.raises(RuntimeError, match="async with"):
            await batch.__anext__()
        async with batch:
            assert len([task async for task in batch]) == 1
        with pytest.raises(RuntimeError, match="runs once"):
            async with batch:
                pass


async def test_generate_many_is_aligned_with_its_input() -> None:
    requests: list[kx.ImageRequest | str] = [
        kx.ImageRequest("ok", generate_count=3),
        "bad prompt",
        kx.ImageRequest("refused"),
        "ok again",
    ]
    async with wired({"fail_if": lambda prompt: prompt.startswith("bad")}, max_concurrency=1) as (
        fake,
        client,
    ):
        fake.inject(500, times=1)  # the first submit to arrive fails
        results = await client.generate_many(requests)
    assert [len(r) for r in results] == [1, 1, 1, 1]
    assert isinstance(results[0][0], kx.ServerError)
    assert isinstance(results[1][0], kx.TaskFailedError)
    assert all(isinstance(r[0], kx.ImageResult) for r in results[2:])


async def test_generate_many_orders_each_requests_results_by_task_index() -> None:
    requests = [kx.ImageRequest(f"p{i}", generate_count=8) for i in range(5)]
    async with wired({"shuffle": True, "complete_after": (0.0, 0.03)}) as (fake, client):
        results = await client.generate_many(requests)
    for request, outcome in zip(requests, results, strict=True):
        assert [r.index for r in outcome if isinstance(r, kx.ImageResult)] == list(range(8))
        assert all(
            isinstance(r, kx.ImageResult) and fake.tasks[r.task_id].prompt == request.prompt
            for r in outcome
        )


async def test_ten_thousand_tasks_leave_the_registry_flat() -> None:
    requests = [kx.ImageRequest(f"prompt {i}", generate_count=4) for i in range(2500)]
    async with wired({"complete_after": (0.0, 0.01)}, max_concurrency=64) as (fake, client):
        count = 0
        peak_pending = 0
        async with client.batch(requests) as batch:
            async for task in batch:
                count += 1
                assert task.result().image_url.endswith(f"/{task.task_id}.png")
                peak_pending = max(peak_pending, client.stats.pending)
        gc.collect()
        stats = client.stats
    assert count == 10_000 == len(fake.tasks)
    assert peak_pending > 0
    assert stats.pending == 0
    assert stats.buffered == 0
    assert stats.resolved_by_callback == 10_000
