# expect: quick start finished: 13 tasks created
"""Quick start: generate, submit, batch and generate_many, end to end on FakeKeevx.

Run it with ``python docs/examples/quickstart.py``: no API key, no network.
"""

from __future__ import annotations

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx


# --8<-- [start:generate]
async def generate_one(client: kx.AsyncKeevx) -> None:
    request = kx.ImageRequest("a red fox in the snow", generate_count=2, image_ratio="16:9")
    images = await client.generate(request, timeout=600)
    for image in images:  # one ImageResult per task, in task order
        print(f"image {image.index}: {image.image_url}")


# --8<-- [end:generate]


# --8<-- [start:submit]
async def submit_then_wait(client: kx.AsyncKeevx) -> None:
    submission = await client.submit(kx.ImageRequest("a lighthouse at dawn", generate_count=3))
    print(f"submitted: {len(submission.task_ids)} task IDs")
    for task in submission.tasks:
        image = await task.wait(timeout=600)  # or simply: await task
        print(f"task {task.index} done: {image.task_id}")


# --8<-- [end:submit]


# --8<-- [start:batch]
async def run_batch(client: kx.AsyncKeevx) -> None:
    prompts = [f"a watercolor of city number {n}" for n in range(5)]
    async with client.batch(prompts, concurrency=4, timeout=600) as batch:
        async for task in batch:  # in completion order
            error = task.exception()
            if error is None:
                print(f"done: {task.request.prompt!r} -> {task.result().image_url}")
            else:
                print(f"failed: {task.request.prompt!r}: {error}")
    print(f"batch: {batch.submitted} submitted, {batch.yielded} tasks finished")


# --8<-- [end:batch]


# --8<-- [start:generate_many]
async def run_generate_many(client: kx.AsyncKeevx) -> None:
    requests = [
        kx.ImageRequest("a koi pond", generate_count=2),
        kx.ImageRequest("a paper crane"),
    ]
    results = await client.generate_many(requests, timeout=600)
    for request, outcomes in zip(requests, results, strict=True):  # aligned with `requests`
        for outcome in outcomes:  # an ImageResult, or the KeevxError in its place
            if isinstance(outcome, kx.KeevxError):
                print(f"{request.prompt!r}: failed: {outcome}")
            else:
                print(f"{request.prompt!r}: image {outcome.index} {outcome.image_url}")


# --8<-- [end:generate_many]


async def main() -> None:
    # The emulator stands in for https://api.keevx.cn and calls back into the client.
    async with FakeKeevx() as fake, fake.client() as client:
        await generate_one(client)
        await submit_then_wait(client)
        await run_batch(client)
        await run_generate_many(client)
        print(f"quick start finished: {client.stats.tasks_created} tasks created")


if __name__ == "__main__":
    anyio.run(main)
