"""A real IPython kernel runs the client cell by cell, as a notebook user does.

Found by trying it in Jupyter: a client made in one cell and awaited in the next timed
out (its lost callbacks were never looked up), entering in one cell and leaving in
another raised "Attempted to exit cancel scope in a different task". Each cell here runs
in the kernel's own event loop, in a task of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from jupyter_client.manager import start_new_kernel
from test_redact import _wait_until_listening
from wiring import closed_port

if TYPE_CHECKING:
    from collections.abc import Iterator

    from jupyter_client.blocking.client import BlockingKernelClient


@pytest.fixture
def fake_url() -> Iterator[str]:
    """A FakeKeevx on loopback, in a process of its own."""
    port = closed_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEEVX_")}
    fake = subprocess.Popen(  # noqa: S603 (our own interpreter and fake)
        [sys.executable, "-m", "keevx_async.testing", "--port", str(port), "--seed", "9"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_listening(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        fake.terminate()
        fake.wait(timeout=15)


@pytest.fixture
def kernel() -> Iterator[BlockingKernelClient]:
    manager, client = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def run_cell(kernel: BlockingKernelClient, code: str, log: list[str] | None = None) -> str:
    """Run one cell; what it printed (its log lines go to ``log``), or the test fails
    with the cell's traceback."""
    printed: list[str] = []
    errors: list[str] = []

    def collect(message: dict[str, object]) -> None:
        content = message["content"]
        assert isinstance(content, dict)
        if message["msg_type"] == "stream":
            sink = printed if content["name"] == "stdout" else log
            if sink is not None:
                sink.append(str(content["text"]))
        elif message["msg_type"] == "error":
            errors.append("\n".join(content["traceback"]))

    reply = kernel.execute_interactive(code, timeout=60, output_hook=collect)
    assert reply["content"]["status"] == "ok", "\n".join(errors) or reply
    return "".join(printed)


def test_a_client_used_cell_by_cell_in_a_real_kernel(
    kernel: BlockingKernelClient, fake_url: str
) -> None:
    run_cell(
        kernel,
        "import logging, keevx_async as kx\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        f"client = kx.AsyncKeevx(api_key='test', base_url={fake_url!r}, reconcile_after=0.2)",
    )
    # No callback URL and never entered: the wait itself drives the lookups.
    log: list[str] = []
    out = run_cell(
        kernel,
        "images = await client.generate_many(['a cat', 'a dog'], timeout=30)\n"
        "print([type(group[0]).__name__ for group in images], client.stats.resolved_by_lookup)",
        log,
    )
    assert out.strip() == "['ImageResult', 'ImageResult'] 2"
    # One line says where results come from, and nothing contradicts it.
    assert "results come from status lookups" in "".join(log)
    assert "not looked up" not in "".join(log)
    out = run_cell(kernel, "await client.aclose()\nprint('closed', client.stats.pending)")
    assert out.strip() == "closed 0"


def test_entered_in_one_cell_and_left_in_another(
    kernel: BlockingKernelClient, fake_url: str
) -> None:
    run_cell(
        kernel,
        "import keevx_async as kx\n"
        f"client = kx.AsyncKeevx(api_key='test', base_url={fake_url!r}, reconcile_after=0.2)\n"
        "await client.__aenter__()",
    )
    out = run_cell(
        kernel,
        "[image] = await client.generate(kx.ImageRequest('a fox'), timeout=30)\n"
        "print(image.image_url.endswith(image.task_id + '.png'))",
    )
    assert out.strip() == "True"
    out = run_cell(
        kernel,
        "await client.__aexit__(None, None, None)\nprint('left', client._reconciler.running)",
    )
    assert out.strip() == "left False"


def test_the_sync_client_in_a_real_kernel(kernel: BlockingKernelClient, fake_url: str) -> None:
    """No ``await`` at all: ``kx.Keevx`` blocks the cell while Jupyter's loop runs."""
    run_cell(
        kernel,
        "import keevx_async as kx\n"
        f"client = kx.Keevx(api_key='test', base_url={fake_url!r}, reconcile_after=0.2)",
    )
    out = run_cell(
        kernel,
        "images = client.generate(kx.ImageRequest('a heron', generate_count=2), timeout=30)\n"
        "print(len(images), all(i.image_url.endswith(i.task_id + '.png') for i in images))",
    )
    assert out.strip() == "2 True"
    out = run_cell(kernel, "client.close()\nprint('closed', client.stats.pending)")
    assert out.strip() == "closed 0"
