"""Run [`FakeKeevx`][keevx_async.testing.FakeKeevx] as a standalone loopback HTTP server.

``python -m keevx_async.testing --port 8000`` serves the emulator until Ctrl-C or SIGTERM.
Once it accepts connections it prints one line, ``FakeKeevx listening on <url>``, so a
parent process can wait for it and learn the port (``--port 0`` picks a free one). Its
file host serves every result URL (``{url}/files/...``) and every uploaded file too.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from typing import TYPE_CHECKING, TextIO

import anyio

from keevx_async.testing._fake import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import Sequence


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _seconds_or_range(text: str) -> float | tuple[float, float]:
    low, comma, high = text.partition(",")
    if not comma:
        return _seconds(text)
    bounds = (_seconds(low), _seconds(high))
    if bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"range must be LOW,HIGH with LOW <= HIGH, got {text}")
    return bounds


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m keevx_async.testing``."""
    parser = argparse.ArgumentParser(
        prog="python -m keevx_async.testing",
        description="Run FakeKeevx, the Keevx service emulator, on a loopback HTTP server "
        "until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on; 0 picks one")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--api-key", help="the only API key accepted (default: any bearer token is accepted)"
    )
    parser.add_argument(
        "--latency", type=_seconds, default=0.0, help="seconds before each reply (default 0)"
    )
    parser.add_argument(
        "--complete-after",
        type=_seconds_or_range,
        default=0.01,
        metavar="S|LOW,HIGH",
        help="seconds until a task finishes, or a uniform random range (default 0.01)",
    )
    parser.add_argument("--fail-rate", type=_fraction, default=0.0, help="fraction of failed tasks")
    parser.add_argument(
        "--lost-rate", type=_fraction, default=0.0, help="fraction of lost callbacks"
    )
    parser.add_argument(
        "--duplicate-rate", type=_fraction, default=0.0, help="fraction of callbacks sent twice"
    )
    parser.add_argument(
        "--early-callbacks",
        action="store_true",
        help="finish tasks and call them back before the submit reply",
    )
    parser.add_argument(
        "--shuffle", action="store_true", help="call back a submission's tasks out of order"
    )
    parser.add_argument("--seed", type=int, help="seed for reproducible runs")
    parser.add_argument(
        "--file-size",
        type=_positive_int,
        help="bytes of each result PNG the file host serves (default: a tiny one)",
    )
    parser.add_argument(
        "--file-delay",
        type=_seconds,
        default=0.0,
        help="seconds each file body takes to send (default 0)",
    )
    parser.add_argument(
        "--file-ttl",
        type=_seconds,
        help="seconds a result file is served after its task finished (default: forever)",
    )
    parser.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop to run on"
    )
    return parser


def fake_from_args(args: argparse.Namespace) -> FakeKeevx:
    """The emulator configured by parsed command-line arguments."""
    return FakeKeevx(
        api_key=args.api_key,
        latency=args.latency,
        complete_after=args.complete_after,
        fail_rate=args.fail_rate,
        lost_rate=args.lost_rate,
        duplicate_rate=args.duplicate_rate,
        early_callbacks=args.early_callbacks,
        shuffle=args.shuffle,
        seed=args.seed,
        file_size=args.file_size,
        file_delay=args.file_delay,
        file_ttl=args.file_ttl,
    )


async def serve_until_signalled(
    fake: FakeKeevx, *, host: str, port: int, out: TextIO | None = None
) -> None:
    """Serve ``fake`` on ``host:port``, announce it on ``out``, return on SIGINT/SIGTERM."""
    out = sys.stdout if out is None else out
    async with fake, fake.serve(host=host, port=port) as server:
        # Listening for signals before announcing: whoever reacts to the line by sending
        # SIGTERM must find it handled, never the default "terminate at once".
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            out.write(f"FakeKeevx listening on {server.url}\n")
            out.flush()
            await anext(signals)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), serve until signalled, return 0."""
    args = build_parser().parse_args(argv)
    serve = functools.partial(
        serve_until_signalled, fake_from_args(args), host=args.host, port=args.port
    )
    anyio.run(serve, backend=args.backend)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    raise SystemExit(main())
