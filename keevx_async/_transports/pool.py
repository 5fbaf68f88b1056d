"""What the fan-out transports share: the pool's bounds and the TLS context."""

from __future__ import annotations

import ssl

import httpx

__all__ = ["pool_limits", "ssl_context"]


def ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    """The TLS context httpx itself would use for ``verify`` (its CA bundle, its defaults)."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    return httpx.create_ssl_context(verify=verify)


def pool_limits(limits: httpx.Limits) -> tuple[int, float | None]:
    connections = limits.max_connections
    if connections is None:
        raise ValueError("a fan-out transport needs a bounded pool: set max_connections")
    return connections, limits.keepalive_expiry
