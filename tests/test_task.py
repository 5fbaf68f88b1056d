"""Task: waiting, reading, cancellation and wait_all (on asyncio and trio)."""

from __future__ import annotations

import anyio
import pytest

import keevx_async as kx
from keevx_async._models import CallbackPayload
from keevx_async._registry import TaskRegistry
from keevx_async._task import wait_all

pytestmark = pytest.mark.anyio

REQUEST = kx.ImageRequest("a lighthouse at dawn", generate_count=2)


def _tasks(registry: TaskRegistry, count: int = 1) -> list[kx.Task]:
    tasks = [kx.Task(f"t{i}", REQUEST, i, submission_id="s1") for i in range(count)]
    registry.register(tasks)
    return tasks


def _succeed(registry: TaskRegistry, task_id: str) -> None:
    payload = CallbackPayload(
        task_id=task_id, status="SUCCEEDED", image_url=f"https://cdn.test/{task_id}.png"
    )
    assert registry.apply(payload, "s1") is kx.CallbackOutcome.RESOLVED


def _fail(registry: TaskRegistry, task_id: str, message: str = "refused") -> None:
    payload = CallbackPayload(task_id=task_id, status="FAILED", error_message=message)
    assert registry.apply(payload, "s1") is kx.CallbackOutcome.RESOLVED


# --- reading without waiting ----------------------------------------------------------------


def test_unfinished_task_reports_pending() -> None:
    task = kx.Task("t1", REQUEST, 0)
    assert not task.done()
    assert task.status == "GENERATING"
    with pytest.raises(kx.TaskPendingError) as caught:
        task.result()
    assert caught.value.task_id == "t1"
    with pytest.raises(kx.TaskPendingError):
        task.exception()
    assert "t1" in repr(task)
    assert "done" not in repr(task)


def test_succeeded_task_gives_its_result_and_no_exception() -> None:
    registry = TaskRegistry()
    (task,) = _tasks(registry)
    _succeed(registry, "t0")
    assert task.done()
    assert task.exception() is None
    assert task.result().image_url == "https://cdn.test/t0.png"
    assert repr(task).endswith("done>")


def test_failed_task_raises_its_error_from_result() -> None:
    registry = TaskRegistry()
    (task,) = _tasks(registry)
    _fail(registry, "t0", "nsfw")
    error = task.exception()
    assert isinstance(error, kx.TaskFailedError)
    with pytest.raises(kx.TaskFailedError) as caught:
        task.result()
    assert caught.value is error
    assert error.error_message == "nsfw"


def test_request_that_was_never_submitted_is_a_finished_task_raising_the_submit_error() -> None:
    error = kx.APIError("parameter error", code=100001, status_code=200, request=REQUEST)
    task = kx.Task._not_submitted(REQUEST, error)
    assert task.task_id is None
    assert task.done()
    assert task.status == "SUBMIT_FAILED"
    assert task.exception() is error
    with pytest.raises(kx.APIError) as caught:
        task.result()
    assert caught.value is error


class _Collector:
    """A completion sink, as a batch is: told once when a task finishes."""

    def __init__(self) -> None:
        self.finished: list[kx.Task] = []

    def task_done(self, task: kx.Task) -> None:
        assert task.done()
        self.finished.append(task)


def test_completion_sink_is_told_once_when_the_task_finishes() -> None:
    registry = TaskRegistry()
    first, second = _tasks(registry, 2)
    sink = _Collector()
    first._sink = sink
    second._sink = sink

    _fail(registry, "t1")
    _succeed(registry, "t0")
    assert (
        registry.apply(
            CallbackPayload(task_id="t0", status="SUCCEEDED", image_url="https://x.test/y.png"),
            "s1",
        )
        is kx.CallbackOutcome.DUPLICATE
    )

    assert sink.finished == [second, first]


# --- waiting ----------------------------------------------------------------------------------


async def test_wait_and_await_return_the_result_once_resolved() -> None:
    registry = TaskRegistry()
    (task,) = _tasks(registry)
    results: list[kx.ImageResult] = []

    async def waiter() -> None:
        results.append(await task)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert results == []
        _succeed(registry, "t0")

    assert results == [task.result()]
    assert await task.wait() == task.result()
    assert await task.wait(timeout=0) == task.result()
    assert task._waiters is None


async def test_wait_raises_the_task_failure() -> None:
    registry = TaskRegistry()
    (task,) = _tasks(registry)
    _fail(registry, "t0", "bad prompt")
    with pytest.raises(kx.TaskFailedError, match="bad prompt"):
        await task


async def test_wait_timeout_leaves_the_task_resolvable() -> None:
    registry = TaskRegistry()
    (task,) = _tasks(registry)

    with pytest.raises(kx.TaskTimeoutError) as caught:
        await task.wait(timeout=0.01)

    error = caught.value
    assert isinstance(error, TimeoutError)
    assert error.task_id == "t0"
    assert error.timeout == 0.01
    assert error.request is REQUEST
    assert not task.done()
    assert task._waiters is None
    assert registry.get("t0") is task

    _succeed(registry, "t0")
    assert (await task.wait(timeout=5)).image_url == "https://cdn.test/t0.png"


