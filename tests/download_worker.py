"""Run by tests/test_files.py in a process of its own, to be killed mid-download: saves one
file with ``AsyncKeevx.download`` (its own download client, over loopback).

Usage: python download_worker.py URL DEST
"""

from __future__ import annotations

import sys

import anyio

import keevx_async as kx


async def main(url: str, dest: str) -> None:
    async with kx.AsyncKeevx(api_key="worker-key", base_url="http://127.0.0.1:9") as client:
        sys.stdout.write(f"{await client.download(url, dest)}\n")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
