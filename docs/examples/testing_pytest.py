# expect: 6 passed
"""Test your own code with FakeKeevx and pytest, under asyncio and trio.

``thumbnails`` is the application code under test; the fixtures give every test a fresh
emulator and a client wired to it. Run this file directly (it calls pytest on itself) or
copy the fixtures into your ``conftest.py``. Needs ``pytest`` and ``trio``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


async def thumbnails(client: kx.AsyncKeevx, prompts: list[str]) -> dict[str, str | None]:
    """The code under test: the first image URL of each prompt, None where it failed."""
    results = await client.generate_many(prompts, timeout=5)
    return {
        prompt: None if isinstance(outcomes[0], kx.KeevxError) else outcomes[0].image_url
        for prompt, outcomes in zip(prompts, results, strict=True)
    }


# --8<-- [start:fixtures]
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # run every test under both event loops


@pytest.fixture
async def fake() -> AsyncIterator[FakeKeevx]:
    async with FakeKeevx(seed=0) as fake:
        yield fake


@pytest.fixture
async def client(fake: FakeKeevx) -> AsyncIterator[kx.AsyncKeevx]:
    # An AsyncKeevx wired to the fake: callbacks go straight into it.
    async with fake.client() as client:
        yield client


# --8<-- [end:fixtures]


# --8<-- [start:tests]
@pytest.mark.anyio
async def test_every_prompt_gets_an_image(client: kx.AsyncKeevx, fake: FakeKeevx) -> None:
    urls = await thumbnails(client, ["a fox", "an owl"])
    assert all(url is not None and url.endswith(".png") for url in urls.values())
    assert fake.accepted_submits == 2


@pytest.mark.anyio
async def test_a_moderated_prompt_is_none(client: kx.AsyncKeevx, fake: FakeKeevx) -> None:
    fake.fail_if = lambda prompt: "forbidden" in prompt
    urls = await thumbnails(client, ["a fox", "a forbidden fox"])
    assert urls["a forbidden fox"] is None
    assert urls["a fox"] is not None


@pytest.mark.anyio
async def test_survives_a_rate_limit(client: kx.AsyncKeevx, fake: FakeKeevx) -> None:
    fake.inject(429, retry_after=0.05)
    urls = await thumbnails(client, ["a fox"])
    assert urls["a fox"] is not None
    assert fake.submit_calls == 2  # the 429, then the retry


# --8<-- [end:tests]


if __name__ == "__main__":
    # This script imported anyio (through keevx_async) before pytest started, so pytest
    # cannot rewrite the asserts of anyio's plugin; that warning is harmless here.
    quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning", "-p", "no:cacheprovider"]
    sys.exit(pytest.main([__file__, "-q", *quiet]))