async def test_cancelled_waiter_leaves_nothing_behind_and_the_task_still_resolves() -> None:
    registry = TaskRegistry()
    (task,) = _tasks(registry)

    async with anyio.create_task_group() as tg:
        tg.start_soon(task.wait)
        await anyio.wait_all_tasks_blocked()
        assert task._waiters is not None
        assert len(task._waiters) == 1
        tg.cancel_scope.cancel()

    assert task._waiters is None
    assert not task.done()
    _succeed(registry, "t0")
    assert (await task).task_id == "t0"


async def test_waiter_cancelled_by_an_outer_scope_leaves_nothing_behind() -> None:
    registry = TaskRegistry()
    (task,) = _tasks(registry)
    with anyio.move_on_after(0.01) as scope:
        await task
    assert scope.cancelled_caught
    assert task._waiters is None
    assert not task.done()


async def test_all_concurrent_waiters_wake_with_the_same_result() -> None:
    registry = TaskRegistry()
    (task,) = _tasks(registry)
    results: list[kx.ImageResult] = []
    gave_up = anyio.Event()

    async def waiter(timeout: float | None) -> None:
        results.append(await task.wait(timeout))

    async def doomed() -> None:
        try:
            await task.wait(0.001)
        except kx.TaskTimeoutError:
            gave_up.set()

    async with anyio.create_task_group() as tg:
        for timeout in (None, 30.0, None, 60.0, None):
            tg.start_soon(waiter, timeout)
        tg.start_soon(doomed)
        await anyio.wait_all_tasks_blocked()
        await gave_up.wait()  # the short waiter gives up first and must not disturb the rest
        assert task._waiters is not None
        assert len(task._waiters) == 5
        _succeed(registry, "t0")

    assert len(results) == 5
    assert all(result == task.result() for result in results)
    assert task._waiters is None


# --- wait_all ---------------------------------------------------------------------------------


async def test_wait_all_returns_results_in_task_order() -> None:
    registry = TaskRegistry()
    tasks = _tasks(registry, 3)
    results: list[kx.ImageResult] = []

    async def gather() -> None:
        results.extend(await wait_all(tasks, timeout=None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(gather)
        for task_id in ("t2", "t0", "t1"):
            await anyio.wait_all_tasks_blocked()
            assert results == []
            _succeed(registry, task_id)

    assert [r.task_id for r in results] == ["t0", "t1", "t2"]
    assert [r.index for r in results] == [0, 1, 2]
    assert all(task._waiters is None for task in tasks)


async def test_wait_all_of_nothing_is_empty() -> None:
    assert await wait_all([], timeout=0.0) == []


async def test_wait_all_raises_a_later_failure_while_an_earlier_task_is_pending() -> None:
    registry = TaskRegistry()
    tasks = _tasks(registry, 3)
    caught: list[kx.KeevxError] = []

    async def gather() -> None:
        try:
            await wait_all(tasks, timeout=None)
        except kx.TaskFailedError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(gather)
        await anyio.wait_all_tasks_blocked()
        _fail(registry, "t2", "third failed")

    assert len(caught) == 1
    assert caught[0] is tasks[2].exception()
    assert not tasks[0].done()
    assert not tasks[1].done()
    assert all(task._waiters is None for task in tasks)


async def test_wait_all_raises_the_first_error_in_task_order_when_several_are_known() -> None:
    registry = TaskRegistry()
    tasks = _tasks(registry, 3)
    _fail(registry, "t2", "third")
    _fail(registry, "t1", "second")
    with pytest.raises(kx.TaskFailedError) as caught:
        await wait_all(tasks, timeout=None)
    assert caught.value.task_id == "t1"


@pytest.mark.parametrize(("finished", "first_unfinished"), [((), "t0"), (("t0",), "t1")])
async def test_wait_all_timeout_names_the_first_unfinished_task(
    finished: tuple[str, ...], first_unfinished: str
) -> None:
    registry = TaskRegistry()
    tasks = _tasks(registry, 3)
    for task_id in finished:
        _succeed(registry, task_id)

    with pytest.raises(kx.TaskTimeoutError) as caught:
        await wait_all(tasks, timeout=0.01)

    assert caught.value.task_id == first_unfinished
    assert caught.value.timeout == 0.01
    assert caught.value.request is REQUEST
    assert all(task._waiters is None for task in tasks)
    # The tasks are unchanged and can still finish.
    for task in tasks:
        if not task.done():
            _succeed(registry, task.task_id or "")
    assert len(await wait_all(tasks, timeout=1.0)) == 3


async def test_reading_a_failed_task_again_does_not_grow_its_traceback() -> None:
    task = kx.Task("i2is-a", kx.ImageRequest("x"))
    task._finish(None, kx.TaskFailedError(task_id="i2is-a", status="FAILED", error_message="no"))
    depths = []
    for _ in range(3):
        with pytest.raises(kx.TaskFailedError) as caught:
            task.result()
        depth, tb = 0, caught.value.__traceback__
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        depths.append(depth)
    assert depths[0] == depths[1] == depths[2]
