"""The framework recipes in ``examples/`` on their real frameworks, over real HTTP.

FakeKeevx serves the API on a loopback socket and POSTs every callback over HTTP to the
app's own callback route, while a request to the app's ``/images`` route awaits
``client.generate``: the production path, on 127.0.0.1 only. ASGI apps run under uvicorn
on asyncio and hypercorn's trio worker on trio (both run the lifespan); aiohttp serves
itself; the WSGI recipe runs on the standard library's server, in threads.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
import httpx
import pytest
from anyio.from_thread import BlockingPortal
from wiring import API_KEY, callback_body

import keevx_async as kx
from keevx_async.testing import FakeKeevx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from types import ModuleType

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CALLBACK_PATH = "/keevx/callback"

#: (recipe, backend): every recipe on every backend its framework runs on. aiohttp and
#: Django are built on asyncio, so they run on asyncio only (not skipped: not listed).
RECIPES = [
    ("fastapi", "asyncio"),
    ("fastapi", "trio"),
    ("starlette", "asyncio"),
    ("starlette", "trio"),
    ("aiohttp", "asyncio"),
    ("django", "asyncio"),
    ("any_framework", "asyncio"),
    ("any_framework", "trio"),
]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` once (Django's settings can be configured once)."""
    module_name = f"keevx_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # Registered first: Django imports the module again by name (ROOT_URLCONF).
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


