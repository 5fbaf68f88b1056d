# expect: 3 images; FakeKeevx POSTed 3 callbacks to the script's own receiver
"""A script with no web app: ``client.serve_callbacks()`` receives its callbacks itself.

Everything runs on 127.0.0.1: FakeKeevx is served on a loopback port and POSTs each
callback over HTTP to the receiver the script starts, as the real service would (it needs
``pip install 'keevx-async[server]'``). Runs under asyncio (uvicorn), then trio (hypercorn).
Against the real service, drop the fake and pass ``public_url`` (see the guide).
"""

from __future__ import annotations

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx


# --8<-- [start:script]
async def generate_with_own_receiver(client: kx.AsyncKeevx) -> list[kx.ImageResult]:
    # Listening before the block runs; for the block, the service is told to call it.
    async with client.serve_callbacks(port=0) as server:
        print(f"receiving callbacks at {server.url}")
        request = kx.ImageRequest("a lighthouse at dawn", generate_count=3)
        images = await client.generate(request, timeout=600)
    # Here the server is stopped, its port free, and client.callback_url as it was.
    for image in images:
        print(f"image {image.index}: {image.image_url}")
    return images


# --8<-- [end:script]


async def main() -> None:
    async with FakeKeevx(complete_after=0.05) as fake, fake.serve(port=0):
        # The fake's loopback URL stands in for https://api.keevx.cn.
        async with kx.AsyncKeevx(api_key="test", base_url=fake.base_url) as client:
            images = await generate_with_own_receiver(client)
        await fake.wait_idle()
        print(
            f"{len(images)} images; FakeKeevx POSTed {fake.callbacks_sent} callbacks "
            "to the script's own receiver"
        )


if __name__ == "__main__":
    anyio.run(main)
    anyio.run(main, backend="trio")  # needs `pip install trio`
