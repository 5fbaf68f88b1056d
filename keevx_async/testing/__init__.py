"""Test helpers: an emulator of the Keevx service and a tiny loopback HTTP server.

[`FakeKeevx`][keevx_async.testing.FakeKeevx] is a faithful emulator of the Keevx image generation
API, written as a
plain ASGI 3 application: the same request rules and envelopes, ``i2is-`` task IDs, the
task-state GET endpoint, and one callback per finished task, delivered by HTTP to the
request's ``callback_url`` or handed straight to an object with ``feed_callback`` (such as
the SDK client). Its knobs reproduce the service's hard cases: latency, scripted 429/5xx
replies (with ``Retry-After``, and the ambiguous "tasks created but error returned" case),
failed tasks, and callbacks that arrive before the submit reply, twice, out of order, or
never. It counts what it sees (submits, concurrency, callbacks) so tests can assert on it,
and lets them wait instead of sleeping: for quiescence with
[`FakeKeevx.wait_idle`][keevx_async.testing.FakeKeevx.wait_idle], for a count with
[`wait_for_submits`][keevx_async.testing.FakeKeevx.wait_for_submits],
[`wait_for_gets`][keevx_async.testing.FakeKeevx.wait_for_gets] and
[`wait_for_callbacks`][keevx_async.testing.FakeKeevx.wait_for_callbacks]:

    async with FakeKeevx(complete_after=0.05) as fake, fake.http_client() as http:
        reply = await http.post(
            "/v1/image_generate",
            json={"prompt": "a red fox", "generate_count": 2},
            headers={"Authorization": "Bearer test-key"},
        )
        await fake.wait_idle()

Reach it in-process through ``httpx.ASGITransport``
([`FakeKeevx.http_client`][keevx_async.testing.FakeKeevx.http_client]) or on a
real socket ([`FakeKeevx.serve`][keevx_async.testing.FakeKeevx.serve], built on
[`serve_asgi`][keevx_async.testing.serve_asgi], which runs any ASGI app
on 127.0.0.1 under asyncio or trio). ``python -m keevx_async.testing --port 8000`` runs the
emulator as a standalone server.
"""

from __future__ import annotations

from keevx_async.testing._deliverer import CallbackSink
from keevx_async.testing._fake import FakeKeevx
from keevx_async.testing._http_server import LoopbackServer, serve_asgi
from keevx_async.testing._task import FakeTask

__all__ = ["CallbackSink", "FakeKeevx", "FakeTask", "LoopbackServer", "serve_asgi"]
