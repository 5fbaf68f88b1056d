"""TaskRegistry: where a verified callback meets its task (driven by a fake clock)."""

from __future__ import annotations

import gc
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keevx_async as kx
from keevx_async import Task
from keevx_async._models import CallbackPayload
from keevx_async._registry import TaskRegistry
from keevx_async._stats import Counters

REQUEST = kx.ImageRequest("a red fox", generate_count=3)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _succeeded(task_id: str, url: str | None = None, **raw_extra: object) -> CallbackPayload:
    image_url = url or f"https://cdn.test/{task_id}.png"
    raw = {"task_id": task_id, "status": "SUCCEEDED", "image_url": image_url, **raw_extra}
    return CallbackPayload(task_id=task_id, status="SUCCEEDED", image_url=image_url, raw=raw)


def _status(task_id: str, status: str, error_message: str = "") -> CallbackPayload:
    return CallbackPayload(task_id=task_id, status=status, error_message=error_message)


def _registry(**options: object) -> tuple[TaskRegistry, FakeClock]:
    clock = FakeClock()
    return TaskRegistry(clock=clock, **options), clock  # type: ignore[arg-type]


# --- resolving -----------------------------------------------------------------------------


def test_succeeded_callback_resolves_the_task_with_all_result_fields() -> None:
    registry, _ = _registry()
    tasks = [Task(f"t{i}", REQUEST, i, submission_id="s1") for i in range(3)]
    registry.register(tasks)
    assert registry.pending_count == 3
    assert registry.get("t1") is tasks[1]

    payload = CallbackPayload(
        task_id="t1",
        status="SUCCEEDED",
        image_url="https://cdn.test/t1.png",
        task_type="custom_type",
        raw={"task_id": "t1", "status": "SUCCEEDED", "extra": [1, 2]},
    )
    assert registry.apply(payload, "s1") is kx.CallbackOutcome.RESOLVED

    result = tasks[1].result()
    assert result == kx.ImageResult(
        task_id="t1",
        image_url="https://cdn.test/t1.png",
        request=REQUEST,
        index=1,
        status="SUCCEEDED",
        task_type="custom_type",
    )
    assert result.request is REQUEST
    assert dict(result.raw) == {"task_id": "t1", "status": "SUCCEEDED", "extra": [1, 2]}
    assert tasks[1].status == "SUCCEEDED"
    assert tasks[1].done()
    assert not tasks[0].done()
    assert not tasks[2].done()
    assert registry.get("t1") is None
    assert registry.pending_count == 2
    assert registry.counters.resolved_by_callback == 1


@pytest.mark.parametrize(
    ("status", "message"), [("FAILED", "content policy"), ("CANCELLED", ""), ("EXPIRED", "late")]
)
def test_failed_or_unknown_finished_status_fails_the_task(status: str, message: str) -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])

    assert registry.apply(_status("t1", status, message), "s1") is kx.CallbackOutcome.RESOLVED

    error = task.exception()
    assert isinstance(error, kx.TaskFailedError)
    assert (error.task_id, error.status, error.error_message) == ("t1", status, message)
    assert error.request is REQUEST
    assert status in str(error)
    with pytest.raises(kx.TaskFailedError):
        task.result()
    assert task.status == status
    assert registry.pending_count == 0


@pytest.mark.parametrize("status", ["GENERATING", "PENDING", "PROCESSING"])
def test_unfinished_status_updates_the_task_and_keeps_it_pending(status: str) -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])

    assert registry.apply(_status("t1", status), "s1") is kx.CallbackOutcome.PROGRESS

    assert task.status == status
    assert not task.done()
    assert registry.pending_count == 1
    assert registry.counters == Counters()  # progress is not counted: nothing resolved


def test_second_callback_after_resolve_is_a_duplicate_and_changes_nothing() -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    registry.apply(_succeeded("t1", "https://cdn.test/first.png"), "s1")

    again = registry.apply(_succeeded("t1", "https://cdn.test/second.png"), "s1")
    failed = registry.apply(_status("t1", "FAILED", "boom"), None)

    assert again is failed is kx.CallbackOutcome.DUPLICATE
    assert task.result().image_url == "https://cdn.test/first.png"
    assert task.status == "SUCCEEDED"
    assert registry.counters.callbacks_duplicate == 2
    assert registry.counters.resolved_by_callback == 1


def test_trusted_callback_without_submission_resolves_any_task() -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    assert registry.apply(_succeeded("t1"), None) is kx.CallbackOutcome.RESOLVED
    assert task.done()


def test_progress_for_an_unknown_task_is_not_buffered() -> None:
    registry, _ = _registry()
    assert registry.apply(_status("t9", "GENERATING"), "s1") is kx.CallbackOutcome.PROGRESS
    assert registry.early_count == 0


# --- early callbacks -------------------------------------------------------------------------


