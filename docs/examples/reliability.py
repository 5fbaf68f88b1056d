# expect: no callback URL: 6 of 6 images by lookup
"""Reliability: lost callbacks recovered by status lookups, and a script with no receiver.

Run it with ``python docs/examples/reliability.py``: no API key, no network. The emulator
loses a third of its callbacks; the client's sweeper looks those tasks up.
"""

from __future__ import annotations

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx


# --8<-- [start:safety-net]
async def with_lost_callbacks(fake: FakeKeevx) -> None:
    fake.lost_rate = 1 / 3  # the service never calls back for a third of the tasks
    async with fake.client(reconcile_after=0.5, reconcile_per_second=20) as client:
        prompts = [f"a paper boat, variant {n}" for n in range(12)]
        outcomes = await client.generate_many(prompts, timeout=60)
        images = sum(isinstance(o, kx.ImageResult) for group in outcomes for o in group)
        stats = client.stats
        print(
            f"{images} images: {stats.resolved_by_callback} by callback, "
            f"{stats.resolved_by_lookup} by lookup ({stats.lookups} GETs)"
        )


# --8<-- [end:safety-net]


# --8<-- [start:no-receiver]
async def without_a_receiver(fake: FakeKeevx) -> None:
    # No callback_url anywhere: the client says so once in the log and looks every task
    # up, first min(reconcile_after, 2) seconds after its submit, then at doubling intervals.
    async with fake.client(callback_url=None, reconcile_after=0.5) as client:
        outcomes = await client.generate_many(["a tin robot", "a glass owl"] * 3, timeout=60)
        images = [o for group in outcomes for o in group if isinstance(o, kx.ImageResult)]
        stats = client.stats
        print(f"no callback URL: {stats.resolved_by_lookup} of {len(images)} images by lookup")


# --8<-- [end:no-receiver]


async def main() -> None:
    async with FakeKeevx(complete_after=(0.05, 0.3), seed=11) as fake:
        await with_lost_callbacks(fake)
        fake.lost_rate = 0.0
        await without_a_receiver(fake)


if __name__ == "__main__":
    anyio.run(main)
