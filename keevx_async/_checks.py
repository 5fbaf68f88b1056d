"""Options and arguments checked where they are given, before anything is sent.

A bad option must fail at the call that takes it, naming it, not at the first request or
(worse) after a submit the service has billed. NaN passes ``not x > 0``-style checks in
one direction and fails them in the other, and ``"30"`` passes none of them with a clear
message, so every number goes through here: a real number (not a ``bool``, not a string),
finite, and in range. Each function returns the value, normalised, or raises
``TypeError`` (wrong type) or ``ValueError`` (out of range), both naming the option.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, overload

import httpx

__all__ = ["check_bool", "check_http_timeout", "check_int", "check_seconds"]


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}; got {_type_name(value)} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


@overload
def check_seconds(
    name: str, value: object, *, none_ok: bool, zero_ok: bool = ...
) -> float | None: ...


@overload
def check_seconds(name: str, value: object, *, zero_ok: bool = ...) -> float: ...


def check_seconds(
    name: str, value: object, *, none_ok: bool = False, zero_ok: bool = False
) -> float | None:
    """``value`` as a float: a finite real number above 0 (or 0 itself with ``zero_ok``);
    ``None`` passes with ``none_ok``. Used for durations and rates alike."""
    if value is None and none_ok:
        return None
    bound = ">= 0" if zero_ok else "> 0"
    allowed = f"a number {bound}" + (" or None" if none_ok else "")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {allowed}; got {_type_name(value)} {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (a truthy string is a mistake, not a yes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {_type_name(value)} {value!r}")
    return value


def check_http_timeout(value: object) -> httpx.Timeout:
    """The client's ``timeout=``: seconds (a number > 0) or an ``httpx.Timeout`` whose
    phases are each ``None`` (no limit) or a number > 0."""
    if isinstance(value, httpx.Timeout):
        phases: dict[str, Any] = value.as_dict()
        for phase, seconds in phases.items():
            check_seconds(f"timeout.{phase}", seconds, none_ok=True)
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            "timeout must be a number of seconds > 0 or an httpx.Timeout; "
            f"got {_type_name(value)} {value!r}"
        )
    return httpx.Timeout(check_seconds("timeout", value))