def test_early_callback_is_buffered_then_applied_when_its_submission_registers() -> None:
    registry, _ = _registry()
    assert registry.apply(_succeeded("t1"), "s1") is kx.CallbackOutcome.BUFFERED
    assert registry.early_count == 1
    assert registry.counters.callbacks_buffered == 1

    task = Task("t1", REQUEST, 0, submission_id="s1")
    other = Task("t2", REQUEST, 1, submission_id="s1")
    registry.register([task, other])

    assert task.result().image_url == "https://cdn.test/t1.png"
    assert not other.done()
    assert registry.early_count == 0
    assert registry.pending_count == 1
    assert registry.counters.resolved_by_callback == 1


def test_early_failure_is_applied_at_register() -> None:
    registry, _ = _registry()
    registry.apply(_status("t1", "FAILED", "nope"), "s1")
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    error = task.exception()
    assert isinstance(error, kx.TaskFailedError)
    assert error.error_message == "nope"


def test_early_callback_of_another_submission_is_never_applied_and_ages_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, clock = _registry(early_max_age=60.0)
    assert registry.apply(_succeeded("t1"), "intruder") is kx.CallbackOutcome.BUFFERED

    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    assert not task.done()
    assert registry.early_count == 1

    clock.now += 61.0
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        assert registry.early_count == 0
    assert registry.counters.callbacks_evicted == 1
    assert any("t1" in r.getMessage() for r in caplog.records)
    assert not task.done()
    assert registry.pending_count == 1


def test_unverified_early_callback_applies_to_any_submission() -> None:
    registry, _ = _registry()
    registry.apply(_succeeded("t1"), None)
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    assert task.done()
    assert registry.early_count == 0


def test_unverified_early_callback_applies_to_an_unverified_task() -> None:
    registry, _ = _registry()
    registry.apply(_succeeded("t1"), None)
    task = Task("t1", REQUEST, 0)
    registry.register([task])
    assert task.done()


def test_repeated_early_callback_is_kept_once() -> None:
    registry, _ = _registry()
    first = registry.apply(_succeeded("t1", "https://cdn.test/a.png"), "s1")
    second = registry.apply(_succeeded("t1", "https://cdn.test/b.png"), "s1")
    assert first is second is kx.CallbackOutcome.BUFFERED
    assert registry.early_count == 1
    assert registry.counters.callbacks_buffered == 1
    assert registry.counters.callbacks_duplicate == 1
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    assert task.result().image_url == "https://cdn.test/a.png"


def test_full_early_buffer_evicts_the_oldest_first_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, clock = _registry(max_early=2)
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        for name in ("t1", "t2", "t3"):
            registry.apply(_succeeded(name), "s1")
            clock.now += 1.0

    assert registry.early_count == 2
    assert registry.counters.callbacks_evicted == 1
    warnings = [
        r for r in caplog.records if r.name == "keevx_async" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert "t1" in warnings[0].getMessage()
    assert "full" in warnings[0].getMessage()

    tasks = [
        Task(name, REQUEST, i, submission_id="s1") for i, name in enumerate(("t1", "t2", "t3"))
    ]
    registry.register(tasks)
    assert [task.done() for task in tasks] == [False, True, True]


def test_early_callback_expires_after_its_max_age() -> None:
    registry, clock = _registry(early_max_age=30.0)
    registry.apply(_succeeded("t1"), "s1")
    clock.now += 20.0
    registry.apply(_succeeded("t2"), "s1")
    clock.now += 20.0  # t1 is 40 s old, t2 20 s

    assert registry.early_count == 1
    tasks = [Task("t1", REQUEST, 0, submission_id="s1"), Task("t2", REQUEST, 1, submission_id="s1")]
    registry.register(tasks)
    assert [task.done() for task in tasks] == [False, True]
    assert registry.counters.callbacks_evicted == 1


def test_young_early_callback_survives_until_register() -> None:
    registry, clock = _registry(early_max_age=30.0)
    registry.apply(_succeeded("t1"), "s1")
    clock.now += 29.0
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    assert task.done()


def test_max_early_zero_keeps_no_early_callbacks(caplog: pytest.LogCaptureFixture) -> None:
    registry, _ = _registry(max_early=0)
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        assert registry.apply(_succeeded("t1"), "s1") is kx.CallbackOutcome.BUFFERED
    assert registry.early_count == 0
    assert registry.counters.callbacks_evicted == 1
    assert any("disabled" in r.getMessage() for r in caplog.records)
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    assert not task.done()


@pytest.mark.parametrize(("option", "value"), [("max_early", -1), ("early_max_age", 0.0)])
def test_invalid_limits_are_refused(option: str, value: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        TaskRegistry(**{option: value})  # type: ignore[arg-type]


# --- foreign tokens -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload", [_succeeded("t1"), _status("t1", "FAILED"), _status("t1", "GENERATING")]
)
def test_foreign_token_on_a_known_task_is_refused_and_changes_nothing(
    payload: CallbackPayload, caplog: pytest.LogCaptureFixture
) -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, status="PROCESSING", submission_id="s1")
    registry.register([task])

    with (
        caplog.at_level(logging.WARNING, logger="keevx_async"),
        pytest.raises(kx.CallbackAuthError),
    ):
        registry.apply(payload, "s2")

    assert not task.done()
    assert task.status == "PROCESSING"
    assert registry.get("t1") is task
    assert registry.counters.callbacks_rejected == 1
    assert registry.counters.resolved_by_callback == 0
    assert any("another submission" in r.getMessage() for r in caplog.records)
    # The rightful callback still works afterwards.
    assert registry.apply(_succeeded("t1"), "s1") is kx.CallbackOutcome.RESOLVED


