"""Callback tokens: how the SDK tells its own callbacks from forged ones.

The service does not sign callbacks, so each submission gets an unguessable token in the
``callback_url`` it sends. A token is ``<submission id>.<mac>``: a random submission ID and
an HMAC-SHA256 of it under the client's secret. Any process holding the secret can check
a token before the submit reply arrives (nothing to look up), and the registry then binds
the submission ID to the task IDs the reply brings, so a token only ever resolves the
tasks of its own submission.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, urlsplit, urlunsplit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._types import CallbackTokenIn

__all__ = ["TOKEN_PARAM", "CallbackSigner", "attach_token", "token_from_target", "token_from_url"]

TOKEN_PARAM: Final = "keevx_token"
"""The query parameter that carries the token with ``callback_token_in="query"``."""
_DOMAIN: Final = b"keevx-callback-token-v1:"
_MAC_BYTES: Final = 16


def _as_key(secret: object) -> bytes:
    if isinstance(secret, str):
        key = secret.encode()
    elif isinstance(secret, (bytes, bytearray)):
        key = bytes(secret)
    else:
        raise TypeError(f"a callback secret must be str or bytes; got {type(secret).__name__}")
    if not key:
        raise ValueError("callback_secret must not be empty")
    return key


class CallbackSigner:
    """Issues and verifies callback tokens under one or more secrets.

    The first secret signs; every secret verifies, so a secret can be rotated by putting
    the new one first while the old one still verifies callbacks already in flight.
    """

    __slots__ = ("_keys",)

    def __init__(self, secret: str | bytes | Sequence[str | bytes] | None) -> None:
        if secret is None:
            keys = [secrets.token_bytes(32)]
        elif isinstance(secret, (str, bytes, bytearray)):
            keys = [_as_key(secret)]
        else:
            keys = [_as_key(s) for s in secret]
            if not keys:
                raise ValueError("callback_secret must hold at least one secret")
        self._keys: tuple[bytes, ...] = tuple(keys)

    def _mac(self, key: bytes, submission_id: str) -> str:
        digest = hmac.new(key, _DOMAIN + submission_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:_MAC_BYTES]).rstrip(b"=").decode()

    def issue(self) -> tuple[str, str]:
        """A fresh ``(submission_id, token)`` pair."""
        submission_id = secrets.token_urlsafe(12)
        return submission_id, f"{submission_id}.{self._mac(self._keys[0], submission_id)}"

    def verify(self, token: str | None) -> str | None:
        """The submission ID a valid token was issued for, or ``None``.

        Compares in constant time against every secret.
        """
        # Query values arrive percent-decoded: anything at all can show up here.
        if not token or not token.isascii():
            return None
        submission_id, dot, mac = token.partition(".")
        if not dot or not submission_id or not mac:
            return None
        valid = False
        for key in self._keys:
            # No early exit: the time taken does not tell which secret matched.
            valid |= hmac.compare_digest(self._mac(key, submission_id), mac)
        return submission_id if valid else None


def attach_token(url: str, token: str, token_in: CallbackTokenIn) -> str:
    """``url`` with ``token`` added: as a query parameter, or as the last path segment.

    The user's own query string is kept as it was.
    """
    parts = urlsplit(url)
    if token_in == "path":
        path = parts.path.rstrip("/") + "/" + token
        return urlunsplit(parts._replace(path=path))
    query = f"{parts.query}&{TOKEN_PARAM}={token}" if parts.query else f"{TOKEN_PARAM}={token}"
    return urlunsplit(parts._replace(query=query))


def token_from_target(path: str, query: str) -> str | None:
    """The token in a request target: the query parameter if present, else the last
    path segment (a wrong guess simply fails verification)."""
    if query:
        for name, value in reversed(parse_qsl(query, keep_blank_values=True)):
            if name == TOKEN_PARAM:
                return value
    segment = path.rstrip("/").rpartition("/")[2]
    return segment or None


def token_from_url(url: str) -> str | None:
    """The token in a full callback URL (see `token_from_target`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return token_from_target(parts.path, parts.query)
