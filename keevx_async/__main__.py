"""``python -m keevx_async``: the package's command line (``demo``: see ``_demo``)."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import TYPE_CHECKING

import anyio

from ._demo import DEFAULT_CONCURRENCY, DEFAULT_REQUESTS, DEFAULT_SEED, run_demo
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m keevx_async``."""
    parser = argparse.ArgumentParser(
        prog="python -m keevx_async",
        description="keevx_async, the asyncio/trio SDK of the Keevx image generation API.",
    )
    parser.add_argument("--version", action="version", version=f"keevx_async {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a batch against a local emulator of the service (no API key, no network)",
        description="Submit a seeded batch of requests to FakeKeevx on 127.0.0.1, receive "
        "its callbacks on a second loopback port, and print what became of every request.",
    )
    demo.add_argument(
        "--requests", type=_positive, default=DEFAULT_REQUESTS, help="requests to submit"
    )
    demo.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the run")
    demo.add_argument(
        "--concurrency", type=_positive, default=DEFAULT_CONCURRENCY, help="submits in flight"
    )
    demo.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop to run on"
    )
    demo.add_argument(
        "--no-callbacks",
        dest="callbacks",
        action="store_false",
        help="run with no callback URL (as a script with no public address): every result "
        "comes from status lookups",
    )
    demo.add_argument(
        "--download",
        metavar="DIR",
        help="save every image into DIR as it finishes (fetched from the emulator's file host)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit code.

    Without a command it prints the help to stderr and returns 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    demo = functools.partial(
        run_demo,
        requests=args.requests,
        seed=args.seed,
        concurrency=args.concurrency,
        callbacks=args.callbacks,
        download=args.download,
    )
    return anyio.run(demo, backend=args.backend)


if __name__ == "__main__":  # pragma: no cover - run through a subprocess
    raise SystemExit(main())
