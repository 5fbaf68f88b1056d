"""The routing benchmark runs (``--quick``) and ends with its figure lines.

Only the shape of the output is checked, never a figure's value: speed is the
benchmark's business, not the test suite's. The script checks its own outcomes (every
callback forwarded and resolving its own task, every key with a TTL) and exits non-zero
otherwise. It needs the Redis server the router tests use (127.0.0.1:6379).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_router.py"

MS = r"\d+\.\d{3}"
FIGURES = [
    rf"router_routed_p50_ms {MS}",
    rf"router_routed_p99_ms {MS}",
    rf"router_redis_baseline_p50_ms {MS}",
    rf"router_redis_baseline_p99_ms {MS}",
    rf"router_local_p50_ms {MS}",
    rf"router_local_p99_ms {MS}",
    r"router_bytes_per_claim \d+",
    r"router_bytes_per_result \d+",
    r"router_used_memory_per_task -?\d+",  # a server shared with others may shrink meanwhile
    rf"router_added_p50_ms -?{MS}",
    r"router_added_latency_ratio \d+\.\d\d \(routed p50 / .+\)",
]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_router_benchmark_runs_and_prints_its_figures(backend: str) -> None:
    # The script runs its own event loop: it is not tied to the test's.
    done = subprocess.run(  # noqa: S603 (our own interpreter, our own script)
        [sys.executable, str(SCRIPT), "--quick", "--backend", backend],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("# machine: nproc="), done.stdout
    # The figure lines close the output, in this order.
    tail = lines[-len(FIGURES) :]
    assert len(tail) == len(FIGURES), done.stdout
    for pattern, line in zip(FIGURES, tail, strict=True):
        assert re.fullmatch(pattern, line), (pattern, line, done.stdout)
    # Every key of the run was deleted at the end.
    assert any(re.fullmatch(r"# cleanup: deleted [\d,]+ keys under \S+", line) for line in lines)
