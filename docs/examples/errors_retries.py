# expect: while the client is paused: 0 more submit calls
"""Errors and retries: what is retried, what is raised, and what ``maybe_created`` means.

Every fault here is scripted with ``FakeKeevx.inject`` or ``fail_if``.
"""

from __future__ import annotations

import logging
import sys

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx

REQUEST = kx.ImageRequest("a glass teapot")


# --8<-- [start:invalid]
def invalid_request() -> None:
    try:
        kx.ImageRequest("a cat", generate_count=9)
    except kx.InvalidRequestError as exc:  # also a ValueError; nothing was sent
        print(f"invalid request, field {exc.field!r}: {exc}")


# --8<-- [end:invalid]


# --8<-- [start:submit_errors]
async def submit_safely(client: kx.AsyncKeevx, request: kx.ImageRequest) -> list[str]:
    try:
        images = await client.generate(request, timeout=600)
    except kx.TaskFailedError as exc:  # the task ran and failed: no image
        print(f"task failed ({exc.status}): {exc.error_message}")
    except kx.RateLimitError as exc:  # retries spent, or Retry-After > max_retry_wait
        print(f"rate limited; the service asked to wait {exc.retry_after:.0f} s")
    except (kx.APIError, kx.TransportError) as exc:
        if exc.maybe_created:
            # The request may have been accepted (and billed) although no task IDs came
            # back: do not resubmit blindly. Record it and check before trying again.
            print(f"{type(exc).__name__}: maybe_created=True, not resubmitting")
        else:
            # Provably refused (a 4xx, code != 0, no connection): safe to fix and resend.
            print(f"{type(exc).__name__}: refused, maybe_created=False: {exc}")
    else:
        return [image.image_url for image in images]
    return []


# --8<-- [end:submit_errors]


async def main() -> None:
    # The SDK logs each retry and pause on the "keevx_async" logger.
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s", stream=sys.stdout)
    invalid_request()
    fake = FakeKeevx(fail_if=lambda prompt: "forbidden" in prompt)
    async with fake, fake.client() as client:
        # A 429 with a short Retry-After: waited out and retried; the caller never sees it.
        fake.inject(429, retry_after=0.2)
        urls = await submit_safely(client, REQUEST)
        print(f"after a 429: {len(urls)} image, {fake.submit_calls} submit calls")

        # A 429 pauses the whole client: submits started meanwhile wait it out too,
        # so a fan-out backs off as one instead of hammering the service.
        fake.inject(429, retry_after=0.5)
        fake.reset_metrics()
        started = anyio.current_time()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(submit_safely, client, REQUEST)  # this one gets the 429
            await anyio.sleep(0.1)
            for _ in range(3):
                task_group.start_soon(submit_safely, client, REQUEST)
        later = fake.submit_times[1:]
        held = sum(1 for at in later if at - started >= 0.49)
        print(f"{held} of {len(later)} later submits waited out the 0.5 s pause")

        # A 500 after the body was sent is ambiguous: the service may have created
        # the tasks (create=True makes the fake do exactly that). Never retried.
        fake.inject(500, create=True)
        await submit_safely(client, REQUEST)

        # A refusal: the service provably did nothing.
        fake.inject(400)
        await submit_safely(client, REQUEST)

        # The task itself fails.
        await submit_safely(client, kx.ImageRequest("a forbidden door"))

        # The root of the tree catches everything the SDK raises.
        try:
            await client.retrieve("i2is-does-not-exist")
        except kx.KeevxError as exc:
            print(f"retrieve: {type(exc).__name__} code={getattr(exc, 'code', None)}")

        # A Retry-After longer than max_retry_wait (60 s by default): raised, not slept.
        # The client still honours it: until it is over, its other submits fail at once,
        # unsent (so this client is done for the next two minutes).
        fake.inject(429, retry_after=120)
        await submit_safely(client, REQUEST)
        calls = fake.submit_calls
        await submit_safely(client, REQUEST)
        print(f"while the client is paused: {fake.submit_calls - calls} more submit calls")


if __name__ == "__main__":
    anyio.run(main)
