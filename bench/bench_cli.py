"""The `keevx` command line against the same run through ``client.batch`` in a script.

Figures (each contender a child process of its own, run one after the other; both
against the built-in emulator in-process, FakeKeevx, with the same settings, no journal):

- ``cli_rate_ratio``: requests per second of ``keevx batch PROMPTS --fake --out FILE``
  over a script that reads the same JSONL, runs it through ``client.batch`` and writes one
  JSON line per task (target >= 0.90), at the largest size.
- ``cli_rss_ratio``: the command's peak RSS over the script's, at the largest size
  (target <= 1.25: the command adds rich and its bookkeeping, not per-request state).
- ``cli_rss_growth_mb``: how much the command's peak RSS grows from the smaller input to
  the larger one, less the script's growth (target < 10 MB: flat in the input size; the
  emulator's own task table grows in both; noise below zero counts as 0).

Run: ``python bench/bench_cli.py`` (``--quick`` for a smoke run; ``--sizes``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

SCRIPT = """
import json, sys
import anyio
import keevx_async as kx
from keevx_async._cli._commands import FAKE_COMPLETE_AFTER
from keevx_async.testing import FakeKeevx

async def main(source, out_path):
    def requests():
        with open(source) as lines:
            for number, line in enumerate(lines, 1):
                fields = json.loads(line)
                yield kx.ImageRequest(fields.pop("prompt"), custom_id=str(number), **fields)
    async with FakeKeevx(complete_after=FAKE_COMPLETE_AFTER) as fake, fake.client() as client:
        with open(out_path, "a") as out:
            async with client.batch(requests()) as batch:
                async for task in batch:
                    result = task.result()
                    out.write(json.dumps({"custom_id": task.request.custom_id,
                        "task_id": task.task_id, "url": result.image_url}) + "\\n")
                    out.flush()

anyio.run(main, sys.argv[1], sys.argv[2], backend="asyncio")
"""


def _measure(command: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{command[:4]} exited with {child.returncode}")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    """Run both contenders at each size; print the table and the figures."""
    args = _common.parse_args(__doc__ or "", sizes="5000,20000")
    sizes = [500, 2000] if args.quick else [int(size) for size in args.sizes.split(",")]
    rows = []
    measured: dict[tuple[str, int], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        for size in sizes:
            source = folder / f"prompts-{size}.jsonl"
            source.write_text(
                "".join(
                    json.dumps({"prompt": f"a lighthouse at dawn {n}"}) + "\n" for n in range(size)
                )
            )
            cli = [sys.executable, "-m", "keevx_async", "batch", str(source), "--fake", "-q"]
            cli += ["--out", str(folder / f"cli-{size}.jsonl")]
            script = [sys.executable, "-c", SCRIPT, str(source), str(folder / f"s-{size}.jsonl")]
            for name, command in (("script", script), ("keevx batch", cli)):
                seconds, rss = _measure(command)
                measured[name, size] = (seconds, rss)
                rows.append([name, size, size / seconds, seconds, rss])
    _common.print_table(
        "keevx batch --fake against client.batch in a script (one child process each)",
        ["contender", "requests", "requests/s", "seconds", "peak RSS MB"],
        rows,
    )
    print()
    small, large = sizes[0], sizes[-1]
    cli_seconds, cli_rss = measured["keevx batch", large]
    script_seconds, script_rss = measured["script", large]
    _common.print_figure("cli_rate_ratio", script_seconds / cli_seconds, "target >= 0.90")
    _common.print_figure("cli_rss_ratio", cli_rss / script_rss, "target <= 1.25")
    growth = (cli_rss - measured["keevx batch", small][1]) - (
        script_rss - measured["script", small][1]
    )
    # Below zero is measurement noise: no growth.
    _common.print_figure(
        "cli_rss_growth_mb", max(0.0, growth), f"{small:,} -> {large:,}; target < 10"
    )


if __name__ == "__main__":
    main()
