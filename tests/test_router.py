"""Callback routing between clients over the real Redis server (``RedisRouter``).

Each test runs several clients in one process, each with a router of its own, as the
worker processes of one app would have (tests/test_router_processes.py does it with
real processes). Callbacks are handed to the receiving worker exactly as FakeKeevx
would POST them, token included.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis_support import REDIS_URL, TcpProxy, kill_connections, prefix_keys, sync_redis
from wiring import API_KEY, CALLBACK_URL, callback_body

import keevx_async as kx
from keevx_async._models import CallbackPayload
from keevx_async._router import decode_record, decode_request_record, encode_record
from keevx_async._wire import WireFormatError
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

pytestmark = pytest.mark.anyio

SECRET = "shared-secret-of-the-app"


class Receiver:
    """Feeds callbacks into one client and keeps each outcome (or error) by task ID."""

    def __init__(self, client: kx.AsyncKeevx) -> None:
        self.client = client
        self.outcomes: dict[str, list[kx.CallbackOutcome | str]] = {}

    async def feed_callback(self, body: bytes, /, *, url: str) -> kx.CallbackOutcome:
        task_id = json.loads(body)["data"]["task_id"]
        try:
            outcome = await self.client.feed_callback(body, url=url)
        except kx.KeevxError as exc:
            self.outcomes.setdefault(task_id, []).append(type(exc).__name__)
            raise
        self.outcomes.setdefault(task_id, []).append(outcome)
        return outcome


def worker(fake: FakeKeevx, prefix: str, url: str = REDIS_URL, **options: Any) -> kx.AsyncKeevx:
    """One worker's client: shared secret, callback URL and Redis prefix."""
    router_options = options.pop("router_options", {})
    options.setdefault("reconcile_after", None)
    options.setdefault("http_client", fake.http_client())
    return kx.AsyncKeevx(
        api_key=API_KEY,
        base_url=fake.base_url,
        callback_url=CALLBACK_URL,
        callback_secret=SECRET,
        router=kx.RedisRouter(url, prefix=prefix, **router_options),
        **options,
    )


def router_of(client: kx.AsyncKeevx) -> kx.RedisRouter:
    router = client.router
    assert isinstance(router, kx.RedisRouter)
    return router


@asynccontextmanager
async def workers(
    prefix: str, count: int = 2, *, url: str = REDIS_URL, **fake_options: Any
) -> AsyncIterator[tuple[FakeKeevx, list[kx.AsyncKeevx]]]:
    """A running fake and ``count`` entered worker clients sharing one Redis prefix."""
    fake_options.setdefault("api_key", API_KEY)
    fake_options.setdefault("seed", 7)
    async with FakeKeevx(**fake_options) as fake:
        clients = [worker(fake, prefix, url) for _ in range(count)]
        try:
            for client in clients:
                await client.__aenter__()
            yield fake, clients
        finally:
            for client in reversed(clients):
                await client.__aexit__(None, None, None)
                await client._engine.http.aclose()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds (polling), or fail naming ``what``."""
    with anyio.move_on_after(timeout):
        while not check():  # noqa: ASYNC110 (the state is in Redis: nothing to wait on)
            await anyio.sleep(0.01)
        return
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def hash_of(redis: Any, key: str) -> dict[bytes, bytes]:
    """A Redis hash, as the bytes redis-py returns."""
    fields: dict[bytes, bytes] = redis.hgetall(key)
    return fields


def image_of(task_id: str) -> str:
    return f"https://api.fake.keevx.test/files/{task_id}.png"


def assert_own_results(
    results: list[list[kx.ImageResult | kx.KeevxError]], prompts: list[str]
) -> None:
    """Each request got its own tasks' images, in order."""
    assert len(results) == len(prompts)
    for prompt, images in zip(prompts, results, strict=True):
        for index, image in enumerate(images):
            assert isinstance(image, kx.ImageResult), image
            assert (image.request.prompt, image.index) == (prompt, index)
            assert image.image_url.endswith(f"/{image.task_id}.png")


# --- routing ---------------------------------------------------------------------------


async def test_a_callback_received_by_another_worker_resolves_the_owner(
    redis_prefix: str,
) -> None:
    async with workers(redis_prefix, complete_after=(0.1, 0.2)) as (fake, (owner, other)):
        receiver = Receiver(other)
        fake.deliver_into(receiver)
        prompts = [f"prompt {i}" for i in range(20)]
        requests = [kx.ImageRequest(p, generate_count=1 + i % 3) for i, p in enumerate(prompts)]
        with anyio.fail_after(10):
            results = await owner.generate_many(requests)
            await fake.wait_idle()  # the receiver's side of the last callbacks, too
        assert_own_results(results, prompts)
        tasks = sum(len(images) for images in results)
        assert {o for outcomes in receiver.outcomes.values() for o in outcomes} == {
            kx.CallbackOutcome.FORWARDED
        }
        assert len(receiver.outcomes) == tasks
        assert owner.stats.resolved_by_callback == tasks
        assert (other.stats.callbacks_forwarded, other.stats.pending) == (tasks, 0)
        assert owner.stats.lookups == 0


