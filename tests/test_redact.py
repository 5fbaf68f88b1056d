"""Callback tokens are kept out of access logs (``kx.redact_callback_tokens``)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wiring import closed_port

import keevx_async as kx
from keevx_async._redact import REDACTED, redact
from keevx_async._tokens import CallbackSigner, attach_token


@settings(max_examples=200)
@given(
    st.sampled_from(["query", "path"]),
    st.sampled_from(["https://app.test/cb", "https://app.test/keevx/cb?tenant=7", "http://h/"]),
    st.booleans(),
)
def test_every_issued_token_is_redacted_from_a_logged_url(
    token_in: str, base: str, encode_dot: bool
) -> None:
    _, token = CallbackSigner(None).issue()
    url = attach_token(base, token, token_in)  # type: ignore[arg-type]
    if encode_dot:
        url = url.replace(token, token.replace(".", "%2E"))
    line = f'127.0.0.1:5000 - "POST {url} HTTP/1.1" 200'
    redacted = redact(line)
    assert token.split(".")[1] not in redacted  # the MAC never survives
    assert REDACTED in redacted
    assert redacted.startswith('127.0.0.1:5000 - "POST ')


def test_other_text_is_left_as_it_was() -> None:
    line = '127.0.0.1:5000 - "GET /health?verbose=1 HTTP/1.1" 200'
    assert redact(line) == line


def test_the_filter_redacts_message_and_arguments_and_drops_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = "keevx.test.access"
    token = CallbackSigner(None).issue()[1]
    kx.redact_callback_tokens([name])
    kx.redact_callback_tokens([name])  # twice: still one filter
    logger = logging.getLogger(name)
    assert sum(isinstance(f, kx.CallbackTokenFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=name):
        logger.info('"%s %s"', "POST", f"/cb?keevx_token={token}")
        logger.info("callback at /cb/%s", token)
        logger.info("%(path)s", {"path": f"/cb/{token}"})
    assert len(caplog.records) == 3
    assert token not in caplog.text
    assert caplog.text.count(REDACTED) == 3


def _serve(port: int, redacting: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    if not redacting:
        env["KEEVX_TEST_NO_REDACT"] = "1"
    command = [sys.executable, "-m", "uvicorn", "redact_app:app", "--port", str(port)]
    return subprocess.Popen(  # noqa: S603 (our own interpreter and app)
        [*command, "--host", "127.0.0.1", "--access-log"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_until_listening(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # a process starting: nothing to wait on but the port
    pytest.fail("uvicorn did not start")


@pytest.mark.parametrize("redacting", [True, False], ids=["redacting", "control"])
def test_uvicorns_access_log_shows_no_token(redacting: bool) -> None:
    port = closed_port()
    token = CallbackSigner(None).issue()[1]
    server = _serve(port, redacting)
    try:
        _wait_until_listening(port)
        with httpx.Client(trust_env=False) as http:
            for path in (f"/cb?keevx_token={token}", f"/cb/{token}"):
                reply = http.post(f"http://127.0.0.1:{port}{path}", content=b"{}")
                assert reply.status_code == 401  # not issued by that client: refused
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=15)
    assert '"POST /cb' in output, output  # the access log did log both requests
    if redacting:
        assert token not in output, output
        assert token.split(".")[1] not in output, output
        assert output.count(REDACTED) == 2, output
    else:
        assert token in output  # the control: without the filter, the log shows it
