"""Fuzzing the callback path: ``callback_app`` fed arbitrary methods, paths, headers and
bodies (random bytes, and genuine callbacks mutated field by field).

Bounded (a fixed number of examples per backend, no deadline), so it runs in CI with the
rest of the suite. What must hold for every request:

- nothing escapes the app: every request gets exactly one response, with a status from
  the documented set;
- a 200 is only ever the answer to a callback that resolved, buffered, duplicated,
  forwarded or reported progress on a task (the client's counters say which), never to
  one that changed nothing;
- a task is only ever resolved by a callback carrying its own submission's token.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import keevx_async as kx
from keevx_async._tokens import attach_token
from keevx_async._types import UNFINISHED_STATUSES

CALLBACK_URL = "https://app.example.test/cb"
REQUEST = kx.ImageRequest("fuzzed")
STATUSES = {200, 400, 401, 405, 408, 413, 415, 503}
TASK_IDS = ("i2is-a", "i2is-b", "i2is-c")

_TEXT = st.text(max_size=12)
_JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    _TEXT,
    st.sampled_from(["SUCCEEDED", "FAILED", "GENERATING", "PENDING", "\ud800", "\udfff"]),
)
_JSON = st.recursive(
    _JSON_SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_TEXT, inner, max_size=3)),
    max_leaves=6,
)


def _genuine(task_id: str) -> dict[str, Any]:
    return {
        "code": 0,
        "msg": "ok",
        "task_type": "image_generate",
        "data": {
            "task_id": task_id,
            "status": "SUCCEEDED",
            "image_url": f"https://cdn.test/{task_id}.png",
            "error_message": "",
        },
    }


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "mutated", "genuine", "genuine"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(_JSON)).encode()
    document = _genuine(draw(st.sampled_from([*TASK_IDS, "i2is-unknown", ""])))
    if kind == "mutated":
        where = draw(st.sampled_from(["top", "data"]))
        target = document if where == "top" else document["data"]
        key = draw(st.sampled_from([*target, "extra"]))
        if draw(st.booleans()):
            target[key] = draw(_JSON)
        else:
            target.pop(key, None)
    ascii_only = draw(st.booleans())
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def _requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request: which token its URL carries, and the rest of it as drawn."""
    return {
        # Weighted towards what reaches the body: a POST with its own token.
        "method": draw(st.sampled_from(["POST"] * 12 + ["GET", "PUT", "DELETE"])),
        # Whose token: one of the two submissions, a mangled one, none, or random text.
        "token": draw(
            st.sampled_from(["first"] * 5 + ["second", "second", "mangled", "none", "random"])
        ),
        "random_token": draw(st.text(max_size=30)),
        "token_in": draw(st.sampled_from(["query", "path"])),
        "extra_query": draw(st.sampled_from(["", "a=1", "keevx_token=", "%zz", "x=%FF"])),
        "headers": draw(
            st.just([(b"content-type", b"application/json")])
            | st.just([])
            | st.lists(
                st.tuples(
                    st.sampled_from(
                        [b"content-type", b"content-length", b"transfer-encoding", b"x-any"]
                    ),
                    st.binary(max_size=20),
                ),
                max_size=3,
            )
        ),
        "body": draw(_bodies()),
        "chunks": draw(st.integers(min_value=1, max_value=3)),
    }


async def _exchange(app: Any, scope: dict[str, Any], body: bytes, chunks: int) -> list[Any]:
    size = max(1, -(-len(body) // chunks))
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages = [
        {"type": "http.request", "body": part, "more_body": n < len(parts) - 1}
        for n, part in enumerate(parts)
    ]
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await anyio.sleep_forever()  # pragma: no cover (the app reads no further)
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)
    return sent


def _counted(stats: kx.ClientStats) -> int:
    return (
        stats.resolved_by_callback
        + stats.callbacks_buffered
        + stats.callbacks_duplicate
        + stats.callbacks_forwarded
    )


async def _one(request: dict[str, Any]) -> None:
    token_in = request["token_in"]
    async with kx.AsyncKeevx(
        api_key="k", callback_url=CALLBACK_URL, callback_token_in=token_in, reconcile_after=None
    ) as client:
        intake = client._callbacks
        first_sub, first_token = intake.signer.issue()
        _, second_token = intake.signer.issue()
        first = [kx.Task(t, REQUEST, i, submission_id=first_sub) for i, t in enumerate(TASK_IDS)]
        intake.registry.register(first)
        token = {
            "first": first_token,
            "second": second_token,
            "mangled": first_token[:-2] + ("AA" if not first_token.endswith("AA") else "BB"),
            "none": None,
            "random": request["random_token"],
        }[request["token"]]
        url = CALLBACK_URL if token is None else attach_token(CALLBACK_URL, token, token_in)
        path, _, query = url.removeprefix("https://app.example.test").partition("?")
        if request["extra_query"]:
            query = f"{request['extra_query']}&{query}" if query else request["extra_query"]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request["method"],
            "scheme": "https",
            "path": path,
            "raw_path": path.encode("latin-1", "replace"),
            "query_string": query.encode("latin-1", "replace"),
            "headers": request["headers"],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 443),
        }
        before = client.stats
        sent = await _exchange(client.callback_app, scope, request["body"], request["chunks"])
        after = client.stats
        resolved = [task for task in first if task.done()]

    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    status = starts[0]["status"]
    assert status in STATUSES, sent
    event("status", str(status))
    if status == 200:
        # Something happened to a task, or the callback reported progress.
        body = json.loads(request["body"])
        progress = body["data"]["status"] in UNFINISHED_STATUSES
        assert progress or _counted(after) == _counted(before) + 1, (request, after)
    else:
        assert _counted(after) == _counted(before), (request, after)
    # Only the first submission's own token resolves its tasks, with the body's data.
    for task in resolved:
        assert request["token"] == "first", request
        assert status == 200, request
        assert task.result().image_url == json.loads(request["body"])["data"]["image_url"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=_requests())
def test_callback_app_never_fails_and_answers_200_only_for_what_it_applied(
    backend: str, request: dict[str, Any]
) -> None:
    anyio.run(_one, request, backend=backend)