async def test_early_callbacks_on_another_worker_are_found_by_the_claim(
    redis_prefix: str,
) -> None:
    # Every callback arrives before the owner has its submit reply, so before its claim.
    async with workers(redis_prefix, early_callbacks=True) as (fake, (owner, other)):
        receiver = Receiver(other)
        fake.deliver_into(receiver)
        prompts = [f"early {i}" for i in range(10)]
        with anyio.fail_after(10):
            results = await owner.generate_many(
                [kx.ImageRequest(p, generate_count=2) for p in prompts]
            )
            await fake.wait_idle()
        assert_own_results(results, prompts)
        assert {o for outcomes in receiver.outcomes.values() for o in outcomes} == {
            kx.CallbackOutcome.BUFFERED
        }
        assert owner.stats.resolved_by_callback == 20


async def test_a_callback_for_the_receivers_own_task_stays_local_and_is_recorded(
    redis_prefix: str,
) -> None:
    async with workers(redis_prefix, 3) as (fake, (owner, _, third)):
        receiver = Receiver(owner)
        fake.deliver_into(receiver)
        [image] = await owner.generate(kx.ImageRequest("local"))
        assert receiver.outcomes[image.task_id] == [kx.CallbackOutcome.RESOLVED]
        assert owner.stats.callbacks_forwarded == 0
        # Its result was recorded for the others: any worker can re-attach to it.
        await eventually(
            lambda: bool(prefix_keys(sync_redis(), redis_prefix, "result:")), "the record"
        )
        task = await third.task(image.task_id)
        assert task.done()
        assert task.result().image_url == image_of(image.task_id)
        assert task.request.prompt == "local"


async def test_a_lone_surrogate_in_a_routed_callback_is_a_400_and_changes_nothing(
    redis_prefix: str,
) -> None:
    # Found by adversarial testing: the record for Redis could not be encoded (HTTP 500).
    async with workers(redis_prefix, complete_after=1e9) as (fake, (owner, other)):
        submission = await owner.submit(kx.ImageRequest("a fox"))
        (fake_task,) = fake.tasks.values()
        assert fake_task.callback_url is not None
        genuine = callback_body(fake_task.task_id, image_url=image_of(fake_task.task_id))
        forged = genuine.replace(b".png", b"\\ud83d.png")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other.callback_app)) as http:
            refused = await http.post(fake_task.callback_url, content=forged)
            assert refused.status_code == 400
            assert "data.image_url" in refused.text
            assert not submission.tasks[0].done()
            accepted = await http.post(fake_task.callback_url, content=genuine)
            assert accepted.status_code == 200
        image = await submission.tasks[0].wait(5)
        assert image.image_url == image_of(fake_task.task_id)
        assert other.stats.callbacks_malformed == 1


async def test_a_replayed_callback_never_overwrites_the_recorded_result(
    redis_prefix: str,
) -> None:
    # Found by adversarial testing: the replay, same valid token and another image_url,
    # was answered 200 and every worker's client.task() then returned the replayed URL.
    async with workers(redis_prefix, count=3, complete_after=1e9) as (fake, workers_):
        owner, other, third = workers_
        submission = await owner.submit(kx.ImageRequest("a fox"))
        (fake_task,) = fake.tasks.values()
        assert fake_task.callback_url is not None
        task_id = fake_task.task_id
        genuine = callback_body(task_id, image_url=image_of(task_id))
        replayed = callback_body(task_id, image_url="https://evil.example.test/x.png")
        url = fake_task.callback_url
        assert await other.feed_callback(genuine, url=url) is kx.CallbackOutcome.FORWARDED
        image = await submission.tasks[0].wait(5)
        for receiver in (other, third, owner):
            outcome = await receiver.feed_callback(replayed, url=url)
            assert outcome is kx.CallbackOutcome.DUPLICATE, receiver
        # Every worker, and a fresh one, sees the first result.
        assert image.image_url == image_of(task_id)
        for reader in (other, third):
            task = await reader.task(task_id)
            assert (await task.wait(5)).image_url == image_of(task_id)
        assert (await owner.task(task_id)).result().image_url == image_of(task_id)


