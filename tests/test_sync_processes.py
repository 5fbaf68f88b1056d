"""Keevx in the processes it is made for: a plain script, Ctrl-C, exit without close, a
fork, and a WSGI app under a real WSGI server, each against FakeKeevx on a loopback port."""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
import httpx
import pytest
from wiring import API_KEY, fake_in_thread

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from types import ModuleType

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


def test_the_guides_script_runs_against_a_loopback_service(
    served: tuple[FakeKeevx, BlockingPortal],
) -> None:
    fake, _ = served
    done = subprocess.run(  # noqa: S603 - our own script, run by our interpreter
        [sys.executable, str(ROOT / "docs" / "examples" / "sync_script.py")],
        env=clean_env(KEEVX_API_KEY=API_KEY, KEEVX_BASE_URL=fake.base_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    by_prompt = {task.prompt: task for task in fake.tasks.values()}
    assert lines[0] == f"generated: {by_prompt['a red fox in the snow'].image_url}"
    assert lines[1].startswith("task 0 done: ")
    assert lines[2].startswith("task 1 done: ")
    assert {lines[3], lines[4]} == {
        f"'a koi pond': {by_prompt['a koi pond'].image_url}",
        f"'a paper crane': {by_prompt['a paper crane'].image_url}",
    }
    assert lines[5] == "sync script finished: 5 tasks created"
    assert len(fake.tasks) == 5
    # No callback URL: every result came from a lookup, and the script was told so.
    assert all(task.callback_url is None for task in fake.tasks.values())
    assert "results come from status lookups" in done.stderr


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


# --- a WSGI app --------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # One thread per request: /images blocks while its callback comes in on another.
    daemon_threads = True


def load_wsgi_app(name: str) -> ModuleType:
    """A fresh import of ``examples/wsgi_app.py``: its client is made at import."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "wsgi_app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def wsgi_url(
    served: tuple[FakeKeevx, BlockingPortal], monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """examples/wsgi_app.py on the standard library's threading WSGI server."""
    fake, _ = served
    server = make_server(
        "127.0.0.1",
        0,
        lambda *_: [],
        server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("KEEVX_API_KEY", API_KEY)
    monkeypatch.setenv("KEEVX_BASE_URL", fake.base_url)
    monkeypatch.setenv("KEEVX_CALLBACK_URL", url + CALLBACK_PATH)
    monkeypatch.delenv("KEEVX_CALLBACK_SECRET", raising=False)
    app = load_wsgi_app("keevx_example_wsgi_app")
    server.set_app(app.application)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        app.client.close()


def test_wsgi_requests_in_threads_each_get_the_image_of_their_own_prompt(
    served: tuple[FakeKeevx, BlockingPortal], wsgi_url: str
) -> None:
    fake, portal = served
    fake.complete_after = (0.0, 0.05)
    fake.fail_if = lambda prompt: "forbidden" in prompt
    prompts = [f"prompt {n}" for n in range(12)] + ["a forbidden fox"]
    with httpx.Client(base_url=wsgi_url, trust_env=False, timeout=30) as http:

        def ask(prompt: str) -> httpx.Response:
            return http.post("/images", json={"prompt": prompt})

        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            responses = dict(zip(prompts, pool.map(ask, prompts), strict=True))
        missing = http.get("/elsewhere")
        invalid = http.post("/images", json={"prompt": ""})
        forged = http.post(CALLBACK_PATH, content=b"{}")
    portal.call(fake.wait_idle)

    failed = responses.pop("a forbidden fox")
    assert failed.status_code == 502
    assert "moderation" in failed.text
    for prompt, response in responses.items():
        assert response.status_code == 200, response.text
        reply = response.json()
        task = fake.tasks[reply["task_id"]]
        assert task.prompt == prompt
        assert reply["image_url"] == task.image_url
        # The result came by callback, POSTed over HTTP to the WSGI app itself.
        assert task.callback_url is not None
        assert task.callback_url.startswith(wsgi_url + CALLBACK_PATH + "?keevx_token=")
        assert task.callbacks_sent == 1
    assert fake.delivery_failures == []
    assert missing.status_code == 404
    assert invalid.status_code == 422
    assert forged.status_code == 401
