"""Keevx in the processes it is made for: Ctrl-C in a blocked call, an exit without close,
a fork, each against FakeKeevx on a loopback port."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from wiring import fake_in_thread

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from anyio.from_thread import BlockingPortal

    from keevx_async.testing import FakeKeevx

ROOT = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "sync_app.py"
CALLBACK_PATH = "/keevx/callback"


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    """The event loop of the client's thread."""
    return str(request.param)


@pytest.fixture
def served() -> Iterator[tuple[FakeKeevx, BlockingPortal]]:
    with fake_in_thread() as served:
        yield served


def within(seconds: float, wait: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """``wait``, failing after ``seconds`` instead of hanging the test."""

    async def bounded() -> None:
        with anyio.fail_after(seconds):
            await wait()

    return bounded


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: no KEEVX_* of the shell's, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEEVX_")}
    env.update(extra)
    return env


def start_app(mode: str, base_url: str, backend: str) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - our own script, run by our interpreter
        [sys.executable, str(APP), mode, base_url, backend],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["interrupt-with", "interrupt-forgotten"])
def test_ctrl_c_in_a_blocked_generate_ends_the_process_promptly(
    served: tuple[FakeKeevx, BlockingPortal], backend: str, mode: str
) -> None:
    fake, portal = served
    fake.complete_after = 3600
    app = start_app(mode, fake.base_url, backend)
    try:
        portal.call(within(30, functools.partial(fake.wait_for_submits, 1)))
        assert app.stdout is not None
        assert app.stdout.readline() == "generating\n"
        interrupted = time.monotonic()
        app.send_signal(signal.SIGINT)
        _, stderr = app.communicate(timeout=30)
    finally:
        app.kill()
        app.communicate()
    assert time.monotonic() - interrupted < 15
    assert app.returncode == -signal.SIGINT, stderr  # died of the interrupt, as Python does
    assert "\nKeyboardInterrupt\n" in stderr, stderr
    assert ("was not closed" in stderr) == (mode == "interrupt-forgotten"), stderr


def test_a_script_that_never_closes_its_client_exits_with_a_warning(
    served: tuple[FakeKeevx, BlockingPortal], backend: str
) -> None:
    fake, _ = served
    app = start_app("forgotten", fake.base_url, backend)
    stdout, stderr = app.communicate(timeout=60)
    assert app.returncode == 0, stderr
    [task_id] = fake.tasks
    assert stdout == f"generated {task_id}\n"
    assert stderr.count("a keevx_async.Keevx was not closed") == 1, stderr


def test_a_forked_child_is_told_to_make_its_own_client() -> None:
    done = subprocess.run(  # noqa: S603 - our own script, run by our interpreter
        [sys.executable, str(APP), "fork", "http://127.0.0.1:9", "asyncio"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    child, parent = done.stdout.splitlines()
    assert child.startswith("child: this Keevx was made in another process, before a fork")
    assert parent == "parent: child exited with 0"
    assert "was not closed" not in done.stderr