async def test_duplicates_after_the_owner_finished_change_nothing(redis_prefix: str) -> None:
    # The tasks finish well after the owner's records are in Redis (a loaded machine once
    # took longer than the default to write them, and the first callback was BUFFERED).
    async with workers(redis_prefix, duplicate_rate=1.0, complete_after=0.5) as (
        fake,
        (owner, other),
    ):
        receiver = Receiver(other)
        fake.deliver_into(receiver)
        images = await owner.generate(kx.ImageRequest("twice", generate_count=3))
        await fake.wait_idle()
        for image in images:
            outcomes = receiver.outcomes[image.task_id]
            assert len(outcomes) == 2
            assert outcomes[0] is kx.CallbackOutcome.FORWARDED
            assert image.image_url == image_of(image.task_id)
        assert owner.stats.resolved_by_callback == 3


async def test_a_lookup_result_is_recorded_for_the_other_workers(redis_prefix: str) -> None:
    async with workers(redis_prefix, lost_rate=1.0) as (fake, (owner, other)):
        submission = await owner.submit(kx.ImageRequest("looked up"))
        await fake.wait_idle()
        [task_id] = submission.task_ids
        snapshot = await owner.retrieve(task_id)
        assert snapshot.done
        assert submission.tasks[0].done()
        await eventually(
            lambda: bool(prefix_keys(sync_redis(), redis_prefix, "result:")), "the record"
        )
        again = await other.task(task_id)
        assert again.result().image_url == image_of(task_id)


# --- re-attaching ----------------------------------------------------------------------


async def test_results_wait_in_redis_for_a_client_that_asks_again(redis_prefix: str) -> None:
    async with workers(redis_prefix, 1, complete_after=0.3) as (fake, (receiver_client,)):
        receiver = Receiver(receiver_client)
        fake.deliver_into(receiver)
        request = kx.ImageRequest("outlived its worker", generate_count=2, image_ratio="1:1")
        async with (
            fake.http_client() as http,
            worker(fake, redis_prefix, http_client=http) as owner,
        ):
            submission = await owner.submit(request)
            await eventually(
                lambda: len(prefix_keys(sync_redis(), redis_prefix, "task:")) == 2, "the claims"
            )
        # The owner's worker went away before the callbacks came.
        await fake.wait_idle()
        assert {o for outcomes in receiver.outcomes.values() for o in outcomes} == {
            kx.CallbackOutcome.BUFFERED
        }
        async with (
            fake.http_client() as http,
            worker(fake, redis_prefix, http_client=http) as restarted,
        ):
            for index, task_id in enumerate(submission.task_ids):
                task = await restarted.task(task_id)
                assert task.done()
                assert (task.request, task.index) == (request, index)
                result = task.result()
                assert (result.task_id, result.image_url) == (task_id, image_of(task_id))


async def test_a_re_attached_task_gets_its_callback_routed_to_it(redis_prefix: str) -> None:
    async with workers(redis_prefix, 3, complete_after=0.5) as (fake, (owner, receiver, late)):
        receiver_feed = Receiver(receiver)
        fake.deliver_into(receiver_feed)
        submission = await owner.submit(kx.ImageRequest("two waiters"))
        [task_id] = submission.task_ids
        await eventually(
            lambda: bool(prefix_keys(sync_redis(), redis_prefix, "task:")), "the claim"
        )
        task = await late.task(task_id)  # a second waiter, in another worker
        assert not task.done()
        assert task.request.prompt == "two waiters"
        with anyio.fail_after(5):
            from_late = await task
            from_owner = await submission.tasks[0]
            await fake.wait_idle()
        assert from_late.image_url == from_owner.image_url == image_of(task_id)
        assert receiver_feed.outcomes[task_id] == [kx.CallbackOutcome.FORWARDED]


async def test_task_returns_the_pending_task_itself(redis_prefix: str) -> None:
    async with workers(redis_prefix, complete_after=60) as (_fake, (owner, _)):
        submission = await owner.submit(kx.ImageRequest("same object"))
        assert await owner.task(submission.task_ids[0]) is submission.tasks[0]


async def test_task_of_an_id_nobody_knows(redis_prefix: str) -> None:
    async with workers(redis_prefix, 1) as (_fake, (client,)):
        with pytest.raises(kx.UnknownTaskError, match=r"i2is-nobody.*request="):
            await client.task("i2is-nobody")
        # With the request, it waits for the task's callback, wherever it arrives.
        request = kx.ImageRequest("given by the caller")
        task = await client.task("i2is-nobody", request=request)
        assert (task.task_id, task.request, task.done()) == ("i2is-nobody", request, False)
        await eventually(
            lambda: bool(prefix_keys(sync_redis(), redis_prefix, "task:")), "the claim"
        )


