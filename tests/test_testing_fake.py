"""Tests of FakeKeevx, the service emulator, and of ``python -m keevx_async.testing``."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

import keevx_async as kx
from keevx_async._types import IMAGE_QUALITIES, IMAGE_RATIOS
from keevx_async.testing import FakeKeevx, FakeTask, serve_asgi
from keevx_async.testing.__main__ import build_parser, main
from keevx_async.testing._rules import MODERATION_MESSAGE, RANDOM_FAILURE_MESSAGE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskGroup

    from keevx_async._asgi import Message, Receive, Scope, Send

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer test-key"}
SUBMIT = "/v1/image_generate"
TASK_ID = re.compile(r"^i2is-[0-9a-f]{32}$")
CALLBACK_URL = "https://app.example/hooks/keevx?token=t0k%2Fen&x=1"
REPO_ROOT = Path(__file__).resolve().parent.parent


class CallbackRecorder:
    """A duck-typed callback sink: records every body it is fed, in order."""

    def __init__(self, log: list[str] | None = None, *, fail: bool = False) -> None:
        self.calls: list[tuple[dict[str, Any], str]] = []
        self.log = log if log is not None else []
        self.fail = fail
        self.active = 0
        self.max_active = 0
        self.hold = 0.0
        self.gate: anyio.Event | None = None

    async def feed_callback(self, body: bytes, *, url: str | None = None) -> None:
        assert isinstance(body, bytes)
        assert url is not None
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await anyio.sleep(self.hold)
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.active -= 1
        if self.fail:
            raise ValueError("receiver is down")
        payload = json.loads(body)
        self.calls.append((payload, url))
        self.log.append(f"callback {payload['data']['task_id']}")

    @property
    def task_ids(self) -> list[str]:
        return [payload["data"]["task_id"] for payload, _ in self.calls]


class ReceiverApp:
    """An ASGI callback receiver: records each request, answers with ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        more_body = True
        while more_body:  # drained: httpx's ASGITransport may deliver the body in parts
            message = await receive()
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
        self.requests.append(
            {
                "method": scope["method"],
                "path": scope["path"],
                "query_string": scope["query_string"],
                "headers": dict(scope["headers"]),
                "body": json.loads(body),
            }
        )
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def submit(http: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    return await http.post(SUBMIT, json={"prompt": "a red fox", **fields})


async def task_ids_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["code"] == 0, payload
    ids: list[str] = payload["data"]["task_ids"]
    return ids


# -- submit: envelope, IDs, defaults -----------------------------------------------------


async def test_submit_returns_one_task_id_per_image_in_the_service_envelope() -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        response = await submit(http, generate_count=8)
        ids = await task_ids_of(response)
    assert response.json() == {"code": 0, "msg": "ok", "data": {"task_ids": ids}}
    assert response.headers["content-type"] == "application/json"
    assert len(ids) == 8
    assert len(set(ids)) == 8
    assert all(TASK_ID.match(task_id) for task_id in ids)
    assert list(fake.tasks) == ids
    assert [fake.tasks[task_id].index for task_id in ids] == list(range(8))
    assert fake.tasks[ids[0]].body == {
        "prompt": "a red fox",
        "reference_images": [],
        "module": "std",
        "generate_count": 8,
        "image_quality": "2K",
        "image_ratio": "9:16",
        "callback_url": None,
    }
    assert (fake.submit_calls, fake.accepted_submits) == (1, 1)


async def test_every_valid_value_is_accepted_and_null_means_default() -> None:
    valid: list[dict[str, Any]] = [
        {"prompt": "x" * 1000},
        {"prompt": "x"},
        {"generate_count": 1},
        {"module": "pro"},
        {"reference_images": ["https://a.example/1.png"] * 5},
        {"module": None, "generate_count": None, "reference_images": None},
        {"callback_url": ""},  # an empty URL means no callback
        *({"image_quality": quality} for quality in IMAGE_QUALITIES),
        *({"image_ratio": ratio} for ratio in IMAGE_RATIOS),
    ]
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        for fields in valid:
            (task_id,) = await task_ids_of(await submit(http, **fields))
            assert fake.tasks[task_id].callback_url is None
    assert fake.accepted_submits == len(valid)


async def test_more_than_five_reference_images_are_silently_truncated() -> None:
    images = [f"https://a.example/{n}.png" for n in range(7)]
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        (task_id,) = await task_ids_of(await submit(http, reference_images=images))
    assert fake.tasks[task_id].body["reference_images"] == images[:5]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"reference_images": "https://a.example/1.png"}, "reference_images"),
        ({"reference_images": ["https://a.example/1.png", 7]}, "reference_images"),
        ({"module": "max"}, "module"),
        ({"generate_count": 0}, "generate_count"),
        ({"generate_count": 9}, "generate_count"),
        ({"generate_count": True}, "generate_count"),
        ({"generate_count": 2.0}, "generate_count"),
        ({"generate_count": "2"}, "generate_count"),
        ({"image_quality": "8K"}, "image_quality"),
        ({"image_ratio": "2:1"}, "image_ratio"),
        ({"callback_url": 5}, "callback_url"),
    ],
)
async def test_invalid_fields_get_parameter_error_100001(
    fields: dict[str, Any], field: str
) -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        response = await submit(http, **fields)
    assert response.status_code == 200
    payload = response.json()
    assert payload["code"] == 100001
    assert payload["msg"].startswith(f"parameter error: {field} ")
    assert payload["data"] is None
    assert (fake.submit_calls, fake.accepted_submits, fake.tasks) == (1, 0, {})


