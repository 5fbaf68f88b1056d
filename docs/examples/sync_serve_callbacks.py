# expect: trio: 3 images, 3 callbacks POSTed to the script's own receiver
"""Callbacks in a script with no web app, no ``await``: ``Keevx.serve_callbacks()``.

Everything runs on 127.0.0.1: FakeKeevx is served on a loopback port and POSTs each
callback over HTTP to the receiver the client starts, as the real service would (it needs
``pip install 'keevx-async[server]'``). The client runs on asyncio (uvicorn), then on trio
(hypercorn). Against the real service, pass ``public_url``: the URL at which the service
reaches that port (a tunnel, a public address).
"""

from __future__ import annotations

from typing import Literal

from anyio.from_thread import start_blocking_portal

import keevx_async as kx
from keevx_async.testing import FakeKeevx


# --8<-- [start:script]
def generate_with_own_receiver(client: kx.Keevx) -> list[kx.ImageResult]:
    # Listening before the block runs; for the block, the service is told to call it.
    with client.serve_callbacks(port=0) as server:
        print(f"receiving callbacks at {server.url}")
        request = kx.ImageRequest("a lighthouse at dawn", generate_count=3)
        return client.generate(request, timeout=600)


# --8<-- [end:script]


def run(backend: Literal["asyncio", "trio"]) -> None:
    fake = FakeKeevx(complete_after=0.05)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(fake),
        portal.wrap_async_context_manager(fake.serve()) as api,
    ):
        # The fake's loopback URL stands in for https://api.keevx.cn.
        with kx.Keevx(api_key="test", base_url=api.url, backend=backend) as client:
            images = generate_with_own_receiver(client)
        portal.call(fake.wait_idle)
        print(
            f"{backend}: {len(images)} images, {fake.callbacks_sent} callbacks POSTed "
            "to the script's own receiver"
        )


if __name__ == "__main__":
    run("asyncio")
    run("trio")  # needs `pip install trio`