async def test_task_checks_its_arguments(redis_prefix: str) -> None:
    async with workers(redis_prefix, 1) as (_fake, (client,)):
        with pytest.raises(ValueError, match="task_id"):
            await client.task("")
        with pytest.raises(TypeError, match="ImageRequest"):
            await client.task("i2is-x", request="a prompt")  # type: ignore[arg-type]


# --- tokens ----------------------------------------------------------------------------


async def test_a_token_of_another_submission_is_refused_by_redis(redis_prefix: str) -> None:
    async with workers(redis_prefix, complete_after=60) as (fake, (owner, other)):
        first = await owner.submit(kx.ImageRequest("first"))
        second = await owner.submit(kx.ImageRequest("second"))
        await eventually(
            lambda: len(prefix_keys(sync_redis(), redis_prefix, "task:")) == 2, "the claims"
        )
        [first_id] = first.task_ids
        [second_id] = second.task_ids
        body = _callback(first_id)
        # The token of the second submission, on the first one's callback.
        with pytest.raises(kx.CallbackAuthError, match="another submission"):
            await other.feed_callback(body, url=fake.tasks[second_id].callback_url)
        assert not first.tasks[0].done()
        assert other.stats.callbacks_rejected == 1
        assert other.stats.callbacks_forwarded == 0
        # Its own token still works afterwards.
        outcome = await other.feed_callback(body, url=fake.tasks[first_id].callback_url)
        assert outcome is kx.CallbackOutcome.FORWARDED
        with anyio.fail_after(5):
            assert (await first.tasks[0]).image_url == image_of(first_id)


async def test_one_token_buys_at_most_eight_early_callbacks(redis_prefix: str) -> None:
    async with workers(redis_prefix, complete_after=60) as (fake, (owner, other)):
        submission = await owner.submit(kx.ImageRequest("leaked token"))
        url = fake.tasks[submission.task_ids[0]].callback_url
        assert url is not None
        for n in range(8):
            outcome = await other.feed_callback(_callback(f"i2is-forged-{n}"), url=url)
            assert outcome is kx.CallbackOutcome.BUFFERED
        with pytest.raises(kx.CallbackAuthError, match="8 early callbacks"):
            await other.feed_callback(_callback("i2is-forged-9"), url=url)
        # Replaying one already recorded costs nothing more: a duplicate, changing nothing.
        again = await other.feed_callback(_callback("i2is-forged-0"), url=url)
        assert again is kx.CallbackOutcome.DUPLICATE


def _callback(task_id: str, status: str = "SUCCEEDED") -> bytes:
    data = {"task_id": task_id, "status": status, "image_url": image_of(task_id)}
    data["error_message"] = ""
    return json.dumps(
        {"code": 0, "msg": "ok", "task_type": "image_generate", "data": data}
    ).encode()


async def test_unverified_clients_route_too(redis_prefix: str) -> None:
    async with FakeKeevx(api_key=API_KEY) as fake:
        owner = worker(fake, redis_prefix, verify_callbacks=False)
        other = worker(fake, redis_prefix, verify_callbacks=False)
        async with owner, other:
            fake.deliver_into(Receiver(other))
            [image] = await owner.generate(kx.ImageRequest("no tokens"), timeout=5)
            await fake.wait_idle()
            assert image.image_url == image_of(image.task_id)
            assert other.stats.callbacks_forwarded == 1


# --- keys, TTLs and claims -------------------------------------------------------------


async def test_every_key_has_a_ttl_and_claims_are_released(redis_prefix: str) -> None:
    redis = sync_redis()
    async with FakeKeevx(api_key=API_KEY, complete_after=60) as fake:
        options = {"owner_ttl": 120, "result_ttl": 30}
        owner = worker(fake, redis_prefix, router_options=options)
        other = worker(fake, redis_prefix, router_options=options)
        async with owner, other:
            submission = await owner.submit(kx.ImageRequest("ttl"))
            [first] = submission.task_ids
            claim = f"{redis_prefix}task:{first}"
            await eventually(lambda: redis.exists(claim) == 1, "the claim")
            fields = hash_of(redis, claim)
            assert fields[f"w:{router_of(owner).worker_id}".encode()] == b"1"
            assert decode_request_record(fields[b"req"]) == submission.request
            assert 110 < redis.ttl(claim) <= 120
            # A callback for the first task: result recorded, claim released, TTLs shortened.
            await other.feed_callback(_callback(first), url=fake.tasks[first].callback_url)
            with anyio.fail_after(5):
                await submission.tasks[0]

            def released() -> bool:
                return not any(key.startswith(b"w:") for key in hash_of(redis, claim))

            await eventually(released, "the release of the claim")
            assert 0 < redis.ttl(f"{redis_prefix}result:{first}") <= 30
            # A task given up (its wait timed out): its claim is released too.
            with pytest.raises(kx.TaskTimeoutError):
                await owner.generate(kx.ImageRequest("abandoned"), timeout=0.05)
            abandoned = [t for t in fake.tasks if fake.tasks[t].prompt == "abandoned"]
            late_claim = f"{redis_prefix}task:{abandoned[0]}"
            await eventually(lambda: redis.exists(late_claim) == 1, "the late claim")
            await eventually(
                lambda: not any(k.startswith(b"w:") for k in hash_of(redis, late_claim)),
                "the abandoned claim's release",
            )
        for key in prefix_keys(redis, redis_prefix):
            assert redis.ttl(key) > 0, key


