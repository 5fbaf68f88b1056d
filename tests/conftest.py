"""Fixtures shared by every test module."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import settings

# Hypothesis imports its shrinking optimiser lazily, in the middle of a test. Under pytest
# that import compiles (assertion rewriting) at whatever stack depth the test is at, and
# CPython 3.11 before 3.11.8 can then fail with "SystemError: AST constructor recursion
# depth mismatch" (python/cpython#106905). Importing it here, at the top, sidesteps that.
with contextlib.suppress(ImportError):
    import hypothesis.internal.conjecture.optimiser  # noqa: F401

# Property tests check behaviour, never speed: on a shared machine a slow example is not a
# failure. CI prints the seed of any failure, so it can be replayed.
settings.register_profile("keevx", deadline=None, print_blob=True)
settings.load_profile("keevx")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on both backends the SDK supports."""
    return str(request.param)


# The real Redis server of the router tests (a prefix of the test's own, emptied after).
from redis_support import redis_prefix  # noqa: E402, F401