def test_foreign_token_on_a_finished_task_is_refused() -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    registry.apply(_succeeded("t1"), "s1")
    with pytest.raises(kx.CallbackAuthError):
        registry.apply(_succeeded("t1", "https://evil.test/x.png"), "s2")
    assert task.result().image_url == "https://cdn.test/t1.png"


# --- forgetting ------------------------------------------------------------------------------


def test_abandoned_task_leaves_pending_and_a_later_callback_is_a_duplicate() -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    registry.abandon(task)

    assert registry.pending_count == 0
    assert registry.apply(_succeeded("t1"), "s1") is kx.CallbackOutcome.DUPLICATE
    assert not task.done()
    assert registry.early_count == 0


def test_abandon_of_an_unregistered_or_replaced_task_is_a_no_op() -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    registry.abandon(Task("t1", REQUEST, 0, submission_id="s1"))
    registry.abandon(Task(None, REQUEST))
    assert registry.get("t1") is task
    assert registry.apply(_succeeded("t1"), "s1") is kx.CallbackOutcome.RESOLVED


def test_pending_entry_vanishes_when_the_task_is_garbage_collected() -> None:
    registry, _ = _registry()
    registry.register([Task(f"t{i}", REQUEST, i, submission_id="s1") for i in range(3)])
    gc.collect()
    assert registry.pending_count == 0

    task = Task("t9", REQUEST, 0, submission_id="s1")
    registry.register([task])
    assert registry.pending_count == 1
    del task
    gc.collect()
    assert registry.pending_count == 0
    assert registry.get("t9") is None


def test_collecting_a_replaced_task_leaves_its_successor_pending() -> None:
    registry, _ = _registry()
    first = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([first])
    second = Task("t1", REQUEST, 0, submission_id="s2")
    registry.register([second])
    del first
    gc.collect()
    # Collecting the first task must not take the second's entry with it.
    assert registry.get("t1") is second
    assert registry.apply(_succeeded("t1"), "s2") is kx.CallbackOutcome.RESOLVED
    assert second.result().image_url == "https://cdn.test/t1.png"


def test_resolved_task_is_not_pending_and_its_id_answers_duplicate() -> None:
    registry, _ = _registry()
    task = Task("t1", REQUEST, 0, submission_id="s1")
    registry.register([task])
    assert registry.apply(_succeeded("t1"), "s1") is kx.CallbackOutcome.RESOLVED
    assert registry.pending_count == 0
    assert registry.get("t1") is None
    assert registry.apply(_succeeded("t1"), "s1") is kx.CallbackOutcome.DUPLICATE
    assert registry.counters.resolved_by_callback == 1


def test_abandoned_task_ids_are_remembered_within_the_same_bounded_window() -> None:
    registry, _ = _registry(remember_done=1)
    first, second = Task("a", REQUEST, 0), Task("b", REQUEST, 0)
    registry.register([first])
    registry.register([second])
    registry.abandon(first)
    registry.abandon(second)
    assert registry.apply(_succeeded("b"), None) is kx.CallbackOutcome.DUPLICATE
    # "a" fell out of the window: its late callback looks like an early one now.
    assert registry.apply(_succeeded("a"), None) is kx.CallbackOutcome.BUFFERED


def test_finished_task_ids_are_remembered_within_a_bounded_window() -> None:
    registry, _ = _registry(remember_done=2)
    for n in (1, 2, 3):
        task = Task(f"t{n}", REQUEST, 0, submission_id=f"s{n}")
        registry.register([task])
        registry.apply(_succeeded(f"t{n}"), f"s{n}")

    assert registry.apply(_succeeded("t3"), "s3") is kx.CallbackOutcome.DUPLICATE
    assert registry.apply(_succeeded("t2"), "s2") is kx.CallbackOutcome.DUPLICATE
    # t1 and its submission fell out of the window: it now looks like an unknown task.
    assert registry.apply(_succeeded("t1"), "s1") is kx.CallbackOutcome.BUFFERED