# --8<-- [start:serve_asgi]
@asynccontextmanager
async def serve_asgi_app(app: Any, sock: socket.socket, backend: str) -> AsyncIterator[None]:
    """Serve ``app`` on the bound ``sock``, lifespan included, until the block ends."""
    if backend == "trio":
        import hypercorn.trio  # noqa: PLC0415 - trio only
        from hypercorn.config import Config  # noqa: PLC0415

        config = Config()
        # hypercorn owns (and closes) the descriptor it is given: give it a duplicate.
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
        config.accesslog = None
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait))
            try:
                yield
            finally:
                stop.set()
    else:
        import uvicorn  # noqa: PLC0415 - asyncio only

        server = uvicorn.Server(uvicorn.Config(app, lifespan="on", ws="none", log_level="warning"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                # uvicorn sets a flag, no event, once it accepts connections.
                while not server.started:  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            try:
                yield
            finally:
                server.should_exit = True


# --8<-- [end:serve_asgi]


# --8<-- [start:serve_aiohttp]
@asynccontextmanager
async def serve_aiohttp_app(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    from aiohttp import web  # noqa: PLC0415 - asyncio only

    runner = web.AppRunner(app)
    await runner.setup()  # runs cleanup_ctx up to its yield: the client is open
    try:
        await web.SockSite(runner, sock).start()
        yield
    finally:
        await runner.cleanup()


# --8<-- [end:serve_aiohttp]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # One thread per request: /images waits while the callback comes in on another.
    daemon_threads = True


@asynccontextmanager
async def serve_wsgi_recipe(module: ModuleType) -> AsyncIterator[str]:
    """The WSGI recipe on the standard library's server; yields its base URL."""
    server = make_server(
        "127.0.0.1",
        0,
        lambda *_: [],
        server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    async with (
        kx.AsyncKeevx(callback_url=url + CALLBACK_PATH) as client,
        BlockingPortal() as portal,
    ):
        server.set_app(module.make_wsgi_app(client, portal))
        thread.start()
        try:
            yield url
        finally:
            await anyio.to_thread.run_sync(server.shutdown)
            server.server_close()
            await anyio.to_thread.run_sync(thread.join)


@pytest.fixture
async def fake() -> AsyncIterator[FakeKeevx]:
    async with FakeKeevx(api_key=API_KEY, seed=5, complete_after=0.02) as fake, fake.serve():
        yield fake


@pytest.fixture
def app_socket() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield sock


@asynccontextmanager
async def running_recipe(
    recipe: str,
    backend: str,
    fake: FakeKeevx,
    sock: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[str]:
    """Run a recipe configured, as in production, from KEEVX_*; yields its base URL."""
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("KEEVX_API_KEY", API_KEY)
    monkeypatch.setenv("KEEVX_BASE_URL", fake.base_url)
    monkeypatch.setenv("KEEVX_CALLBACK_URL", url + CALLBACK_PATH)
    monkeypatch.delenv("KEEVX_CALLBACK_SECRET", raising=False)
    if recipe == "any_framework":
        async with serve_wsgi_recipe(load_example("any_framework")) as wsgi_url:
            yield wsgi_url
    elif recipe == "aiohttp":
        async with serve_aiohttp_app(load_example("aiohttp_app").create_app(), sock):
            yield url
    else:
        module = load_example(f"{recipe}_app")
        app = module.application if recipe == "django" else module.create_app()
        async with serve_asgi_app(app, sock, backend):
            yield url


# --8<-- [start:test]
@pytest.mark.parametrize(("recipe", "anyio_backend"), RECIPES)
async def test_each_request_gets_the_image_of_its_own_task(
    recipe: str,
    fake: FakeKeevx,
    app_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    anyio_backend: str,
) -> None:
    prompts = ["a red fox", "a blue heron", "a green frog"]
    replies: dict[str, dict[str, Any]] = {}
    async with (
        running_recipe(recipe, anyio_backend, fake, app_socket, monkeypatch) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):

        async def ask(prompt: str) -> None:
            response = await http.post("/images", json={"prompt": prompt})
            assert response.status_code == 200, response.text
            replies[prompt] = response.json()

        async with anyio.create_task_group() as tg:
            for prompt in prompts:
                tg.start_soon(ask, prompt)
        await fake.wait_idle()

    for prompt, reply in replies.items():
        task = fake.tasks[reply["task_id"]]
        assert task.prompt == prompt
        assert reply["image_url"] == task.image_url
        assert task.image_url.endswith(f"/{task.task_id}.png")
        # The result came by callback, POSTed over HTTP to the app itself.
        assert task.callback_url is not None
        assert task.callback_url.startswith(url + CALLBACK_PATH + "?keevx_token=")
        assert task.callbacks_sent == 1
    assert fake.delivery_failures == []


# --8<-- [end:test]


@pytest.mark.parametrize(("recipe", "anyio_backend"), RECIPES)
async def test_forged_callbacks_get_401(
    recipe: str,
    fake: FakeKeevx,
    app_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    anyio_backend: str,
) -> None:
    async with (
        running_recipe(recipe, anyio_backend, fake, app_socket, monkeypatch) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        genuine = (await http.post("/images", json={"prompt": "a lighthouse"})).json()
        await fake.wait_idle()
        task = fake.tasks[genuine["task_id"]]
        assert task.callback_url is not None
        forged = callback_body(task.task_id, image_url="https://evil.example/x.png")
        no_token = await http.post(CALLBACK_PATH, content=forged)
        bad_token = await http.post(
            CALLBACK_PATH, params={"keevx_token": "abc.def"}, content=forged
        )
        # The genuine URL still works: duplicates are answered 200 and change nothing.
        replayed = await http.post(task.callback_url, content=forged)

    assert no_token.status_code == 401
    assert bad_token.status_code == 401
    assert replayed.status_code == 200
    assert genuine["image_url"] == task.image_url


@pytest.mark.parametrize(("recipe", "anyio_backend"), RECIPES)
async def test_a_failed_task_is_answered_502(
    recipe: str,
    fake: FakeKeevx,
    app_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    anyio_backend: str,
) -> None:
    fake.fail_if = lambda prompt: "forbidden" in prompt
    async with (
        running_recipe(recipe, anyio_backend, fake, app_socket, monkeypatch) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        failed = await http.post("/images", json={"prompt": "a forbidden fox"})
        fine = await http.post("/images", json={"prompt": "an allowed fox"})

    assert failed.status_code == 502
    assert "moderation" in failed.text
    assert fine.status_code == 200
    assert fake.tasks[fine.json()["task_id"]].prompt == "an allowed fox"


@pytest.mark.parametrize(("recipe", "anyio_backend"), RECIPES)
async def test_callbacks_before_the_reply_and_twice(
    recipe: str,
    fake: FakeKeevx,
    app_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    anyio_backend: str,
) -> None:
    # Each callback reaches the app while its /images request still waits for the submit
    # reply, and then once more.
    fake.early_callbacks = True
    fake.duplicate_rate = 1.0
    async with (
        running_recipe(recipe, anyio_backend, fake, app_socket, monkeypatch) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        response = await http.post("/images", json={"prompt": "an early bird"})
        await fake.wait_idle()

    assert response.status_code == 200, response.text
    task = fake.tasks[response.json()["task_id"]]
    assert task.prompt == "an early bird"
    assert response.json()["image_url"] == task.image_url
    assert task.callbacks_sent == 2  # both answered 200
    assert fake.delivery_failures == []
