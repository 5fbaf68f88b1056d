"""pytest fixtures for testing your own code against FakeKeevx.

Installed with the package (entry point ``pytest11``) and inert until a test asks for one
of its fixtures: importing it defines fixtures and a marker, nothing else.

- ``fake_keevx``: a running [`FakeKeevx`][keevx_async.testing.FakeKeevx], fresh for each
  test. Its constructor options come from the ``keevx`` marker (closest wins), with
  ``seed=0`` unless the marker gives one, so the random fates are the same on every run;
  its attributes can also be changed in the test.
- ``keevx_client``: an [`AsyncKeevx`][keevx_async.AsyncKeevx] wired to ``fake_keevx``
  in-process, every callback handed straight into it (token checks included), made by
  [`FakeKeevx.client`][keevx_async.testing.FakeKeevx.client] with the options of the
  ``keevx_client_options`` fixture (override it to change them).

The fixtures are async: they run under anyio's pytest plugin, on the backend of the
test's ``anyio_backend`` fixture (asyncio unless you parametrise it, e.g. with trio too):

```python
import pytest

import keevx_async as kx

pytestmark = pytest.mark.anyio


@pytest.mark.keevx(fail_rate=1.0)
async def test_failures_are_reported(keevx_client: kx.AsyncKeevx) -> None:
    with pytest.raises(kx.TaskFailedError):
        await keevx_client.generate(kx.ImageRequest("a red fox"))
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from keevx_async.testing._fake import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keevx_async import AsyncKeevx

__all__ = ["fake_keevx", "keevx_client", "keevx_client_options"]

MARKER = "keevx"


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``keevx`` marker (so ``--strict-markers`` accepts it)."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): FakeKeevx options for the fake_keevx fixture of keevx_async, "
        "e.g. @pytest.mark.keevx(fail_rate=0.5, seed=1)",
    )


def _fake_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    options: dict[str, Any] = {"seed": 0}
    # Farthest first, so a test's own marker wins over its class's and module's.
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        if marker.args:
            raise TypeError(
                f"@pytest.mark.{MARKER} takes FakeKeevx options as keywords only; "
                f"got positional {marker.args!r}"
            )
        options.update(marker.kwargs)
    return options


@pytest.fixture
async def fake_keevx(
    request: pytest.FixtureRequest, anyio_backend: object
) -> AsyncIterator[FakeKeevx]:
    """A running FakeKeevx for one test, built from the ``keevx`` marker's options."""
    # ``anyio_backend`` is requested so that anyio's plugin runs this async fixture, on
    # the test's backend, whether or not the test itself is marked ``anyio``.
    del anyio_backend
    async with FakeKeevx(**_fake_options(request)) as fake:
        yield fake


@pytest.fixture
def keevx_client_options() -> dict[str, Any]:
    """Options for the ``keevx_client`` fixture's ``AsyncKeevx``; override to change them.

    ``api_key``, ``base_url`` and ``callback_url`` default to values that fit the fake.
    """
    return {}


@pytest.fixture
async def keevx_client(
    fake_keevx: FakeKeevx, keevx_client_options: dict[str, Any]
) -> AsyncIterator[AsyncKeevx]:
    """An AsyncKeevx wired to ``fake_keevx``: callbacks are handed straight into it."""
    async with fake_keevx.client(**keevx_client_options) as client:
        yield client