async def test_missing_prompt_is_a_parameter_error() -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        response = await http.post(SUBMIT, json={"module": "std"})
    assert response.json()["code"] == 100001
    assert response.json()["msg"].startswith("parameter error: prompt ")


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe", b""])
async def test_a_body_that_is_not_a_json_object_gets_400(body: bytes) -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        response = await http.post(SUBMIT, content=body)
    assert response.status_code == 400
    assert response.json() == {
        "code": 100001,
        "msg": "parameter error: body must be a JSON object",
        "data": None,
    }


# -- GET -----------------------------------------------------------------------------


async def test_get_shows_generating_until_the_task_finishes() -> None:
    async with FakeKeevx(complete_after=3600) as fake, fake.http_client(headers=AUTH) as http:
        (task_id,) = await task_ids_of(await submit(http))
        response = await http.get(f"{SUBMIT}/{task_id}")
    assert response.json() == {
        "code": 0,
        "msg": "ok",
        "data": {
            "task_id": task_id,
            "status": "GENERATING",
            "image_url": "",
            "thumbnail_url": "",
            "error_message": "",
        },
    }
    assert fake.get_calls == 1
    assert fake.tasks[task_id].finished_at is None


async def test_get_shows_the_result_once_finished() -> None:
    async with (
        FakeKeevx(complete_after=0, image_base_url="https://img.example") as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        (task_id,) = await task_ids_of(await submit(http))
        await fake.wait_idle()
        response = await http.get(f"{SUBMIT}/{task_id}")
    assert response.json()["data"] == {
        "task_id": task_id,
        "status": "SUCCEEDED",
        "image_url": f"https://img.example/{task_id}.png",
        "thumbnail_url": f"https://img.example/{task_id}_thumb.png",
        "error_message": "",
    }
    task = fake.tasks[task_id]
    assert task.finished_at is not None
    assert task.finished_at >= task.created_at


async def test_unknown_task_is_110002() -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        response = await http.get(f"{SUBMIT}/i2is-{'0' * 32}")
    assert response.status_code == 200
    assert response.json() == {"code": 110002, "msg": "task not found", "data": None}


# -- auth, routing, lifecycle ---------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}, {"Authorization": "x"}],
)
async def test_missing_or_malformed_authorization_is_401(headers: dict[str, str]) -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=headers) as http:
        for response in (await submit(http), await http.get(f"{SUBMIT}/i2is-1")):
            assert response.status_code == 401
            assert response.json()["code"] == 401
            assert response.json()["data"] is None
    assert fake.tasks == {}
    assert (fake.submit_calls, fake.get_calls) == (1, 1)


async def test_api_key_must_match_when_set() -> None:
    async with FakeKeevx(api_key="right") as fake, fake.http_client() as http:
        wrong = await http.post(
            SUBMIT, json={"prompt": "p"}, headers={"Authorization": "Bearer wrong"}
        )
        right = await http.post(
            SUBMIT, json={"prompt": "p"}, headers={"Authorization": "bearer right"}
        )
    assert wrong.status_code == 401
    assert wrong.json() == {"code": 401, "msg": "invalid api key", "data": None}
    assert right.status_code == 200
    assert fake.accepted_submits == 1


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/v1/other", 404, None),
        ("POST", "/", 404, None),
        ("GET", f"{SUBMIT}/", 404, None),
        ("GET", f"{SUBMIT}/a/b", 404, None),
        ("GET", SUBMIT, 405, "POST"),
        ("PUT", SUBMIT, 405, "POST"),
        ("POST", f"{SUBMIT}/i2is-1", 405, "GET"),
        ("DELETE", f"{SUBMIT}/i2is-1", 405, "GET"),
    ],
)
async def test_unknown_paths_404_and_wrong_methods_405(
    method: str, path: str, status: int, allow: str | None
) -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        response = await http.request(method, path)
    assert response.status_code == status
    assert response.json()["code"] == status
    assert response.json()["data"] is None
    assert response.headers.get("allow") == allow
    assert (fake.submit_calls, fake.get_calls) == (0, 0)


async def test_a_fake_that_is_not_running_answers_500() -> None:
    fake = FakeKeevx()
    async with fake.http_client(headers=AUTH) as http:
        response = await submit(http)
    assert response.status_code == 500
    assert "not running" in response.json()["msg"]
    with pytest.raises(RuntimeError, match="not running"):
        await fake.wait_idle()
    with pytest.raises(RuntimeError, match="not running"):
        await fake.__aexit__(None, None, None)


async def test_entering_twice_is_refused() -> None:
    async with FakeKeevx() as fake:
        with pytest.raises(RuntimeError, match="already running"):
            await fake.__aenter__()


async def test_an_exception_in_the_block_propagates_unwrapped() -> None:
    with pytest.raises(LookupError, match="from the block"):
        async with FakeKeevx():
            raise LookupError("from the block")


