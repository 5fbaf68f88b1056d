"""What every ASGI piece of the SDK shares: the ASGI 3 types, the URL of a bound address,
and how long a callback in flight at shutdown gets to finish.

``callback_app``, the callback server of ``client.serve_callbacks()`` and the loopback test
server in `keevx_async.testing` all speak plain ASGI 3; they take these names from here, so
they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

__all__ = [
    "DEFAULT_SHUTDOWN_GRACE",
    "ASGIApp",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "http_url",
]

Scope = MutableMapping[str, Any]
"""An ASGI connection scope."""
Message = MutableMapping[str, Any]
"""An ASGI event (sent or received)."""
Receive = Callable[[], Awaitable[Message]]
"""The ASGI ``receive`` callable."""
Send = Callable[[Message], Awaitable[None]]
"""The ASGI ``send`` callable."""
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI 3 application."""

DEFAULT_SHUTDOWN_GRACE: Final = 5.0
"""Seconds a request still arriving when a server shuts down gets to finish."""


def http_url(host: str, port: int) -> str:
    """``http://host:port``, with an IPv6 host in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
