"""RedisRouter across real processes: submit in one, receive the callback in another.

The test process is worker A, which submits. Workers B (``router_worker.py``) run as
separate processes, on the test's backend, and receive callbacks on real loopback
servers. FakeKeevx is served on loopback and POSTs each callback over HTTP to the
callback URL A gave it: B's, or a load balancer's in front of several B. Every client
shares the callback secret, the Redis server (on 127.0.0.1:6379) and a key prefix of the
test's own. Lookups are off (``reconcile_after=None``): every result arrived by callback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import httpx
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from redis_support import REDIS_URL, kill_connections, prefix_keys, sync_redis
from wiring import API_KEY, CALLBACK_URL

import keevx_async as kx
from keevx_async.testing import FakeKeevx, serve_asgi

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).with_name("router_worker.py")
SECRET = "router-processes-shared-secret"
#: Seconds a worker gets to start (import, connect to Redis, listen).
START_LIMIT = 30
#: Seconds any one test may take: a hang fails instead of stalling the suite.
LIMIT = 45


def worker_env() -> dict[str, str]:
    """The test's environment without KEEVX_* (the worker refuses to run with them)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("KEEVX_")}


@attrs.define
class Worker:
    """A running ``router_worker.py``: its process, first line of output and log file."""

    process: Process
    line: str
    log_path: Path

    def log(self) -> str:
        """What the worker wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def worker(
    role: str,
    *,
    backend: str,
    prefix: str,
    fake_url: str,
    log_dir: Path,
    extra: Sequence[str] = (),
) -> AsyncIterator[Worker]:
    """Start ``router_worker.py`` and wait for its first line; SIGKILL it after the block."""
    log_path = log_dir / f"{role}-{uuid.uuid4().hex[:8]}.log"
    command = [
        sys.executable,
        str(WORKER),
        f"--backend={backend}",
        f"--redis-url={REDIS_URL}",
        f"--prefix={prefix}",
        f"--secret={SECRET}",
        f"--fake-url={fake_url}",
        "--port=0",
        f"--role={role}",
        *extra,
    ]
    with log_path.open("wb") as log:
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stderr=log, env=worker_env()
        )
        try:
            assert process.stdout is not None
            try:
                with anyio.fail_after(START_LIMIT):
                    raw = await BufferedByteReceiveStream(process.stdout).receive_until(
                        b"\n", 65536
                    )
            except (anyio.IncompleteRead, anyio.EndOfStream, TimeoutError):
                pytest.fail(f"the {role} worker did not start:\n{log_path.read_text()}")
            yield Worker(process, raw.decode(), log_path)
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                await process.aclose()  # waits for it, and closes its pipes


@asynccontextmanager
async def receiving_worker(
    backend: str, prefix: str, fake: FakeKeevx, log_dir: Path
) -> AsyncIterator[tuple[Worker, str]]:
    """A receiver worker B; yields it and its callback URL."""
    async with worker(
        "receiver", backend=backend, prefix=prefix, fake_url=fake.base_url, log_dir=log_dir
    ) as b:
        word, _, url = b.line.strip().partition(" ")
        assert word == "ready", b.line
        yield b, url


def router_client(prefix: str, fake: FakeKeevx, **options: Any) -> kx.AsyncKeevx:
    """A client in this process with a RedisRouter under ``prefix``, lookups off."""
    options.setdefault("reconcile_after", None)
    return kx.AsyncKeevx(
        api_key=API_KEY,
        base_url=fake.base_url,
        callback_secret=SECRET,
        router=kx.RedisRouter(REDIS_URL, prefix=prefix),
        **options,
    )


async def wait_for(predicate: Callable[[], bool], what: str, limit: float = 20) -> None:
    """Poll until ``predicate()`` holds; fail the test after ``limit`` seconds."""
    try:
        with anyio.fail_after(limit):
            # Counters of the fake and the receivers: nothing to wait on but themselves.
            while not predicate():  # noqa: ASYNC110
                await anyio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"waited {limit} s for {what}")


def check_results(
    results: list[list[kx.ImageResult | kx.KeevxError]], prompts: list[str], fake: FakeKeevx
) -> None:
    """Each prompt got one task, with its own image."""
    task_ids = set()
    for prompt, items in zip(prompts, results, strict=True):
        [result] = items
        assert isinstance(result, kx.ImageResult), f"{prompt}: {result!r}"
        assert result.request.prompt == prompt
        assert fake.tasks[result.task_id].prompt == prompt
        assert result.image_url == fake.tasks[result.task_id].image_url
        task_ids.add(result.task_id)
    assert task_ids == set(fake.tasks)


def check_keys_expire(prefix: str) -> list[str]:
    """Every key under ``prefix`` has a TTL; returns the keys."""
    client = sync_redis()
    try:
        keys = prefix_keys(client, prefix)
        without = {key: ttl for key in keys if (ttl := client.ttl(key)) <= 0}
    finally:
        client.close()
    assert without == {}, f"keys without a TTL: {without}"
    return keys


def routed_fake(**options: Any) -> FakeKeevx:
    options.setdefault("complete_after", (0.05, 0.5))
    return FakeKeevx(api_key=API_KEY, seed=6, **options)


def _check_worker_killed(b: Worker) -> None:
    assert b.process.returncode == -signal.SIGKILL, b.process.returncode


# --- 1. A submits, B receives --------------------------------------------------------


async def test_callback_delivered_to_another_process_resolves_the_submitter(
    anyio_backend: str, redis_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not inherited by the worker (it would refuse to run), and not used by A either.
    monkeypatch.setenv("KEEVX_CALLBACK_SECRET", "not-the-shared-secret")
    prompts = [f"a fox number {n}" for n in range(30)]
    with anyio.fail_after(LIMIT):
        async with routed_fake() as fake, fake.serve():
            async with receiving_worker(anyio_backend, redis_prefix, fake, tmp_path) as (b, url):
                async with router_client(redis_prefix, fake, callback_url=url) as a:
                    results = await a.generate_many(prompts, timeout=15)
                    await fake.wait_idle()
                    stats = a.stats
            _check_worker_killed(b)

    check_results(results, prompts, fake)
    assert fake.callbacks_sent == 30
    assert fake.delivery_failures == []
    callback_urls = [task.callback_url or "" for task in fake.tasks.values()]
    assert all(callback_url.startswith(url) for callback_url in callback_urls)
    # Every result came from B through Redis: none was looked up, none came to A itself.
    assert stats.resolved_by_callback == 30
    assert stats.lookups == 0
    assert stats.callbacks_forwarded == 0
    assert stats.pending == 0
    keys = check_keys_expire(redis_prefix)
    assert len([key for key in keys if key.startswith(f"{redis_prefix}result:")]) == 30
    assert "Traceback" not in b.log()


# --- 2. A receiver dies mid-stream ---------------------------------------------------


class OneChunk(httpx.AsyncByteStream):
    """A request body of one chunk, sent without an async generator.

    httpx's own ``ByteStream`` is one, and trio warns about it when a send is cut off
    (as by a backend killed mid-request) and it is garbage collected: encode/httpx#3686.
    """

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __aiter__(self) -> OneChunk:
        return self

    async def __anext__(self) -> bytes:
        body, self._body = self._body, None
        if body is None:
            raise StopAsyncIteration
        return body


class RoundRobin:
    """A load balancer: each POST goes to the next live backend, over HTTP.

    A backend that refuses the connection is skipped; one that fails mid-request is
    answered 502 (the request may have been applied there: the sender delivers again).
    """

    def __init__(self, backends: list[str], http: httpx.AsyncClient) -> None:
        self.backends = backends
        self.http = http
        self.answered = dict.fromkeys(backends, 0)
        self.refused = 0
        self.failed = 0
        self._next = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"].decode()
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode()
        status, content, headers = 502, b"no backend is up", []
        # Each backend once, starting with the next one in turn.
        start, self._next = self._next, self._next + 1
        for offset in range(len(self.backends)):
            backend = self.backends[(start + offset) % len(self.backends)]
            request = self.http.build_request(
                "POST",
                backend + target,
                headers={"content-type": "application/json", "content-length": str(len(body))},
            )
            request.stream = OneChunk(body)
            try:
                response = await self.http.send(request)
            except httpx.ConnectError:
                self.refused += 1
                continue
            except httpx.HTTPError as exc:
                self.failed += 1
                content = f"the backend failed: {type(exc).__name__}".encode()
                break
            self.answered[backend] += 1
            status, content = response.status_code, response.content
            if "retry-after" in response.headers:
                headers.append((b"retry-after", response.headers["retry-after"].encode()))
            break
        headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


async def test_receiver_killed_mid_stream_loses_nothing(
    anyio_backend: str, redis_prefix: str, tmp_path: Path
) -> None:
    prompts = [f"a heron number {n}" for n in range(150)]
    results: list[list[kx.ImageResult | kx.KeevxError]] = []
    with anyio.fail_after(LIMIT):
        async with (
            routed_fake(redeliveries=6, redeliver_after=0.1, complete_after=(0.1, 2.0)) as fake,
            fake.serve(),
            receiving_worker(anyio_backend, redis_prefix, fake, tmp_path) as (b1, url1),
            receiving_worker(anyio_backend, redis_prefix, fake, tmp_path) as (b2, url2),
            httpx.AsyncClient(trust_env=False, timeout=10) as http,
        ):
            balancer = RoundRobin([url1, url2], http)
            async with (
                serve_asgi(balancer) as lb,
                router_client(redis_prefix, fake, callback_url=lb.url) as a,
            ):

                async def submit_all() -> None:
                    results.extend(await a.generate_many(prompts, timeout=20))

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(submit_all)
                    await wait_for(lambda: fake.callbacks_sent >= 50, "50 callbacks")
                    sent_at_kill = fake.callbacks_sent
                    b1.process.kill()
                    await b1.process.wait()
                await fake.wait_idle()
                stats = a.stats

    check_results(results, prompts, fake)
    # The kill was mid-stream: B1 had answered some, B2 answered the rest, and the dead
    # B1 refused the connections it was offered after the kill.
    assert sent_at_kill < 150
    assert balancer.answered[url1] > 0
    assert balancer.answered[url2] > 0
    assert balancer.answered[url1] + balancer.answered[url2] >= 150
    assert balancer.refused > 0
    assert all(task.callbacks_sent >= 1 for task in fake.tasks.values())
    # Only deliveries cut off by the kill failed (502), and were delivered again.
    assert {reason for _, reason in fake.delivery_failures} <= {"HTTP 502"}
    assert stats.resolved_by_callback == 150
    assert stats.lookups == 0
    _check_worker_killed(b1)
    _check_worker_killed(b2)
    check_keys_expire(redis_prefix)


# --- 3. The owner dies: its results wait in Redis ------------------------------------


class RecordingSink:
    """Feeds each callback to a client, recording what it did."""

    def __init__(self, client: kx.AsyncKeevx) -> None:
        self.client = client
        self.outcomes: list[kx.CallbackOutcome] = []

    async def feed_callback(self, body: bytes, /, *, url: str) -> object:
        outcome = await self.client.feed_callback(body, url=url)
        self.outcomes.append(outcome)
        return outcome


async def test_owner_killed_results_wait_for_a_new_process(
    anyio_backend: str, redis_prefix: str, tmp_path: Path
) -> None:
    with anyio.fail_after(LIMIT):
        async with (
            routed_fake(complete_after=1.0) as fake,
            fake.serve(),
            router_client(redis_prefix, fake) as receiving,
        ):
            sink = RecordingSink(receiving)
            fake.deliver_into(sink)
            async with worker(
                "owner",
                backend=anyio_backend,
                prefix=redis_prefix,
                fake_url=fake.base_url,
                log_dir=tmp_path,
                extra=["--count=10", f"--callback-url={CALLBACK_URL}"],
            ) as owner:
                task_ids: list[str] = json.loads(owner.line)["task_ids"]
                owner.process.kill()
                await owner.process.wait()
            _check_worker_killed(owner)
            await wait_for(lambda: len(sink.outcomes) == 10, "the 10 callbacks")
            await fake.wait_idle()
            async with router_client(redis_prefix, fake) as fresh:
                tasks = [await fresh.task(task_id) for task_id in task_ids]
                fresh_stats = fresh.stats

    # Nobody listened: every callback was kept in Redis for an owner to come.
    assert sink.outcomes == [kx.CallbackOutcome.BUFFERED] * 10
    assert fake.callbacks_sent == 10
    assert len(task_ids) == 10
    for number, (task_id, task) in enumerate(zip(task_ids, tasks, strict=True)):
        assert task.done()
        result = task.result()
        assert result.task_id == task_id
        assert result.request.prompt == f"p{number}"  # the request the killed owner recorded
        assert fake.tasks[task_id].prompt == f"p{number}"
        assert result.image_url == fake.tasks[task_id].image_url
    assert fresh_stats.lookups == 0
    check_keys_expire(redis_prefix)


# --- 4. Redis connections cut while callbacks flow -----------------------------------


async def test_redis_connections_cut_mid_run(
    anyio_backend: str, redis_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keevx_async.router")
    prompts = [f"a frog number {n}" for n in range(100)]
    results: list[list[kx.ImageResult | kx.KeevxError]] = []
    killed: list[int] = []
    redis = sync_redis()
    try:
        with anyio.fail_after(LIMIT):
            async with (
                routed_fake(redeliveries=6, redeliver_after=0.1, complete_after=(0.1, 2.0)) as fake,
                fake.serve(),
                receiving_worker(anyio_backend, redis_prefix, fake, tmp_path) as (b, url),
                router_client(redis_prefix, fake, callback_url=url) as a,
            ):

                async def submit_all() -> None:
                    results.extend(await a.generate_many(prompts, timeout=20))

                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(submit_all)
                    await wait_for(lambda: fake.callbacks_sent >= 20, "20 callbacks")
                    for _ in range(2):
                        killed.append(kill_connections(redis, redis_prefix))
                        await anyio.sleep(0.3)
                    sent_after_cuts = fake.callbacks_sent
                await fake.wait_idle()
                stats = a.stats
    finally:
        redis.close()

    check_results(results, prompts, fake)
    assert all(count >= 2 for count in killed), killed  # A's and B's connections at least
    assert sent_after_cuts < 100  # the cuts came while callbacks flowed
    assert all(task.callbacks_sent >= 1 for task in fake.tasks.values())
    # A callback B could not record was refused with 503 (and delivered again): never
    # another failure, never one lost after a 200.
    assert {reason for _, reason in fake.delivery_failures} <= {"HTTP 503"}
    assert stats.resolved_by_callback == 100
    assert stats.lookups == 0
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert unreachable, [r.getMessage() for r in caplog.records]
    assert "Traceback" not in b.log()
    _check_worker_killed(b)
    check_keys_expire(redis_prefix)