async def test_claims_are_refreshed_while_waited_for(redis_prefix: str) -> None:
    redis = sync_redis()
    async with FakeKeevx(api_key=API_KEY, complete_after=60) as fake:
        owner = worker(fake, redis_prefix, router_options={"owner_ttl": 1.5})
        async with owner:
            submission = await owner.submit(kx.ImageRequest("long wait"))
            claim = f"{redis_prefix}task:{submission.task_ids[0]}"
            await eventually(lambda: redis.exists(claim) == 1, "the claim")
            await anyio.sleep(3.5)  # more than twice the TTL
            assert redis.exists(claim) == 1
            assert redis.ttl(claim) > 0


# --- faults ----------------------------------------------------------------------------


async def test_redis_unreachable_gives_503_then_everything_arrives(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keevx_async.router")
    async with anyio.create_task_group() as task_group:
        proxy = TcpProxy(task_group)
        await proxy.start()
        async with FakeKeevx(api_key=API_KEY, complete_after=60) as fake:
            options = {"timeout": 0.3, "reconnect_max_wait": 0.2}
            owner = worker(fake, redis_prefix, proxy.url, router_options=options)
            other = worker(fake, redis_prefix, proxy.url, router_options=options)
            async with owner, other:
                before = await owner.submit(kx.ImageRequest("before the outage"))
                await eventually(lambda: router_of(other).connected, "the connection")
                proxy.stop()
                await eventually(lambda: not router_of(owner).connected, "the cut")
                during = await owner.submit(kx.ImageRequest("during the outage"))
                http = httpx.AsyncClient(transport=httpx.ASGITransport(app=other.callback_app))
                async with http:
                    statuses = []
                    for submission in (before, during):
                        task_id = submission.task_ids[0]
                        url = fake.tasks[task_id].callback_url
                        assert url is not None
                        with anyio.fail_after(5):  # refused fast, never a hang
                            reply = await http.post(url, content=_callback(task_id))
                        statuses.append((reply.status_code, reply.headers.get("retry-after")))
                    assert statuses == [(503, "1"), (503, "1")]
                    assert other.stats.router_errors == 2
                    assert not before.tasks[0].done()
                    await proxy.start()
                    await eventually(lambda: router_of(owner).connected, "the reconnection")
                    # The service delivers the refused callbacks again: now they arrive.
                    for submission in (before, during):
                        task_id = submission.task_ids[0]
                        reply = await http.post(
                            fake.tasks[task_id].callback_url or "", content=_callback(task_id)
                        )
                        assert reply.status_code == 200
                        with anyio.fail_after(5):
                            assert (await submission.tasks[0]).image_url == image_of(task_id)
        proxy.stop()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert "unreachable" in errors[0].getMessage()
    # Logged once per outage per router, not once per failure.
    assert len(errors) <= 2
    assert any("reachable again" in r.getMessage() for r in caplog.records)


async def test_connections_cut_mid_stream_lose_nothing(redis_prefix: str) -> None:
    redis = sync_redis()
    async with workers(redis_prefix, complete_after=(0.05, 1.5), redeliveries=6) as (
        fake,
        (owner, other),
    ):
        fake.redeliver_after = 0.05
        receiver = Receiver(other)
        fake.deliver_into(receiver)
        prompts = [f"cut {i}" for i in range(60)]

        async def cut() -> None:
            for _ in range(3):
                await anyio.sleep(0.3)
                assert kill_connections(redis, redis_prefix) >= 1

        with anyio.fail_after(20):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(cut)
                results = await owner.generate_many(prompts)
        assert_own_results(results, prompts)
        # Refused callbacks were refused, never lost: each task resolved by its callback.
        assert owner.stats.resolved_by_callback == 60
        for task_id, reason in fake.delivery_failures:
            assert reason.startswith("RouterError"), (task_id, reason)


async def test_a_router_that_is_not_running_refuses_to_route(redis_prefix: str) -> None:
    async with FakeKeevx(api_key=API_KEY, complete_after=60) as fake:
        client = worker(fake, redis_prefix)
        url = CALLBACK_URL + "?keevx_token=" + client._callbacks.signer.issue()[1]
        with pytest.raises(kx.RouterError, match="not running"):
            await client.feed_callback(_callback("i2is-early"), url=url)
        with pytest.raises(kx.RouterError, match="not running"):
            await client.task("i2is-early")
        assert client.stats.router_errors == 1
        await client._engine.http.aclose()


# --- construction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"url": "http://127.0.0.1:6379"}, "redis://"),
        ({"prefix": ""}, "prefix"),
        ({"owner_ttl": 0.5}, "owner_ttl"),
        ({"result_ttl": True}, "result_ttl"),
        ({"timeout": 0}, "timeout"),
        ({"reconnect_max_wait": -1}, "reconnect_max_wait"),
        ({"worker_id": ""}, "worker_id"),
    ],
)
def test_router_options_are_checked(options: dict[str, Any], match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        kx.RedisRouter(**options)


def test_the_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ImportError, match=r"keevx-async\[redis\]"):
        kx.RedisRouter()


