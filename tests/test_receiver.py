"""callback_app: the ASGI receiver of a real client, driven over httpx.ASGITransport."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

import keevx_async as kx
from keevx_async._asgi import Message
from keevx_async._tokens import TOKEN_PARAM, attach_token

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio

CALLBACK_URL = "https://app.example.test/cb"
REQUEST = kx.ImageRequest("a fox", generate_count=2)


@asynccontextmanager
async def receiving(
    **options: Any,
) -> AsyncIterator[tuple[kx.AsyncKeevx, httpx.AsyncClient]]:
    """A real client and an HTTP client posting to its callback_app in-process."""
    settings: dict[str, Any] = {
        "api_key": "test",
        "base_url": "https://api.example.test",
        "callback_url": CALLBACK_URL,
    }
    settings.update(options)
    async with (
        kx.AsyncKeevx(**settings) as client,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=client.callback_app),
            base_url="https://app.example.test",
        ) as http,
    ):
        yield client, http


def _submission(
    client: kx.AsyncKeevx, *task_ids: str, register: bool = True
) -> tuple[str, list[kx.Task]]:
    """Issue a token the way submit does, and (optionally) register its tasks.

    Returns the callback URL the service would POST to, and the tasks.
    """
    submission_id, token = client._callbacks.signer.issue()
    tasks = [kx.Task(t, REQUEST, i, submission_id=submission_id) for i, t in enumerate(task_ids)]
    if register:
        client._callbacks.registry.register(tasks)
    return attach_token(CALLBACK_URL, token, client.callback_token_in), tasks


def _post_scope(url: str) -> dict[str, Any]:
    """The ASGI scope of a JSON POST to ``url`` (for tests that drive the app by hand)."""
    parts = urlsplit(url)
    return {
        "type": "http",
        "method": "POST",
        "path": parts.path,
        "query_string": parts.query.encode(),
        "headers": [(b"content-type", b"application/json")],
    }


def _target(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


class _ChunkedBody(httpx.AsyncByteStream):
    """A request body sent in chunks without a Content-Length (a plain iterator, so a
    receiver that stops reading early leaves no unfinished generator behind)."""

    def __init__(self, body: bytes, chunk_size: int) -> None:
        self._chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
        self.chunk_count = len(self._chunks)
        self.chunks_sent = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.chunks_sent == self.chunk_count:
            raise StopAsyncIteration
        self.chunks_sent += 1
        return self._chunks[self.chunks_sent - 1]


def _callback(task_id: str, status: str = "SUCCEEDED", **data: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "task_id": task_id,
        "status": status,
        "image_url": f"https://cdn.test/{task_id}.png" if status == "SUCCEEDED" else "",
        "error_message": "",
    }
    fields.update(data)
    return {"code": 0, "msg": "ok", "task_type": "image_generate", "data": fields}


# --- accepted ---------------------------------------------------------------------------------


async def test_valid_callback_resolves_its_task_and_answers_ok() -> None:
    async with receiving() as (client, http):
        url, (first, second) = _submission(client, "i2is-a", "i2is-b")

        response = await http.post(_target(url), json=_callback("i2is-b"))

        assert response.status_code == 200
        assert response.json() == {"code": 0, "msg": "ok"}
        assert response.headers["content-type"] == "application/json"
        assert second.result().image_url == "https://cdn.test/i2is-b.png"
        assert second.result().index == 1
        assert not first.done()

        response = await http.post(_target(url), json=_callback("i2is-a"))
        assert response.status_code == 200
        assert first.result().image_url == "https://cdn.test/i2is-a.png"
        assert client.stats.pending == 0


async def test_failed_callback_fails_the_task() -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        body = _callback("i2is-a", "FAILED", error_message="content policy")
        response = await http.post(_target(url), json=body)
        assert response.status_code == 200
        error = task.exception()
        assert isinstance(error, kx.TaskFailedError)
        assert error.error_message == "content policy"


async def test_progress_callback_updates_status_only() -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        response = await http.post(_target(url), json=_callback("i2is-a", "PROCESSING"))
        assert response.status_code == 200
        assert task.status == "PROCESSING"
        assert not task.done()


async def test_duplicate_callback_is_ok_and_changes_nothing() -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        await http.post(_target(url), json=_callback("i2is-a"))
        again = _callback("i2is-a", image_url="https://cdn.test/other.png")

        response = await http.post(_target(url), json=again)

        assert response.status_code == 200
        assert response.json() == {"code": 0, "msg": "ok"}
        assert task.result().image_url == "https://cdn.test/i2is-a.png"
        assert client.stats.callbacks_duplicate == 1


async def test_early_callback_is_ok_and_applied_when_the_submission_registers() -> None:
    async with receiving() as (client, http):
        url, tasks = _submission(client, "i2is-a", register=False)

        response = await http.post(_target(url), json=_callback("i2is-a"))

        assert response.status_code == 200
        assert client.stats.buffered == 1
        assert not tasks[0].done()
        client._callbacks.registry.register(tasks)
        assert tasks[0].result().image_url == "https://cdn.test/i2is-a.png"
        assert client.stats.buffered == 0


async def test_callback_with_charset_in_content_type_is_accepted() -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        response = await http.post(
            _target(url),
            content=json.dumps(_callback("i2is-a")).encode(),
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert response.status_code == 200
        assert task.done()


async def test_path_token_placement_is_accepted() -> None:
    async with receiving(callback_token_in="path") as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        assert urlsplit(url).query == ""
        assert urlsplit(url).path.startswith("/cb/")

        response = await http.post(_target(url), json=_callback("i2is-a"))

        assert response.status_code == 200
        assert task.done()


async def test_a_path_token_with_an_encoded_dot_gets_one_answer_everywhere() -> None:
    # Found by adversarial testing: a proxy encoding the token's dot as %2E made
    # callback_app accept it while feed_callback refused the very same URL.
    async with receiving(callback_token_in="path") as (client, http):
        url_a, (task_a,) = _submission(client, "i2is-a")
        url_b, (task_b,) = _submission(client, "i2is-b")
        head, _, token = url_a.rpartition("/")
        encoded_a = f"{head}/{token.replace('.', '%2E')}"
        head, _, token = url_b.rpartition("/")
        encoded_b = f"{head}/{token.replace('.', '%2e')}"

        response = await http.post(_target(encoded_a), json=_callback("i2is-a"))
        assert response.status_code == 200
        assert task_a.result().task_id == "i2is-a"
        outcome = await client.feed_callback(json.dumps(_callback("i2is-b")), url=encoded_b)
        assert outcome is kx.CallbackOutcome.RESOLVED
        assert task_b.result().task_id == "i2is-b"
        # A query string of the user's own next to a path token changes nothing.
        url_c, (task_c,) = _submission(client, "i2is-c")
        response = await http.post(_target(url_c) + "?tenant=7", json=_callback("i2is-c"))
        assert response.status_code == 200
        assert task_c.result().task_id == "i2is-c"


async def test_a_trickled_body_is_refused_with_408_after_the_body_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by adversarial testing: a valid token and a body sent a byte at a time held
    # the request (and its task) until shutdown.
    async with receiving() as (client, _):
        url, (task,) = _submission(client, "i2is-a")
        app = client.callback_app
        app.body_timeout = 0.2
        body = json.dumps(_callback("i2is-a")).encode()
        scope = _post_scope(url)
        first = [{"type": "http.request", "body": body[:5], "more_body": True}]
        sent: list[Message] = []

        async def receive() -> Message:
            if first:
                return first.pop()
            await anyio.sleep_forever()  # the rest never comes
            raise AssertionError  # pragma: no cover

        async def send(message: Message) -> None:
            sent.append(message)

        with anyio.fail_after(5):
            await app(scope, receive, send)
        assert sent[0]["status"] == 408
        assert b"not received within 0.2 seconds" in sent[1]["body"]
        assert not task.done()  # nothing applied: a redelivery can still resolve it
        assert client.stats.pending == 1
    assert "took over 0.2 s to arrive" in caplog.text


async def test_without_verification_callbacks_need_no_token() -> None:
    async with receiving(verify_callbacks=False) as (client, http):
        task = kx.Task("i2is-a", REQUEST, 0)
        client._callbacks.registry.register([task])

        response = await http.post("/cb", json=_callback("i2is-a"))

        assert response.status_code == 200
        assert task.result().image_url == "https://cdn.test/i2is-a.png"


# --- refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"code": 0}',
        b'{"data": {"task_id": "", "status": "FAILED"}}',
        b'{"data": {"task_id": "i2is-a", "status": "SUCCEEDED"}}',
    ],
)
async def test_malformed_body_is_400_and_changes_nothing(body: bytes) -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")

        response = await http.post(
            _target(url), content=body, headers={"content-type": "application/json"}
        )

        assert response.status_code == 400
        assert response.json()["code"] == 400
        assert not task.done()
        assert task.status == "GENERATING"
        assert client.stats.callbacks_malformed == 1
        assert client.stats.buffered == 0


@pytest.mark.parametrize(
    "target",
    [
        "/cb",
        f"/cb?{TOKEN_PARAM}=",
        f"/cb?{TOKEN_PARAM}=forged.token",
        f"/cb?{TOKEN_PARAM}=nodot",
        f"/cb?other={TOKEN_PARAM}",
    ],
)
async def test_missing_or_bad_token_is_401_and_changes_nothing(target: str) -> None:
    async with receiving() as (client, http):
        _, (task,) = _submission(client, "i2is-a")

        response = await http.post(target, json=_callback("i2is-a"))

        assert response.status_code == 401
        assert response.json()["code"] == 401
        assert not task.done()
        assert client.stats.callbacks_rejected == 1


async def test_token_signed_with_another_secret_is_401() -> None:
    async with receiving(callback_secret="ours") as (client, http):
        _, (task,) = _submission(client, "i2is-a")
        async with receiving(callback_secret="theirs") as (other, _):
            forged_url, _ = _submission(other, "i2is-a", register=False)

        response = await http.post(_target(forged_url), json=_callback("i2is-a"))

        assert response.status_code == 401
        assert not task.done()


async def test_non_ascii_token_is_401_not_a_crash() -> None:
    async with receiving() as (client, http):
        _, (task,) = _submission(client, "i2is-a")

        response = await http.post(f"/cb?{TOKEN_PARAM}=abc.%C3%A9", json=_callback("i2is-a"))

        assert response.status_code == 401
        assert not task.done()


async def test_token_is_checked_before_the_body() -> None:
    async with receiving() as (client, http):
        response = await http.post(
            f"/cb?{TOKEN_PARAM}=forged.token",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 401
        assert client.stats.callbacks_malformed == 0


async def test_token_of_another_submission_is_401_and_the_task_is_unchanged() -> None:
    async with receiving() as (client, http):
        _, (task,) = _submission(client, "i2is-a")
        other_url, _ = _submission(client, "i2is-b")

        response = await http.post(_target(other_url), json=_callback("i2is-a"))

        assert response.status_code == 401
        assert not task.done()
        assert task.status == "GENERATING"
        assert client.stats.callbacks_rejected == 1


async def test_early_callback_with_another_submissions_token_is_never_applied() -> None:
    async with receiving() as (client, http):
        url, tasks = _submission(client, "i2is-a", register=False)
        # Another submission whose reply has not arrived either.
        other_url, _ = _submission(client, "i2is-z", register=False)

        response = await http.post(_target(other_url), json=_callback("i2is-a"))
        assert response.status_code == 200  # buffered: the task is not known yet

        client._callbacks.registry.register(tasks)
        assert not tasks[0].done()
        await http.post(_target(url), json=_callback("i2is-a"))
        assert tasks[0].done()


async def test_body_over_the_cap_with_content_length_is_413() -> None:
    async with receiving(max_callback_body=100) as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        body = _callback("i2is-a", padding="x" * 200)

        response = await http.post(_target(url), json=body)

        assert response.status_code == 413
        assert "100" in response.json()["msg"]
        assert not task.done()


async def test_streamed_body_over_the_cap_without_content_length_is_413() -> None:
    async with receiving(max_callback_body=100) as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        body = _ChunkedBody(json.dumps(_callback("i2is-a", padding="x" * 200)).encode(), 40)
        request = httpx.Request(
            "POST",
            f"https://app.example.test{_target(url)}",
            stream=body,
            headers={"content-type": "application/json"},
        )
        assert "content-length" not in request.headers

        response = await http.send(request)

        assert response.status_code == 413
        assert body.chunks_sent < body.chunk_count  # it stopped reading at the cap
        assert not task.done()


async def test_streamed_body_within_the_cap_is_read_whole() -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        body = _ChunkedBody(json.dumps(_callback("i2is-a")).encode(), 16)
        request = httpx.Request(
            "POST",
            f"https://app.example.test{_target(url)}",
            stream=body,
            headers={"content-type": "application/json"},
        )

        response = await http.send(request)

        assert response.status_code == 200
        assert body.chunks_sent == body.chunk_count
        assert task.done()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_json_body_counts_whatever_the_content_type(content_type: str) -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        response = await http.post(
            _target(url),
            content=json.dumps(_callback("i2is-a")).encode(),
            headers={"content-type": content_type},
        )
        assert response.status_code == 200
        assert task.done()


async def test_form_encoded_body_is_400_and_changes_nothing() -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        response = await http.post(_target(url), data={"task_id": "i2is-a"})
        assert response.status_code == 400
        assert not task.done()


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405_with_allow_header(method: str) -> None:
    async with receiving() as (client, http):
        url, (task,) = _submission(client, "i2is-a")
        response = await http.request(method, _target(url), json=_callback("i2is-a"))
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert not task.done()


# --- other scopes -------------------------------------------------------------------------------


async def test_lifespan_startup_and_shutdown_are_answered() -> None:
    async with receiving() as (client, _):
        to_app_send, to_app = anyio.create_memory_object_stream[Message](4)
        from_app_send, from_app = anyio.create_memory_object_stream[Message](4)
        async with to_app_send, to_app, from_app_send, from_app:

            async def receive() -> Message:
                return await to_app.receive()

            async def send(message: Message) -> None:
                await from_app_send.send(message)

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.callback_app, {"type": "lifespan"}, receive, send)
                    await to_app_send.send({"type": "lifespan.startup"})
                    assert await from_app.receive() == {"type": "lifespan.startup.complete"}
                    await to_app_send.send({"type": "lifespan.shutdown"})
                    assert await from_app.receive() == {"type": "lifespan.shutdown.complete"}


async def test_websocket_scope_is_refused() -> None:
    async with receiving() as (client, _):

        async def receive() -> Message:
            return {"type": "websocket.connect"}

        async def send(message: Message) -> None:
            raise AssertionError(f"nothing should be sent: {message}")

        with pytest.raises(RuntimeError, match="HTTP only"):
            await client.callback_app({"type": "websocket", "path": "/cb"}, receive, send)


async def test_client_disconnect_mid_body_is_treated_as_end_of_body() -> None:
    async with receiving() as (client, _):
        url, (task,) = _submission(client, "i2is-a")
        encoded = json.dumps(_callback("i2is-a")).encode()
        incoming: list[Message] = [
            {"type": "http.request", "body": encoded[:10], "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[Message] = []

        async def receive() -> Message:
            return incoming.pop(0)

        async def send(message: Message) -> None:
            sent.append(message)

        scope = _post_scope(url)
        await client.callback_app(scope, receive, send)

        assert sent[0]["status"] == 400
        assert not task.done()
