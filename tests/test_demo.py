"""``python -m keevx_async demo``: the command line, the live view and the report."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from typing import TYPE_CHECKING

import httpx
import pytest

import keevx_async as kx
from keevx_async import __version__
from keevx_async.__main__ import main
from keevx_async._demo import (
    FLAGGED_MARKER,
    _CallbackRoute,
    _print_table,
    _verdict,
    build_requests,
    run_demo,
)

if TYPE_CHECKING:
    from pathlib import Path

SUMMARY = re.compile(r"^(\d+) requests, (\d+) tasks: (\d+) succeeded, (\d+) failed in \d+\.\d\d s$")
TABLE_ROW = re.compile(r"^\s*(\d+)\s{2}.*\s(i2is-[0-9a-f]{7}\.\.\.)\s")


def _summary(output: str) -> tuple[int, int, int, int]:
    matches = [SUMMARY.match(line) for line in output.splitlines()]
    found = [match for match in matches if match is not None]
    assert len(found) == 1, output
    requests, tasks, succeeded, failed = map(int, found[0].groups())
    return requests, tasks, succeeded, failed


def _request_numbers(output: str) -> list[int]:
    return [
        int(match.group(1))
        for match in map(TABLE_ROW.match, output.splitlines())
        if match is not None
    ]


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "keevx_async", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- the command line, in a real process ----------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_command_reports_every_request(backend: str) -> None:
    completed = _run_module("demo", "--requests", "20", "--seed", "3", "--backend", backend)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    output = completed.stdout
    assert f"on {backend}" in output
    requests, tasks, succeeded, failed = _summary(output)
    expected = build_requests(20, 3)
    assert requests == 20
    assert tasks == sum(request.generate_count for request in expected)
    assert succeeded + failed == tasks
    flagged = [r.generate_count for r in expected if r.prompt.startswith(FLAGGED_MARKER)]
    assert failed == sum(flagged) > 0
    # Grouped by request, in input order: every number shows once, ascending.
    assert _request_numbers(output) == list(range(1, 21))
    assert len(re.findall(r"\si2is-[0-9a-f]{7}\.\.\.\s", output)) == tasks
    # The scripted 429 paused the client and was retried; nothing was lost.
    assert "pausing all requests" in output
    assert "21 submit calls, 20 accepted (1 refused)" in output
    assert "\r" not in output  # not a terminal: plain progress lines only
    assert "progress: " in output
    assert completed.stderr == ""


def test_demo_without_callbacks_gets_every_result_by_lookup() -> None:
    completed = _run_module("demo", "--requests", "10", "--seed", "4", "--no-callbacks")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    output = completed.stdout
    _, tasks, succeeded, failed = _summary(output)
    assert succeeded + failed == tasks
    assert "no callback URL" in output
    assert f"resolved_by_callback=0, resolved_by_lookup={tasks}," in output
    assert _request_numbers(output) == list(range(1, 11))


def test_demo_with_download_saves_every_image_as_a_real_png(tmp_path: Path) -> None:
    out = tmp_path / "images"
    completed = _run_module("demo", "--requests", "8", "--seed", "5", "--download", str(out))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    _, _, succeeded, _ = _summary(completed.stdout)
    assert f"files: {succeeded} images saved into {out}" in completed.stdout
    saved = sorted(out.iterdir())
    assert len(saved) == succeeded > 0
    for path in saved:
        assert path.name.startswith("i2is-")
        assert path.suffix == ".png"
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_module_without_a_command_prints_help_and_exits_2() -> None:
    completed = _run_module()
    assert completed.returncode == 2
    assert "demo" in completed.stderr
    assert "usage:" in completed.stderr


# --- in-process, so coverage sees it --------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("live", [True, False])
async def test_run_demo_writes_progress_table_and_summary(live: bool) -> None:
    out = io.StringIO()
    code = await run_demo(requests=12, seed=5, concurrency=4, file=out, live=live)
    output = out.getvalue()
    assert code == 0, output
    requests, tasks, succeeded, failed = _summary(output)
    expected = build_requests(12, 5)
    assert (requests, tasks) == (12, sum(request.generate_count for request in expected))
    assert failed == sum(r.generate_count for r in expected if r.prompt.startswith(FLAGGED_MARKER))
    assert succeeded == tasks - failed
    assert _request_numbers(output) == list(range(1, 13))
    assert "content moderation rejected the prompt" in output
    assert "retrying POST" in output
    assert "client stats: submitted=12, submit_errors=0" in output
    # Lost callbacks (the emulator drops a few) were recovered by one lookup each.
    lookups = int(re.search(r"(\d+) status lookups", output).group(1))  # type: ignore[union-attr]
    assert f"resolved_by_lookup={lookups}, lookups={lookups}, lookup_errors=0" in output
    # A terminal gets one line redrawn in place; a log gets whole lines.
    assert ("\r\x1b[Kread " in output) is live
    assert ("progress: read 12/12" in output) is not live


@pytest.mark.anyio
async def test_run_demo_with_one_request_has_nothing_flagged() -> None:
    out = io.StringIO()
    assert await run_demo(requests=1, seed=1, concurrency=1, file=out, live=False) == 0
    _, tasks, succeeded, failed = _summary(out.getvalue())
    assert (succeeded, failed) == (tasks, 0)


@pytest.mark.anyio
async def test_run_demo_refuses_nonsense_sizes() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        await run_demo(requests=0, file=io.StringIO())


def test_build_requests_is_seeded_and_flags_about_a_tenth() -> None:
    first, again = build_requests(50, 7), build_requests(50, 7)
    assert first == again
    assert build_requests(50, 8) != first
    assert sum(r.prompt.startswith(FLAGGED_MARKER) for r in first) == 5
    assert {r.generate_count for r in first} <= {1, 2, 3, 4}


def test_verdict_names_requests_missing_tasks() -> None:
    one, two = kx.ImageRequest("a fox", generate_count=2), kx.ImageRequest("an owl")
    pending = kx.Task("i2is-pending", two, 0)
    out = io.StringIO()
    assert _verdict(out, [one, two], [[], [pending]]) == 1
    assert out.getvalue() == "requests without a reported fate: 1, 2\n"


def test_table_shows_unsubmitted_requests_and_missing_outcomes() -> None:
    refused = kx.ImageRequest("a fox")
    error = kx.ServerError("boom", code=500, status_code=500, maybe_created=True)
    not_submitted = kx.Task._not_submitted(refused, error)
    out = io.StringIO()
    _print_table(out, [refused, kx.ImageRequest("an owl")], [[not_submitted], []])
    rows = out.getvalue().splitlines()[2:]
    assert re.match(r"^1  a fox\s+-\s+ServerError: boom \(code 500, HTTP 500\)", rows[0])
    assert re.match(r"^2  an owl\s+\(no outcome\)$", rows[1])
    assert _verdict(io.StringIO(), [refused], [[not_submitted]]) == 0


@pytest.mark.anyio
async def test_callback_route_answers_404_off_its_path() -> None:
    route = _CallbackRoute("/keevx/callback")
    transport = httpx.ASGITransport(app=route)
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as http:
        reply = await http.post("/elsewhere", json={})
        unplugged = await http.post("/keevx/callback", json={})
    assert reply.status_code == unplugged.status_code == 404


def test_main_runs_the_demo_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--requests", "3", "--seed", "2", "--concurrency", "2"]) == 0
    assert _summary(capsys.readouterr().out)[0] == 3


def test_main_without_a_command_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_main_refuses_a_concurrency_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--concurrency", "0"])
    assert exited.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err