def test_router_must_be_a_router() -> None:
    with pytest.raises(TypeError, match="CallbackRouter"):
        kx.AsyncKeevx(api_key="k", router="redis://127.0.0.1")  # type: ignore[arg-type]


def test_defaults_and_repr() -> None:
    router = kx.RedisRouter(worker_id="w1", owner_ttl=1.2)
    assert (router.owner_ttl, router.result_ttl, router.worker_id) == (2, 3600, "w1")
    assert (
        repr(router) == "RedisRouter('redis://127.0.0.1:6379/0', prefix='keevx:', worker_id='w1')"
    )
    assert repr(kx.LocalRouter()) == "LocalRouter()"
    assert isinstance(kx.AsyncKeevx(api_key="k").router, kx.LocalRouter)


async def test_a_router_serves_one_client(redis_prefix: str) -> None:
    router = kx.RedisRouter(prefix=redis_prefix)
    async with kx.AsyncKeevx(api_key="k", router=router):
        pass
    with pytest.raises(RuntimeError, match="one per client"):
        async with kx.AsyncKeevx(api_key="k", router=router):
            pass


# --- the local router ------------------------------------------------------------------


async def test_local_router_task_needs_the_request_and_gets_the_result_by_lookup() -> None:
    async with FakeKeevx(api_key=API_KEY, lost_rate=1.0) as fake:
        async with fake.client(reconcile_after=0.05) as first:
            submission = await first.submit(kx.ImageRequest("restarted"))
        await fake.wait_idle()
        [task_id] = submission.task_ids
        async with fake.client(reconcile_after=0.05) as restarted:
            with pytest.raises(kx.UnknownTaskError):
                await restarted.task(task_id)
            task = await restarted.task(task_id, request=submission.request)
            with anyio.fail_after(5):
                image = await task
            assert (image.task_id, image.image_url) == (task_id, image_of(task_id))
            assert restarted.stats.resolved_by_lookup == 1


async def test_local_router_task_takes_an_early_callback_kept_for_it() -> None:
    async with FakeKeevx(api_key=API_KEY) as fake, fake.client(verify_callbacks=False) as client:
        assert await client.feed_callback(_callback("i2is-kept")) is kx.CallbackOutcome.BUFFERED
        task = await client.task("i2is-kept", request=kx.ImageRequest("kept"))
        assert task.done()
        assert task.result().image_url == image_of("i2is-kept")


# --- records ---------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=20)


@given(
    task_id=_text.filter(bool),
    status=st.sampled_from(["SUCCEEDED", "FAILED", "CANCELLED"]),
    image_url=_text,
    error=_text,
    task_type=_text.filter(bool),
    submission_id=st.none() | _text.filter(bool),
    extra=st.dictionaries(
        _text.filter(lambda k: k not in ("task_id", "status")), _text, max_size=3
    ),
)
def test_records_round_trip(  # noqa: PLR0917 (hypothesis passes them by name)
    task_id: str,
    status: str,
    image_url: str,
    error: str,
    task_type: str,
    submission_id: str | None,
    extra: dict[str, str],
) -> None:
    if status == "SUCCEEDED" and not image_url:
        image_url = "https://img.example/x.png"
    raw = {**extra, "task_id": task_id, "status": status, "image_url": image_url}
    raw["error_message"] = error
    payload = CallbackPayload(
        task_id=task_id,
        status=status,
        image_url=image_url,
        error_message=error,
        task_type=task_type,
        raw=raw,
    )
    decoded, sub = decode_record(encode_record(payload, submission_id))
    assert sub == submission_id
    assert (decoded.task_id, decoded.status, decoded.image_url, decoded.error_message) == (
        task_id,
        status,
        image_url,
        error,
    )
    assert decoded.task_type == task_type
    assert dict(decoded.raw) == raw


