"""Every script in docs/examples runs end to end and prints what its page promises.

The guides include these scripts verbatim, so a change that breaks a documented example
breaks this test instead of silently rotting the docs. The API reference is checked to
cover every public name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from wiring import API_KEY, fake_in_thread

import keevx_async
import keevx_async.testing

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = DOCS / "examples"

#: A line each example must print (a substring of one line of its output).
#: Each example names, in a first-line comment ``# expect: <text>``, a substring of one
#: line its output must contain.
EXPECT_MARK = "# expect: "


def expected_line(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith(EXPECT_MARK), f"{path.name} must start with {EXPECT_MARK!r}"
    return first.removeprefix(EXPECT_MARK)


SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py"))


def test_every_example_has_an_expected_line() -> None:
    assert SCRIPTS, f"no examples found in {EXAMPLES}"
    for name in SCRIPTS:
        assert expected_line(EXAMPLES / name)


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs(name: str) -> None:
    # The examples run on FakeKeevx: no real key, URL or secret may leak in from the shell.
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEEVX_")}
    completed = subprocess.run(  # noqa: S603 - our own scripts, run by our interpreter
        [sys.executable, str(EXAMPLES / name)],
        cwd=DOCS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert completed.returncode == 0, output
    expected = expected_line(EXAMPLES / name)
    assert any(expected in line for line in completed.stdout.splitlines()), output


def test_api_reference_covers_every_public_name() -> None:
    pages = "".join(path.read_text() for path in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: (keevx_async\S*)", pages, flags=re.MULTILINE))
    public = {f"keevx_async.{name}" for name in keevx_async.__all__}
    assert public - documented == set()
    assert "keevx_async.testing" in documented  # its __all__ is listed in testing.md
    testing_page = (DOCS / "reference" / "testing.md").read_text()
    for name in keevx_async.testing.__all__:
        assert f"- {name}" in testing_page, name


def test_the_readmes_fakekeevx_snippet_runs_as_printed() -> None:
    """The README's 'Testing with FakeKeevx' snippet is a whole script: it runs."""
    readme = (DOCS.parent / "README.md").read_text()
    section = readme.split("## Testing with FakeKeevx", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(  # noqa: S603 (our own interpreter, the README's own code)
        [sys.executable, "-c", snippet], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"https://\S+/i2is-\S+\.png\n", done.stdout), done.stdout


def test_the_readmes_sync_snippet_runs_as_printed() -> None:
    """The README's synchronous snippet is a whole script: it runs, against the service
    its environment names (here FakeKeevx on a loopback port), results by lookups."""
    readme = (DOCS.parent / "README.md").read_text()
    section = readme.split("### Without `await`", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEEVX_")}
    with fake_in_thread() as (fake, _):
        env.update(KEEVX_API_KEY=API_KEY, KEEVX_BASE_URL=fake.base_url)
        done = subprocess.run(  # noqa: S603 (our own interpreter, the README's own code)
            [sys.executable, "-c", snippet],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    [task] = fake.tasks.values()
    assert task.prompt == "a red fox in the snow"
    assert done.stdout == f"{task.image_url}\n"


def test_the_readmes_video_snippet_runs_as_printed() -> None:
    """The README's video snippet is a whole script: it runs on FakeKeevx."""
    readme = (DOCS.parent / "README.md").read_text()
    section = readme.split("### Videos", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(  # noqa: S603 (our own interpreter, the README's own code)
        [sys.executable, "-c", snippet], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"https://\S+/i2v-\S+\.mp4 6 1920 1080\n", done.stdout), done.stdout
