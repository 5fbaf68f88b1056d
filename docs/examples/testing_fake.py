# expect: 8 submit calls for 6 requests
"""FakeKeevx's fault knobs: early, duplicate, shuffled and lost callbacks, and what the
client makes of them.
"""

from __future__ import annotations

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx


# --8<-- [start:hard_cases]
async def hard_cases() -> None:
    fake = FakeKeevx(
        early_callbacks=True,  # every callback arrives before the submit reply
        duplicate_rate=1.0,  # ... and twice
        shuffle=True,  # ... and not in task order
        seed=42,  # the same fates on every run
    )
    async with fake, fake.client() as client:
        images = await client.generate(kx.ImageRequest("a maze", generate_count=4))
        await fake.wait_idle()  # every callback delivered: no sleeping in tests
        print(f"images in task order: {[image.index for image in images]}")
        print(f"fake: {fake.submit_calls} submit, {fake.callbacks_sent} callbacks sent")
        stats = client.stats
        print(f"client: {stats.callbacks_buffered} buffered, {stats.callbacks_duplicate} dup")


# --8<-- [end:hard_cases]


# --8<-- [start:lost]
async def lost_callbacks() -> None:
    fake = FakeKeevx(lost_rate=1.0)  # no callback ever arrives
    async with fake, fake.client() as client:
        submission = await client.submit(kx.ImageRequest("a message in a bottle"))
        task = submission.tasks[0]
        try:
            await task.wait(timeout=0.2)
        except kx.TaskTimeoutError:
            print("no callback within 0.2 s; the task stays pending")
        await fake.wait_idle()  # the task has finished on the service's side
        assert task.task_id is not None
        snapshot = await client.retrieve(task.task_id)  # the GET endpoint
        print(f"retrieve: {snapshot.status}, done={snapshot.done}")
        image = await task  # a finished snapshot resolves the waiting task
        print(f"resolved by lookup: {image.image_url}")


# --8<-- [end:lost]


# --8<-- [start:faults]
async def scripted_faults() -> None:
    fake = FakeKeevx(latency=0.01, fail_rate=0.5, seed=2)
    fake.inject(503, retry_after=0.1, times=2)  # two throttled replies, then normal ones
    async with fake, fake.client() as client:
        results = await client.generate_many(["a"] * 3 + ["b"] * 3)
        failed = sum(isinstance(outcomes[0], kx.TaskFailedError) for outcomes in results)
        print(f"{fake.submit_calls} submit calls for 6 requests, {failed} tasks failed")
        print(f"at most {fake.max_in_flight} submits in flight at once")


# --8<-- [end:faults]


# --8<-- [start:waiting]
async def waiting_without_sleeping() -> None:
    fake = FakeKeevx(complete_after=(0.01, 0.05))
    async with fake, fake.client() as client, anyio.create_task_group() as tg:
        # Code under test that works in the background, here a bulk run of three prompts.
        tg.start_soon(client.generate_many, ["a fox", "a kite", "a maze"])
        await fake.wait_for_submits(3)  # the three requests have created their tasks
        print(f"the service has {len(fake.tasks)} tasks")
        await fake.wait_for_callbacks(3)  # ... and the client has taken all three results
        print(f"{fake.callbacks_sent} callbacks delivered, {client.stats.pending} pending")


# --8<-- [end:waiting]


async def main() -> None:
    await hard_cases()
    await lost_callbacks()
    await scripted_faults()
    await waiting_without_sleeping()


if __name__ == "__main__":
    anyio.run(main)