def test_counts_return_to_zero_when_everything_is_resolved() -> None:
    registry, _ = _registry()
    registry.apply(_succeeded("t0"), "s1")
    tasks = [Task(f"t{i}", REQUEST, i, submission_id="s1") for i in range(3)]
    registry.register(tasks)
    registry.apply(_succeeded("t1"), "s1")
    registry.apply(_status("t2", "FAILED"), "s1")
    assert all(task.done() for task in tasks)
    assert registry.pending_count == 0
    assert registry.early_count == 0


# --- any order ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(1, 6),
    data=st.data(),
)
def test_callbacks_in_any_order_around_register_resolve_each_task_once(
    count: int, data: st.DataObject
) -> None:
    registry, clock = _registry()
    names = [f"t{i}" for i in range(count)]
    # Each task gets one or more (duplicate) callbacks; "register" is one event among them.
    events: list[str | None] = [None]
    for name in names:
        events += [name] * data.draw(st.integers(1, 3), label=f"copies of {name}")
    order = data.draw(st.permutations(events), label="order")

    tasks = [Task(name, REQUEST, i, submission_id="s1") for i, name in enumerate(names)]
    for event in order:
        clock.now += 0.5
        if event is None:
            registry.register(tasks)
        else:
            outcome = registry.apply(_succeeded(event), "s1")
            assert outcome in (
                kx.CallbackOutcome.RESOLVED,
                kx.CallbackOutcome.BUFFERED,
                kx.CallbackOutcome.DUPLICATE,
            )

    for task in tasks:
        assert task.result().image_url == f"https://cdn.test/{task.task_id}.png"
        assert task.result().index == task.index
    assert registry.counters.resolved_by_callback == count
    assert registry.pending_count == 0
    assert registry.early_count == 0


def test_one_token_buffers_at_most_as_many_callbacks_as_a_submission_has_tasks() -> None:
    registry, _ = _registry()
    for i in range(8):
        assert registry.apply(_succeeded(f"t{i}"), "s1") is kx.CallbackOutcome.BUFFERED
    with pytest.raises(kx.CallbackAuthError, match="early callbacks"):
        registry.apply(_succeeded("t8"), "s1")
    # Other submissions are not affected, and registering s1 frees its place.
    assert registry.apply(_succeeded("u0"), "s2") is kx.CallbackOutcome.BUFFERED
    registry.register([Task("t0", REQUEST, 0, submission_id="s1")])
    assert registry.early_count == 1  # s1's leftovers can never apply, so they went
    with pytest.raises(kx.CallbackAuthError, match="another submission"):
        registry.apply(_succeeded("t9"), "s1")


def test_an_early_callback_nobody_claims_names_the_likely_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found with uvicorn --workers 4 and no RedisRouter: callbacks reaching the wrong
    # worker were answered 200, held as early, and expired with no word at all.
    caplog.set_level(logging.WARNING, logger="keevx_async")
    registry, clock = _registry(early_max_age=600.0)
    registry.apply(_succeeded("t-elsewhere"), "s-other")
    clock.now += 29.0
    registry.apply(_succeeded("t-normal"), "s1")  # any activity checks the oldest
    assert not [r for r in caplog.records if "RedisRouter" in r.getMessage()]

    clock.now += 2.0  # 31 s: no submit reply takes that long
    registry.apply(_succeeded("t-more"), "s2")
    [hint] = [r.getMessage() for r in caplog.records if "RedisRouter" in r.getMessage()]
    assert "t-elsewhere" in hint
    assert "--workers" in hint
    assert "another deployment" in hint
    clock.now += 10.0
    registry.apply(_succeeded("t-again"), "s3")  # said once a minute at most
    assert len([r for r in caplog.records if "RedisRouter" in r.getMessage()]) == 1

    clock.now += 600.0  # then dropped, counted as unclaimed
    assert registry.early_count == 0
    assert registry.counters.callbacks_unclaimed == 4
    assert registry.counters.callbacks_evicted == 4


def test_a_short_max_age_hints_at_half_of_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keevx_async")
    registry, clock = _registry(early_max_age=10.0)
    registry.apply(_succeeded("t-elsewhere"), "s-other")
    clock.now += 5.0
    assert registry.early_count == 1
    assert [r for r in caplog.records if "RedisRouter" in r.getMessage()]
    assert registry.counters.callbacks_unclaimed == 0


def test_a_full_buffer_evicts_without_counting_unclaimed() -> None:
    registry, _ = _registry(max_early=1)
    registry.apply(_succeeded("t1"), "s1")
    registry.apply(_succeeded("t2"), "s1")
    assert registry.counters.callbacks_evicted == 1
    assert registry.counters.callbacks_unclaimed == 0
