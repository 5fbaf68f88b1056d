# expect: 2 images, 2 callbacks POSTed to http://127.0.0.1:
"""End to end over real sockets: FakeKeevx and your callback receiver on 127.0.0.1.

The client uses its own HTTP connections (no injected transport), and the fake POSTs every
callback over HTTP to ``client.callback_app`` served by ``serve_asgi``: the path a
production deployment takes, on loopback only. Runs under asyncio, then trio.
"""

from __future__ import annotations

import anyio

import keevx_async as kx
from keevx_async.testing import FakeKeevx, serve_asgi


# --8<-- [start:loopback]
async def main() -> None:
    async with FakeKeevx(complete_after=0.05) as fake, fake.serve(port=0) as api:
        print(f"FakeKeevx listening on {api.url}")
        client = kx.AsyncKeevx(api_key="test", base_url=fake.base_url)  # the loopback URL
        async with client, serve_asgi(client.callback_app) as receiver:
            callback_url = receiver.url + "/keevx/callback"
            request = kx.ImageRequest("a kite", generate_count=2, callback_url=callback_url)
            images = await client.generate(request, timeout=5)
            await fake.wait_idle()
            print(f"{len(images)} images, {fake.callbacks_sent} callbacks POSTed to {receiver.url}")


# --8<-- [end:loopback]


if __name__ == "__main__":
    anyio.run(main)
    anyio.run(main, backend="trio")  # needs `pip install trio`
