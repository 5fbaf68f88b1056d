"""A worker process of the multi-process router tests (``tests/test_router_processes.py``).

The tests start it with ``sys.executable`` as a separate process, one per worker of a web
app, and kill it with SIGKILL when they are done with it (it never exits on its own):

- ``--role receiver``: a client with a ``RedisRouter`` that receives callbacks on a real
  loopback server (``serve_callbacks``). It prints ``ready <url>`` once it listens.
- ``--role owner``: a client with a ``RedisRouter`` that submits ``--count`` prompts
  ``p0``, ``p1``, ... to the fake service and prints their task IDs as one JSON line,
  once its claims on them are recorded in Redis.

Its log (warnings and errors) goes to stderr. It refuses to run with any ``KEEVX_*``
variable in its environment: everything it uses comes from its arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import anyio

import keevx_async as kx

API_KEY = "test-key"
# Seconds the owner waits at most for its claims to reach Redis.
CLAIM_WAIT = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's options."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=("asyncio", "trio"), required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--fake-url", required=True, help="the FakeKeevx base URL")
    parser.add_argument("--port", type=int, default=0, help="the receiver's port (0: any)")
    parser.add_argument("--role", choices=("receiver", "owner"), required=True)
    parser.add_argument("--count", type=int, default=1, help="prompts the owner submits")
    parser.add_argument("--callback-url", help="the owner's callback URL")
    return parser.parse_args(argv)


def say(line: str) -> None:
    """Write one line to stdout, at once (the test waits for it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_client(args: argparse.Namespace, callback_url: str | None = None) -> kx.AsyncKeevx:
    """A client of the fake service whose callbacks are routed through Redis."""
    return kx.AsyncKeevx(
        api_key=API_KEY,
        base_url=args.fake_url,
        callback_url=callback_url,
        callback_secret=args.secret,
        router=kx.RedisRouter(args.redis_url, prefix=args.prefix),
        reconcile_after=None,
    )


async def receive(args: argparse.Namespace) -> None:
    """Receive callbacks on a loopback port until killed."""
    async with (
        make_client(args) as client,
        client.serve_callbacks("127.0.0.1", args.port) as server,
    ):
        say(f"ready {server.url}")
        await anyio.sleep_forever()


async def own(args: argparse.Namespace) -> None:
    """Submit ``--count`` prompts, print their task IDs, then wait until killed."""
    async with make_client(args, args.callback_url) as client:
        task_ids: list[str] = []
        for number in range(args.count):
            submission = await client.submit(kx.ImageRequest(f"p{number}"))
            task_ids.extend(submission.task_ids)
        # A submit returns once its claims are in Redis, or after the router's timeout:
        # print only once Redis holds every one, so that a kill right after the line
        # leaves them (and their requests) recorded.
        with anyio.fail_after(CLAIM_WAIT):
            for task_id in task_ids:
                while True:
                    record = await client.router.find(task_id)
                    if record is not None and record.request is not None:
                        break
                    await anyio.sleep(0.01)
        say(json.dumps({"task_ids": task_ids}))
        await anyio.sleep_forever()


def main(argv: list[str] | None = None) -> int:
    """Run the worker; it only returns when it cannot start."""
    args = parse_args(argv)
    inherited = sorted(name for name in os.environ if name.startswith("KEEVX_"))
    if inherited:
        sys.stderr.write(f"router_worker: refusing to run with {', '.join(inherited)} set\n")
        return 2
    if args.role == "owner" and not args.callback_url:
        sys.stderr.write("router_worker: --role owner needs --callback-url\n")
        return 2
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    anyio.run(receive if args.role == "receiver" else own, args, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
