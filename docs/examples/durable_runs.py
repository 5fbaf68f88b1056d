# expect: resumed: 2 replayed, 1 newly submitted, 3 submits paid in all
"""A durable run: a batch with a journal, run again, nothing paid twice.

The first run generates two rows. The second run of the same input, with a row added
(as after a crash, or when the input grew), replays those two from the journal with no
network call and submits only the row never sent.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx


# --8<-- [start:run]
async def run(client: kx.AsyncKeevx, rows: dict[str, str], journal: Path) -> list[kx.Task]:
    """Generate one image per row (row ID -> prompt); run it again to resume."""
    requests = [kx.ImageRequest(prompt, custom_id=row) for row, prompt in rows.items()]
    finished = []
    async with client.batch(requests, journal=journal) as batch:
        async for task in batch:
            error = task.exception()
            if isinstance(error, kx.UnknownOutcomeError):
                print(f"{task.custom_id}: submitted before a crash, outcome unknown")
            elif error is not None:
                print(f"{task.custom_id}: failed: {error}")
            finished.append(task)
    return finished


# --8<-- [end:run]


async def main() -> None:
    rows = {"row-1": "a snowy owl", "row-2": "a tide pool"}
    async with FakeKeevx() as fake, fake.client() as client:
        with tempfile.TemporaryDirectory() as directory:
            journal = Path(directory) / "run.db"
            first = await run(client, rows, journal)
            print(f"first run: {len(first)} results")
            rows["row-3"] = "a bonsai tree"  # a line added to the input
            again = await run(client, rows, journal)
            replayed = sum(task.replayed for task in again)
            # --8<-- [start:inspect]
            summary = await kx.SQLiteJournal(journal).summary()
            print(summary)  # {'sending': 0, 'submitted': 3, ..., 'succeeded': 3, ...}
            async for result in kx.SQLiteJournal(journal).results():
                print(result.custom_id, result.task_id, result.url)
            # --8<-- [end:inspect]
    print(
        f"resumed: {replayed} replayed, {len(again) - replayed} newly submitted, "
        f"{fake.accepted_submits} submits paid in all"
    )


if __name__ == "__main__":
    anyio.run(main)
