"""The HTTP transports of the client's own ``httpx.AsyncClient``, built for fan-out.

httpx's connection pool (httpcore) re-examines every connection of the pool, each with a
``poll()`` system call, and every queued request, each time a request enters or leaves it:
work that grows with the pool, paid twice per request. At 64 connections that caps a
client at a few hundred requests per second on loopback, far below the network. Two ways
around it, picked at the first request, when the running async library is known:

- on asyncio, with ``aiohttp`` importable (the ``keevx-async[aiohttp]`` extra):
  `AiohttpTransport`, one
  ``aiohttp.ClientSession`` behind the httpx interface;
- otherwise (trio, or no aiohttp): `ShardedTransport`,
  the same connections split over several small httpx pools, each request sent through
  the least busy one.

Either way the client's callers see httpx: requests, responses and httpx's exceptions,
mapped so that the retry policy (which tells "never sent" from "maybe acted on" by the
exception's class) holds whichever transport sent the request.

One transport per module; `FanoutTransport` (``fanout.py``) picks between them, and
`FanoutClient` (``fanout_client.py``) is the ``httpx.AsyncClient`` with a direct path for the
SDK's own requests.
"""

from __future__ import annotations

from .aiohttp import AiohttpTransport, aiohttp_usable
from .fanout import FanoutTransport
from .fanout_client import FanoutClient
from .sharded import CONNECTIONS_PER_SHARD, ShardedTransport

__all__ = [
    "CONNECTIONS_PER_SHARD",
    "AiohttpTransport",
    "FanoutClient",
    "FanoutTransport",
    "ShardedTransport",
    "aiohttp_usable",
]
