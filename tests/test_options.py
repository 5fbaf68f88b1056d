"""Every option and argument is checked at the call that takes it, before anything is sent.

Found by adversarial testing: ``max_callback_body=nan`` let a 5 MB body through,
``early_callback_max_age=nan`` evicted early callbacks at once, ``generate(timeout=nan)``
and ``timeout='5'`` failed only after the service had accepted (billed) the submit.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keevx_async as kx
from keevx_async.testing import FakeKeevx

pytestmark = pytest.mark.anyio

# Values no option takes: the number-ish mistakes, and other types.
_NOT_A_NUMBER = st.one_of(
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, "5", "30", b"5", [5], True, False]),
    st.builds(object),
)
_NEGATIVE = st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)
_NEGATIVE_INT = st.integers(max_value=-1)

# option -> whether None is allowed
_SECONDS_OPTIONS = {
    "max_per_second": True,
    "max_retry_wait": False,
    "reconcile_after": True,
    "reconcile_per_second": True,
    "early_callback_max_age": False,
}
_INT_OPTIONS = ["max_concurrency", "max_retries", "max_early_callbacks", "max_callback_body"]


def _bad_for(option: str) -> st.SearchStrategy[Any]:
    if option in _INT_OPTIONS:
        return st.one_of(_NEGATIVE_INT, st.floats(), st.just(None), _NOT_A_NUMBER)
    strategies = [_NOT_A_NUMBER, _NEGATIVE]
    if not _SECONDS_OPTIONS[option]:
        strategies.append(st.just(None))
    if option != "max_retry_wait":
        strategies.append(st.just(0))
    return st.one_of(*strategies)


@st.composite
def _bad_option(draw: st.DrawFn) -> tuple[str, Any]:
    option = draw(st.sampled_from([*_SECONDS_OPTIONS, *_INT_OPTIONS, "timeout"]))
    if option == "timeout":
        value = draw(
            st.one_of(
                _NOT_A_NUMBER.filter(lambda v: not isinstance(v, float) or not math.isinf(v)),
                _NEGATIVE,
                st.just(0),
                st.just(None),
                st.sampled_from([math.inf]),
                st.builds(
                    lambda phase, bad: httpx.Timeout(5.0, **{phase: bad}),
                    st.sampled_from(["connect", "read", "write", "pool"]),
                    st.sampled_from([math.nan, -1.0, 0.0, math.inf]),
                ),
            )
        )
        return option, value
    return option, draw(_bad_for(option))


@settings(max_examples=300, deadline=None)
@given(_bad_option())
def test_every_bad_option_is_refused_at_construction_naming_it(bad: tuple[str, Any]) -> None:
    option, value = bad
    # max_concurrency=0 and the like: ValueError; a string or a bool: TypeError.
    with pytest.raises((TypeError, ValueError)) as caught:
        kx.AsyncKeevx(api_key="k", **{option: value})
    assert option in str(caught.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"http_client": "x"}, "http_client must be an httpx.AsyncClient"),
        ({"verify_callbacks": "no"}, "verify_callbacks must be True or False"),
        ({"api_key": "key\n"}, "api_key must be printable ASCII"),
        ({"api_key": "cl\u00e9"}, "api_key must be printable ASCII"),
        ({"api_key": 12345}, "api_key must be a string"),
    ],
)
def test_other_bad_options_are_refused_naming_them(options: dict[str, Any], message: str) -> None:
    options.setdefault("api_key", "k")
    with pytest.raises((TypeError, ValueError), match=message):
        kx.AsyncKeevx(**options)


def test_good_values_are_kept_normalised() -> None:
    client = kx.AsyncKeevx(
        api_key="k",
        timeout=httpx.Timeout(5.0, read=None),
        max_retry_wait=0,
        reconcile_after=1,
        reconcile_per_second=None,
        max_early_callbacks=0,
    )
    assert client.max_retry_wait == 0.0
    assert client.reconcile_after == 1.0
    assert client._engine.http.timeout.read is None


_BAD_SECONDS = [math.nan, math.inf, -1, 0, "5", True, [1]]


@pytest.mark.parametrize("timeout", _BAD_SECONDS)
async def test_method_arguments_are_refused_before_anything_is_sent(timeout: Any) -> None:
    async with FakeKeevx() as fake, fake.client() as client:
        request = kx.ImageRequest("a fox")
        with pytest.raises((TypeError, ValueError), match="timeout"):
            await client.generate(request, timeout=timeout)
        with pytest.raises((TypeError, ValueError), match="timeout"):
            await client.generate_many([request], timeout=timeout)
        with pytest.raises((TypeError, ValueError), match="timeout"):
            client.batch([request], timeout=timeout)
        with pytest.raises((TypeError, ValueError), match="concurrency"):
            client.batch([request], concurrency=timeout)
        with pytest.raises((TypeError, ValueError), match="max_pending"):
            client.batch([request], max_pending=timeout)
        with pytest.raises((TypeError, ValueError), match="shutdown_grace"):
            client.serve_callbacks(port=0, shutdown_grace=-1 if timeout == 0 else timeout)
        assert fake.submit_calls == 0  # nothing was sent, nothing was paid for
        # A task's wait checks its timeout before it waits.
        (task,) = (await client.submit(request)).tasks
        if timeout == 0:  # a wait may take 0: "done yet?"
            with pytest.raises(kx.TaskTimeoutError):
                await task.wait(timeout)
        else:
            with pytest.raises((TypeError, ValueError), match="timeout"):
                await task.wait(timeout)
        with anyio.fail_after(5):
            assert (await task.wait(5)).task_id == task.task_id


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": "2"}, "timeout"),
        ({"reconnect_max_wait": math.inf}, "reconnect_max_wait"),
        ({"owner_ttl": math.nan}, "owner_ttl"),
        ({"result_ttl": "60"}, "result_ttl"),
    ],
)
def test_redis_router_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        kx.RedisRouter(**options)
