"""Fan-out: submits per second at concurrency 64 against a loopback server in another process.

Figures (each a ratio of rates measured in this process, this run; median of interleaved
repetitions):

- ``fanout_asyncio_ratio``: the default ``AsyncKeevx`` on asyncio (aiohttp extra installed)
  against bare aiohttp doing the same POSTs (target >= 0.50).
- ``fanout_httpx_ratio``: the default ``AsyncKeevx`` on trio (httpx's own transport, sharded)
  against a plain ``httpx.AsyncClient`` with one pool, also on trio (target >= 3).
- ``peer_openai_ratio`` / ``peer_openai_aiohttp_ratio``: the default ``AsyncKeevx`` on asyncio
  against openai-python's ``AsyncOpenAI.post`` (its default client, and its aiohttp client),
  retries off (target >= 2).

Run: ``python bench/bench_fanout.py`` (``--quick`` for a smoke run, ``--submits``,
``--concurrency``, ``--reps``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import _common
import anyio
import httpx

import keevx_async as kx
from keevx_async._transports import FanoutTransport, aiohttp_usable
from keevx_async._wire import encode_request

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

REQUEST = kx.ImageRequest("a lighthouse at dawn, oil on canvas")
CALLBACK_URL = "https://app.example.test/keevx/callback"
# What the SDK sends for REQUEST, token included: the baselines POST the very same bytes.
BODY = encode_request(REQUEST, CALLBACK_URL + "?keevx_token=" + "x" * 43)
HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
SUBMIT_PATH = "/v1/image_generate"


async def _workers(count: int, concurrency: int, one: Callable[[], Awaitable[object]]) -> float:
    """Seconds for ``count`` calls of ``one``, ``concurrency`` at a time (workers share a count)."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(concurrency):
            group.start_soon(worker)
    return time.perf_counter() - start


async def sdk(url: str, count: int, concurrency: int, **options: Any) -> float:
    """The SDK's ``submit`` (the default client unless ``http_client`` is given)."""
    async with kx.AsyncKeevx(
        api_key="bench",
        base_url=url,
        callback_url=CALLBACK_URL,
        max_concurrency=concurrency,
        **options,
    ) as client:
        return await _workers(count, concurrency, lambda: client.submit(REQUEST))


async def sdk_httpx_transport(url: str, count: int, concurrency: int) -> float:
    """The SDK on asyncio without aiohttp: the transport it would pick, passed in."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    transport = FanoutTransport(limits=limits, prefer_aiohttp=False)
    async with httpx.AsyncClient(transport=transport) as http:
        return await sdk(url, count, concurrency, http_client=http)


async def bare_aiohttp(url: str, count: int, concurrency: int) -> float:
    """aiohttp alone: one session, a pool of ``concurrency``, the same POSTs."""
    import aiohttp  # noqa: PLC0415 (asyncio only)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.post(url + SUBMIT_PATH, data=BODY, headers=HEADERS) as reply:
                json.loads(await reply.read())

        return await _workers(count, concurrency, one)


async def plain_httpx(url: str, count: int, concurrency: int, transport: Any = None) -> float:
    """``httpx.AsyncClient`` with one pool of ``concurrency`` connections."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, transport=transport) as http:

        async def one() -> None:
            (await http.post(url + SUBMIT_PATH, content=BODY, headers=HEADERS)).json()

        return await _workers(count, concurrency, one)


async def httpx_aiohttp(url: str, count: int, concurrency: int) -> float:
    """httpx over the ``httpx-aiohttp`` package's transport."""
    import httpx_aiohttp  # noqa: PLC0415 (bench extra)

    limits = httpx.Limits(max_connections=concurrency)
    return await plain_httpx(url, count, concurrency, httpx_aiohttp.AiohttpTransport(limits=limits))


async def httpx_our_aiohttp(url: str, count: int, concurrency: int) -> float:
    """httpx over the SDK's own aiohttp transport (no SDK around it)."""
    from keevx_async._transports import AiohttpTransport  # noqa: PLC0415

    limits = httpx.Limits(max_connections=concurrency)
    return await plain_httpx(url, count, concurrency, AiohttpTransport(limits=limits))


async def openai_post(url: str, count: int, concurrency: int, *, aiohttp: bool) -> float:
    """openai-python's generic ``post``, retries off (its default client or its aiohttp one)."""
    import openai  # noqa: PLC0415 (bench extra)

    payload = json.loads(BODY)
    http_client = openai.DefaultAioHttpClient() if aiohttp else None
    async with openai.AsyncOpenAI(
        api_key="bench", base_url=url + "/v1", max_retries=0, http_client=http_client
    ) as client:

        async def one() -> None:
            await client.post("/image_generate", cast_to=object, body=payload)

        return await _workers(count, concurrency, one)


OPENAI = "openai AsyncOpenAI.post, asyncio"
OPENAI_AIOHTTP = "openai + DefaultAioHttpClient, asyncio"
OPTIONAL = {"openai": [OPENAI, OPENAI_AIOHTTP], "httpx_aiohttp": ["httpx + httpx-aiohttp, asyncio"]}


def main() -> None:
    args = _common.parse_args(__doc__ or "", submits=5000, concurrency=64)
    count = 200 if args.quick else args.submits
    concurrency = args.concurrency
    if not aiohttp_usable():
        raise SystemExit("this benchmark needs aiohttp (pip install 'keevx-async[aiohttp]')")

    with _common.loopback_server() as server:
        url = server.url

        def on_asyncio(
            fn: Callable[..., Coroutine[Any, Any, float]], **kw: Any
        ) -> Callable[[], float]:
            return lambda: asyncio.run(fn(url, count, concurrency, **kw))

        def on_trio(fn: Callable[..., Awaitable[float]]) -> Callable[[], float]:
            return lambda: anyio.run(fn, url, count, concurrency, backend="trio")

        runs = {
            "aiohttp (bare), asyncio": on_asyncio(bare_aiohttp),
            "AsyncKeevx default, asyncio": on_asyncio(sdk),
            "httpx plain, trio": on_trio(plain_httpx),
            "AsyncKeevx default, trio": on_trio(sdk),
            OPENAI: on_asyncio(openai_post, aiohttp=False),
            OPENAI_AIOHTTP: on_asyncio(openai_post, aiohttp=True),
            "httpx plain, asyncio": on_asyncio(plain_httpx),
            "AsyncKeevx, httpx transport, asyncio": on_asyncio(sdk_httpx_transport),
            "httpx + httpx-aiohttp, asyncio": on_asyncio(httpx_aiohttp),
            "httpx + keevx AiohttpTransport, asyncio": on_asyncio(httpx_our_aiohttp),
        }
        # Baselines from the bench extra; without it their figures print n/a.
        for module, names in OPTIONAL.items():
            if not _common.importable(module):
                print(f"{module} is not installed (pip install 'keevx-async[bench]'): skipped")
                for name in names:
                    del runs[name]
        times = _common.interleaved(runs, args.reps, warmup=not args.quick)

    rates = {name: count / _common.median(seconds) for name, seconds in times.items()}
    _common.print_table(
        f"fan-out: {count:,} submits at concurrency {concurrency}, median of {args.reps} "
        f"({_common.machine()})",
        ["contender", "submits/s", "best/s", "worst/s"],
        [
            [name, rate, count / min(times[name]), count / max(times[name])]
            for name, rate in rates.items()
        ],
    )
    print()
    sdk_asyncio = rates["AsyncKeevx default, asyncio"]
    _common.print_figure(
        "fanout_asyncio_ratio",
        sdk_asyncio / rates["aiohttp (bare), asyncio"],
        "target >= 0.50",
    )
    _common.print_figure(
        "fanout_httpx_ratio",
        rates["AsyncKeevx default, trio"] / rates["httpx plain, trio"],
        "target >= 3",
    )
    for figure, peer in (
        ("peer_openai_ratio", OPENAI),
        ("peer_openai_aiohttp_ratio", OPENAI_AIOHTTP),
    ):
        ratio = sdk_asyncio / rates[peer] if peer in rates else None
        _common.print_figure(figure, ratio, "target >= 2")


if __name__ == "__main__":
    main()
