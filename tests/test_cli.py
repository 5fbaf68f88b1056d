"""``keevx``: the real command line in subprocesses against FakeKeevx on loopback.

A FakeKeevx serves on a loopback port (``python -m keevx_async.testing``); each test runs
``python -m keevx_async batch ... --base-url URL`` in a process of its own and checks what
it wrote (``--out`` lines, files) and what the fake recorded (``GET /_fake/state``).
Synchronisation is by reading the ``--out`` file, never by sleeping blindly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

KEY = "cli-test-key"
SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    command = [sys.executable, "-m", "keevx_async.testing", "--port", "0", "--seed", "3"]
    command += ["--complete-after", "0.02,0.3", "--api-key", KEY]
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


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEVX_")}
    env.update(KEEVX_API_KEY=KEY, COLUMNS="100", NO_COLOR="1", **extra)
    return env


def _keevx(*args: str, **popen: Any) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "keevx_async", *args]
    return subprocess.Popen(  # noqa: S603
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=popen.pop("env", _env()),
        **popen,
    )


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _created(url: str, prefix: str) -> Counter[str]:
    """Prompt -> how many tasks the fake created for it, for this test's prompts."""
    state = httpx.get(f"{url}/_fake/state", timeout=10).json()["data"]
    return Counter(
        task["prompt"] for task in state["tasks"].values() if task["prompt"].startswith(prefix)
    )


def _input(directory: Path, prefix: str, count: int, bad: set[int]) -> dict[int, int]:
    """A JSONL input of ``count`` lines, images and videos, the ``bad`` line numbers
    invalid; returns line number -> tasks expected."""
    rng = random.Random(count)
    expected = {}
    lines = []
    for number in range(1, count + 1):
        prompt = f"{prefix} {number}"
        if number in bad:
            lines.append(
                rng.choice(
                    [
                        '{"prompt": "x", "generate_count": 9}',
                        '{"prompt": "x", "colour": "red"}',
                        "not json",
                        '{"prompt": "x", "kind": "video", "model": "KL", "image_url": "https://e.x/a.png"}',
                    ]
                )
            )
        elif number % 7 == 0:
            lines.append(
                json.dumps(
                    {
                        "prompt": prompt,
                        "kind": "video",
                        "image_url": "https://e.x/a.png",
                        "duration": 4,
                    }
                )
            )
            expected[number] = 1
        else:
            count_images = rng.randint(1, 2)
            lines.append(json.dumps({"prompt": prompt, "generate_count": count_images}))
            expected[number] = count_images
    (directory / "in.jsonl").write_text("\n".join(lines) + "\n")
    return expected


def test_a_500_line_input_with_bad_lines_videos_and_downloads(
    fake_url: str, tmp_path: Path
) -> None:
    prefix = uuid.uuid4().hex
    bad = {3, 50, 123, 333, 499}
    expected = _input(tmp_path, prefix, 500, bad)
    out, files = tmp_path / "out.jsonl", tmp_path / "files"
    run = _keevx(
        "batch", str(tmp_path / "in.jsonl"), "--base-url", fake_url, "--out", str(out),
        "--download", str(files), "--listen", "127.0.0.1:0", "--concurrency", "32",
    )  # fmt: skip
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr
    records = _records(out)
    invalid = {r["line"] for r in records if r["status"] == "INVALID"}
    assert invalid == bad
    tasks = Counter(r["line"] for r in records if r["status"] != "INVALID")
    assert tasks == Counter(expected)
    for record in records:
        if record["status"] == "INVALID":
            continue
        assert record["status"] == "SUCCEEDED", record
        assert record["custom_id"] == str(record["line"])
        assert record["request"]["prompt"] == f"{prefix} {record['line']}"
        assert record["kind"] == ("video" if record["line"] % 7 == 0 else "image")
        assert Path(record["path"]).is_file()
    assert sum(_created(fake_url, prefix).values()) == sum(expected.values())
    assert "line 3" in stdout
    assert "invalid lines (skipped)" in stdout


def test_ctrl_c_then_the_same_command_resumes_without_paying_twice(
    fake_url: str, tmp_path: Path
) -> None:
    prefix = uuid.uuid4().hex
    expected = _input(tmp_path, prefix, 400, set())
    out = tmp_path / "out.jsonl"
    command = ["batch", str(tmp_path / "in.jsonl"), "--base-url", fake_url, "--out", str(out)]
    command += ["--listen", "127.0.0.1:0", "--concurrency", "4", "--per-second", "100"]
    first = _keevx(*command)
    deadline = time.monotonic() + 60
    while not out.exists() or len(out.read_text().splitlines()) < 20:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    assert "run the same command again to resume" in stdout
    assert "Traceback" not in stderr
    interrupted = _records(out)
    assert len({r["line"] for r in interrupted}) < len(expected)

    second = _keevx(*command)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    records = _records(out)
    done = {(r["line"], r["task_id"]) for r in records}
    assert Counter(line for line, _ in done) == Counter(expected)
    assert any(r["replayed"] for r in records[len(interrupted) :])
    created = _created(fake_url, prefix)
    assert created == Counter({f"{prefix} {line}": n for line, n in expected.items()})


def test_fake_runs_a_csv_end_to_end(tmp_path: Path) -> None:
    source = tmp_path / "prompts.csv"
    source.write_text(
        "custom_id,prompt,generate_count,reference_images,image_ratio\n"
        "a,a red fox,2,https://e.x/a.png|https://e.x/b.png,1:1\n"
        'b,a blue fox,1,"[""https://e.x/c.png""]",\n'
        "c,a green fox,two,,\n"
    )
    out = tmp_path / "out.jsonl"
    run = _keevx("batch", str(source), "--fake", "--out", str(out), "--download", str(tmp_path))
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1, stderr
    records = _records(out)
    assert Counter(r["custom_id"] for r in records if r["status"] == "SUCCEEDED") == {
        "a": 2,
        "b": 1,
    }
    assert [r["line"] for r in records if r["status"] == "INVALID"] == [4]
    assert "generate_count" in next(r["error"] for r in records if r["line"] == 4)
    assert all(Path(r["path"]).is_file() for r in records if r["path"])


@pytest.mark.parametrize("command", [[], ["batch"]])
def test_help_matches_its_snapshot(command: list[str]) -> None:
    run = _keevx(*command, "--help")
    stdout, _ = run.communicate(timeout=30)
    assert run.returncode == 0
    name = "_".join(["keevx", *command]) + "_help.txt"
    snapshot = SNAPSHOTS / name
    if os.environ.get("UPDATE_SNAPSHOTS"):
        snapshot.write_text(stdout)
    assert stdout == snapshot.read_text()


def test_a_second_ctrl_c_quits_at_once(fake_url: str, tmp_path: Path) -> None:
    prefix = uuid.uuid4().hex
    _input(tmp_path, prefix, 200, set())
    out = tmp_path / "out.jsonl"
    run = _keevx(
        "batch", str(tmp_path / "in.jsonl"), "--base-url", fake_url, "--out", str(out),
        "--listen", "127.0.0.1:0", "--concurrency", "2", "--per-second", "20", "--no-journal",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not out.exists() or not out.read_text():
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr
