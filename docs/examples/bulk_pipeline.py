# expect: all 20 of 20 requests accounted for
"""A bulk pipeline: a lazy async source, live progress, and failures kept apart.

Twenty prompts stream in from an async generator. One request is refused by the service,
one prompt is rejected by moderation, and a few callbacks are lost; each of those is
reported on its own task while every other image arrives.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

PROMPTS = 20


async def read_prompts() -> AsyncIterator[kx.ImageRequest]:
    """Stands in for a database cursor, a queue or a file: read only as slots free up."""
    for n in range(PROMPTS):
        prompt = "a forbidden castle" if n == 7 else f"a lantern festival, variation {n}"
        yield kx.ImageRequest(prompt, image_quality="1K")


# --8<-- [start:pipeline]
async def run_pipeline(client: kx.AsyncKeevx, image_urls: list[str]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    async with client.batch(read_prompts(), concurrency=4, timeout=1.0) as batch:
        async for task in batch:
            error = task.exception()
            if error is None:
                outcomes["succeeded"] += 1
                image_urls.append(task.result().image_url)  # the service keeps it ~7 days
            elif task.task_id is None:  # the submit itself failed: nothing was created
                outcomes[f"not submitted ({type(error).__name__})"] += 1
            else:  # TaskFailedError or TaskTimeoutError
                outcomes[type(error).__name__] += 1
            print(
                f"read={batch.requests_read} submitted={batch.submitted} "
                f"submit_failed={batch.submit_failed} in_flight={batch.in_flight} "
                f"yielded={batch.yielded}"
            )
    return outcomes


# --8<-- [end:pipeline]


async def main() -> None:
    fake = FakeKeevx(
        complete_after=(0.01, 0.1),  # callbacks arrive out of order
        fail_if=lambda prompt: "forbidden" in prompt,
        lost_rate=0.1,  # some callbacks never come: those tasks time out
        seed=1,
    )
    async with fake, fake.client() as client:
        fake.inject(400)  # the next submit is refused (a 4xx: nothing was created)
        image_urls: list[str] = []
        outcomes = await run_pipeline(client, image_urls)
    for outcome, count in sorted(outcomes.items()):
        print(f"{outcome}: {count}")
    print(f"{len(image_urls)} image URLs to download")
    print(f"all {sum(outcomes.values())} of {PROMPTS} requests accounted for")


if __name__ == "__main__":
    anyio.run(main)
