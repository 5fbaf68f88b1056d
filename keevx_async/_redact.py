"""Keeping callback tokens out of logs.

A callback token in the URL authenticates callbacks; a server's access log that prints
``POST /keevx/callback?keevx_token=...`` hands it to anyone who reads the log.
`redact_callback_tokens` installs a `logging.Filter` on the access loggers of uvicorn,
gunicorn and hypercorn (or any you name) that replaces every token in a record's message
and arguments with ``<redacted>`` before any handler formats it.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Final

from ._tokens import TOKEN_PARAM

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["ACCESS_LOGGERS", "CallbackTokenFilter", "redact_callback_tokens"]

ACCESS_LOGGERS: Final = (
    "uvicorn.access",
    "gunicorn.access",
    "hypercorn.access",
    "aiohttp.access",
)
"""The access loggers of the servers the recipes use."""

REDACTED: Final = "<redacted>"
# The query parameter, whatever its value; and a token anywhere else (a path segment, a
# bare argument): a submission ID (16 URL-safe characters), a dot, a MAC (22), as
# CallbackSigner issues them. A dot that a proxy percent-encoded is matched too.
_QUERY_TOKEN: Final = re.compile(rf"({TOKEN_PARAM}=)[^&\s\"']*")
_PATH_TOKEN: Final = re.compile(
    r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{16}(?:\.|%2[Ee])[A-Za-z0-9_-]{22}(?![A-Za-z0-9_-])"
)


def redact(text: str) -> str:
    """``text`` with every callback token in it replaced by ``<redacted>``."""
    if TOKEN_PARAM in text:
        text = _QUERY_TOKEN.sub(rf"\g<1>{REDACTED}", text)
    return _PATH_TOKEN.sub(REDACTED, text)


class CallbackTokenFilter(logging.Filter):
    """Replaces callback tokens in a record's message and string arguments; drops
    nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always keep it."""
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args.items()}
        return True


def redact_callback_tokens(loggers: Iterable[str] = ACCESS_LOGGERS) -> CallbackTokenFilter:
    """Keep callback tokens out of these loggers' records (default: the access loggers
    of uvicorn, gunicorn, hypercorn and aiohttp). Safe to call more than once.

    ```python
    import keevx_async as kx

    kx.redact_callback_tokens()  # before the server starts logging
    ```

    Returns:
        the filter, installed on each named logger.
    """
    names = [loggers] if isinstance(loggers, str) else list(loggers)
    installed = _INSTALLED
    for name in names:
        target = logging.getLogger(name)
        if not any(isinstance(f, CallbackTokenFilter) for f in target.filters):
            target.addFilter(installed)
    return installed


_INSTALLED: Final = CallbackTokenFilter()
