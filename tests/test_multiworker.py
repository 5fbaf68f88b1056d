"""Several real worker processes behind one callback URL (``uvicorn --workers 2``).

Found by trying the FastAPI recipe with ``--workers 4`` and no RedisRouter: callbacks
reaching the wrong worker were held as early until they expired, and requests ended in
504 with zero log lines. Now the worker holding a callback no task claims names the
likely cause, the waiting worker recovers the task by a lookup, and with a shared
RedisRouter every callback reaches its worker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from redis_support import redis_prefix as redis_prefix  # noqa: PLC0414 - the fixture
from test_redact import _wait_until_listening
from wiring import closed_port

HINT = "no task of this process has that ID"
REQUESTS = 24


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 (our own interpreter, app and fake)
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    output, _ = process.communicate(timeout=30)
    return output


def _run_app(router_prefix: str | None) -> tuple[list[dict[str, str]], list[int], str]:
    """Serve the app with two workers against a loopback FakeKeevx; post REQUESTS images
    twice over (the second wave gives each worker work after the first's callbacks have
    aged); return the replies, the worker PIDs seen, and the app's log."""
    fake_port, app_port = closed_port(), closed_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEEVX_")}
    env["PYTHONPATH"] = str(Path(__file__).parent)
    fake = _start(
        [sys.executable, "-m", "keevx_async.testing", "--port", str(fake_port), "--seed", "3"],
        env,
    )
    env |= {
        "KEEVX_API_KEY": "test",
        "KEEVX_BASE_URL": f"http://127.0.0.1:{fake_port}",
        "KEEVX_CALLBACK_URL": f"http://127.0.0.1:{app_port}/keevx/callback",
        "KEEVX_CALLBACK_SECRET": "shared by the workers",
    }
    if router_prefix is not None:
        env["KEEVX_TEST_ROUTER_PREFIX"] = router_prefix
    app = _start(
        [
            *(sys.executable, "-m", "uvicorn", "multiworker_app:app"),
            *("--host", "127.0.0.1", "--port", str(app_port), "--workers", "2"),
            "--no-access-log",
        ],
        env,
    )
    replies: list[dict[str, str]] = []
    pids: set[int] = set()
    try:
        _wait_until_listening(fake_port)
        _wait_until_listening(app_port)
        url = f"http://127.0.0.1:{app_port}"

        def post(n: int) -> dict[str, str]:
            # A connection per request: the kernel spreads them over both workers.
            with httpx.Client(trust_env=False, timeout=90) as http:
                reply = http.post(f"{url}/images", json={"prompt": f"kite {n}"})
                reply.raise_for_status()
                body: dict[str, str] = reply.json()
                pids.add(http.get(f"{url}/stats").json()["pid"])
                return body

        with ThreadPoolExecutor(REQUESTS) as pool:
            for wave in range(2):
                numbers = range(wave * REQUESTS, (wave + 1) * REQUESTS)
                replies.extend(pool.map(post, numbers))
    finally:
        log = _stop(app)
        _stop(fake)
    return replies, sorted(pids), log


def _assert_every_request_got_its_own_image(replies: list[dict[str, str]]) -> None:
    assert [reply["prompt"] for reply in replies] == [f"kite {n}" for n in range(2 * REQUESTS)]
    assert len({reply["task_id"] for reply in replies}) == 2 * REQUESTS
    for reply in replies:
        assert reply["image_url"].endswith(f"/{reply['task_id']}.png")


def test_without_a_shared_router_the_misrouted_callbacks_are_named() -> None:
    replies, pids, log = _run_app(router_prefix=None)
    assert len(pids) == 2, log  # both workers served requests
    # Each request got its own image anyway (a lookup found those whose callback went to
    # the other worker) ...
    _assert_every_request_got_its_own_image(replies)
    # ... and the log says why they were slow, naming the fix.
    hints = [line for line in log.splitlines() if HINT in line]
    assert hints, log
    assert "RedisRouter" in hints[0]
    assert re.search(r"finished by a status lookup", log), log


def test_with_a_shared_redis_router_every_callback_reaches_its_worker(
    redis_prefix: str,
) -> None:
    replies, pids, log = _run_app(router_prefix=redis_prefix)
    assert len(pids) == 2, log
    _assert_every_request_got_its_own_image(replies)
    assert HINT not in log, log
    assert "finished by a status lookup" not in log, log


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
