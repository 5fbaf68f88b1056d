"""Concurrency curve: submits per second at concurrency 1, 4, 16, 64 and 256.

At each point: bare aiohttp, a plain ``httpx.AsyncClient`` (one pool), and the default
``AsyncKeevx`` on asyncio (aiohttp transport) and on trio (sharded httpx pools), all
POSTing the same submit body to the loopback server in another process. Writes the plot
to ``docs/assets/concurrency.png`` (``--plot`` to write elsewhere, ``--no-plot`` to skip).

Run: ``python bench/bench_curve.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common
import anyio
from bench_fanout import bare_aiohttp, plain_httpx, sdk

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

POINTS = (1, 4, 16, 64, 256)
DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "concurrency.png"
CONTENDERS: dict[str, tuple[Callable[..., Coroutine[Any, Any, float]], str]] = {
    "aiohttp (bare)": (bare_aiohttp, "asyncio"),
    "httpx plain (one pool)": (plain_httpx, "asyncio"),
    "AsyncKeevx, asyncio (aiohttp)": (sdk, "asyncio"),
    "AsyncKeevx, trio (sharded httpx)": (sdk, "trio"),
}


def _run(fn: Callable[..., Coroutine[Any, Any, float]], backend: str, *args: Any) -> float:
    if backend == "asyncio":
        return asyncio.run(fn(*args))
    return anyio.run(fn, *args, backend=backend)


def plot(rates: dict[str, dict[int, float]], path: Path, title: str) -> None:
    """Draw submits/s against concurrency, one line per contender (log-log)."""
    import matplotlib as mpl  # noqa: PLC0415 (bench extra)

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, by_point in rates.items():
        points = sorted(by_point)
        axes.plot(points, [by_point[p] for p in points], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(list(POINTS), [str(p) for p in POINTS])
    axes.set_xlabel("requests in flight (concurrency)")
    axes.set_ylabel("submits per second (median)")
    axes.set_title(title, fontsize=9)
    axes.grid(visible=True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    args = _common.parse_args(__doc__ or "", submits=1500, plot=str(DEFAULT_PLOT), no_plot=False)
    count = 100 if args.quick else args.submits
    rates: dict[str, dict[int, float]] = {name: {} for name in CONTENDERS}
    with _common.loopback_server() as server:
        for point in POINTS:
            runs = {
                name: (
                    lambda fn=fn, backend=backend, point=point: _run(
                        fn, backend, server.url, count, point
                    )
                )
                for name, (fn, backend) in CONTENDERS.items()
            }
            # One warm-up pass at the first point is enough: later points reuse the imports.
            times = _common.interleaved(
                runs, args.reps, warmup=point == POINTS[0] and not args.quick
            )
            for name, seconds in times.items():
                rates[name][point] = count / _common.median(seconds)

    title = f"{count:,} submits per point, median of {args.reps} ({_common.machine()})"
    _common.print_table(
        f"concurrency curve: submits/s, {title}",
        ["contender", *(f"c={p}" for p in POINTS)],
        [[name, *(rates[name][p] for p in POINTS)] for name in CONTENDERS],
    )
    if args.no_plot:
        pass
    elif not _common.importable("matplotlib"):
        print("\nmatplotlib is not installed (pip install 'keevx-async[bench]'): no plot")
    else:
        plot(rates, Path(args.plot), title)
        print(f"\nplot written to {args.plot}")
    print()
    sdk_rates = rates["AsyncKeevx, asyncio (aiohttp)"]
    aiohttp_rates = rates["aiohttp (bare)"]
    httpx_rates = rates["httpx plain (one pool)"]
    _common.print_figure(
        "curve_sdk_over_aiohttp_at_256",
        sdk_rates[256] / aiohttp_rates[256],
        "no target; the plot is the figure",
    )
    _common.print_figure(
        "curve_sdk_trio_over_httpx_at_256",
        rates["AsyncKeevx, trio (sharded httpx)"][256] / httpx_rates[256],
        "no target; the plot is the figure",
    )
    _common.print_figure(
        "curve_httpx_256_over_httpx_1",
        httpx_rates[256] / httpx_rates[1],
        "no target: how httpx's one pool slows as concurrency grows",
    )


if __name__ == "__main__":
    main()
