"""The pytest plugin shipped for users' own tests, run the way pytest plugins are tested:
``pytester`` runs user-style test files, the plugin loaded through its ``pytest11`` entry
point exactly as in a user's project.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import keevx_async as kx

if TYPE_CHECKING:
    from keevx_async.testing import FakeKeevx

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BOTH_BACKENDS = """
import pytest

@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run the test files made so far, on asyncio and trio."""
    pytester.makeconftest(BOTH_BACKENDS)
    # A subprocess: the plugin is found through the installed entry point, with nothing
    # imported from this session, and warnings are errors as in this suite.
    return pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider", "-W", "error", *args)


def test_fixtures_give_a_running_fake_and_a_wired_client_on_both_backends(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest
        import keevx_async as kx

        pytestmark = pytest.mark.anyio

        async def test_generate(keevx_client, fake_keevx):
            [image] = await keevx_client.generate(kx.ImageRequest("a red fox"))
            task = fake_keevx.tasks[image.task_id]
            assert task.prompt == "a red fox"
            assert image.image_url == task.image_url
            assert fake_keevx.callbacks_sent == 1
            assert keevx_client.stats.resolved_by_callback == 1

        async def test_each_test_gets_a_fresh_fake(fake_keevx):
            assert fake_keevx.tasks == {}
            assert fake_keevx.seed == 0
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_generate?asyncio?*PASSED*", "*test_generate?trio?*PASSED*"])


def test_the_marker_sets_the_fakes_knobs_closest_first(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import keevx_async as kx

        pytestmark = [pytest.mark.anyio, pytest.mark.keevx(fail_rate=1.0, latency=0.01)]

        async def test_module_marker(keevx_client, fake_keevx):
            assert (fake_keevx.fail_rate, fake_keevx.latency) == (1.0, 0.01)
            with pytest.raises(kx.TaskFailedError):
                await keevx_client.generate(kx.ImageRequest("a red fox"))

        @pytest.mark.keevx(fail_rate=0.0, seed=7)
        async def test_own_marker_wins(keevx_client, fake_keevx):
            assert (fake_keevx.fail_rate, fake_keevx.latency, fake_keevx.seed) == (0.0, 0.01, 7)
            [image] = await keevx_client.generate(kx.ImageRequest("a red fox"))
            assert image.status == "SUCCEEDED"
        """
    )
    run(pytester, "--strict-markers").assert_outcomes(passed=4)


def test_client_options_come_from_an_overridable_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import keevx_async as kx

        pytestmark = pytest.mark.anyio

        @pytest.fixture
        def keevx_client_options():
            return {"callback_token_in": "path", "max_concurrency": 2}

        async def test_options(keevx_client, fake_keevx):
            assert keevx_client.max_concurrency == 2
            submission = await keevx_client.submit(kx.ImageRequest("a red fox"))
            await submission.tasks[0]
            url = fake_keevx.tasks[submission.task_ids[0]].callback_url
            assert "?" not in url  # the token is the last path segment
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_positional_marker_arguments_are_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.anyio
        @pytest.mark.keevx(0.5)
        async def test_it(fake_keevx):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*takes FakeKeevx options as keywords only*"])


def test_the_plugin_is_inert_unless_a_fixture_is_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import sys

        def test_plain():
            # Loaded (it is an installed plugin) but it made nothing: no fake, no client.
            assert "keevx_async.testing.pytest_plugin" in sys.modules
            import gc
            from keevx_async.testing import FakeKeevx
            import keevx_async as kx
            live = [o for o in gc.get_objects() if isinstance(o, (FakeKeevx, kx.AsyncKeevx))]
            assert live == []
        """
    )
    run(pytester, "--strict-markers").assert_outcomes(passed=1)


def test_fixtures_and_marker_are_documented(pytester: pytest.Pytester) -> None:
    fixtures = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    fixtures.stdout.fnmatch_lines_random(
        [
            "fake_keevx -- *pytest_plugin.py:*",
            "*A running FakeKeevx for one test*",
            "keevx_client -- *pytest_plugin.py:*",
            "keevx_client_options -- *pytest_plugin.py:*",
        ]
    )
    markers = pytester.runpytest_subprocess("--markers", "-p", "no:cacheprovider")
    markers.stdout.fnmatch_lines(["@pytest.mark.keevx(**options): FakeKeevx options*"])


def test_the_copyable_example_file_passes(pytester: pytest.Pytester) -> None:
    example = EXAMPLES / "test_my_app.py"
    pytester.makepyfile(test_my_app=example.read_text())
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*test_survives_a_rate_limit?trio?*PASSED*"])


# The plugin is installed, so this suite can use its fixtures too.


@pytest.mark.anyio
@pytest.mark.keevx(fail_if=lambda prompt: "forbidden" in prompt, seed=3)
async def test_in_this_suite_the_marker_reaches_the_fake(
    keevx_client: kx.AsyncKeevx, fake_keevx: FakeKeevx
) -> None:
    assert fake_keevx.seed == 3
    results = await keevx_client.generate_many(["a fox", "a forbidden fox"])
    [[image], [error]] = results
    assert isinstance(image, kx.ImageResult)
    assert image.image_url == fake_keevx.tasks[image.task_id].image_url
    assert isinstance(error, kx.TaskFailedError)
    assert fake_keevx.tasks[error.task_id].prompt == "a forbidden fox"


@pytest.fixture
def keevx_client_options() -> dict[str, object]:
    return {"callback_token_in": "path"}


@pytest.mark.anyio
async def test_in_this_suite_the_client_options_fixture_is_used(
    keevx_client: kx.AsyncKeevx, fake_keevx: FakeKeevx
) -> None:
    assert keevx_client.callback_token_in == "path"
    [image] = await keevx_client.generate(kx.ImageRequest("a red fox"))
    callback_url = fake_keevx.tasks[image.task_id].callback_url
    assert callback_url is not None
    assert "keevx_token" not in callback_url  # the token is the last path segment
    assert fake_keevx.seed == 0
