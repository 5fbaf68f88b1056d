"""Callback tokens: how the SDK tells its own callbacks from forged ones.

The service does not sign callbacks, so each submission gets an unguessable token in the
``callback_url`` it sends. A token is ``<submission id>.<mac>``: a random submission ID and
an HMAC-SHA256 of it under the client's secret. Any process holding the secret can check
a token before the submit reply arrives (nothing to look up), and the registry then binds
the submission ID to the task IDs the reply brings, so a token only ever resolves the
tasks of its own submission.
"""

from __future__ import annotations

import binascii
import hmac
import re
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._types import CallbackTokenIn

__all__ = [
    "TOKEN_PARAM",
    "CallbackSigner",
    "attach_token",
    "looks_issued",
    "token_from_target",
    "token_from_url",
]

TOKEN_PARAM: Final = "keevx_token"
"""The query parameter that carries the token with ``callback_token_in="query"``."""
_DOMAIN: Final = b"keevx-callback-token-v1:"
_MAC_BYTES: Final = 16
_MAC_CHARS: Final = 22  # _MAC_BYTES in unpadded base64
_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
# The URL shape attach_token produces: the token is the last query parameter, nothing
# after it, in characters that need no decoding. Anything else takes the full parse.
_TRAILING_TOKEN: Final = re.compile(rf"[?&]{TOKEN_PARAM}=([A-Za-z0-9_.-]+)\Z")
DEFAULT_VERIFIED_CACHE: Final = 100_000


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

    A bounded cache keeps the MAC of each submission ID issued or verified lately, so
    the callbacks of a submission cost one HMAC at most, and those of submissions issued
    in this process none. A cached MAC is still compared in constant time, and one that
    does not match is checked in full: the cache changes the cost, never the answer.

    Args:
        secret: the signing secret, or several (the first signs); ``None`` for a random one.
        cache_size: how many submission IDs the cache holds (the oldest go first); ``0``
            turns it off.
    """

    __slots__ = ("_cache_size", "_keys", "_macs")

    def __init__(
        self,
        secret: str | bytes | Sequence[str | bytes] | None,
        *,
        cache_size: int = DEFAULT_VERIFIED_CACHE,
    ) -> None:
        if secret is None:
            keys = [secrets.token_bytes(32)]
        elif isinstance(secret, (str, bytes, bytearray)):
            keys = [_as_key(secret)]
        else:
            keys = [_as_key(s) for s in secret]
            if not keys:
                raise ValueError("callback_secret must hold at least one secret")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0; got {cache_size}")
        self._keys: tuple[bytes, ...] = tuple(keys)
        self._cache_size = cache_size
        # submission ID -> the MAC that verified it, oldest first. The key is the very
        # string the submission's tasks hold, so an entry costs little beyond the MAC.
        self._macs: OrderedDict[str, bytes] = OrderedDict()

    @staticmethod
    def _mac(key: bytes, submission_id: str) -> bytes:
        digest = hmac.digest(key, _DOMAIN + submission_id.encode(), "sha256")
        # Unpadded URL-safe base64, as bytes, without the base64 module's extra copies.
        return binascii.b2a_base64(digest[:_MAC_BYTES], newline=False)[:_MAC_CHARS].translate(
            _URLSAFE
        )

    @property
    def signing_key(self) -> bytes:
        """The secret that signs new tokens."""
        return self._keys[0]

    def adopt(self, key: bytes) -> None:
        """Sign with ``key`` from now on; the secrets before it still verify."""
        self._keys = (key, *(k for k in self._keys if k != key))

    def issue(self) -> tuple[str, str]:
        """A fresh ``(submission_id, token)`` pair."""
        submission_id = secrets.token_urlsafe(12)
        mac = self._mac(self._keys[0], submission_id)
        self._remember(submission_id, mac)
        return submission_id, f"{submission_id}.{mac.decode()}"

    def _remember(self, submission_id: str, mac: bytes) -> None:
        if self._cache_size:
            macs = self._macs
            macs[submission_id] = mac
            if len(macs) > self._cache_size:
                macs.popitem(last=False)

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
        mac_bytes = mac.encode()
        cached = self._macs.get(submission_id)
        if cached is not None and hmac.compare_digest(cached, mac_bytes):
            return submission_id
        valid = None
        for key in self._keys:
            expected = self._mac(key, submission_id)
            # No early exit: the time taken does not tell which secret matched.
            if hmac.compare_digest(expected, mac_bytes):
                valid = expected
        if valid is None:
            return None
        self._remember(submission_id, valid)
        return submission_id


_ISSUED_SHAPE: Final = re.compile(rf"[A-Za-z0-9_-]{{16}}\.[A-Za-z0-9_-]{{{_MAC_CHARS}}}")


def looks_issued(token: str | None) -> bool:
    """Whether ``token`` has the shape of one a `CallbackSigner` issues (whatever its
    secret): a refused token of that shape points at a secret mismatch."""
    return token is not None and _ISSUED_SHAPE.fullmatch(token) is not None


def attach_token(url: str, token: str, token_in: CallbackTokenIn) -> str:
    """``url`` with ``token`` added: as a query parameter, or as the last path segment.

    The user's own query string is kept as it was.
    """
    if token_in == "query" and "?" not in url and "#" not in url:
        return f"{url}?{TOKEN_PARAM}={token}"  # what the full split and join would give
    parts = urlsplit(url)
    if token_in == "path":
        path = parts.path.rstrip("/") + "/" + token
        return urlunsplit(parts._replace(path=path))
    query = f"{parts.query}&{TOKEN_PARAM}={token}" if parts.query else f"{TOKEN_PARAM}={token}"
    return urlunsplit(parts._replace(query=query))


def token_from_target(path: str, query: str) -> str | None:
    """The token in a request target: the query parameter if present, else the last
    path segment (a wrong guess simply fails verification).

    ``path`` as sent (percent-encoded); the segment is decoded here, as the query is by
    ``parse_qsl``, so a token whose dot a proxy encoded as ``%2E`` reads the same from
    ``callback_app`` and from ``feed_callback``. Decoding an already decoded path again
    changes no token (they hold no ``%``).
    """
    if query:
        for name, value in reversed(parse_qsl(query, keep_blank_values=True)):
            if name == TOKEN_PARAM:
                return value
    segment = unquote(path.rstrip("/").rpartition("/")[2])
    return segment or None


def token_from_url(url: str) -> str | None:
    """The token in a full callback URL (see `token_from_target`)."""
    # The URLs this client issues end with the token: read it without parsing the URL.
    # Only where the full parse is sure to agree (one query, no fragment, no IPv6 host).
    found = _TRAILING_TOKEN.search(url)
    if (
        found is not None
        and 0 <= url.find("?") <= found.start()
        and url.isascii()
        and "#" not in url
        and "[" not in url
        and "]" not in url
    ):
        return found.group(1)
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return token_from_target(parts.path, parts.query)
