"""Retry-After parsing, backoff, and the client-wide pace and pause."""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keevx_async._throttle import Throttle, backoff_delay, parse_retry_after

pytestmark = pytest.mark.anyio

# Monotonic clocks may fire a sleep up to one tick early; lower bounds allow that much.
SLACK = 0.005
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

# --- parse_retry_after -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("0", 0.0), ("5", 5.0), ("120", 120.0), (" 7 ", 7.0), ("1.5", 1.5), ("0.25", 0.25)],
)
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_retry_after_any_non_negative_number_is_kept(seconds: float) -> None:
    assert parse_retry_after(repr(seconds)) == seconds


@pytest.mark.parametrize("header", ["-1", "-0.5", "-99999"])
def test_negative_retry_after_means_no_wait(header: str) -> None:
    assert parse_retry_after(header) == 0.0


@pytest.mark.parametrize("offset", [1, 30, 3600])
def test_retry_after_http_date_in_the_future_is_the_time_until_then(offset: int) -> None:
    header = format_datetime(NOW + timedelta(seconds=offset), usegmt=True)
    assert parse_retry_after(header, now=NOW.timestamp()) == pytest.approx(offset)


def test_retry_after_http_date_in_the_past_means_no_wait() -> None:
    header = format_datetime(NOW - timedelta(minutes=5), usegmt=True)
    assert parse_retry_after(header, now=NOW.timestamp()) == 0.0


def test_retry_after_http_date_with_numeric_utc_offset() -> None:
    header = "Thu, 02 Jan 2025 05:04:15 +0200"  # 03:04:15 UTC
    assert parse_retry_after(header, now=NOW.timestamp()) == pytest.approx(10.0)


def test_retry_after_http_date_without_a_known_zone_is_unreadable() -> None:
    # "-0000" means "UTC, but the sender does not know its local zone": no reliable instant.
    assert parse_retry_after("Thu, 02 Jan 2025 03:04:15 -0000", now=NOW.timestamp()) is None


@pytest.mark.parametrize(
    "header",
    ["", "soon", "5 seconds", "Thu, 99 Foo 2025", "nan", "NaN", "inf", "-inf", "1e400"],
)
def test_unreadable_retry_after_is_none(header: str) -> None:
    assert parse_retry_after(header, now=NOW.timestamp()) is None


def test_absent_retry_after_is_none() -> None:
    assert parse_retry_after(None) is None


@given(st.text(max_size=40))
def test_retry_after_never_raises_and_never_goes_negative(header: str) -> None:
    seconds = parse_retry_after(header, now=NOW.timestamp())
    assert seconds is None or seconds >= 0.0


# --- backoff_delay -----------------------------------------------------------------------------


@given(seed=st.integers(), attempt=st.integers(0, 40))
def test_backoff_is_full_jitter_within_the_capped_exponential(seed: int, attempt: int) -> None:
    delay = backoff_delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(8.0, 0.5 * 2**attempt)


def test_backoff_with_the_same_seed_is_reproducible() -> None:
    first = [backoff_delay(n, random.Random(7)) for n in range(6)]
    second = [backoff_delay(n, random.Random(7)) for n in range(6)]
    assert first == second


def test_backoff_spreads_over_the_whole_range() -> None:
    rng = random.Random(1234)
    samples = [backoff_delay(3, rng) for _ in range(500)]  # ceiling 4.0
    assert min(samples) < 0.4
    assert max(samples) > 3.6
    capped = [backoff_delay(20, rng) for _ in range(500)]
    assert max(capped) <= 8.0
    assert max(capped) > 7.0


def test_backoff_without_rng_uses_the_module_random() -> None:
    assert 0.0 <= backoff_delay(0) <= 0.5


# --- Throttle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0, 0.0, -1.0, float("nan")])
def test_throttle_refuses_a_non_positive_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="max_per_second"):
        Throttle(rate)


