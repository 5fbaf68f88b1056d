"""``RedisRouter``: callbacks routed between worker processes over Redis.

Keys, all under the router's ``prefix`` (default ``keevx:``):

- ``task:{task_id}``: a hash, written by every worker that waits for the task (the
  *owners*): ``w:{worker_id}`` per owner, and ``sub`` (the callback token's submission),
  ``req`` (the request, as JSON), ``k`` (its kind's name) and ``i`` (the task's index).
  TTL ``owner_ttl``, refreshed while the task is waited for; ``result_ttl`` once it finished.
- ``result:{task_id}``: the task's finished callback. TTL ``result_ttl``, which the
  task's hash then keeps at least too (so its request outlives its result).
- ``early:{submission_id}``: the task IDs of callbacks recorded before their submission's
  reply (at most 8, as a submission has at most 8 tasks). TTL ``result_ttl``.
- channel ``worker:{worker_id}``: one per client, where its routed callbacks arrive.

A callback is recorded and its owners notified in one Lua script, atomically; an owner
writes its claim before it reads the result key. Whatever the interleaving, a callback is
either found by the claim or published to a claim already made, and an owner that was
disconnected reads every result key of its tasks again once it has subscribed anew.

redis-py's client is asyncio-only. Under trio the router runs it on an asyncio loop in a
thread of its own, and waits for it without blocking trio.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import secrets
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar, cast

import anyio

from ._checks import check_seconds
from ._eventloop import running_on_asyncio
from ._exceptions import CallbackAuthError, RouterError
from ._models import CallbackOutcome
from ._router import (
    CallbackRouter,
    TaskRecord,
    decode_request_record,
    encode_record,
    encode_request_record,
)
from ._types import MAX_GENERATE_COUNT

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from concurrent.futures import Future

    from anyio.abc import TaskStatus
    from anyio.from_thread import BlockingPortal
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript

    from ._models import CallbackPayload
    from ._router import RouterHost
    from ._task import Task

__all__ = ["INSTALL_HINT", "RedisRouter"]

logger = logging.getLogger("keevx_async.router")

INSTALL_HINT: Final = "pip install 'keevx-async[redis]'"
DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
# Claims and reads per pipeline round trip.
_CHUNK: Final = 500
# Reconnection backoff: from this, doubling, up to ``reconnect_max_wait``, full jitter.
_RECONNECT_BASE: Final = 0.05
# Queued writes kept at most while Redis is unreachable (the oldest releases go first;
# claims are rewritten whole after reconnecting anyway).
_MAX_QUEUED: Final = 1_000_000
_NO_OWNER: Final = -1
_FOREIGN: Final = -2
_TOO_MANY_EARLY: Final = -3
_ALREADY_RECORDED: Final = -4

# KEYS: result, task, early. ARGV: record, result TTL, channel prefix, submission ID or
# "", worker not to notify or "", early limit, task ID.
# Returns the owners notified (>= 0), or _NO_OWNER, _FOREIGN, _TOO_MANY_EARLY, or
# _ALREADY_RECORDED: a finished task's record is written once, by its first callback (or
# lookup); a later one is a duplicate, whatever it says, and notifies nobody.
_RECORD_SCRIPT: Final = """
local sub = redis.call('HGET', KEYS[2], 'sub')
if sub and sub ~= '' and ARGV[4] ~= '' and sub ~= ARGV[4] then
  return -2
end
if not sub and ARGV[4] ~= '' then
  redis.call('SADD', KEYS[3], ARGV[7])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  if redis.call('SCARD', KEYS[3]) > tonumber(ARGV[6]) then
    redis.call('SREM', KEYS[3], ARGV[7])
    return -3
  end
end
if not redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then
  return -4
end
local ttl = redis.call('TTL', KEYS[2])
if ttl >= 0 and ttl < tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
local notified = -1
for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(field, 1, 2) == 'w:' then
    if notified < 0 then notified = 0 end
    local worker = string.sub(field, 3)
    if worker ~= ARGV[5] then
      notified = notified + redis.call('PUBLISH', ARGV[3] .. worker, ARGV[1])
    end
  end
