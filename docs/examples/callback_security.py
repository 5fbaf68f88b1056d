# expect: new token, ['old-secret', 'new-secret']: buffered
"""Callback tokens: what the service is given, what is refused, and sharing and rotating
the secret across the workers of one app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import Sequence

    import httpx

CALLBACK_URL = "https://app.example.test/keevx/callback?tenant=acme"


class Recorder:
    """Keeps the callbacks instead of delivering them (``FakeKeevx.deliver_into``)."""

    def __init__(self) -> None:
        self.callbacks: list[tuple[bytes, str]] = []

    async def feed_callback(self, body: bytes, /, *, url: str) -> None:
        self.callbacks.append((body, url))


def make_client(
    fake: FakeKeevx,
    http: httpx.AsyncClient,
    *,
    callback_secret: str | Sequence[str] | None = None,
    callback_token_in: Literal["query", "path"] = "query",
) -> kx.AsyncKeevx:
    return kx.AsyncKeevx(
        api_key="test",
        base_url=fake.base_url,
        http_client=http,
        callback_url=CALLBACK_URL,
        callback_secret=callback_secret,
        callback_token_in=callback_token_in,
    )


async def outcome(client: kx.AsyncKeevx, body: bytes, url: str) -> str:
    try:
        return str(await client.feed_callback(body, url=url))
    except kx.CallbackAuthError:
        return "rejected (CallbackAuthError)"


async def main() -> None:
    recorder = Recorder()
    async with FakeKeevx() as fake, fake.http_client() as http:
        fake.deliver_into(recorder)

        # --8<-- [start:token]
        async with make_client(fake, http) as client:
            submission = await client.submit(kx.ImageRequest("a locked gate"))
            await fake.wait_idle()
            body, url = recorder.callbacks[0]
            print(f"the service was given: {url}")  # your query string is kept
            print(f"with the token: {await outcome(client, body, url)}")
            print(f"without it: {await outcome(client, body, CALLBACK_URL)}")
            forged = url[:-4] + "AAAA"
            print(f"with a forged one: {await outcome(client, body, forged)}")
            print(f"task done: {submission.tasks[0].done()}")
            # A genuine token is good for its own submission's tasks only.
            other = await client.submit(kx.ImageRequest("another gate"))
            await fake.wait_idle()
            other_body, _ = recorder.callbacks[-1]
            mixed = await outcome(client, other_body, url)
            print(f"another submission's task, this token: {mixed}")
            print(f"that task done: {other.tasks[0].done()}")
        # --8<-- [end:token]

        # --8<-- [start:path]
        async with make_client(fake, http, callback_token_in="path") as client:
            await client.submit(kx.ImageRequest("a secret garden"))
            await fake.wait_idle()
            print(f"token in the path: {recorder.callbacks[-1][1]}")
        # --8<-- [end:path]

        # --8<-- [start:shared]
        # Two workers of one app share the secret (e.g. KEEVX_CALLBACK_SECRET): each
        # verifies the tokens the other issued. A worker with another secret refuses them.
        async with (
            make_client(fake, http, callback_secret="s3cret-shared") as worker_a,
            make_client(fake, http, callback_secret="s3cret-shared") as worker_b,
            make_client(fake, http, callback_secret="another-app") as stranger,
        ):
            await worker_a.submit(kx.ImageRequest("a shared secret"))
            await fake.wait_idle()
            body, url = recorder.callbacks[-1]
            print(f"worker B: {await outcome(worker_b, body, url)}")  # valid, task unknown
            print(f"another app: {await outcome(stranger, body, url)}")
        # --8<-- [end:shared]

        # --8<-- [start:rotation]
        # Rotation: the first secret signs new tokens, every listed secret verifies, so
        # callbacks of submits made before the switch are still accepted.
        async with make_client(fake, http, callback_secret="old-secret") as before:
            await before.submit(kx.ImageRequest("a changing of the guard"))
            await fake.wait_idle()
        body, url = recorder.callbacks[-1]
        rotating = make_client(fake, http, callback_secret=["new-secret", "old-secret"])
        rotated = make_client(fake, http, callback_secret="new-secret")
        async with rotating, rotated:
            print(f"old token, ['new-secret', 'old-secret']: {await outcome(rotating, body, url)}")
            print(f"old token, 'new-secret' only: {await outcome(rotated, body, url)}")

        # In a fleet, some processes get the new list before others. A process still on
        # ["old-secret"] alone would refuse the tokens that "new-secret" signs, so first
        # make every process accept the new secret, and only then sign with it.
        signing = make_client(fake, http, callback_secret=["new-secret", "old-secret"])
        accepting = make_client(fake, http, callback_secret=["old-secret", "new-secret"])
        async with signing, accepting:
            await signing.submit(kx.ImageRequest("a new guard"))  # signed with new-secret
            await fake.wait_idle()
            body, url = recorder.callbacks[-1]
            print(f"new token, ['old-secret', 'new-secret']: {await outcome(accepting, body, url)}")
        # --8<-- [end:rotation]


if __name__ == "__main__":
    anyio.run(main)
