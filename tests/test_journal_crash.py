"""A journaled batch SIGKILLed at points hypothesis picks, then resumed, in real processes.

A FakeKeevx serves on loopback (``python -m keevx_async.testing``); each run of the batch
is ``tests/journal_worker.py`` in a process of its own, which stops dead at the chosen
milestone and says so (``KILLME``): the test kills it on reading that line, so the kill
lands exactly there, with no sleeping. Then the run is resumed until it finishes, and the
fake's own record of what was submitted (``GET /_fake/state``) is checked against what
the runs reported: nothing lost, nothing paid twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from journal_support import postgres_schema

if TYPE_CHECKING:
    from collections.abc import Iterator

WORKER = Path(__file__).parent / "journal_worker.py"
COUNT = 6
KINDS = ("start", "submit", "reply", "callback", "download")
_kills = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 5)), min_size=1, max_size=2)


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    command = [sys.executable, "-m", "keevx_async.testing", "--port", "0", "--seed", "5"]
    command += ["--complete-after", "0.02,0.2"]
    fake = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # noqa: S603
    try:
        assert fake.stdout is not None
        line = fake.stdout.readline()
        assert line.startswith("FakeKeevx listening on "), line
        yield line.split()[-1]
    finally:
        fake.send_signal(signal.SIGTERM)
        fake.wait(10)
        if fake.stdout is not None:
            fake.stdout.close()


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with postgres_schema() as dsn:
        yield dsn


def _run(
    url: str, journal: str, out: Path, prefix: str, kill: tuple[str, int] | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """One run of the worker: the tasks it reported, and whether it was killed."""
    command = [sys.executable, str(WORKER), url, journal, str(out), prefix, str(COUNT)]
    if kill is not None:
        command += [kill[0], str(kill[1])]
    if kill == ("resubmit", 0):
        command = [*command[:-2], "--resubmit"]
    with tempfile.TemporaryFile("w+") as errors:
        worker = subprocess.Popen(  # noqa: S603
            command, stdout=subprocess.PIPE, stderr=errors, text=True
        )
        assert worker.stdout is not None
        reported = []
        killed = False
        for line in worker.stdout:
            if line == "KILLME\n":
                os.kill(worker.pid, signal.SIGKILL)
                killed = True
                break
            if line != "DONE\n":
                reported.append(json.loads(line))
        code = worker.wait(60)
        worker.stdout.close()
        errors.seek(0)
        assert killed or code == 0, errors.read()
    return reported, killed


def _submitted(url: str, prefix: str) -> dict[str, str]:
    """Task ID -> prompt of every task the fake created for this run."""
    state = httpx.get(f"{url}/_fake/state", timeout=10).json()["data"]
    return {
        task_id: task["prompt"]
        for task_id, task in state["tasks"].items()
        if task["prompt"].startswith(prefix + " ")
    }


def _check_crashes(url: str, journal: str, kills: list[tuple[str, int]]) -> None:
    prefix = uuid.uuid4().hex
    prompts = {f"{prefix} {i}" for i in range(COUNT)}
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "out"
        if not journal:
            journal = str(Path(directory) / "run.db")
        reported = []
        for kill in kills:
            tasks, _ = _run(url, journal, out, prefix, kill)
            reported += tasks
        final, killed = _run(url, journal, out, prefix)
        assert not killed
        reported += final

        # Every request is reported once by the finished run: done, or unknown.
        assert sorted(task["prompt"] for task in final) == sorted(prompts)
        unknown = {t["prompt"] for t in final if t["error"] == "UnknownOutcomeError"}
        assert all(t["error"] is None for t in final if t["prompt"] not in unknown)
        assert all(t["task_id"] is None for t in final if t["prompt"] in unknown)
        # Every task ID maps to its request, and every saved file exists.
        created = _submitted(url, prefix)
        for task in reported:
            if task["task_id"] is not None:
                assert created[task["task_id"]] == task["prompt"]
            if task["error"] is None:
                assert Path(task["path"]).exists()
        # Nothing was paid twice.
        assert max(Counter(created.values()).values(), default=0) <= 1
        assert set(created.values()) >= prompts - unknown

        # Resubmitting the unknown ones finishes the run; only they may be paid twice.
        resent, _ = _run(url, journal, out, prefix, ("resubmit", 0))
        assert sorted(task["prompt"] for task in resent) == sorted(prompts)
        assert all(task["error"] is None for task in resent)
        assert {t["prompt"] for t in resent if not t["replayed"]} == unknown
        twice = {p for p, n in Counter(_submitted(url, prefix).values()).items() if n > 1}
        assert twice <= unknown


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(kills=_kills)
def test_sqlite_runs_survive_kills(fake_url: str, kills: list[tuple[str, int]]) -> None:
    _check_crashes(fake_url, "", kills)


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(kills=_kills)
def test_postgres_runs_survive_kills(
    fake_url: str, postgres_dsn: str, kills: list[tuple[str, int]]
) -> None:
    _check_crashes(fake_url, f"postgres:{uuid.uuid4().hex}:{postgres_dsn}", kills)


def test_a_run_killed_twice_in_a_row_mid_submit_and_mid_callback(fake_url: str) -> None:
    _check_crashes(fake_url, "", [("reply", 2), ("callback", 1)])
