# expect: worker A got the image whose callback reached worker B
"""Deployment: two workers of one app share callbacks through Redis (a RedisRouter).

Run it with ``python docs/examples/deployment.py``: no API key, no network, but a Redis
server at 127.0.0.1:6379 (``redis-server``) and ``pip install 'keevx-async[redis]'``.
The "workers" are clients in one process, each with a RedisRouter on the same Redis URL
and prefix and with the same callback secret, as the worker processes of a web app
would be. FakeKeevx plays the service and the load balancer: it hands every callback to
worker B. The script deletes its keys (``keevx-docs-<random>:*``) at the end.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import anyio
import redis

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

REDIS_URL = "redis://127.0.0.1:6379/0"
# One prefix per run, so that runs side by side never share keys.
PREFIX = f"keevx-docs-{secrets.token_hex(4)}:"
# In production: KEEVX_CALLBACK_SECRET, the same on every worker.
SECRET = secrets.token_urlsafe(32)


def worker(fake: FakeKeevx) -> AbstractAsyncContextManager[kx.AsyncKeevx]:
    """The client of one worker: the same secret, Redis URL and prefix as the others."""
    return fake.client(
        deliver_callbacks=False,  # the "load balancer" below picks the worker
        callback_secret=SECRET,
        router=kx.RedisRouter(REDIS_URL, prefix=PREFIX),
    )


class CallbackRoute:
    """Worker B's callback route: feeds each callback to B and notes what it did."""

    def __init__(self, client: kx.AsyncKeevx) -> None:
        self.client = client
        self.outcomes: list[str] = []

    async def feed_callback(self, body: bytes, *, url: str) -> kx.CallbackOutcome:
        outcome = await self.client.feed_callback(body, url=url)
        self.outcomes.append(outcome.name)
        return outcome


# --8<-- [start:generate]
async def generate_on_a(a: kx.AsyncKeevx) -> None:
    # A submits and waits. The callback reaches B, which records it in Redis and
    # notifies A (FORWARDED): A's generate() returns.
    [image] = await a.generate(kx.ImageRequest("a lighthouse at dawn"), timeout=30)
    print(f"worker A got the image whose callback reached worker B: {image.image_url}")


# --8<-- [end:generate]


# --8<-- [start:two-requests]
async def submit_request(client: kx.AsyncKeevx) -> str:
    """A first HTTP request: submit, and answer the browser with the task ID."""
    submission = await client.submit(kx.ImageRequest("a paper crane"))
    return submission.task_ids[0]


async def result_request(client: kx.AsyncKeevx, task_id: str) -> str:
    """A later HTTP request, on whichever worker gets it: the task's result."""
    task = await client.task(task_id)  # the request (and result) recorded in Redis
    image = await task.wait(timeout=30)  # at once if the task finished already
    return image.image_url


# --8<-- [end:two-requests]


async def main() -> None:
    async with FakeKeevx(complete_after=0.3) as fake, worker(fake) as b:
        route = CallbackRoute(b)
        fake.deliver_into(route)  # every callback goes to worker B
        async with worker(fake) as a:
            await generate_on_a(a)
            task_id = await submit_request(a)
            # The browser asks again, and the load balancer picks worker B.
            image_url = await result_request(b, task_id)
            print(f"worker B fetched task {task_id} that worker A submitted: {image_url}")
            task_id = await submit_request(a)  # then a deploy stops A
        # A is gone before its task finished: the callback reaches B, which keeps it in
        # Redis for result_ttl (BUFFERED: no live worker waits for the task).
        await fake.wait_idle()
        async with worker(fake) as c:  # the restarted worker, or any other
            image_url = await result_request(c, task_id)
            print(f"worker C fetched task {task_id} after A stopped: {image_url}")
        print(f"what the callbacks did on worker B: {', '.join(route.outcomes)}")


def delete_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


if __name__ == "__main__":
    try:
        anyio.run(main)
        anyio.run(main, backend="trio")  # needs `pip install trio`
    finally:
        delete_keys(PREFIX)
