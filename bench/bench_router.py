"""Callback routing: the latency a ``RedisRouter`` adds between workers, and its Redis memory.

Workload (issue 6): two clients in one process, on one event loop, each with its own
``RedisRouter`` (one prefix per run), one ``callback_secret`` and one ``callback_url``.
The owner A submits N one-image requests to an in-process FakeKeevx whose tasks never
finish on their own, and so are never called back by it. Then, one task at a time, the
receiver B is fed the task's callback (the body FakeKeevx would POST, the URL with A's
token) and the clock runs until A's ``task.wait()`` returns: B records the callback and
publishes it to A's channel (one Lua script), A's subscription resolves the task.

Baseline, same process, interleaved with the SDK runs: raw redis-py on asyncio doing the
least Redis work a routed callback needs. One connection SETs a key (with EX) and
PUBLISHes a message the size of the routed record, both in one round trip (a pipeline,
as the router's one script call); a subscriber on a second connection receives it, and
the clock runs until the waiting coroutine wakes. On asyncio the baseline runs on the
benchmark's own loop. Under trio (``--backend trio``), where the router runs redis-py on
an asyncio loop in a thread of its own, the baseline runs on a fresh asyncio loop in a
worker thread, between the trio runs.

For context, the local path: A is fed the callback of its own task. Redis is not on the
way: the result is recorded for the other workers in the background.

Memory: ``MEMORY USAGE`` of a sample of the claims (``{prefix}task:*``, once written)
and of the recorded results (``{prefix}result:*``), and the growth of Redis's
``used_memory`` over the whole run per task created (other clients of the same Redis
count in it too). Every key must have a TTL. Every key of the run's prefix is deleted at
the end, also after a failure.

Usage: ``python bench/bench_router.py [--quick] [--reps N] [--callbacks N]
[--backend asyncio|trio] [--redis-url URL]``. Needs a Redis server (default
``redis://127.0.0.1:6379/0``). The last line is ``router_added_latency_ratio <median>``.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import random
import secrets
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import _common
import anyio
import attrs

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CALLBACK_URL = "https://app.example.test/keevx/callback"
REQUEST = kx.ImageRequest("a lighthouse at dawn")
# Seconds one callback may take to resolve its task before the run counts as failed.
WAIT = 5.0
# Keys sampled for MEMORY USAGE and TTL checks, per kind and repetition.
SAMPLE = 200
# Callbacks of each path run once before the repetitions and not counted.
WARMUP = 200
RESULT_TTL = 3600


class OutcomeError(Exception):
    """Something the run did came out wrong: its figures would mean nothing."""


@attrs.frozen
class _Callback:
    """One pending task of A and the callback the service would POST for it."""

    submission: kx.Submission  # held, so the task stays pending
    body: bytes
    url: str

    @property
    def task(self) -> kx.Task:
        return self.submission.tasks[0]

    @property
    def task_id(self) -> str:
        return self.submission.task_ids[0]


@attrs.frozen
class _Latency:
    """The p50 and p99 of one path in one repetition, in milliseconds."""

    p50: float
    p99: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> _Latency:
        return cls(_percentile(seconds, 0.50) * 1e3, _percentile(seconds, 0.99) * 1e3)


@attrs.frozen
class _Rep:
    routed: _Latency
    baseline: _Latency
    local: _Latency
    bytes_per_claim: float
    bytes_per_result: float


@attrs.frozen
class _Report:
    reps: list[_Rep]
    tasks_created: int
    used_memory_growth: int
    keys_by_kind: dict[str, int]


def _percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with ``fraction`` of all at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# --- Redis outside the measured paths ------------------------------------------------------


class _Keys:
    """The run's keys, through a synchronous redis-py client (called in a worker thread).

    For what is not measured: waiting for writes to land, memory, TTLs, the cleanup.
    """

    def __init__(self, url: str, prefix: str) -> None:
        import redis  # noqa: PLC0415 (checked by main)

        self.redis: redis.Redis = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=30.0
        )
        self.prefix = prefix

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def result_key(self, task_id: str) -> str:
        return f"{self.prefix}result:{task_id}"

    def version(self) -> str:
        return str(self.redis.info("server")["redis_version"])

    def used_memory(self) -> int:
        return int(self.redis.info("memory")["used_memory"])

    def _each(self, keys: Sequence[str], command: Callable[[Any, str], object]) -> list[Any]:
        replies: list[Any] = []
        for start in range(0, len(keys), 1000):
            pipe = self.redis.pipeline(transaction=False)
            for key in keys[start : start + 1000]:
                command(pipe, key)
            replies.extend(pipe.execute())
        return replies

    def existing(self, keys: Sequence[str]) -> int:
        return sum(self._each(keys, lambda pipe, key: pipe.exists(key)))

    def with_field(self, keys: Sequence[str], field: str) -> int:
        return sum(self._each(keys, lambda pipe, key: pipe.hexists(key, field)))

    def memory_usage(self, keys: Sequence[str]) -> list[int | None]:
        return self._each(keys, lambda pipe, key: pipe.memory_usage(key))

    def ttls(self, keys: Sequence[str]) -> list[int]:
        return self._each(keys, lambda pipe, key: pipe.ttl(key))

    def get(self, key: str) -> bytes | None:
        value = self.redis.get(key)
        assert value is None or isinstance(value, bytes)
        return value

    def scan(self) -> list[str]:
        return [key.decode() for key in self.redis.scan_iter(match=self.prefix + "*", count=1000)]

    def delete_all(self) -> int:
        """Delete every key of the prefix; how many there were."""
        keys = self.scan()
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])
        return len(keys)


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(function, *args)


async def _until(what: str, done: Callable[[], bool]) -> None:
    """Poll ``done`` (blocking, so in a thread) until true; fail after 30 seconds."""
    with anyio.move_on_after(30):
        while not await _in_thread(done):  # noqa: ASYNC110 (Redis has no event for it)
            await anyio.sleep(0.01)
        return
    raise OutcomeError(f"gave up waiting for {what}")


def _sampled(task_ids: Sequence[str], seed: int) -> list[str]:
    return random.Random(seed).sample(list(task_ids), min(SAMPLE, len(task_ids)))


async def _mean_size(keys: _Keys, names: list[str], what: str) -> float:
    """The mean ``MEMORY USAGE`` of keys that must exist and expire."""
    sizes = await _in_thread(keys.memory_usage, names)
    ttls = await _in_thread(keys.ttls, names)
    if any(size is None for size in sizes):
        raise OutcomeError(f"some {what} keys are missing from Redis")
    if not all(ttl > 0 for ttl in ttls):
        raise OutcomeError(f"some {what} keys have no TTL (TTLs seen: {sorted(set(ttls))[:5]})")
    return statistics.fmean(sizes)


# --- the three paths ------------------------------------------------------------------------


async def _pending(fake: FakeKeevx, owner: kx.AsyncKeevx, count: int) -> list[_Callback]:
    """Submit ``count`` one-image requests from ``owner``; their callbacks, not yet fed."""
    _check_fake_quiet(fake)
    fake.reset_metrics()
    submissions = await _common.submit_concurrently(owner.submit, REQUEST, count)
    callbacks = []
    for submission in submissions:
        task = fake.tasks[submission.task_ids[0]]
        assert task.callback_url is not None
        body = _common.succeeded_callback(fake, task)
        callbacks.append(_Callback(submission, body, task.callback_url))
    return callbacks


def _check_fake_quiet(fake: FakeKeevx) -> None:
    """Only the benchmark feeds callbacks: the fake must not have sent any itself."""
    if fake.callbacks_sent or fake.delivery_failures:
        raise OutcomeError("the fake called back tasks itself: they were to stay pending")


def _image_url(fake: FakeKeevx, task_id: str) -> str:
    return f"{fake.image_base_url}/{task_id}.png"


async def _feed_one_by_one(
    receiver: kx.AsyncKeevx,
    callbacks: list[_Callback],
    expected: kx.CallbackOutcome,
    fake: FakeKeevx,
) -> list[float]:
    """Seconds from feeding each callback to ``receiver`` until its task in A is done."""
    feed = receiver.feed_callback
    seconds = []
    gc.collect()
    for callback in callbacks:
        task, task_id = callback.task, callback.task_id
        start = time.perf_counter()
        outcome = await feed(callback.body, url=callback.url)
        try:
            result = await task.wait(WAIT)
        except kx.TaskTimeoutError:
            raise OutcomeError(f"task {task_id} was not resolved within {WAIT} s") from None
        seconds.append(time.perf_counter() - start)
        if outcome is not expected:
            raise OutcomeError(f"a callback was {outcome}, not {expected}, for {task_id}")
        if result.task_id != task_id or result.image_url != _image_url(fake, task_id):
            raise OutcomeError(f"task {task_id} got the image of another: {result}")
    return seconds


async def _redis_baseline(url: str, prefix: str, message: bytes, count: int) -> list[float]:
    """Seconds per SET + PUBLISH until a subscriber has the message (asyncio only)."""
    from redis.asyncio import Redis  # noqa: PLC0415 (checked by main)

    loop = asyncio.get_running_loop()
    channel = f"{prefix}baseline"
    waiting: list[asyncio.Future[bytes]] = []

    def expire(future: asyncio.Future[bytes]) -> None:
        if not future.done():
            future.set_exception(OutcomeError(f"a message was not received within {WAIT} s"))

    async with Redis.from_url(url) as publisher, Redis.from_url(url) as subscriber:
        pubsub = subscriber.pubsub()
        await pubsub.subscribe(channel)
        confirmation = await pubsub.get_message(timeout=WAIT)
        if confirmation is None or confirmation["type"] != "subscribe":
            raise OutcomeError(f"no subscription confirmation: {confirmation}")

        async def pump() -> None:
            # As the router's own listener: poll with a timeout, hand over at once.
            while True:
                received = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if received is not None and received["type"] == "message" and waiting:
                    future = waiting.pop()
                    if not future.done():
                        future.set_result(received["data"])

        pumping = asyncio.ensure_future(pump())
        seconds = []
        keys = []
        try:
            for i in range(WARMUP + count):
                key = f"{prefix}baseline:{i}"
                keys.append(key)
                future = loop.create_future()
                waiting.append(future)
                timer = loop.call_later(WAIT, expire, future)
                start = time.perf_counter()
                async with publisher.pipeline(transaction=False) as pipe:
                    pipe.set(key, message, ex=RESULT_TTL)
                    pipe.publish(channel, message)
                    await pipe.execute()
                received = await future
                elapsed = time.perf_counter() - start
                timer.cancel()
                if received != message:
                    raise OutcomeError("the subscriber received another message than published")
                if i >= WARMUP:
                    seconds.append(elapsed)
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            for start in range(0, len(keys), 1000):
                await publisher.delete(*keys[start : start + 1000])
    return seconds


# --- the run ----------------------------------------------------------------------------------


async def _measure(
    args: Any, fake: FakeKeevx, owner: kx.AsyncKeevx, receiver: kx.AsyncKeevx, keys: _Keys
) -> _Report:
    count: int = args.callbacks
    assert isinstance(owner.router, kx.RedisRouter)
    owner_claim = f"w:{owner.router.worker_id}"
    on_trio = args.backend == "trio"
    used_before = await _in_thread(keys.used_memory)
    all_ids: list[str] = []

    async def pending(n: int) -> list[_Callback]:
        callbacks = await _pending(fake, owner, n)
        ids = [callback.task_id for callback in callbacks]
        all_ids.extend(ids)
        # Fed before its claim is written, a callback would be BUFFERED, not FORWARDED.
        task_keys = [keys.task_key(task_id) for task_id in ids]
        await _until("A's claims", lambda: keys.existing(task_keys) == len(task_keys))
        return callbacks

    async def routed(callbacks: list[_Callback]) -> list[float]:
        forwarded = receiver.stats.callbacks_forwarded
        seconds = await _feed_one_by_one(receiver, callbacks, kx.CallbackOutcome.FORWARDED, fake)
        if receiver.stats.callbacks_forwarded - forwarded != len(callbacks):
            raise OutcomeError(f"B forwarded {receiver.stats} for {len(callbacks)} callbacks")
        return seconds

    async def local(callbacks: list[_Callback]) -> list[float]:
        return await _feed_one_by_one(owner, callbacks, kx.CallbackOutcome.RESOLVED, fake)

    async def baseline(message: bytes, n: int) -> list[float]:
        if on_trio:
            seconds: list[float] = await anyio.to_thread.run_sync(
                lambda: asyncio.run(_redis_baseline(args.redis_url, keys.prefix, message, n))
            )
            return seconds
        return await _redis_baseline(args.redis_url, keys.prefix, message, n)

    # Warm up every path (connections, the script's SHA, code caches); not counted.
    warmup = min(WARMUP, count)
    callbacks = await pending(warmup)
    await routed(callbacks)
    # The baseline publishes what the router published: a record as it sits in Redis.
    message = await _in_thread(keys.get, keys.result_key(callbacks[0].task_id))
    if message is None:
        raise OutcomeError("B recorded no result in Redis")
    await baseline(message, warmup)
    await local(await pending(warmup))

    reps = []
    for rep in range(args.reps):
        routed_callbacks = await pending(count)
        local_callbacks = await pending(count)
        routed_ids = [callback.task_id for callback in routed_callbacks]
        claim_size = await _mean_size(
            keys, [keys.task_key(task_id) for task_id in _sampled(routed_ids, rep)], "claim"
        )
        # Alternate the order, so that no path always meets the same state of the machine.
        order = ["routed", "baseline", "local"]
        if rep % 2:
            order.reverse()
        seconds: dict[str, list[float]] = {}
        for path in order:
            if path == "routed":
                seconds[path] = await routed(routed_callbacks)
            elif path == "baseline":
                seconds[path] = await baseline(message, count)
            else:
                seconds[path] = await local(local_callbacks)
        result_size = await _mean_size(
            keys, [keys.result_key(task_id) for task_id in _sampled(routed_ids, rep)], "result"
        )
        reps.append(
            _Rep(
                routed=_Latency.of(seconds["routed"]),
                baseline=_Latency.of(seconds["baseline"]),
                local=_Latency.of(seconds["local"]),
                bytes_per_claim=claim_size,
                bytes_per_result=result_size,
            )
        )

    # Let A's background writes land: a result recorded for each task it resolved itself,
    # and its claim released on every task.
    task_keys = [keys.task_key(task_id) for task_id in all_ids]
    result_keys = [keys.result_key(task_id) for task_id in all_ids]
    await _until("every result", lambda: keys.existing(result_keys) == len(result_keys))
    await _until("A's releases", lambda: keys.with_field(task_keys, owner_claim) == 0)
    used_after = await _in_thread(keys.used_memory)

    # Every key the run left must expire.
    names: list[str] = await _in_thread(keys.scan)
    ttls = await _in_thread(keys.ttls, names)
    lasting = [name for name, ttl in zip(names, ttls, strict=True) if ttl <= 0]
    if lasting:
        raise OutcomeError(f"{len(lasting)} keys have no TTL, e.g. {lasting[:3]}")
    by_kind: dict[str, int] = {}
    for name in names:
        kind = name[len(keys.prefix) :].split(":", 1)[0]
        by_kind[kind] = by_kind.get(kind, 0) + 1
    if by_kind != {"task": len(all_ids), "result": len(all_ids)}:
        raise OutcomeError(f"expected one task and one result key per task; found {by_kind}")
    _check_fake_quiet(fake)
    if owner.stats.router_errors or receiver.stats.router_errors:
        raise OutcomeError(f"router errors: A {owner.stats}, B {receiver.stats}")
    return _Report(
        reps=reps,
        tasks_created=len(all_ids),
        used_memory_growth=used_after - used_before,
        keys_by_kind=by_kind,
    )


async def _run(args: Any, keys: _Keys) -> _Report | OutcomeError:
    secret = secrets.token_hex(16)

    def client(http: Any) -> kx.AsyncKeevx:
        return kx.AsyncKeevx(
            api_key="bench",
            base_url=fake.base_url,
            http_client=http,
            callback_url=CALLBACK_URL,
            callback_secret=secret,
            max_concurrency=64,
            reconcile_after=None,  # no lookups: callbacks only
            router=kx.RedisRouter(args.redis_url, prefix=keys.prefix, result_ttl=RESULT_TTL),
        )

    # Tasks that never finish on their own are never called back by the fake.
    async with (
        FakeKeevx(complete_after=10**6) as fake,
        fake.http_client() as owner_http,
        fake.http_client() as receiver_http,
        client(owner_http) as owner,
        client(receiver_http) as receiver,
    ):
        fake.deliver_into(None)
        try:
            return await _measure(args, fake, owner, receiver, keys)
        except OutcomeError as exc:
            return exc


def _print_report(report: _Report) -> None:
    _common.print_table(
        "Milliseconds from feeding a callback until its task is done (ratio: routed p50 / "
        "Redis p50)",
        [
            "rep",
            "routed p50",
            "routed p99",
            "Redis p50",
            "Redis p99",
            "local p50",
            "local p99",
            "ratio",
        ],
        [
            [
                index + 1,
                *(
                    f"{value:.3f}"
                    for value in (
                        rep.routed.p50,
                        rep.routed.p99,
                        rep.baseline.p50,
                        rep.baseline.p99,
                        rep.local.p50,
                        rep.local.p99,
                    )
                ),
                f"{rep.routed.p50 / rep.baseline.p50:.2f}",
            ]
            for index, rep in enumerate(report.reps)
        ],
    )
    print()

    def mid(values: list[float]) -> float:
        return statistics.median(values)

    routed_p50 = mid([rep.routed.p50 for rep in report.reps])
    baseline_p50 = mid([rep.baseline.p50 for rep in report.reps])
    per_task = report.used_memory_growth / report.tasks_created
    print(
        f"# Redis memory: {report.keys_by_kind} keys for {report.tasks_created:,} tasks; "
        f"used_memory grew by {report.used_memory_growth:,} bytes (other clients of this "
        "Redis count in it too)"
    )
    print(f"router_routed_p50_ms {routed_p50:.3f}")
    print(f"router_routed_p99_ms {mid([rep.routed.p99 for rep in report.reps]):.3f}")
    print(f"router_redis_baseline_p50_ms {baseline_p50:.3f}")
    print(f"router_redis_baseline_p99_ms {mid([rep.baseline.p99 for rep in report.reps]):.3f}")
    print(f"router_local_p50_ms {mid([rep.local.p50 for rep in report.reps]):.3f}")
    print(f"router_local_p99_ms {mid([rep.local.p99 for rep in report.reps]):.3f}")
    print(f"router_bytes_per_claim {mid([rep.bytes_per_claim for rep in report.reps]):.0f}")
    print(f"router_bytes_per_result {mid([rep.bytes_per_result for rep in report.reps]):.0f}")
    print(f"router_used_memory_per_task {per_task:.0f}")
    added = mid([rep.routed.p50 - rep.baseline.p50 for rep in report.reps])
    print(f"router_added_p50_ms {added:.3f}")
    _common.print_figure(
        "router_added_latency_ratio",
        mid([rep.routed.p50 / rep.baseline.p50 for rep in report.reps]),
        "routed p50 / raw redis-py SET+PUBLISH p50, same process",
    )


def main() -> int:
    args = _common.parse_args(
        __doc__.splitlines()[0],
        callbacks=10_000,
        backend="asyncio",
        redis_url=DEFAULT_REDIS_URL,
    )
    if args.quick:
        args.callbacks = 500
    if args.backend not in ("asyncio", "trio"):
        print(f"bench_router: --backend must be asyncio or trio, not {args.backend!r}")
        return 2
    try:
        import redis  # noqa: F401, PLC0415 (an optional extra)
    except ImportError:
        print("bench_router: needs redis-py: pip install 'keevx-async[redis]'", file=sys.stderr)
        return 2
    prefix = f"keevx-bench-router:{os.getpid()}-{secrets.token_hex(4)}:"
    keys = _Keys(args.redis_url, prefix)
    try:
        version = keys.version()
    except Exception as exc:
        print(
            f"bench_router: cannot reach Redis at {args.redis_url} ({type(exc).__name__}: "
            f"{exc}); start a Redis server there, or pass --redis-url",
            file=sys.stderr,
        )
        return 2
    print(f"# machine: {_common.machine()} redis={version} backend={args.backend}")
    print(
        f"# callback routing: {args.callbacks:,} callbacks per path, one at a time; "
        f"{args.reps} interleaved repetitions (median); key prefix {prefix}"
    )
    baseline_loop = (
        "a fresh asyncio loop in a worker thread (redis-py has no trio client)"
        if args.backend == "trio"
        else "the same asyncio loop"
    )
    print(f"# Redis baseline: raw redis-py, SET EX + PUBLISH in one pipeline, on {baseline_loop}")
    try:
        outcome = anyio.run(_run, args, keys, backend=args.backend)
    finally:
        print(f"# cleanup: deleted {keys.delete_all():,} keys under {prefix}")
    if isinstance(outcome, OutcomeError):
        print(f"bench_router: FAILED: {outcome}", file=sys.stderr)
        return 1
    _print_report(outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