@pytest.mark.parametrize(
    "record",
    [
        b"not json",
        b"[]",
        b'{"data": 1}',
        b'{"sub": 5, "data": {}}',
        b'{"data": {"status": "SUCCEEDED"}}',
    ],
)
def test_bad_records_are_refused(record: bytes) -> None:
    with pytest.raises(WireFormatError):
        decode_record(record)


def test_unreadable_stored_requests_read_as_none() -> None:
    assert decode_request_record(b"{") is None
    assert decode_request_record(b'{"prompt": ""}') is None


# --- more faults, forks and custom routers ---------------------------------------------


async def test_a_client_entered_while_redis_is_down_starts_and_connects_later(
    redis_prefix: str,
) -> None:
    async with anyio.create_task_group() as task_group:
        proxy = TcpProxy(task_group)
        await proxy.start()
        proxy.stop()  # a port where nothing listens now
        async with FakeKeevx(api_key=API_KEY, complete_after=60) as fake:
            options = {"timeout": 0.2, "reconnect_max_wait": 0.1}
            client = worker(fake, redis_prefix, proxy.url, router_options=options)
            with anyio.fail_after(10):  # never a hang
                async with client:
                    await check_down_then_up(client, proxy, redis_prefix)
        proxy.stop()


async def check_down_then_up(client: kx.AsyncKeevx, proxy: TcpProxy, redis_prefix: str) -> None:
    assert not router_of(client).connected
    with pytest.raises(kx.RouterError, match="could not read task"):
        await client.task("i2is-somewhere")
    # Submits go on without Redis; the claim is written once it is back.
    submission = await client.submit(kx.ImageRequest("while down"))
    claim = f"{redis_prefix}task:{submission.task_ids[0]}"
    assert sync_redis().exists(claim) == 0
    await proxy.start()
    await eventually(lambda: router_of(client).connected, "the connection")
    await eventually(lambda: sync_redis().exists(claim) == 1, "the claim")
    assert router_of(client).errors >= 1