end
return notified
"""

_T = TypeVar("_T")


def _redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis operation raises when Redis is unreachable or misbehaves."""
    import redis.exceptions  # noqa: PLC0415 (the extra is optional)

    return (redis.exceptions.RedisError, OSError, TimeoutError)


def _whole_seconds(name: str, value: float) -> int:
    if check_seconds(name, value) < 1:
        raise ValueError(f"{name} must be a number of seconds >= 1; got {value!r}")
    return math.ceil(value)


class _Link:
    """redis-py on the caller's loop (asyncio), or on an asyncio loop in a thread (trio).

    ``call`` runs a coroutine function where the Redis client lives and waits for it;
    ``notifier`` wraps a function so that the Redis side can call it on the host loop.
    """

    def __init__(self, portal: BlockingPortal | None, portal_cm: Any) -> None:
        self._portal = portal
        self._portal_cm = portal_cm

    @classmethod
    async def open(cls) -> _Link:
        if running_on_asyncio():
            return cls(None, None)
        portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        portal = await anyio.to_thread.run_sync(portal_cm.__enter__)
        return cls(portal, portal_cm)

    async def call(self, function: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        portal = self._portal
        if portal is None:
            return await function(*args)
        import trio  # noqa: PLC0415 (only under trio)

        future: Future[_T] = portal.start_task_soon(function, *args)
        done = anyio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: Future[_T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            if not future.done():
                future.cancel()
        return future.result()

    def notifier(self, function: Callable[[bytes], None]) -> Callable[[bytes], None]:
        if self._portal is None:
            return function
        import trio  # noqa: PLC0415 (only under trio)

        token = trio.lowlevel.current_trio_token()

        def notify(data: bytes) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(function, data)

        return notify

    async def aclose(self) -> None:
        if self._portal_cm is not None:
            portal_cm, self._portal_cm = self._portal_cm, None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(portal_cm.__exit__, None, None, None)


class RedisRouter(CallbackRouter):
    """Routes callbacks between the worker processes of one app through Redis.

    Give every worker the same ``callback_secret`` (the token of a callback is checked by
    whichever worker receives it) and the same ``url`` and ``prefix``:

    ```python
    client = kx.AsyncKeevx(router=kx.RedisRouter("redis://127.0.0.1:6379/0", prefix="keevx:"))
    ```

    The worker that receives a callback for a task it does not wait for records it in
    Redis and notifies the workers that do, which resolve the task within milliseconds.
    A callback that arrives before its submit reply, or while no live worker waits for
    the task (its worker restarted), is kept for ``result_ttl`` seconds: a client that
    asks for the task again with [`AsyncKeevx.task`][keevx_async.AsyncKeevx.task] gets it.

    When Redis cannot be reached, the error is logged once per outage and the router
    reconnects with backoff; meanwhile callbacks it would have to record are refused
    with 503, so that the service delivers them again, and callbacks for tasks of this
    worker are still applied here. Needs the extra ``keevx-async[redis]`` (redis-py) and
    an entered client (``async with``). Runs on asyncio and on trio.

    Args:
        url: the Redis URL (``redis://``, ``rediss://`` or ``unix://``).
        prefix: the prefix of every key and channel; one per app (or per test).
        owner_ttl: seconds a worker's claim on a task lives; refreshed every third of it
            while the worker waits, so it only runs out after the worker died.
        result_ttl: seconds a recorded result (and the request it answers) is kept for a
            client to re-attach to its task.
        timeout: seconds for one Redis operation (connecting included); a callback that
            cannot be recorded within a few of them is refused with 503.
        reconnect_max_wait: the longest wait between reconnection attempts.
        worker_id: this client's name in Redis; default a random one, drawn again in a
            process forked after the router was made (a client made before gunicorn's
            ``--preload`` fork). Two clients must never share one.
    """

    shares_callbacks: ClassVar[bool] = True

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        prefix: str = "keevx:",
        owner_ttl: float = 600.0,
        result_ttl: float = 3600.0,
        timeout: float = 2.0,
        reconnect_max_wait: float = 5.0,
        worker_id: str | None = None,
    ) -> None:
        try:
            import redis.asyncio  # noqa: F401, PLC0415 (the extra is optional)
        except ImportError:
            raise ImportError(
                f"RedisRouter needs redis-py, from the extra keevx-async[redis]: {INSTALL_HINT}"
            ) from None
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must be a redis://, rediss:// or unix:// URL; got {url!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string; got {prefix!r}")
        timeout = check_seconds("timeout", timeout)
        reconnect_max_wait = check_seconds("reconnect_max_wait", reconnect_max_wait)
        if worker_id is not None and (not isinstance(worker_id, str) or not worker_id):
            raise ValueError(f"worker_id must be a non-empty string; got {worker_id!r}")
        self.url = url
        self.prefix = prefix
        self.owner_ttl = _whole_seconds("owner_ttl", owner_ttl)
        self.result_ttl = _whole_seconds("result_ttl", result_ttl)
        self.timeout = float(timeout)
        self.reconnect_max_wait = float(reconnect_max_wait)
        self._random_id = worker_id is None
        self._made_in = os.getpid()
        self.worker_id: str = worker_id or secrets.token_hex(8)
        """This client's name in Redis (its channel is ``{prefix}worker:{worker_id}``)."""
        self.connected = False
        """Whether the router is subscribed to its channel now (so that callbacks routed
        to this worker arrive at once)."""
        self.errors = 0
        """Redis operations that failed (each outage is logged once, not counted once)."""
        self._channel_prefix = f"{prefix}worker:"
        self._set_worker_id(self.worker_id)
        self._link: _Link | None = None
        self._redis: Redis | None = None
        self._script: AsyncScript | None = None
        self._host: RouterHost | None = None
        self._writes: list[tuple[str, Any]] = []
        self._wake_writer: anyio.Event | None = None
        # Set once the writes queued before it are done (or failed and queued again).
        self._written: anyio.Event | None = None
        self._pubsub_redis: Redis | None = None
        self._outage = False
        self._used = False

    def _set_worker_id(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._channel = self._channel_prefix + worker_id

    def __repr__(self) -> str:
        return f"RedisRouter({self.url!r}, prefix={self.prefix!r}, worker_id={self.worker_id!r})"

    # --- keys -------------------------------------------------------------------------

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def _result_key(self, task_id: str) -> str:
        return f"{self.prefix}result:{task_id}"

    def _early_key(self, submission_id: str | None) -> str:
        return f"{self.prefix}early:{submission_id or ''}"

    # --- lifetime ---------------------------------------------------------------------

    async def run(self, host: RouterHost, *, task_status: TaskStatus[None]) -> None:
        """Connect, subscribe and route until cancelled (the client runs this)."""
        if self._used:
            raise RuntimeError("this RedisRouter already served a client: make one per client")
        self._used = True
        if self._random_id and os.getpid() != self._made_in:
            self._set_worker_id(secrets.token_hex(8))  # a fork must not share its parent's
        self._host = host
        self._wake_writer = anyio.Event()
        self._written = anyio.Event()
        link = self._link = await _Link.open()
        try:
            self._redis = await link.call(self._connect, 1)
            # The channel's own client never retries behind our back: redis-py would
            # subscribe again silently, and what was published meanwhile would be missed.
            self._pubsub_redis = await link.call(self._connect, 0)
            deliver = link.notifier(host.deliver)
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(self._write_loop)
                task_group.start_soon(self._refresh_loop)
                await task_group.start(self._listen_loop, deliver)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await self._last_writes()
                self.connected = False
                self._host = None
                for redis in (self._redis, self._pubsub_redis):
                    if redis is not None:
                        with contextlib.suppress(Exception):
                            await link.call(redis.aclose)
                await link.aclose()

    async def _last_writes(self) -> None:
        """Write what is still queued (releases, results), if Redis answers in time."""
        writes, self._writes = self._writes, []
        # Not while an outage is known: leaving must not wait for a Redis that is away.
        if writes and not self._outage and self._link is not None:
            with anyio.move_on_after(self.timeout), contextlib.suppress(*_redis_errors()):
                await self._link.call(self._write, writes)

    async def _connect(self, retries: int) -> Redis:
        from redis.asyncio import Redis  # noqa: PLC0415 (the extra is optional)
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import EqualJitterBackoff  # noqa: PLC0415

        redis = Redis.from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            health_check_interval=max(1, math.ceil(self.timeout * 5)),
            retry=Retry(EqualJitterBackoff(cap=0.2, base=0.02), retries),
            client_name=f"{self.prefix}{self.worker_id}",
        )
        if retries:
            self._script = redis.register_script(_RECORD_SCRIPT)
        return redis

    def _problem(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if not self._outage:
            self._outage = True
            logger.error(
                "Redis at %s is unreachable (%s: %s: %s); reconnecting with backoff, and "
                "refusing callbacks for other workers' tasks with 503 meanwhile",
                self.url, what, type(exc).__name__, exc,
            )  # fmt: skip

    def _recovered(self) -> None:
        if self._outage:
            self._outage = False
            logger.warning("Redis at %s is reachable again", self.url)

    async def _backoff(self, attempt: int) -> None:
        cap = min(self.reconnect_max_wait, _RECONNECT_BASE * 2**attempt)
        await anyio.sleep(random.uniform(cap / 2, cap))  # noqa: S311 (jitter, not secrets)

    # --- receiving: the worker's channel ----------------------------------------------

    async def _listen_loop(
        self, deliver: Callable[[bytes], None], *, task_status: TaskStatus[None]
    ) -> None:
        link = self._link
        assert link is not None
        attempt = 0
        started = False
        errors = _redis_errors()
        while True:
            pubsub = None
            try:
                with anyio.fail_after(self.timeout * 3):
                    pubsub = await link.call(self._subscribe)
                await self._reclaim_all()
                self.connected = True
                self._recovered()
                attempt = 0
                if not started:
                    started = True
                    task_status.started()
                await link.call(self._pump, pubsub, deliver)
            except errors as exc:
                self._problem("subscribing" if not self.connected else "listening", exc)
            finally:
                self.connected = False
                if pubsub is not None:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await link.call(pubsub.aclose)
            if not started:
                # Start anyway: the client works without Redis, and this loop goes on.
                started = True
                task_status.started()
            await self._backoff(attempt)
            attempt += 1

    async def _subscribe(self) -> PubSub:
        assert self._pubsub_redis is not None
        pubsub = self._pubsub_redis.pubsub(ignore_subscribe_messages=False)
        try:
            await pubsub.subscribe(self._channel)
            # The confirmation: from here on, nothing published to us is missed.
            message = await pubsub.get_message(timeout=self.timeout)
            while message is not None and message["type"] != "subscribe":  # pragma: no cover
                message = await pubsub.get_message(timeout=self.timeout)
        except BaseException:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise
        if message is None:  # pragma: no cover - Redis answers or the socket times out
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise TimeoutError("Redis did not confirm the subscription")
        return pubsub

    @staticmethod
    async def _pump(pubsub: PubSub, deliver: Callable[[bytes], None]) -> None:
        """Deliver what arrives on the channel until the connection fails."""
        while True:
            # A timeout, so the health check pings a connection gone quiet.
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            if message["type"] == "message":
                deliver(message["data"])
            elif message["type"] == "subscribe":  # pragma: no cover - retries are off
                return  # subscribed anew without us: start over, results included

    # --- claiming: this worker's tasks ------------------------------------------------

    async def claim(self, tasks: Sequence[Task]) -> None:
        """Claim ``tasks``: their callbacks are routed to this worker from now on.

        Returns once the claims are in Redis (with their requests, for `find`), or after
        ``timeout`` seconds, or at once while Redis is unreachable: the claims are then
        written once it is back. Never raises, and is not cut short by cancellation.
        """
        written = self._queue_write("claim", [self._claim_of(task) for task in tasks])
        if written is not None and self.connected:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout):
                await written.wait()

    def finished(self, payload: CallbackPayload, submission_id: str | None) -> None:
        """Queue the record of a result this worker got itself, for the others."""
        self._queue_write("finished", (payload.task_id, encode_record(payload, submission_id)))

    def release(self, task_id: str) -> None:
        """Queue the end of this worker's claim on a task."""
        self._queue_write("release", task_id)

    def _queue_write(self, kind: str, item: Any) -> anyio.Event | None:
        writes = self._writes
        writes.append((kind, item))
        if len(writes) > _MAX_QUEUED:
            for index, (queued_kind, _) in enumerate(writes):  # pragma: no branch
                if queued_kind == "release":
                    del writes[index]
                    break
        if self._wake_writer is not None:
            self._wake_writer.set()
        return self._written

    async def _write_loop(self) -> None:
        link = self._link
        assert link is not None
        assert self._wake_writer is not None
        errors = _redis_errors()
        attempt = 0
        while True:
            await self._wake_writer.wait()
            self._wake_writer = anyio.Event()
            writes, self._writes = self._writes, []
            written, self._written = self._written, anyio.Event()
            assert written is not None
            try:
                with anyio.fail_after(self.timeout * (3 + len(writes) // _CHUNK)):
                    found = await link.call(self._write, writes)
            except anyio.get_cancelled_exc_class():
                self._writes[:0] = writes  # for the last writes on the way out
                raise
            except errors as exc:
                written.set()
                self._problem("writing claims", exc)
                self._writes[:0] = writes
                await self._backoff(attempt)
                attempt += 1
                self._wake_writer.set()
                continue
            written.set()
            attempt = 0
            self._deliver_found(found)

    async def _write(self, writes: list[tuple[str, Any]]) -> list[bytes]:
        """Run queued writes in pipelines; the results found for claimed tasks."""
        claims: list[tuple[str, dict[str, str]]] = []
        others = []
        for kind, item in writes:
            if kind == "claim":
                claims.extend(item)
            else:
                others.append((kind, item))
        assert self._redis is not None
        assert self._script is not None
        mine = f"w:{self.worker_id}"
        for start in range(0, len(others), _CHUNK):
            async with self._redis.pipeline(transaction=False) as pipe:
                for kind, item in others[start : start + _CHUNK]:
                    if kind == "finished":
                        task_id, record = item
                        await self._script(
                            keys=self._record_keys(task_id, None),
                            args=self._record_args(
                                record, None, skip=self.worker_id, task_id=task_id
                            ),
                            client=pipe,
                        )
                        pipe.hdel(self._task_key(task_id), mine)
                    else:
                        pipe.hdel(self._task_key(item), mine)
                await pipe.execute()
        return await self._claim(claims)

    async def _claim(self, claims: list[tuple[str, dict[str, str]]]) -> list[bytes]:
        """Write claims (before reading results: see the module docstring)."""
        assert self._redis is not None
        found: list[bytes] = []
        for start in range(0, len(claims), _CHUNK):
            chunk = claims[start : start + _CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id, fields in chunk:
                    key = self._task_key(task_id)
                    pipe.hset(key, mapping=cast("Any", fields))
                    pipe.expire(key, self.owner_ttl)
                    pipe.get(self._result_key(task_id))
                replies = await pipe.execute()
            found.extend(reply for reply in replies[2::3] if reply is not None)
        return found

    async def _reclaim_all(self) -> None:
        """Claim every task this worker waits for again, and read their results."""
        host = self._host
        assert host is not None
        assert self._link is not None
        claims = [self._claim_of(task) for task in host.pending_tasks()]
        found = await self._link.call(self._claim, claims)
        self._deliver_found(found)

    def _deliver_found(self, found: list[bytes]) -> None:
        host = self._host
        if host is not None:
            for record in found:
                host.deliver(record)

    async def _refresh_loop(self) -> None:
        """Keep the claims of tasks still waited for alive (every third of owner_ttl)."""
        errors = _redis_errors()
        while True:
            await anyio.sleep(self.owner_ttl / 3)
            if self.connected:
                try:
                    with anyio.fail_after(self.timeout * 3):
                        await self._reclaim_all()
                except errors as exc:
                    self._problem("refreshing claims", exc)

    # --- forwarding: callbacks for other workers' tasks -------------------------------

    def _record_keys(self, task_id: str, submission_id: str | None) -> list[str]:
        return [self._result_key(task_id), self._task_key(task_id), self._early_key(submission_id)]

    def _record_args(
        self, record: bytes, submission_id: str | None, *, skip: str, task_id: str
    ) -> list[Any]:
        return [
            record,
            self.result_ttl,
            self._channel_prefix,
            submission_id or "",
            skip,
            MAX_GENERATE_COUNT,
            task_id,
        ]

    async def forward(self, payload: CallbackPayload, submission_id: str | None) -> CallbackOutcome:
        """Record a finished callback in Redis and notify the task's owners.

        Raises:
            RouterError: Redis could not record it (the callback gets 503).
            CallbackAuthError: the task's owner recorded another submission for it, or
                the token already has as many early callbacks as a submission has tasks.
        """
        task_id = payload.task_id
        keys = self._record_keys(task_id, submission_id)
        args = self._record_args(
            encode_record(payload, submission_id), submission_id, skip="", task_id=task_id
        )
        notified: int = await self._ask(
            "recording a callback",
            f"could not record the callback for task {task_id} in",
            self._run_script,
            keys,
            args,
        )
        if notified == _FOREIGN:
            raise CallbackAuthError(
                f"callback for task {task_id} carries a token issued for another submission"
            )
        if notified == _ALREADY_RECORDED:
            return CallbackOutcome.DUPLICATE
        if notified == _TOO_MANY_EARLY:
            raise CallbackAuthError(
                f"callback for task {task_id}: its token already has {MAX_GENERATE_COUNT} "
                "early callbacks, as many as a submission has tasks"
            )
        return CallbackOutcome.FORWARDED if notified > 0 else CallbackOutcome.BUFFERED

    async def find(self, task_id: str) -> TaskRecord | None:
        """What Redis holds about a task: its request and its result, if recorded.

        Raises:
            RouterError: Redis could not be read.
        """
        fields, result = await self._ask(
            "reading a task", f"could not read task {task_id} from", self._read, task_id
        )
        if not fields and result is None:
            return None
        index = fields.get(b"i", b"0")
        return TaskRecord(
            task_id=task_id,
            request=None
            if b"req" not in fields
            else decode_request_record(fields[b"req"], _text_or_none(fields.get(b"k"))),
            index=int(index) if index.isdigit() else 0,
            submission_id=fields.get(b"sub", b"").decode() or None,
            result=result,
        )

    async def _ask(
        self, doing: str, failure: str, function: Callable[..., Awaitable[_T]], *args: Any
    ) -> _T:
        """One Redis operation for a caller who is waiting (bounded; RouterError if not).

        ``doing`` names the operation in the outage log; ``failure`` starts the error's
        message ("could not read task X from").
        """
        link = self._link
        if link is None or self._redis is None or self._host is None:
            raise RouterError(
                "the RedisRouter is not running: enter its client (`async with`) first"
            )
        try:
            with anyio.fail_after(self.timeout * 3):
                answer = await link.call(function, *args)
        except _redis_errors() as exc:
            self._problem(doing, exc)
            raise RouterError(
                f"{failure} Redis at {self.url}: {type(exc).__name__}: {exc}"
            ) from exc
        self._recovered()
        return answer

    async def _run_script(self, keys: list[str], args: list[Any]) -> int:
        assert self._script is not None  # registered with the client
        notified: int = await self._script(keys, args)
        return notified

    async def _read(self, task_id: str) -> tuple[dict[bytes, bytes], bytes | None]:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._task_key(task_id))
            pipe.get(self._result_key(task_id))
            fields, result = await pipe.execute()
        return fields, result

    def _claim_of(self, task: Task) -> tuple[str, dict[str, str]]:
        task_id = task.task_id
        assert task_id is not None  # only submitted tasks are waited for
        # The request as its submit body, with its own callback URL if it had one, and
        # its kind, so that a lookup or a routed callback reads the task right.
        kind, request = encode_request_record(task.request)
        return task_id, {
            f"w:{self.worker_id}": "1",
            "sub": task.submission_id or "",
            "req": request,
            "k": kind,
            "i": str(task.index),
        }


def _text_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="replace")
