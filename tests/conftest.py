"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest
from hypothesis import settings

# Property tests check behaviour, never speed: on a shared machine a slow example is not a
# failure. CI prints the seed of any failure, so it can be replayed.
settings.register_profile("keevx", deadline=None, print_blob=True)
settings.load_profile("keevx")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on both backends the SDK supports."""
    return str(request.param)
