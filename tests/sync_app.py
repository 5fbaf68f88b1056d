"""A script using kx.Keevx, run in a subprocess by tests/test_sync_processes.py.

``python sync_app.py MODE BASE_URL BACKEND``, the service (FakeKeevx) at ``BASE_URL``:

- ``interrupt-with``: blocks in ``generate`` inside ``with kx.Keevx()``, for a SIGINT.
- ``interrupt-forgotten``: the same with a client nobody closes.
- ``forgotten``: generates, then exits without closing the client.
- ``fork``: forks; the child calls the client it inherited, the parent closes it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Literal, cast

import keevx_async as kx

Backend = Literal["asyncio", "trio"]


def say(line: str) -> None:
    """Write one line to stdout, at once (the test reads it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(mode: str, base_url: str, backend: Backend) -> None:
    client = kx.Keevx(api_key="test-key", base_url=base_url, backend=backend, reconcile_after=0.05)
    if mode == "interrupt-with":
        with client:
            say("generating")
            client.generate(kx.ImageRequest("a task that never ends"))
    elif mode == "interrupt-forgotten":
        say("generating")
        client.generate(kx.ImageRequest("a task that never ends"))
    elif mode == "forgotten":
        [image] = client.generate(kx.ImageRequest("a forgotten client"))
        say(f"generated {image.task_id}")
    elif mode == "fork":
        child = os.fork()
        if child == 0:
            try:
                client.retrieve("i2is-1")
            except RuntimeError as exc:
                say(f"child: {exc}")
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(child, 0)
        client.close()
        say(f"parent: child exited with {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    # Ctrl-C raises KeyboardInterrupt, also when started with SIGINT ignored (a test run
    # in a background job inherits that).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main(sys.argv[1], sys.argv[2], cast("Backend", sys.argv[3]))
