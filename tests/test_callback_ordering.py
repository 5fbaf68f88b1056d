"""Property: whatever the order of reply and callbacks, every task gets its own result once."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wiring import API_KEY, CALLBACK_URL, callback_body

import keevx_async as kx

pytestmark = pytest.mark.anyio


class EarlyCallbackService:
    """A service that calls back some tasks before it replies to the submit.

    ``plan`` is a list of ``(position, early)``: the callbacks in the order they are
    delivered (a position may repeat: a duplicate), each either before the reply
    (``early``) or after it.
    """

    def __init__(self, task_ids: list[str], plan: list[tuple[int, bool]]) -> None:
        self.task_ids = task_ids
        self.plan = plan
        self.client: kx.AsyncKeevx | None = None
        self.callback_url = ""
        self.outcomes: list[kx.CallbackOutcome] = []

    async def deliver(self, early: bool) -> None:
        assert self.client is not None
        for position, is_early in self.plan:
            if is_early is early:
                task_id = self.task_ids[position]
                outcome = await self.client.feed_callback(
                    callback_body(task_id, image_url=f"https://i/{task_id}.png"),
                    url=self.callback_url,
                )
                self.outcomes.append(outcome)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.callback_url = json.loads(body)["callback_url"]
        await self.deliver(early=True)
        reply = {"code": 0, "msg": "ok", "data": {"task_ids": self.task_ids}}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(reply).encode()})


plans = st.integers(min_value=1, max_value=8).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(
            st.tuples(st.integers(min_value=0, max_value=n - 1), st.booleans()), max_size=3 * n
        ).map(
            # Every task is called back at least once, after the reply if not before.
            lambda extra: [(i, False) for i in range(n)] + extra
        ),
        st.randoms(use_true_random=False),
    )
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plans)
async def test_any_order_of_reply_and_callbacks_resolves_each_task_once(
    case: tuple[int, list[tuple[int, bool]], Any],
) -> None:
    count, plan, rng = case
    rng.shuffle(plan)
    task_ids = [f"i2is-{i:032x}" for i in range(count)]
    service = EarlyCallbackService(task_ids, plan)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=service)) as http,
        kx.AsyncKeevx(
            api_key=API_KEY,
            base_url="https://api.example.test",
            callback_url=CALLBACK_URL,
            http_client=http,
        ) as client,
    ):
        service.client = client
        submission = await client.submit(kx.ImageRequest("p", generate_count=count))
        await service.deliver(early=False)
        stats = client.stats
    # Each task holds the result of its own ID, whatever the order.
    for index, task in enumerate(submission.tasks):
        assert task.result().image_url == f"https://i/{task_ids[index]}.png"
        assert task.result().index == index
    assert stats.resolved_by_callback == count
    assert stats.pending == 0
    assert stats.buffered == 0
    early_firsts = {p for p, early in plan if early}
    assert stats.callbacks_buffered == len(early_firsts)
    assert service.outcomes.count(kx.CallbackOutcome.RESOLVED) == count - len(early_firsts)
    assert len(service.outcomes) == len(plan)
