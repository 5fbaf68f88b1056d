"""The callback benchmarks run (``--quick``) and end with their figure lines.

Only the shape of the output is checked, never a figure's value: speed is the
benchmarks' business, not the test suite's. Each script checks its own outcomes (every
callback resolved its task, every POST answered 200) and fails loudly otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

FIGURES = {
    "bench_callbacks.py": [
        r"callback_bare_loop_rate \d+ /s",
        r"callback_feed_rate \d+ /s",
        r"callback_ingestion_ratio \d+\.\d\d \(target >= 0\.40\)",
    ],
    "bench_memory.py": [
        r"memory_per_pending_task \d+ bytes \(target <= 1000, aim 500\)",
    ],
    "bench_receiver.py": [
        r"receiver_bare_rate \d+ /s",
        r"receiver_callback_app_rate \d+ /s",
        r"receiver_ratio \d+\.\d\d \(target >= 0\.80\)",
    ],
}


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_benchmark_runs_and_prints_its_figures(script: str) -> None:
    # The receiver benchmark runs uvicorn (asyncio) and an aiohttp driver in their own
    # processes: these scripts are not tied to the test's event loop.
    done = subprocess.run(  # noqa: S603 (our own interpreter, our own scripts)
        [sys.executable, str(BENCH / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    patterns = FIGURES[script]
    # The figure lines close the output, in this order.
    tail = lines[-len(patterns) :]
    assert len(tail) == len(patterns), done.stdout
    for pattern, line in zip(patterns, tail, strict=True):
        assert re.fullmatch(pattern, line), (pattern, line, done.stdout)
    assert any(line.startswith("# machine: nproc=") for line in lines)
