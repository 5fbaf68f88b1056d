"""Run by tests/test_journal_crash.py in a process of its own, to be SIGKILLed: a journaled
batch against a FakeKeevx served on loopback, its callbacks received on a real server.

Usage: python journal_worker.py BASE_URL JOURNAL OUT_DIR PREFIX COUNT [KIND N] [--resubmit]

``JOURNAL`` is a SQLite file path, or ``postgres:<run>:<dsn>``. The requests are
``f"{PREFIX} {i}"`` for ``i < COUNT``, and their images are saved into ``OUT_DIR``. With
``KIND N``, the worker stops dead at the ``N``-th milestone of that kind: it prints
``KILLME`` and waits for its SIGKILL. The kinds: ``start`` (before any submit),
``submit`` (a submit request about to go out), ``reply`` (a submit reply arrived, its
body not yet read nor recorded), ``callback`` (a callback's result committed, its 200 not
yet sent), ``download`` (a result file about to be fetched).

Every task the batch yields is printed as a JSON line; ``DONE`` ends a finished run.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

import anyio
import httpx

import keevx_async as kx


class Milestones:
    """Counts milestones and stops dead at the chosen one."""

    def __init__(self, kind: str | None, n: int) -> None:
        self.kind = kind
        self.n = n
        self.seen: Counter[str] = Counter()

    async def reached(self, kind: str) -> None:
        self.seen[kind] += 1
        if kind == self.kind and self.seen[kind] == self.n:
            sys.stdout.write("KILLME\n")
            sys.stdout.flush()
            await anyio.sleep_forever()


def _journal(spec: str) -> kx.Journal | str:
    if spec.startswith("postgres:"):
        _, run, dsn = spec.split(":", 2)
        return kx.PostgresJournal(dsn, run=run)
    return spec


async def main(argv: list[str]) -> None:
    resubmit = "--resubmit" in argv
    args = [arg for arg in argv if arg != "--resubmit"]
    base_url, journal, out_dir, prefix, count = args[:5]
    milestones = Milestones(args[5], int(args[6])) if len(args) > 5 else Milestones(None, 0)

    async def on_request(request: httpx.Request) -> None:
        if request.method == "POST":
            await milestones.reached("submit")

    async def on_response(response: httpx.Response) -> None:
        if response.request.method == "POST":
            await milestones.reached("reply")

    async def on_file(request: httpx.Request) -> None:
        await milestones.reached("download")

    holder: list[kx.AsyncKeevx] = []

    async def callbacks(scope: Any, receive: Any, send: Any) -> None:
        async def answer(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                await milestones.reached("callback")
            await send(message)

        await holder[0].callback_app(scope, receive, answer)

    requests = [kx.ImageRequest(f"{prefix} {i}") for i in range(int(count))]
    await milestones.reached("start")
    with anyio.fail_after(60):
        async with (
            httpx.AsyncClient(
                event_hooks={"request": [on_request], "response": [on_response]}
            ) as http,
            httpx.AsyncClient(event_hooks={"request": [on_file]}) as files,
            kx.CallbackServer(callbacks, port=0) as server,
            kx.AsyncKeevx(
                api_key="worker-key",
                base_url=base_url,
                callback_url=server.url,
                http_client=http,
                download_client=files,
                max_retries=0,
            ) as client,
        ):
            holder.append(client)
            async with client.batch(
                requests,
                journal=_journal(journal),
                download_to=out_dir,
                resubmit_unknown=resubmit,
                concurrency=4,
            ) as batch:
                async for task in batch:
                    error = task.exception()
                    line = {
                        "task_id": task.task_id,
                        "prompt": task.request.prompt,
                        "error": None if error is None else type(error).__name__,
                        "replayed": task.replayed,
                        "path": None if error is not None else str(task.result().path),
                    }
                    sys.stdout.write(json.dumps(line) + "\n")
                    sys.stdout.flush()
    sys.stdout.write("DONE\n")
    sys.stdout.flush()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
