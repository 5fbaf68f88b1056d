"""A test file to copy: your code against FakeKeevx, with keevx_async's pytest fixtures.

``fake_keevx`` (a running emulator) and ``keevx_client`` (an ``AsyncKeevx`` wired to it)
come with the package: no conftest needed. ``anyio_backend`` below runs every test on
asyncio and trio (drop ``"trio"`` if your code is asyncio-only; move the fixture to your
``conftest.py`` to apply it everywhere). Needs ``pytest`` (and ``trio`` for trio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import keevx_async as kx

if TYPE_CHECKING:
    from keevx_async.testing import FakeKeevx

pytestmark = pytest.mark.anyio


# --8<-- [start:app]
async def thumbnails(client: kx.AsyncKeevx, prompts: list[str]) -> dict[str, str | None]:
    """The code under test: the first image URL of each prompt, None where it failed."""
    results = await client.generate_many(prompts, timeout=30)
    return {
        prompt: None if isinstance(outcomes[0], kx.KeevxError) else outcomes[0].image_url
        for prompt, outcomes in zip(prompts, results, strict=True)
    }


# --8<-- [end:app]


# --8<-- [start:tests]
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_every_prompt_gets_its_own_image(
    keevx_client: kx.AsyncKeevx, fake_keevx: FakeKeevx
) -> None:
    urls = await thumbnails(keevx_client, ["a fox", "an owl"])
    # Each URL is the one of the task the fake created for that prompt.
    for prompt, url in urls.items():
        [task] = [task for task in fake_keevx.tasks.values() if task.prompt == prompt]
        assert url == task.image_url
    assert fake_keevx.accepted_submits == 2


@pytest.mark.keevx(fail_if=lambda prompt: "forbidden" in prompt)
async def test_a_moderated_prompt_gives_none(keevx_client: kx.AsyncKeevx) -> None:
    urls = await thumbnails(keevx_client, ["a fox", "a forbidden fox"])
    assert urls["a forbidden fox"] is None
    assert urls["a fox"] is not None


@pytest.mark.keevx(early_callbacks=True, duplicate_rate=1.0, shuffle=True)
async def test_early_and_duplicate_callbacks(keevx_client: kx.AsyncKeevx) -> None:
    urls = await thumbnails(keevx_client, ["a maze", "a labyrinth"])
    assert None not in urls.values()


async def test_survives_a_rate_limit(keevx_client: kx.AsyncKeevx, fake_keevx: FakeKeevx) -> None:
    fake_keevx.inject(429, retry_after=0.05)  # knobs can also be changed in the test
    urls = await thumbnails(keevx_client, ["a fox"])
    assert urls["a fox"] is not None
    assert fake_keevx.submit_calls == 2  # the 429, then the retry


# --8<-- [end:tests]