async def test_a_cancelled_block_stops_the_fake_cleanly() -> None:
    fake = FakeKeevx(complete_after=3600)
    with anyio.CancelScope() as scope:
        async with fake, fake.http_client(headers=AUTH) as http:
            await task_ids_of(await submit(http))
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    async with fake.http_client(headers=AUTH) as http:
        assert (await submit(http)).status_code == 500


async def test_exit_cancels_deliveries_and_reentering_resumes_unfinished_tasks() -> None:
    recorder = CallbackRecorder()
    recorder.hold = 3600  # a receiver that never answers
    fake = FakeKeevx(complete_after=0)
    fake.deliver_into(recorder)
    async with fake, fake.http_client(headers=AUTH) as http:
        await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await anyio.wait_all_tasks_blocked()
        assert recorder.active == 1
        # Leaving the block must not wait for the stuck delivery.
    assert recorder.active == 0
    assert fake.callbacks_sent == 0

    recorder.hold = 0
    fake.complete_after = 3600
    async with fake, fake.http_client(headers=AUTH) as http:
        (pending_id,) = await task_ids_of(await submit(http))
    assert fake.tasks[pending_id].status == "GENERATING"  # still due in an hour

    fake = FakeKeevx(complete_after=0.05)
    async with fake, fake.http_client(headers=AUTH) as http:
        (task_id,) = await task_ids_of(await submit(http))
    async with fake:  # the task finishes in the second session, whenever the first ended
        await fake.wait_idle()
    assert fake.tasks[task_id].status == "SUCCEEDED"


async def test_http_client_defaults_and_overrides() -> None:
    fake = FakeKeevx()
    async with fake.http_client() as http:
        assert str(http.base_url) == "https://api.fake.keevx.test"
    async with fake.http_client(base_url="https://other.example") as http:
        assert str(http.base_url) == "https://other.example"
    assert fake.base_url == "https://api.fake.keevx.test"


# -- scripted HTTP faults -------------------------------------------------------------


async def test_inject_429_with_retry_after_in_seconds_and_as_a_date() -> None:
    date = "Wed, 21 Oct 2026 07:28:00 GMT"
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        fake.inject(429, retry_after=2.5)
        fake.inject(429, retry_after=2.0, times=2)
        fake.inject(429, retry_after=date)
        fake.inject(429)
        replies = [await submit(http) for _ in range(6)]
    assert [reply.status_code for reply in replies] == [429] * 5 + [200]
    assert [reply.headers.get("retry-after") for reply in replies] == [
        "2.5",
        "2",
        "2",
        date,
        None,
        None,
    ]
    assert replies[0].json() == {"code": 429, "msg": "injected fault: HTTP 429", "data": None}
    assert fake.submit_calls == 6
    assert fake.accepted_submits == 1
    assert len(fake.tasks) == 1


async def test_inject_on_the_get_route_leaves_submits_alone() -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        fake.inject(503, route="get", retry_after=0.25)
        (task_id,) = await task_ids_of(await submit(http))
        failed = await http.get(f"{SUBMIT}/{task_id}")
        ok = await http.get(f"{SUBMIT}/{task_id}")
    assert failed.status_code == 503
    assert failed.headers["retry-after"] == "0.25"
    assert ok.json()["data"]["task_id"] == task_id


async def test_inject_500_with_create_makes_billed_tasks_without_ids() -> None:
    recorder = CallbackRecorder()
    async with FakeKeevx(complete_after=0) as fake, fake.http_client(headers=AUTH) as http:
        fake.deliver_into(recorder)
        fake.inject(500, create=True)
        response = await submit(http, generate_count=3, callback_url=CALLBACK_URL)
        await fake.wait_idle()
    assert response.status_code == 500
    assert response.json() == {"code": 500, "msg": "injected fault: HTTP 500", "data": None}
    assert fake.accepted_submits == 1
    assert len(fake.tasks) == 3
    assert sorted(recorder.task_ids) == sorted(fake.tasks)


async def test_inject_with_create_still_validates() -> None:
    async with FakeKeevx() as fake, fake.http_client(headers=AUTH) as http:
        fake.inject(502, create=True)
        response = await submit(http, generate_count=99)
    assert response.status_code == 502
    assert fake.tasks == {}


def test_inject_rejects_impossible_faults() -> None:
    fake = FakeKeevx()
    with pytest.raises(ValueError, match="route"):
        fake.inject(500, route="delete")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="create"):
        fake.inject(500, route="get", create=True)
    with pytest.raises(ValueError, match="times"):
        fake.inject(500, times=0)


# -- callbacks -------------------------------------------------------------------------


async def test_callbacks_go_to_the_callback_url_exactly_as_given() -> None:
    receiver = ReceiverApp()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver)) as callbacks:
        fake = FakeKeevx(complete_after=0, callback_client=callbacks)
        async with fake, fake.http_client(headers=AUTH) as http:
            ids = await task_ids_of(await submit(http, generate_count=2, callback_url=CALLBACK_URL))
            await fake.wait_idle()
    assert [request["body"]["data"]["task_id"] for request in receiver.requests] == ids
    request = receiver.requests[0]
    assert request["method"] == "POST"
    assert request["path"] == "/hooks/keevx"
    assert request["query_string"] == b"token=t0k%2Fen&x=1"
    assert request["headers"][b"content-type"] == b"application/json"
    assert request["body"] == {
        "code": 0,
        "msg": "ok",
        "task_type": "image_generate",
        "data": {
            "task_id": ids[0],
            "status": "SUCCEEDED",
            "image_url": f"{fake.base_url}/files/{ids[0]}.png",
            "error_message": "",
        },
    }
    assert fake.callbacks_sent == 2
    assert [fake.tasks[task_id].callbacks_sent for task_id in ids] == [1, 1]


