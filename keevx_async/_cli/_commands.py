"""The ``keevx`` commands: each opens a client as the options say and does one job.

`open_client` builds the client: against the built-in emulator with ``--fake``, with a
callback receiver with ``--listen``, else results come by status lookups (said once at
the start). The commands raise `UserError` for a user's mistake; ``main`` prints it as
one line and exits with 2.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import anyio
from rich.table import Table

from .._client import AsyncKeevx
from .._exceptions import APIError, AuthenticationError, KeevxError, TransportError
from .._kinds import VideoRequest
from .._models import ImageRequest
from .._reconcile import RECHECK_BASE
from ..testing import FakeKeevx
from ._run import BatchOptions, Screen, UserError, describe_error, run_batch

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["COMMANDS", "open_client"]

FAKE_COMPLETE_AFTER: Final = (0.01, 0.05)
"""Seconds the emulator (``--fake``) takes to finish an image task."""
JOURNAL_SUFFIX: Final = ".journal.db"


def _note(screen: Screen, text: str) -> None:
    if not screen.quiet:
        screen.console.print(text, style="dim", highlight=False, soft_wrap=True)


@asynccontextmanager
async def open_client(args: argparse.Namespace, screen: Screen) -> AsyncIterator[AsyncKeevx]:
    """The client the options ask for, open for the block."""
    options: dict[str, Any] = {"max_per_second": args.per_second}
    if args.concurrency is not None:
        options["max_concurrency"] = args.concurrency
    if args.fake:
        _note(screen, "--fake: the built-in emulator (FakeKeevx) answers, in-process")
        async with (
            FakeKeevx(complete_after=FAKE_COMPLETE_AFTER) as fake,
            fake.client(**options) as client,
        ):
            yield client
        return
    api_key = os.environ.get("KEEVX_API_KEY")
    if not api_key:
        raise UserError("set KEEVX_API_KEY to your API key (or try the command with --fake)")
    if args.public_url is not None and args.listen is None:
        raise UserError("--public-url needs --listen HOST:PORT (the address to receive on)")
    try:
        client = AsyncKeevx(api_key=api_key, base_url=args.base_url, **options)
    except KeevxError as error:
        raise UserError(str(error)) from None
    async with client:
        if args.listen is not None:
            host, port = args.listen
            try:
                server = client.serve_callbacks(host, port, public_url=args.public_url)
                async with server:
                    _note(screen, f"callbacks: listening on {host}:{port}, sent to {server.url}")
                    yield client
            except ImportError:
                raise UserError(
                    "--listen needs the server extra: pip install 'keevx-async[server]'"
                ) from None
            except OSError as error:
                raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None
            return
        if client.callback_url is None:
            _note(
                screen,
                "no callback URL: results arrive by status lookups, the first about "
                f"{RECHECK_BASE:g} s after each submit, then at doubling intervals "
                "(--listen HOST:PORT --public-url URL receives callbacks instead)",
            )
        yield client


async def batch(args: argparse.Namespace, screen: Screen) -> int:
    """``keevx batch INPUT``."""
    source = Path(args.input)
    journal: Path | None
    if args.no_journal:
        journal = None
    elif args.journal is not None:
        journal = Path(args.journal)
    elif args.fake:
        journal = None  # the emulator forgets its tasks when the command ends
    else:
        journal = source.with_name(source.name + JOURNAL_SUFFIX)
    options = BatchOptions(
        input=source,
        out=None if args.out is None else Path(args.out),
        download=None if args.download is None else Path(args.download),
        journal=journal,
        concurrency=args.concurrency,
        timeout=args.timeout,
        resubmit_unknown=args.resubmit_unknown,
    )
    async with open_client(args, screen) as client:
        return await run_batch(client, options, screen)


def _reference(text: str) -> str | Path:
    return text if text.startswith(("http://", "https://")) else Path(text)


async def generate(args: argparse.Namespace, screen: Screen) -> int:
    """``keevx generate PROMPT``."""
    references = [_reference(ref) for ref in args.ref]
    request: ImageRequest | VideoRequest
    try:
        if args.video:
            request = VideoRequest(
                args.prompt,
                model=args.model,
                image_url=None if args.image is None else _reference(args.image),
                reference_images=references,
                aspect_ratio=args.ratio or "16:9",
                duration=args.duration,
                generate_count=args.count,
            )
        else:
            request = ImageRequest(
                args.prompt,
                generate_count=args.count,
                image_ratio=args.ratio or "9:16",
                image_quality=args.quality,
                module=args.module,
                reference_images=references,
            )
    except KeevxError as error:
        raise UserError(str(error)) from None
    async with open_client(args, screen) as client:
        submission = await client.submit(request)
        code = 0
        for task in submission.tasks:
            try:
                result = await task.wait(timeout=args.timeout)
            except KeevxError as error:
                screen.console.print(
                    f"{task.task_id}  {describe_error(error)}", highlight=False, soft_wrap=True
                )
                code = 1
                continue
            if args.out is None:
                screen.console.print(
                    f"{task.task_id}  {result.url}", highlight=False, soft_wrap=True
                )
            else:
                path = await client.download(result, Path(args.out))
                screen.console.print(f"{task.task_id}  {path}", highlight=False, soft_wrap=True)
        return code


async def status(args: argparse.Namespace, screen: Screen) -> int:
    """``keevx status TASK_ID...``."""
    table = Table("task ID", "status", "URL", "error")
    code = 0
    async with open_client(args, screen) as client:
        for task_id in args.task_ids:
            try:
                snapshot = await client.retrieve(task_id)
            except AuthenticationError:
                raise
            except APIError as error:
                table.add_row(task_id, "-", "", describe_error(error))
                code = 1
                continue
            table.add_row(task_id, snapshot.status, snapshot.url, snapshot.error_message)
            code = code or int(snapshot.status != "SUCCEEDED")
    screen.console.print(table)
    return code


async def download(args: argparse.Namespace, screen: Screen) -> int:
    """``keevx download TASK_ID... --out DIR``."""
    out = Path(args.out)
    code = 0
    async with open_client(args, screen) as client:
        for task_id in args.task_ids:
            try:
                snapshot = await client.retrieve(task_id)
                url = snapshot.url
                if snapshot.status != "SUCCEEDED" or not url:
                    screen.console.print(
                        f"{task_id}  not downloadable: {snapshot.status}", soft_wrap=True
                    )
                    code = 1
                    continue
                suffix = PurePosixPath(urlsplit(url).path).suffix
                dest = out / f"{task_id}{suffix}" if suffix else out
                await anyio.Path(out).mkdir(parents=True, exist_ok=True)
                path = await client.download(url, dest)
            except AuthenticationError:
                raise
            except APIError as error:
                screen.console.print(
                    f"{task_id}  {describe_error(error)}", highlight=False, soft_wrap=True
                )
                code = 1
                continue
            screen.console.print(f"{task_id}  {path}", highlight=False, soft_wrap=True)
    return code


async def upload(args: argparse.Namespace, screen: Screen) -> int:
    """``keevx upload FILE...``."""
    async with open_client(args, screen) as client:
        for name in args.files:
            try:
                uploaded = await client.upload(Path(name))
            except (APIError, TransportError):
                raise
            except KeevxError as error:  # a missing or unusable file
                raise UserError(f"{name}: {error}") from None
            screen.console.print(f"{name}  {uploaded.url}", highlight=False, soft_wrap=True)
    return 0


COMMANDS: Final[dict[str, Callable[[argparse.Namespace, Screen], Awaitable[int]]]] = {
    "batch": batch,
    "generate": generate,
    "status": status,
    "download": download,
    "upload": upload,
}
