"""The real Redis server the router tests use, and a TCP proxy that can cut it off.

The tests use the Redis server on 127.0.0.1:6379 (``KEEVX_TEST_REDIS_URL`` overrides it),
each under a key prefix of its own that is deleted afterwards. A test that cannot reach
it fails with a message saying so: it is never skipped.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

import anyio
import pytest
import redis
import redis.exceptions

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anyio.abc import SocketStream, TaskGroup

REDIS_URL = os.environ.get("KEEVX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_HINT = "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"


def sync_redis() -> redis.Redis:
    """A blocking client of the test server, or the test fails saying why."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(
            f"this test needs the Redis server at {REDIS_URL}, which cannot be reached "
            f"({type(exc).__name__}: {exc}). Start it (for example: {START_HINT}) or point "
            "KEEVX_TEST_REDIS_URL at one.",
            pytrace=False,
        )
    return client


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix``; how many there were."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    return len(keys)


def prefix_keys(client: redis.Redis, prefix: str, kind: str = "") -> list[str]:
    """The keys under ``{prefix}{kind}``, decoded."""
    return sorted(key.decode() for key in client.scan_iter(match=f"{prefix}{kind}*", count=1000))


def kill_connections(client: redis.Redis, name_prefix: str) -> int:
    """Cut every connection whose client name starts with ``name_prefix``; how many."""
    killed = 0
    for info in client.client_list():
        if str(info.get("name", "")).startswith(name_prefix):
            client.client_kill_filter(_id=info["id"])
            killed += 1
    return killed


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of the test's own on the real Redis server, emptied afterwards."""
    client = sync_redis()
    prefix = f"keevx-test:{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        delete_prefix(client, prefix)
        client.close()


class TcpProxy:
    """A loopback TCP proxy in front of Redis that a test can stop and start again.

    Stopping closes the listener and every proxied connection, as a Redis restart or a
    network cut would; starting listens on the same port again.
    """

    def __init__(self, task_group: TaskGroup, target_port: int = 6379) -> None:
        self._task_group = task_group
        self._target_port = target_port
        self._scope: anyio.CancelScope | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The Redis URL that goes through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Listen (on the same port as before, if started before)."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        scope = self._scope = anyio.CancelScope()

        async def serve() -> None:
            with scope:
                async with listener:
                    await listener.serve(self._relay)

        self._task_group.start_soon(serve)

    def stop(self) -> None:
        """Close the listener and cut every connection through the proxy."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    async def _relay(self, downstream: SocketStream) -> None:
        async with downstream:
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self._target_port)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as task_group:

                async def pump(source: SocketStream, sink: SocketStream) -> None:
                    try:
                        async for chunk in source:
                            await sink.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    task_group.cancel_scope.cancel()

                task_group.start_soon(pump, downstream, upstream)
                task_group.start_soon(pump, upstream, downstream)