async def test_no_callback_url_means_no_callback() -> None:
    recorder = CallbackRecorder()
    async with (
        FakeKeevx(complete_after=0, lost_rate=1.0) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        fake.deliver_into(recorder)
        (task_id,) = await task_ids_of(await submit(http))
        await fake.wait_idle()
    assert recorder.calls == []
    assert fake.tasks[task_id].status == "SUCCEEDED"
    assert not fake.tasks[task_id].lost  # nothing to lose


async def test_failed_deliveries_are_recorded_not_retried() -> None:
    receiver = ReceiverApp(status=503)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver)) as callbacks:
        fake = FakeKeevx(complete_after=0, callback_client=callbacks)
        async with fake, fake.http_client(headers=AUTH) as http:
            (task_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
            await fake.wait_idle()
            # Unreachable receiver: the transport error is recorded too.
            fake.callback_client = None  # and no own client, since one was given
            (second_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
            await fake.wait_idle()
    assert len(receiver.requests) == 1
    assert fake.delivery_failures == [
        (task_id, "HTTP 503"),
        (second_id, "no HTTP client for callbacks: the fake is not running"),
    ]
    assert fake.callbacks_sent == 0


async def test_callbacks_over_real_http_to_a_served_receiver() -> None:
    receiver = ReceiverApp()
    async with serve_asgi(receiver) as server, FakeKeevx(complete_after=0) as fake:
        async with fake.http_client(headers=AUTH) as http:
            url = f"{server.url}/cb/path?token=abc%2B1&n=2"
            ids = await task_ids_of(await submit(http, generate_count=3, callback_url=url))
            await fake.wait_idle()
            unreachable = "http://127.0.0.1:9/nothing-listens-here"
            (lost_id,) = await task_ids_of(await submit(http, callback_url=unreachable))
            await fake.wait_idle()
    assert sorted(request["body"]["data"]["task_id"] for request in receiver.requests) == sorted(
        ids
    )
    assert {request["path"] for request in receiver.requests} == {"/cb/path"}
    assert {request["query_string"] for request in receiver.requests} == {b"token=abc%2B1&n=2"}
    assert [task_id for task_id, _ in fake.delivery_failures] == [lost_id]
    assert fake.delivery_failures[0][1].startswith("ConnectError")


async def test_deliver_into_feeds_the_target_and_records_its_exceptions() -> None:
    recorder = CallbackRecorder()
    async with FakeKeevx(complete_after=0) as fake, fake.http_client(headers=AUTH) as http:
        fake.deliver_into(recorder)
        (task_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await fake.wait_idle()
        recorder.fail = True
        (failing_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await fake.wait_idle()
        # Back to HTTP, through the fake's callback client.
        fake.deliver_into(None)
        callbacks = httpx.AsyncClient(
            transport=httpx.MockTransport(lambda request: httpx.Response(204))
        )
        fake.callback_client = callbacks
        async with callbacks:
            (http_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
            await fake.wait_idle()
    assert recorder.calls[0][1] == CALLBACK_URL
    assert recorder.task_ids == [task_id]
    assert fake.delivery_failures == [(failing_id, "ValueError: receiver is down")]
    assert fake.tasks[http_id].callbacks_sent == 1
    assert fake.callbacks_sent == 2


async def test_failed_deliveries_are_tried_again_when_asked() -> None:
    answers = iter([503, 503, 200, 503, 503, 503])
    times: list[float] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        times.append(anyio.current_time())
        return httpx.Response(next(answers))

    callbacks = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    fake = FakeKeevx(complete_after=0, callback_client=callbacks, redeliver_after=0.05)
    async with callbacks, fake, fake.http_client(headers=AUTH) as http:
        fake.redeliveries = 2
        (delivered_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await fake.wait_idle()
        (lost_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await fake.wait_idle()
    # Third time lucky; then three failures and no more tries (1 + redeliveries).
    assert fake.tasks[delivered_id].callbacks_sent == 1
    assert fake.tasks[lost_id].callbacks_sent == 0
    assert fake.delivery_failures == [(delivered_id, "HTTP 503")] * 2 + [(lost_id, "HTTP 503")] * 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1  # doubling


async def test_early_callbacks_arrive_before_the_submit_reply() -> None:
    log: list[str] = []
    recorder = CallbackRecorder(log)
    async with FakeKeevx(early_callbacks=True) as fake, fake.http_client(headers=AUTH) as http:
        fake.deliver_into(recorder)
        response = await submit(http, generate_count=3, callback_url=CALLBACK_URL)
        log.append("reply")
        ids = await task_ids_of(response)
        assert all(fake.tasks[task_id].status == "SUCCEEDED" for task_id in ids)
        await fake.wait_idle()
    assert log == [f"callback {task_id}" for task_id in ids] + ["reply"]


async def test_duplicate_callbacks_are_delivered_twice() -> None:
    recorder = CallbackRecorder()
    async with (
        FakeKeevx(complete_after=0, duplicate_rate=1.0) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        fake.deliver_into(recorder)
        ids = await task_ids_of(await submit(http, generate_count=2, callback_url=CALLBACK_URL))
        await fake.wait_idle()
    assert recorder.task_ids == [ids[0], ids[0], ids[1], ids[1]]
    assert all(fake.tasks[task_id].duplicated for task_id in ids)
    assert [fake.tasks[task_id].callbacks_sent for task_id in ids] == [2, 2]
    assert fake.callbacks_sent == 4


async def test_lost_callbacks_are_never_sent_but_get_shows_the_result() -> None:
    recorder = CallbackRecorder()
    async with (
        FakeKeevx(
            complete_after=0, lost_rate=1.0, duplicate_rate=1.0, early_callbacks=True
        ) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        fake.deliver_into(recorder)
        ids = await task_ids_of(await submit(http, generate_count=2, callback_url=CALLBACK_URL))
        await fake.wait_idle()
        snapshots = [(await http.get(f"{SUBMIT}/{task_id}")).json()["data"] for task_id in ids]
    assert recorder.calls == []
    assert [snapshot["status"] for snapshot in snapshots] == ["SUCCEEDED", "SUCCEEDED"]
    assert all(fake.tasks[task_id].lost for task_id in ids)
    assert not any(fake.tasks[task_id].duplicated for task_id in ids)  # lost wins
    assert fake.callbacks_sent == 0


async def test_lose_if_loses_the_callbacks_of_matching_prompts_only() -> None:
    recorder = CallbackRecorder()
    async with (
        FakeKeevx(complete_after=0, lose_if=lambda prompt: "lose" in prompt) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        fake.deliver_into(recorder)
        lost = await task_ids_of(
            await submit(http, prompt="lose me", generate_count=2, callback_url=CALLBACK_URL)
        )
        kept = await task_ids_of(await submit(http, prompt="keep me", callback_url=CALLBACK_URL))
        await fake.wait_idle()
        snapshots = [(await http.get(f"{SUBMIT}/{task_id}")).json()["data"] for task_id in lost]
    assert recorder.task_ids == list(kept)
    assert [snapshot["status"] for snapshot in snapshots] == ["SUCCEEDED", "SUCCEEDED"]
    assert [fake.tasks[task_id].lost for task_id in (*lost, *kept)] == [True, True, False]
    assert len(fake.get_times) == fake.get_calls == 2
    assert fake.get_times == sorted(fake.get_times)


async def test_fail_rate_fails_tasks_with_an_error_message() -> None:
    recorder = CallbackRecorder()
    async with (
        FakeKeevx(complete_after=0, fail_rate=1.0) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        fake.deliver_into(recorder)
        (task_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await fake.wait_idle()
        snapshot = (await http.get(f"{SUBMIT}/{task_id}")).json()["data"]
    assert recorder.calls[0][0]["data"] == {
        "task_id": task_id,
        "status": "FAILED",
        "image_url": "",
        "error_message": RANDOM_FAILURE_MESSAGE,
    }
    assert snapshot["status"] == "FAILED"
    assert snapshot["thumbnail_url"] == ""
    assert snapshot["error_message"] == RANDOM_FAILURE_MESSAGE


async def test_fail_if_fails_every_task_of_matching_prompts() -> None:
    async with (
        FakeKeevx(complete_after=0, fail_if=lambda prompt: "fail" in prompt) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        bad = await task_ids_of(await submit(http, prompt="please fail", generate_count=3))
        good = await task_ids_of(await submit(http, prompt="a cat", generate_count=2))
        await fake.wait_idle()
    assert {fake.tasks[task_id].status for task_id in bad} == {"FAILED"}
    assert {fake.tasks[task_id].error_message for task_id in bad} == {MODERATION_MESSAGE}
    assert {fake.tasks[task_id].status for task_id in good} == {"SUCCEEDED"}


async def test_callbacks_of_a_submission_arrive_in_task_order_unless_shuffled() -> None:
    recorder = CallbackRecorder()
    async with FakeKeevx(complete_after=0, seed=7) as fake, fake.http_client(headers=AUTH) as http:
        fake.deliver_into(recorder)
        ordered = await task_ids_of(await submit(http, generate_count=8, callback_url=CALLBACK_URL))
        await fake.wait_idle()
        assert recorder.task_ids == ordered

        fake.shuffle = True
        recorder.calls.clear()
        shuffled = await task_ids_of(
            await submit(http, generate_count=8, callback_url=CALLBACK_URL)
        )
        await fake.wait_idle()
        assert recorder.task_ids != shuffled
        assert sorted(recorder.task_ids) == sorted(shuffled)

        # A draw that happens to keep the order is reversed: shuffling always shuffles.
        for _ in range(10):
            recorder.calls.clear()
            pair = await task_ids_of(
                await submit(http, generate_count=2, callback_url=CALLBACK_URL)
            )
            await fake.wait_idle()
            assert recorder.task_ids == pair[::-1]


async def test_early_callbacks_can_be_shuffled_too() -> None:
    recorder = CallbackRecorder()
    async with (
        FakeKeevx(early_callbacks=True, shuffle=True) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        fake.deliver_into(recorder)
        pair = await task_ids_of(await submit(http, generate_count=2, callback_url=CALLBACK_URL))
    assert recorder.task_ids == pair[::-1]


async def test_random_completion_times_still_complete_everything() -> None:
    recorder = CallbackRecorder()
    async with (
        FakeKeevx(complete_after=(0.0, 0.03), seed=1) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        fake.deliver_into(recorder)
        ids = await task_ids_of(await submit(http, generate_count=8, callback_url=CALLBACK_URL))
        await fake.wait_idle()
    assert sorted(recorder.task_ids) == sorted(ids)
    assert all(fake.tasks[task_id].status == "SUCCEEDED" for task_id in ids)


async def test_a_seed_makes_the_fates_reproducible() -> None:
    async def fates(seed: int) -> list[tuple[str, bool, bool]]:
        fake = FakeKeevx(
            complete_after=0, seed=seed, fail_rate=0.5, lost_rate=0.5, duplicate_rate=0.5
        )
        fake.deliver_into(CallbackRecorder())
        async with fake, fake.http_client(headers=AUTH) as http:
            ids = await task_ids_of(await submit(http, generate_count=8, callback_url="http://x/"))
            await fake.wait_idle()
        return [
            (fake.tasks[task_id].status, fake.tasks[task_id].lost, fake.tasks[task_id].duplicated)
            for task_id in ids
        ]

    first = await fates(11)
    assert first == await fates(11)
    assert {status for status, _, _ in first} == {"SUCCEEDED", "FAILED"}
    fake = FakeKeevx(seed=1)
    fake.seed = 2
    assert fake.seed == 2


async def test_delivery_concurrency_bounds_deliveries_in_flight() -> None:
    recorder = CallbackRecorder()
    recorder.gate = anyio.Event()
    async with (
        FakeKeevx(complete_after=0, delivery_concurrency=5) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        fake.delivery_concurrency = 2  # changed at runtime: applies to new deliveries
        fake.deliver_into(recorder)
        for _ in range(6):  # six submissions: six deliveries that could run in parallel
            await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await anyio.wait_all_tasks_blocked()  # two at the gate, four at the limiter
        assert recorder.active == 2
        recorder.gate.set()
        await fake.wait_idle()
    assert len(recorder.calls) == 6
    assert recorder.max_active == 2


# -- metrics ---------------------------------------------------------------------------


async def test_concurrency_metrics_count_submits_being_handled() -> None:
    async with FakeKeevx(latency=0.1) as fake, fake.http_client(headers=AUTH) as http:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(submit, http)
        assert fake.max_in_flight == 5
        assert fake.in_flight == 0
        assert (fake.submit_calls, fake.accepted_submits) == (5, 5)
        assert len(fake.submit_times) == 5
        assert fake.submit_times == sorted(fake.submit_times)
        old_id = next(iter(fake.tasks))

        fake.reset_metrics()
        assert (fake.submit_calls, fake.accepted_submits, fake.max_in_flight) == (0, 0, 0)
        assert (fake.submit_times, fake.tasks, fake.get_calls) == ([], {}, 0)
        assert (fake.callbacks_sent, fake.delivery_failures) == (0, [])
        fake.latency = 0
        # Tasks created before the reset are still known to the service.
        response = await http.get(f"{SUBMIT}/{old_id}")
        assert response.json()["data"]["task_id"] == old_id
        assert fake.get_calls == 1


async def test_wait_idle_waits_for_submits_in_flight() -> None:
    async with (
        FakeKeevx(latency=0.05, complete_after=0) as fake,
        fake.http_client(headers=AUTH) as http,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit, http)
            await anyio.wait_all_tasks_blocked()
            assert fake.in_flight == 1
            tg.start_soon(fake.wait_idle)  # several waiters share one wake-up
            await fake.wait_idle()
            assert fake.in_flight == 0
            assert [task.status for task in fake.tasks.values()] == ["SUCCEEDED"]


# -- awaitable hooks --------------------------------------------------------------------


def waiter(task_group: TaskGroup, wait: Callable[[], Awaitable[None]]) -> anyio.Event:
    """Run ``wait()`` in the background; the event is set once it has returned."""
    returned = anyio.Event()

    async def run() -> None:
        await wait()
        returned.set()

    task_group.start_soon(run)
    return returned


async def test_wait_for_submits_counts_submits_that_created_tasks() -> None:
    async with (
        FakeKeevx(complete_after=3600) as fake,
        fake.http_client(headers=AUTH) as http,
        anyio.create_task_group() as tg,
    ):
        first = waiter(tg, lambda: fake.wait_for_submits(1))
        third = waiter(tg, lambda: fake.wait_for_submits(3))
        await anyio.wait_all_tasks_blocked()
        assert not first.is_set()

        await task_ids_of(await submit(http))
        await first.wait()
        # Neither an invalid request nor a fault creates tasks: no progress.
        await submit(http, generate_count=99)
        fake.inject(429)
        await submit(http)
        await anyio.wait_all_tasks_blocked()
        assert not third.is_set()
        assert (fake.submit_calls, fake.accepted_submits) == (3, 1)

        fake.inject(500, create=True)  # billed: counts, although the reply is an error
        await submit(http)
        await task_ids_of(await submit(http))
        await third.wait()
        assert fake.accepted_submits == 3


async def test_wait_for_a_count_already_reached_returns_at_once() -> None:
    fake = FakeKeevx(complete_after=3600)
    await fake.wait_for_submits(0)  # reached, so fine even before the fake runs
    with pytest.raises(RuntimeError, match="not running"):
        await fake.wait_for_submits(1)
    with pytest.raises(RuntimeError, match="not running"):
        await fake.wait_for_callbacks(1)
    async with fake, fake.http_client(headers=AUTH) as http:
        await task_ids_of(await submit(http))
        await http.get(f"{SUBMIT}/i2is-unknown")
        with anyio.fail_after(5):  # a hang guard: each returns without waiting
            await fake.wait_for_submits(1)
            await fake.wait_for_gets(1)
            await fake.wait_for_callbacks(0)
    await fake.wait_for_submits(1)  # still reached after the fake stopped


async def test_wait_for_submits_counts_again_after_reset_metrics() -> None:
    async with (
        FakeKeevx(complete_after=3600) as fake,
        fake.http_client(headers=AUTH) as http,
        anyio.create_task_group() as tg,
    ):
        await task_ids_of(await submit(http))
        second = waiter(tg, lambda: fake.wait_for_submits(2))
        fake.reset_metrics()
        await task_ids_of(await submit(http))
        await anyio.wait_all_tasks_blocked()
        assert not second.is_set()  # one since the reset
        await task_ids_of(await submit(http))
        await second.wait()


async def test_wait_for_gets_counts_every_get_on_arrival() -> None:
    async with (
        FakeKeevx(complete_after=3600) as fake,
        fake.http_client(headers=AUTH) as http,
        anyio.create_task_group() as tg,
    ):
        second = waiter(tg, lambda: fake.wait_for_gets(2))
        fake.inject(503, route="get")
        assert (await http.get(f"{SUBMIT}/i2is-1")).status_code == 503
        await anyio.wait_all_tasks_blocked()
        assert not second.is_set()
        await http.get(f"{SUBMIT}/i2is-2")  # unknown: still a GET
        await second.wait()
        assert fake.get_calls == 2


async def test_wait_for_callbacks_counts_deliveries_not_failures() -> None:
    recorder = CallbackRecorder()
    recorder.gate = anyio.Event()
    async with (
        FakeKeevx(complete_after=0, duplicate_rate=1.0) as fake,
        fake.http_client(headers=AUTH) as http,
        anyio.create_task_group() as tg,
    ):
        fake.deliver_into(recorder)
        two = waiter(tg, lambda: fake.wait_for_callbacks(2))
        three = waiter(tg, lambda: fake.wait_for_callbacks(3))
        (task_id,) = await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await anyio.wait_all_tasks_blocked()  # the first delivery waits at the gate
        assert recorder.active == 1
        assert not two.is_set()

        recorder.gate.set()
        await two.wait()  # the duplicate: the same task, delivered twice
        assert recorder.task_ids == [task_id, task_id]
        assert fake.callbacks_sent == 2

        recorder.fail = True
        fake.duplicate_rate = 0.0
        await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await fake.wait_idle()
        assert not three.is_set()  # a failed delivery does not count
        assert len(fake.delivery_failures) == 1

        recorder.fail = False
        await task_ids_of(await submit(http, callback_url=CALLBACK_URL))
        await three.wait()


async def test_a_cancelled_waiter_leaves_the_others_alone() -> None:
    async with (
        FakeKeevx(complete_after=3600) as fake,
        fake.http_client(headers=AUTH) as http,
        anyio.create_task_group() as tg,
    ):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await fake.wait_for_submits(1)
        assert scope.cancelled_caught
        kept = waiter(tg, lambda: fake.wait_for_submits(1))
        await task_ids_of(await submit(http))
        await kept.wait()


# -- served on a socket, ASGI details ---------------------------------------------------


async def test_serve_on_loopback_and_base_url() -> None:
    async with FakeKeevx(complete_after=0) as fake:
        assert fake.base_url == "https://api.fake.keevx.test"
        async with fake.serve() as server:
            assert fake.base_url == server.url == f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(
                base_url=fake.base_url, headers=AUTH, trust_env=False
            ) as http:
                (task_id,) = await task_ids_of(await submit(http))
                await fake.wait_idle()
                response = await http.get(f"{SUBMIT}/{task_id}")
        assert response.json()["data"]["status"] == "SUCCEEDED"
        assert fake.base_url == "https://api.fake.keevx.test"


async def _drive_lifespan(fake: FakeKeevx, messages: list[str]) -> list[str]:
    incoming = iter([{"type": kind} for kind in messages])
    sent: list[str] = []

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    await fake({"type": "lifespan"}, receive, send)
    return sent


async def test_lifespan_starts_and_stops_the_fake() -> None:
    fake = FakeKeevx(complete_after=0)
    started = anyio.Event()
    stop = anyio.Event()
    sent: list[str] = []

    async def receive() -> Message:
        if not started.is_set():
            started.set()
            return {"type": "lifespan.startup"}
        await stop.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: Message) -> None:
        sent.append(message["type"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(fake, {"type": "lifespan"}, receive, send)
        await started.wait()
        async with fake.http_client(headers=AUTH) as http:
            await task_ids_of(await submit(http))
            await fake.wait_idle()
            stop.set()
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    async with fake.http_client(headers=AUTH) as http:
        assert (await submit(http)).status_code == 500


async def test_lifespan_leaves_an_entered_fake_alone() -> None:
    async with FakeKeevx() as fake:
        sent = await _drive_lifespan(
            fake, ["lifespan.startup", "lifespan.unknown", "lifespan.shutdown"]
        )
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        await fake.wait_idle()  # still running


async def test_other_scope_types_are_refused() -> None:
    async def never(message: Message) -> None:
        raise AssertionError

    async def nothing() -> Message:
        raise AssertionError

    with pytest.raises(ValueError, match="websocket"):
        await FakeKeevx()({"type": "websocket"}, nothing, never)


async def test_a_client_that_disconnects_early_still_gets_an_answer() -> None:
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": SUBMIT, "headers": []}
    async with FakeKeevx() as fake:
        await fake(scope, receive, send)
    assert messages[0]["status"] == 401


def test_fake_task_is_a_plain_record() -> None:
    task = FakeTask(
        task_id="i2is-x", prompt="p", body={}, index=0, callback_url=None, created_at=1.0
    )
    assert (task.status, task.callbacks_sent, task.lost, task.finished_at) == (
        "GENERATING",
        0,
        False,
        None,
    )


# -- python -m keevx_async.testing -------------------------------------------------------


async def test_module_runs_as_a_server_until_sigterm() -> None:
    command = [sys.executable, "-m", "keevx_async.testing", "--port", "0", "--api-key", "k"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    async with await anyio.open_process(command, env=env) as process:
        assert process.stdout is not None
        try:
            line = b""
            with anyio.fail_after(20):
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive(1)
            match = re.fullmatch(rb"FakeKeevx listening on (http://127\.0\.0\.1:\d+)\n", line)
            assert match is not None, line
            async with httpx.AsyncClient(base_url=match[1].decode(), trust_env=False) as http:
                response = await http.post(
                    SUBMIT, json={"prompt": "p"}, headers={"Authorization": "Bearer k"}
                )
            assert TASK_ID.match(response.json()["data"]["task_ids"][0])
        finally:
            process.terminate()
            with anyio.fail_after(10):
                returncode = await process.wait()
    assert returncode == 0


class _ReadyWatcher(io.StringIO):
    """A stdout that signals a thread when the ready line has been written."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = threading.Event()

    def flush(self) -> None:
        super().flush()
        if self.getvalue().endswith("\n"):
            self.ready.set()


def test_main_serves_until_sigint(anyio_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = _ReadyWatcher()
    monkeypatch.setattr(sys, "stdout", watcher)
    statuses: list[int] = []

    def client() -> None:
        try:
            if watcher.ready.wait(20):
                url = watcher.getvalue().split()[-1]
                with httpx.Client(base_url=url, trust_env=False) as http:
                    response = http.post(SUBMIT, json={"prompt": "p"}, headers=AUTH)
                    statuses.append(response.status_code)
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert main(["--port", "0", "--backend", anyio_backend, "--complete-after", "0,0.01"]) == 0
    finally:
        thread.join(20)
    assert statuses == [200]
    assert watcher.getvalue().startswith("FakeKeevx listening on http://127.0.0.1:")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--port", "0", "--fail-rate", "1.5"],
        ["--port", "0", "--latency", "-1"],
        ["--port", "0", "--complete-after", "0.5,0.1"],
        ["--port", "0", "--complete-after", "soon"],
    ],
)
def test_command_line_rejects_bad_values(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        build_parser().parse_args(argv)
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err


def test_command_line_knobs() -> None:
    args = build_parser().parse_args(
        [
            "--port",
            "8123",
            "--complete-after",
            "0.1,0.5",
            "--duplicate-rate",
            "0.25",
            "--shuffle",
            "--early-callbacks",
            "--seed",
            "3",
        ]
    )
    assert (args.port, args.host, args.complete_after) == (8123, "127.0.0.1", (0.1, 0.5))
    assert (args.duplicate_rate, args.shuffle, args.early_callbacks, args.seed) == (
        0.25,
        True,
        True,
        3,
    )


# --- FakeKeevx.client -------------------------------------------------------------------


async def test_client_is_wired_to_the_fake_and_gets_callbacks_straight_in() -> None:
    async with FakeKeevx(api_key="secret-key") as fake, fake.client() as client:
        results = await client.generate(kx.ImageRequest("a kite", generate_count=2))
        assert {r.task_id for r in results} == set(fake.tasks)
        assert client.callback_url == "https://app.example.test/keevx/callback"
    # Leaving the block stops handing callbacks to the closed client.
    assert fake._callback_target is None


async def test_client_options_go_to_the_client() -> None:
    async with FakeKeevx(lost_rate=1.0) as fake:
        async with fake.client(max_concurrency=3, deliver_callbacks=False) as client:
            assert client.max_concurrency == 3
            assert fake._callback_target is None
            submission = await client.submit(kx.ImageRequest("x"))
            await fake.wait_idle()
            assert not submission.tasks[0].done()
