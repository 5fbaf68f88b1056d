# expect: worker B: 3 callback(s) unclaimed; worker A: 3 of 3 images, 3 by lookup
"""Troubleshooting: what the log says when callbacks reach the wrong worker process.

Two clients stand for two worker processes behind one callback URL, with a shared
secret but no shared router: every callback of worker A's tasks reaches worker B (as a
load balancer might send it). Worker B names the likely cause in its log; worker A's
tasks are still finished, late, by status lookups. Run it with
``python docs/examples/troubleshooting.py``: no API key, no network.
"""

from __future__ import annotations

import logging

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


async def main() -> None:
    options = {"callback_secret": "shared by both workers", "reconcile_after": 1.0}
    async with (
        FakeKeevx(seed=5) as fake,
        # A short early_callback_max_age so that the example need not wait 30 s for the
        # hint (the default keeps early callbacks 600 s and hints after 30 s).
        fake.client(deliver_callbacks=False, **options) as worker_a,
        fake.client(early_callback_max_age=1.0, **options) as worker_b,
    ):
        # Every callback goes to worker B, although worker A submitted the requests.
        images = await worker_a.generate_many(["a red kite", "a blue kite", "a green kite"])
        await anyio.sleep(1.1)  # the callbacks have waited long enough to be unusual
        unclaimed = worker_b.stats.callbacks_unclaimed
        count = sum(isinstance(image, kx.ImageResult) for group in images for image in group)
        print(
            f"worker B: {unclaimed} callback(s) unclaimed; worker A: {count} of "
            f"{len(images)} images, {worker_a.stats.resolved_by_lookup} by lookup"
        )


if __name__ == "__main__":
    anyio.run(main)
