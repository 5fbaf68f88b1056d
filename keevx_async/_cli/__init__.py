"""``keevx``: the command line (console script ``keevx``, also ``python -m keevx_async``).

Needs the ``keevx-async[cli]`` extra (rich, rich-argparse) for every command but ``demo``.
Exit codes: 0 every task succeeded, 1 a task failed or an input line was invalid, 2 a
usage error (one line saying what to do, never a traceback), 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import TYPE_CHECKING, Final

import anyio

from .._demo import run_demo
from .._exceptions import (
    AuthenticationError,
    InvalidRequestError,
    JournalError,
    KeevxError,
    TransportError,
)
from ._parser import build_parser

try:
    from rich.console import Console
    from rich.logging import RichHandler

    from ._commands import COMMANDS
    from ._run import Screen, UserError
except ImportError as error:  # pragma: no cover - the extra is part of the test environment
    _MISSING: ImportError | None = error
else:
    _MISSING = None

if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

__all__ = ["main"]

EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


def _fail(message: str) -> int:
    sys.stderr.write(f"keevx: error: {message}\n")
    return EXIT_USAGE


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a task group wrapped (a user's mistake raised in a task), else the
    group itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit code.

    Without a command it prints the help to stderr and returns 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "demo":
        demo = functools.partial(
            run_demo,
            requests=args.requests,
            seed=args.seed,
            concurrency=args.concurrency,
            callbacks=args.callbacks,
            download=args.download,
        )
        return anyio.run(demo, backend=args.backend)
    if _MISSING is not None:  # pragma: no cover - the extra is part of the test environment
        return _fail(f"{_MISSING}: this command needs pip install 'keevx-async[cli]'")
    return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    console = Console()
    screen = Screen(console=console, live=console.is_terminal and not args.quiet, quiet=args.quiet)
    logger = logging.getLogger("keevx_async")
    handler = RichHandler(console=Console(stderr=True), show_path=False)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    verbose = args.verbose
    # Retries and hints are the display's to show (429 pauses) or -v's (the log lines).
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    command = COMMANDS[args.command]
    try:
        try:
            return anyio.run(command, args, screen, backend="asyncio")
        except BaseExceptionGroup as group:
            raise _single(group) from None
    except UserError as error:
        return _fail(str(error))
    except AuthenticationError as error:
        return _fail(f"the service refused the API key ({error.status_code}): check KEEVX_API_KEY")
    except TransportError as error:
        return _fail(f"cannot reach the service ({error}): check --base-url and the network")
    except JournalError as error:
        return _fail(f"{error} (another run may be using the journal: wait, or pass --journal)")
    except InvalidRequestError as error:
        return _fail(str(error))
    except KeevxError as error:
        return _fail(f"{type(error).__name__}: {error}")
    except KeyboardInterrupt:
        sys.stderr.write("keevx: interrupted\n")
        return EXIT_INTERRUPTED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