async def test_unlimited_throttle_lets_attempts_through_at_once() -> None:
    throttle = Throttle(None)
    assert throttle.paused_for == 0.0
    for _ in range(100):
        with anyio.fail_after(5):
            await throttle.before_attempt()


async def test_concurrent_attempts_start_at_least_one_interval_apart() -> None:
    rate = 25.0
    interval = 1.0 / rate
    throttle = Throttle(rate)
    starts: list[float] = []

    async def attempt() -> None:
        await throttle.before_attempt()
        starts.append(anyio.current_time())

    began = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(attempt)

    # Each attempt starts no earlier than its slot and the slots are one interval apart,
    # so the k-th start is at least k intervals in (a late wake-up only adds to that).
    assert len(starts) == 6
    for k, start in enumerate(sorted(starts)):
        assert start - began >= k * interval - SLACK


async def test_sequential_attempts_are_paced_too() -> None:
    throttle = Throttle(20.0)
    await throttle.before_attempt()
    first = anyio.current_time()
    await throttle.before_attempt()
    await throttle.before_attempt()
    assert anyio.current_time() - first >= 2 * 0.05 - SLACK


async def test_pause_holds_the_next_attempt_until_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttle = Throttle(None)
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        throttle.pause(0.1, "HTTP 429 from POST /v1/image_generate")
    assert 0.0 < throttle.paused_for <= 0.1
    assert any("HTTP 429" in r.getMessage() for r in caplog.records)

    start = anyio.current_time()
    await throttle.before_attempt()
    assert anyio.current_time() - start >= 0.1 - SLACK
    assert throttle.paused_for == 0.0


async def test_pause_holds_every_waiting_attempt() -> None:
    throttle = Throttle(None)
    throttle.pause(0.08, "HTTP 429")
    start = anyio.current_time()
    starts: list[float] = []

    async def attempt() -> None:
        await throttle.before_attempt()
        starts.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(attempt)

    assert len(starts) == 5
    assert min(starts) - start >= 0.08 - SLACK


async def test_pause_never_shortens_a_longer_one(caplog: pytest.LogCaptureFixture) -> None:
    throttle = Throttle(None)
    with caplog.at_level(logging.WARNING, logger="keevx_async"):
        throttle.pause(30.0, "long")
        throttle.pause(0.01, "short")
    assert throttle.paused_for > 20.0
    assert [r.getMessage() for r in caplog.records if "pausing" in r.getMessage()] == [
        "pausing all requests of this client for 30.00 s: long"
    ]


async def test_longer_pause_extends_a_shorter_one() -> None:
    throttle = Throttle(None)
    throttle.pause(0.01, "short")
    throttle.pause(0.12, "long")
    start = anyio.current_time()
    await throttle.before_attempt()
    assert anyio.current_time() - start >= 0.12 - SLACK


async def test_pause_set_while_waiting_for_a_pace_slot_is_honoured() -> None:
    throttle = Throttle(10.0)  # slots 0.1 s apart
    await throttle.before_attempt()  # takes the first slot at once
    start = anyio.current_time()

    on_its_way = anyio.Event()

    async def take_the_next_slot() -> None:
        on_its_way.set()
        await throttle.before_attempt()  # sleeps toward the next slot

    async with anyio.create_task_group() as tg:
        tg.start_soon(take_the_next_slot)
        await on_its_way.wait()  # well before that slot comes
        throttle.pause(0.25, "HTTP 429")

    assert anyio.current_time() - start >= 0.25 - SLACK


async def test_a_caller_cancelled_while_waiting_for_its_slot_leaves_none_reserved() -> None:
    throttle = Throttle(10.0)  # slots 0.1 s apart
    await throttle.before_attempt()
    next_slot = throttle._next_slot
    with anyio.move_on_after(0.05):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(throttle.before_attempt)
    # The twenty cancelled callers reserved nothing: the next slot is still the second one.
    assert throttle._next_slot == next_slot
