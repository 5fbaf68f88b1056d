"""The HTTP benchmarks still run: each script with ``--quick``, in a subprocess.

Only that they run and print their figure lines is checked, never a figure's value:
performance is measured by ``nox -s bench``, not asserted by the test suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

FIGURES = {
    "bench_fanout.py": [
        "fanout_asyncio_ratio",
        "fanout_httpx_ratio",
        "peer_openai_ratio",
        "peer_openai_aiohttp_ratio",
    ],
    "bench_curve.py": [
        "curve_sdk_over_aiohttp_at_256",
        "curve_sdk_trio_over_httpx_at_256",
        "curve_httpx_256_over_httpx_1",
    ],
    "bench_scale.py": ["scale_time_ratio", "scale_leftover_blocks_per_task"],
    "bench_journal.py": [
        "journal_fanout_ratio",
        "journal_callback_ratio",
        "journal_resume_seconds",
    ],
    "bench_cli.py": ["cli_rate_ratio", "cli_rss_ratio", "cli_rss_growth_mb"],
    "bench_files.py": [
        "download_ratio",
        "fanout_download_ratio",
        "fanout_download_cpu_ratio",
    ],
}


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_benchmark_prints_its_figures(script: str, tmp_path: Path) -> None:
    args = [sys.executable, str(BENCH / script), "--quick"]
    if script == "bench_curve.py":
        args += ["--plot", str(tmp_path / "curve.png")]  # never overwrite the docs' plot
    done = subprocess.run(  # noqa: S603 - our own scripts, with our interpreter
        args, capture_output=True, text=True, timeout=240, check=False, cwd=BENCH.parent
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for figure in FIGURES[script]:
        [line] = [line for line in lines if line.startswith(figure + " ")]
        # n/a when a baseline of the bench extra is not installed; else a ratio.
        value = line.split()[1]
        assert value == "n/a" or float(value) >= 0
        assert "(" in line  # the target (or why there is none) is printed with it
    if script == "bench_curve.py" and "no plot" not in done.stdout:
        assert (tmp_path / "curve.png").stat().st_size > 0
