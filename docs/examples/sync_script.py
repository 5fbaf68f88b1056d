# expect: sync script finished: 5 tasks created
"""A plain script, no ``await``: ``kx.Keevx`` generates, submits and runs a batch.

It reads ``KEEVX_API_KEY`` and ``KEEVX_BASE_URL`` from the environment. Without them it
starts FakeKeevx on 127.0.0.1 first, so ``python docs/examples/sync_script.py`` runs as
is. Against the emulator as a server of its own, in two terminals:

    python -m keevx_async.testing --port 8000
    KEEVX_API_KEY=test KEEVX_BASE_URL=http://127.0.0.1:8000 python docs/examples/sync_script.py
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

from anyio.from_thread import start_blocking_portal

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import Iterator


# --8<-- [start:script]
def main() -> None:
    # The key from KEEVX_API_KEY. No callback URL: results come from status lookups.
    with kx.Keevx() as client:
        [image] = client.generate(kx.ImageRequest("a red fox in the snow"), timeout=600)
        print(f"generated: {image.image_url}")

        # Submit now, wait later: each task is waited for without await.
        submission = client.submit(kx.ImageRequest("a lighthouse at dawn", generate_count=2))
        for task in submission.tasks:
            print(f"task {task.index} done: {task.wait(timeout=600).image_url}")

        # Many requests: a plain iterator of tasks, in the order they finish.
        with client.batch(["a koi pond", "a paper crane"], timeout=600) as batch:
            for task in batch:
                error = task.exception()
                outcome = task.result().image_url if error is None else f"failed: {error}"
                print(f"{task.request.prompt!r}: {outcome}")
        print(f"sync script finished: {client.stats.tasks_created} tasks created")


# --8<-- [end:script]


@contextmanager
def fake_service() -> Iterator[None]:
    """FakeKeevx on a loopback port, on an event loop in a thread: the service's stand-in."""
    fake = FakeKeevx()
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(fake),
        portal.wrap_async_context_manager(fake.serve()) as server,
    ):
        os.environ.update(KEEVX_API_KEY="test", KEEVX_BASE_URL=server.url)
        yield


if __name__ == "__main__":
    if os.environ.get("KEEVX_BASE_URL"):
        main()  # the service (or an emulator) named by the environment
    else:
        with fake_service():
            main()