async def test_routed_records_that_do_not_fit_are_dropped(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    redis = sync_redis()
    async with workers(redis_prefix, 1, complete_after=60) as (_fake, (owner,)):
        first = await owner.submit(kx.ImageRequest("first"))
        second = await owner.submit(kx.ImageRequest("second"))
        [task_id] = first.task_ids
        channel = f"{redis_prefix}worker:{router_of(owner).worker_id}"
        payload = CallbackPayload(task_id=task_id, status="SUCCEEDED", image_url=image_of(task_id))
        foreign = encode_record(payload, second.tasks[0].submission_id)
        assert redis.publish(channel, b"not a record") == 1
        assert redis.publish(channel, foreign) == 1
        await eventually(lambda: owner.stats.callbacks_rejected == 1, "the foreign record")
        assert not first.tasks[0].done()
        assert any("cannot be read" in r.getMessage() for r in caplog.records)
        assert redis.publish(channel, encode_record(payload, first.tasks[0].submission_id)) == 1
        with anyio.fail_after(5):
            assert (await first.tasks[0]).image_url == image_of(task_id)


async def test_a_forked_worker_draws_its_own_worker_id(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = kx.RedisRouter(prefix=redis_prefix, worker_id="mine")
    drawn = kx.RedisRouter(prefix=redis_prefix)
    before = drawn.worker_id
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)  # as in a forked child
    async with kx.AsyncKeevx(api_key="k", router=chosen), kx.AsyncKeevx(api_key="k", router=drawn):
        assert chosen.worker_id == "mine"
        assert drawn.worker_id != before
        assert sync_redis().pubsub_numsub(f"{redis_prefix}worker:{drawn.worker_id}")[0][1] == 1


async def test_releases_queued_at_exit_are_written(redis_prefix: str) -> None:
    redis = sync_redis()
    async with FakeKeevx(api_key=API_KEY, complete_after=60) as fake:
        other = worker(fake, redis_prefix)
        async with other:
            owner = worker(fake, redis_prefix)
            async with owner:
                submission = await owner.submit(kx.ImageRequest("quick exit"))
                [task_id] = submission.task_ids
                url = fake.tasks[task_id].callback_url or ""
                await other.feed_callback(_callback(task_id), url=url)
                with anyio.fail_after(5):
                    await submission.tasks[0]
            # The owner left at once: its release was written on the way out.
            fields = hash_of(redis, f"{redis_prefix}task:{task_id}")
            assert fields
            assert not [key for key in fields if key.startswith(b"w:")]


class MemoryRouter(kx.CallbackRouter):
    """A router of our own over a dict shared by the clients of one test."""

    shares_callbacks = True

    def __init__(self, hub: dict[str, Any]) -> None:
        self.hub = hub

    async def run(self, host: kx.RouterHost, *, task_status: Any) -> None:
        self.hub.setdefault("hosts", []).append(host)
        await super().run(host, task_status=task_status)

    async def claim(self, tasks: Any) -> None:
        for task in tasks:
            # The submission too: without it, a re-attached task's result must come from
            # a lookup (a token cannot be checked against an unknown submission).
            self.hub[task.task_id] = kx.TaskRecord(
                task.task_id, task.request, task.index, submission_id=task.submission_id
            )

    async def forward(
        self, payload: CallbackPayload, submission_id: str | None
    ) -> kx.CallbackOutcome:
        record = encode_record(payload, submission_id)
        known = self.hub.get(payload.task_id)
        self.hub[payload.task_id] = kx.TaskRecord(
            payload.task_id,
            None if known is None else known.request,
            submission_id=None if known is None else known.submission_id,
            result=record,
        )
        for host in self.hub["hosts"]:
            host.deliver(record)
        return kx.CallbackOutcome.FORWARDED

    async def find(self, task_id: str) -> kx.TaskRecord | None:
        record: kx.TaskRecord | None = self.hub.get(task_id)
        return record


async def test_a_router_of_ones_own_plugs_in() -> None:
    hub: dict[str, Any] = {}
    async with FakeKeevx(api_key=API_KEY) as fake:
        options = {"callback_secret": SECRET, "reconcile_after": None}
        async with (
            fake.client(deliver_callbacks=False, router=MemoryRouter(hub), **options) as owner,
            fake.client(deliver_callbacks=False, router=MemoryRouter(hub), **options) as other,
        ):
            receiver = Receiver(other)
            fake.deliver_into(receiver)
            [image] = await owner.generate(kx.ImageRequest("my own router"), timeout=5)
            assert receiver.outcomes[image.task_id] == [kx.CallbackOutcome.FORWARDED]
            task = await other.task(image.task_id)
            assert task.done()
            assert task.request.prompt == "my own router"
            # The base class's defaults: nothing is routed, nothing is known.
            base = kx.CallbackRouter()
            assert await base.find("i2is-x") is None
            with pytest.raises(NotImplementedError):
                await base.forward(CallbackPayload(task_id="i2is-x", status="FAILED"), None)


async def test_a_task_re_attached_by_id_alone_trusts_a_lookup_not_the_callback() -> None:
    # The submitting process restarted: the new one has the same secret, not the
    # submission, and the service's callback carries the old submission's token. Found
    # by adversarial testing: a token leaked from submission A resolved B's re-attached
    # task with a forged URL. Such a callback is not applied: a lookup, made at once,
    # gives the result.
    async with FakeKeevx(api_key=API_KEY, complete_after=0.001, lose_if=lambda _: True) as fake:
        async with fake.client(callback_secret=SECRET) as before:
            submission_a = await before.submit(kx.ImageRequest("a"))
            submission_b = await before.submit(kx.ImageRequest("b"))
        [task_a] = submission_a.task_ids
        [task_b] = submission_b.task_ids
        leaked_url = fake.tasks[task_a].callback_url  # A's token
        async with fake.client(callback_secret=SECRET) as after:
            task = await after.task(task_b, request=submission_b.request)
            forged = callback_body(task_b, image_url="https://evil.example.test/x.png")
            gets = fake.get_calls
            outcome = await after.feed_callback(forged, url=leaked_url)
            assert outcome is kx.CallbackOutcome.PROGRESS
            image = await task.wait(5)  # from the lookup made at once, not reconcile_after
            assert image.image_url == image_of(task_b)
            assert fake.get_calls > gets
            assert after.stats.resolved_by_lookup == 1
            assert after.stats.resolved_by_callback == 0
            # Without a valid token it is still refused.
            with pytest.raises(kx.CallbackAuthError):
                await after.feed_callback(forged, url=CALLBACK_URL)


async def test_a_re_attached_task_with_no_lookups_says_how_to_get_its_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with FakeKeevx(api_key=API_KEY, complete_after=60) as fake:
        async with fake.client(callback_secret=SECRET) as before:
            submission = await before.submit(kx.ImageRequest("restarted"))
        [task_id] = submission.task_ids
        url = fake.tasks[task_id].callback_url
        async with fake.client(callback_secret=SECRET, reconcile_after=None) as after:
            task = await after.task(task_id, request=submission.request)
            outcome = await after.feed_callback(_callback(task_id), url=url)
            assert outcome is kx.CallbackOutcome.PROGRESS
            assert not task.done()
    assert f"call client.retrieve('{task_id}')" in caplog.text
