"""The ``keevx`` command line's arguments: argparse, with rich-argparse for coloured help.

argparse is the standard library's, already behind ``demo`` and ``python -m
keevx_async.testing``; rich-argparse only formats its help, so the command line needs no
second parsing framework.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Final

try:
    from rich_argparse import RawDescriptionRichHelpFormatter
except ImportError:  # pragma: no cover - without the cli extra: `demo` still runs
    RawDescriptionRichHelpFormatter = argparse.RawDescriptionHelpFormatter  # type: ignore[misc,assignment]

from .._demo import DEFAULT_CONCURRENCY, DEFAULT_REQUESTS, DEFAULT_SEED
from .._version import __version__

__all__ = ["build_parser"]

DESCRIPTION_WIDTH: Final = 88

EPILOG: Final = """\
examples:
  keevx demo                                     # the tour: no key, no network
  keevx batch prompts.csv --out results.jsonl --download images/
  keevx batch prompts.jsonl --fake --out results.jsonl   # try a file against the emulator
  keevx generate "a lighthouse at dawn" --count 2 --out images/
  keevx status i2is-0123abcd
  keevx download i2is-0123abcd --out images/
  keevx upload vase.png

The API key comes from KEEVX_API_KEY. Run the same `keevx batch` command again after a
crash or Ctrl-C: its journal (INPUT.journal.db) resumes the run without paying twice.
Exit codes: 0 every task succeeded, 1 a task failed or a line was invalid, 2 a usage
error, 130 stopped by Ctrl-C.
"""

BATCH_EPILOG: Final = """\
INPUT is .jsonl (one object per line: "prompt" plus any request field, "kind": "video"
for a video) or .csv (a header row of field names; reference_images as a JSON array or
separated by "|"). A line's custom_id is kept, else its line number is its custom_id.

examples:
  keevx batch prompts.csv --out results.jsonl --download images/
  keevx batch videos.jsonl --listen 0.0.0.0:8787 --public-url https://me.example/cb
  keevx batch prompts.jsonl --fake --out results.jsonl
"""


class _HelpFormatter(RawDescriptionRichHelpFormatter):
    """rich-argparse's colours, argparse's own words ("usage:", "options:")."""

    group_name_formatter = str
    help_markup = False  # "keevx-async[server]" is text, not rich markup
    text_markup = False


def _wrapped(text: str) -> str:
    """A description, wrapped (the raw formatter keeps the epilogs' examples as written)."""
    return textwrap.fill(text, DESCRIPTION_WIDTH)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {text!r}")
    return host, int(port)


def _client_options() -> argparse.ArgumentParser:
    """The options every command that talks to the service takes."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("service")
    group.add_argument(
        "--base-url", help="the API's base URL (default: KEEVX_BASE_URL, else api.keevx.cn)"
    )
    group.add_argument(
        "--fake",
        action="store_true",
        help="run against the built-in emulator (FakeKeevx) in-process: no key, no network",
    )
    group.add_argument(
        "--listen",
        type=_address,
        metavar="HOST:PORT",
        help="receive callbacks on this address (needs keevx-async[server])",
    )
    group.add_argument(
        "--public-url", metavar="URL", help="the URL the service calls back (with --listen)"
    )
    group.add_argument(
        "--concurrency", type=_positive, metavar="N", help="submits in flight (default 16)"
    )
    group.add_argument(
        "--per-second", type=_positive_float, metavar="R", help="submits started per second"
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help="the most seconds to wait for a task after its submit",
    )
    output = parent.add_argument_group("output")
    verbosity = output.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print the summary only")
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the SDK's log lines (retries, hints; INFO and up)",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``keevx`` (and ``python -m keevx_async``)."""
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="keevx",
        description=_wrapped(
            "Generate images and videos with the Keevx API, one or many at a time."
        ),
        epilog=EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"keevx_async {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    client = _client_options()

    batch = commands.add_parser(
        "batch",
        parents=[client],
        help="run a JSONL or CSV file of requests: progress, results, downloads, resume",
        description=_wrapped(
            "Submit every request of INPUT, stream the results into --out as they "
            "finish, and keep a journal so the same command resumes after a crash or Ctrl-C."
        ),
        epilog=BATCH_EPILOG,
        formatter_class=formatter,
    )
    batch.add_argument("input", metavar="INPUT", help="a .jsonl or .csv file of requests")
    batch.add_argument("--out", metavar="FILE", help="append one JSON line per task to FILE")
    batch.add_argument("--download", metavar="DIR", help="save every result file into DIR")
    journal = batch.add_mutually_exclusive_group()
    journal.add_argument(
        "--journal",
        metavar="FILE",
        help="the run's journal (default INPUT.journal.db; none with --fake)",
    )
    journal.add_argument(
        "--no-journal", action="store_true", help="keep no journal (a rerun starts over)"
    )
    batch.add_argument(
        "--resubmit-unknown",
        action="store_true",
        help="send again the requests whose earlier submit has an unknown outcome "
        "(they may be paid twice)",
    )

    generate = commands.add_parser(
        "generate",
        parents=[client],
        help="generate images (or a video) from one prompt and wait for them",
        description=_wrapped(
            "Submit one image request (a video request with --video), wait for its "
            "results, and print their URLs or save them into --out."
        ),
        formatter_class=formatter,
    )
    generate.add_argument("prompt", metavar="PROMPT")
    generate.add_argument(
        "--count", type=_positive, default=1, metavar="N", help="images (or videos)"
    )
    generate.add_argument(
        "--ratio", metavar="R", help="image ratio (default 9:16); with --video 16:9 or 9:16"
    )
    generate.add_argument("--quality", default="2K", metavar="Q", help="1K, 2K or 4K")
    generate.add_argument("--module", default="std", metavar="M", help="std or pro")
    generate.add_argument(
        "--ref",
        action="append",
        default=[],
        metavar="URL|PATH",
        help="a reference image (repeat for more)",
    )
    generate.add_argument("--out", metavar="DIR", help="save the files into DIR")
    video = generate.add_argument_group("video (image to video)")
    video.add_argument("--video", action="store_true", help="make a video instead")
    video.add_argument("--image", metavar="URL|PATH", help="the start frame (model V)")
    video.add_argument("--model", default="V", metavar="M", help="V or KL")
    video.add_argument("--duration", type=_positive, metavar="S", help="seconds")

    status = commands.add_parser(
        "status",
        parents=[client],
        help="look up tasks by ID",
        description=_wrapped("Look up each task's state and print it as a table."),
        formatter_class=formatter,
    )
    status.add_argument("task_ids", nargs="+", metavar="TASK_ID")

    download = commands.add_parser(
        "download",
        parents=[client],
        help="save the result files of finished tasks",
        description=_wrapped("Look up each task, then save its file into --out."),
        formatter_class=formatter,
    )
    download.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    download.add_argument("--out", required=True, metavar="DIR", help="the directory")

    upload = commands.add_parser(
        "upload",
        parents=[client],
        help="upload local images; prints their URLs",
        description=_wrapped("Upload each file and print its URL (usable as a reference image)."),
        formatter_class=formatter,
    )
    upload.add_argument("files", nargs="+", metavar="FILE")

    demo = commands.add_parser(
        "demo",
        help="run a batch against a local emulator of the service (no API key, no network)",
        description=_wrapped(
            "Submit a seeded batch of requests to FakeKeevx on 127.0.0.1, receive "
            "its callbacks on a second loopback port, and print what became of every request."
        ),
        formatter_class=formatter,
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
