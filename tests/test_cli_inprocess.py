"""``keevx`` in-process: input reading, the display, user mistakes, the small commands.

The subprocess tests (test_cli.py) run the real command; these run ``main`` and the
parts in this process, against the built-in emulator (``--fake``) or a FakeKeevx client.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import keevx_async as kx
from keevx_async._cli import main
from keevx_async._cli._display import Progress, summary
from keevx_async._cli._inputs import InputError, InvalidLine, Line, build_request, read_input
from keevx_async._cli._run import BatchOptions, Screen, request_fields, run_batch
from keevx_async.testing import FakeKeevx, serve_asgi

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEEVX_API_KEY", "KEEVX_BASE_URL", "KEEVX_CALLBACK_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "100")


def _lines(path: Path) -> list[Line | InvalidLine]:
    return list(read_input(path))


# --- input ----------------------------------------------------------------------------


def test_csv_values_are_coerced_by_field(tmp_path: Path) -> None:
    (tmp_path / "ref.png").write_bytes(PNG)
    source = tmp_path / "in.csv"
    source.write_text(
        "prompt,kind,model,reference_images,generate_audio,duration,custom_id\n"
        "a,video,V,ref.png|https://e.x/b.png,yes,,x1\n"
        "b,video,V,https://e.x/b.png,no,8,\n"
        "c,video,V,https://e.x/b.png,maybe,,\n"
        'd,video,V,"[1,",,,\n'
        "e,video,V,https://e.x/b.png,,8,,extra\n"
        "f,image,,,,,\n"
        "g,sound,,,,,\n"
    )
    lines = _lines(source)
    first, second = lines[0], lines[1]
    assert isinstance(first, Line)
    assert isinstance(first.request, kx.VideoRequest)
    assert first.request.reference_images == (tmp_path / "ref.png", "https://e.x/b.png")
    assert first.request.generate_audio is True
    assert first.request.custom_id == "x1"
    assert isinstance(second, Line)
    assert second.request.custom_id == "3"
    bad = {line.number: line.field for line in lines if isinstance(line, InvalidLine)}
    assert bad == {4: "generate_audio", 5: "reference_images", 6: None, 8: "kind"}
    assert isinstance(lines[5], Line)
    assert isinstance(lines[5].request, kx.ImageRequest)


def test_jsonl_lines_report_their_number_and_field(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"prompt": "a", "custom_id": "own"}\n\n[1, 2]\n{"generate_count": 2}\n'
        '{"prompt": "b", "reference_images": "https://e.x/a.png"}\n'
        '{"prompt": "c", "generate_count": "2x"}\n'
    )
    lines = _lines(source)
    assert isinstance(lines[0], Line)
    assert lines[0].request.custom_id == "own"
    invalid = [(line.number, line.field) for line in lines if isinstance(line, InvalidLine)]
    assert invalid[:2] == [(3, None), (4, "prompt")]
    assert [number for number, _ in invalid] == [3, 4, 5, 6]


def test_csv_rejects_a_bad_integer_and_a_missing_header(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("prompt,generate_count\na,lots\n")
    (line,) = _lines(source)
    assert isinstance(line, InvalidLine)
    assert line.field == "generate_count"
    source.write_text("text\na\n")
    with pytest.raises(InputError, match="header"):
        _lines(source)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("in.txt", b"", "must be a .jsonl or a .csv"),
        ("missing.jsonl", None, "no such file"),
        ("in.jsonl", b"\xff\xfe\x00", "not UTF-8"),
        ("in.csv", b'prompt\n"a"b\n', "not valid CSV"),
    ],
)
def test_unreadable_inputs_raise_input_error(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(InputError, match=message):
        _lines(source)


_prompts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1)


@given(
    prompt=_prompts.filter(lambda text: text.strip() == text and 0 < len(text) <= 100),
    count=st.integers(1, 8),
    ratio=st.sampled_from(["1:1", "16:9", "9:16"]),
    module=st.sampled_from(["std", "pro"]),
)
def test_a_request_round_trips_through_its_out_fields(
    prompt: str, count: int, ratio: str, module: str
) -> None:
    fields_in = {"generate_count": count, "image_ratio": ratio, "module": module}
    request = build_request({"prompt": prompt, **fields_in, "custom_id": "7"}, 7, Path())
    fields = json.loads(json.dumps(request_fields(request)))
    fields["custom_id"] = "7"
    assert build_request(fields, 7, Path()) == request


# --- display --------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _text(progress: Progress) -> str:
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(progress.render())
    return " ".join(console.export_text().split())


def test_the_display_at_two_moments_of_a_run() -> None:
    clock = _Clock()
    progress = Progress(total=10, clock=clock)
    clock.now += 2
    progress.read, progress.submitted, progress.running = 4, 3, 2
    progress.finished(None)
    progress.saw_rate_limited(1)
    early = _text(progress)
    assert "read 4/10" in early
    assert "paused: rate limited (429)" in early
    assert "running 2" in early
    assert "0.5 tasks/s" in early

    clock.now += 8
    progress.saw_rate_limited(1)
    progress.read, progress.submitted, progress.running = 10, 10, 0
    for _ in range(8):
        progress.finished(None)
    progress.finished("FAILED: flagged")
    progress.stopping = True
    late = _text(progress)
    assert "succeeded 9" in late
    assert "failed 1" in late
    assert "paused" not in late
    assert "stopping: finishing the submits in flight" in late
    assert "eta 0:00" in late
    line = progress.line()
    assert line.startswith("progress: read 10/10 | invalid 0 | submitted 10 | running 0 |")


def test_the_summary_groups_failures_by_error() -> None:
    progress = Progress()
    assert progress.eta is None
    for number in range(13):
        progress.finished(f"FAILED: reason {number % 12}")
    console = Console(record=True, width=100, file=io.StringIO())
    summary(console, progress, paths={"results": Path("out.jsonl"), "journal": None}, resume="x")
    text = console.export_text()
    assert "failures by error" in text
    assert "FAILED: reason 0" in text
    assert "... and 2 other errors" in text
    assert "results: out.jsonl" in text
    assert "journal:" not in text


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["live", "plain", "quiet"])
async def test_a_run_draws_its_display(tmp_path: Path, mode: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"prompt": "p{n}"}}\n' for n in range(30)))
    file = io.StringIO()
    console = Console(record=True, width=100, file=file, force_terminal=mode == "live")
    screen = Screen(console=console, live=mode == "live", quiet=mode == "quiet", plain_every=0.0)
    async with FakeKeevx(complete_after=(0.05, 0.2)) as fake, fake.client() as client:
        code = await run_batch(client, BatchOptions(input=source), screen)
    assert code == 0
    text = console.export_text()
    assert "tasks succeeded" in text
    if mode == "plain":
        assert "progress: read 30/30" in text
    if mode == "live":
        assert "succeeded 30" in " ".join(text.split())


# --- main: user mistakes and small commands -------------------------------------------


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a"}\n')
    return source


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["batch", "{prompts}"], {}, "set KEEVX_API_KEY"),
        (["batch", "{tmp}/nope.jsonl", "--fake"], {}, "no such file"),
        (["batch", "{prompts}", "--public-url", "https://x"], {"KEEVX_API_KEY": "k"}, "--listen"),
        (
            ["batch", "{prompts}", "--base-url", "http://127.0.0.1:9", "--no-journal"],
            {"KEEVX_API_KEY": "k"},
            "cannot reach the service",
        ),
        (["batch", "{prompts}", "--base-url", "ftp://x"], {"KEEVX_API_KEY": "k"}, "base_url"),
        (["generate", "a", "--count", "9", "--fake"], {}, "generate_count"),
        (["upload", "{tmp}/nope.png", "--fake"], {}, "nope.png"),
        (["batch", "{prompts}", "--fake", "--out", "{tmp}"], {}, "cannot write --out"),
        (["status", "i2is-1", "--base-url", "http://127.0.0.1:9"], {"KEEVX_API_KEY": "k"}, "reach"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(  # noqa: PLR0917 - fixtures and parameters
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    prompts: Path,
    argv: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = [part.format(prompts=prompts, tmp=tmp_path) for part in argv]
    code, _, err = _main(capsys, *argv)
    assert code == 2
    assert err.startswith("keevx: error: "), err
    assert err.count("\n") == 1, err
    assert message in err


def test_a_refused_key_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, prompts: Path
) -> None:
    monkeypatch.setenv("KEEVX_API_KEY", "wrong")
    results: list[tuple[int, str, str]] = []

    async def scenario() -> None:
        async with FakeKeevx(api_key="right") as fake, serve_asgi(fake) as server:
            results.append(
                await anyio.to_thread.run_sync(
                    lambda: _main(capsys, "batch", str(prompts), "--base-url", server.url)
                )
            )

    anyio.run(scenario)
    ((code, _, err),) = results
    assert code == 2
    assert "refused the API key (401)" in err


def test_batch_without_a_command_and_with_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["batch", "x.jsonl", "--listen", "nowhere"])
    assert exited.value.code == 2
    assert "HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["batch", "x.jsonl", "--per-second", "0"])
    with pytest.raises(SystemExit):
        main(["batch", "x.jsonl", "--per-second", "fast"])
    with pytest.raises(SystemExit):
        main(["batch", "x.jsonl", "--concurrency", "many"])


def test_generate_status_download_upload_with_fake(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = _main(capsys, "generate", "a red fox", "--count", "2", "--fake")
    assert code == 0
    assert out.count("https://") == 2
    code, out, _ = _main(capsys, "generate", "a red fox", "--fake", "--out", str(tmp_path))
    assert code == 0
    assert len(list(tmp_path.glob("i2is-*.png"))) == 1
    code, out, _ = _main(capsys, "generate", "[flagged] x", "--fake", "--ref", "https://e.x/a.png")
    image = tmp_path / "vase.png"
    image.write_bytes(PNG)
    code, out, _ = _main(capsys, "upload", str(image), "--fake", "-q")
    assert code == 0
    assert "https://" in out
    code, out, _ = _main(capsys, "status", "i2is-0123", "--fake")
    assert code == 1
    assert "110002" in out
    code, out, _ = _main(capsys, "download", "i2is-0123", "--fake", "--out", str(tmp_path))
    assert code == 1
    assert "110002" in out


# --- run_batch: failures, unknown outcomes, resumes ------------------------------------


def _screen() -> tuple[Screen, Console]:
    console = Console(record=True, width=100, file=io.StringIO())
    return Screen(console=console, live=False), console


def _out(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.anyio
async def test_failures_timeouts_and_unknown_outcomes_are_recorded(tmp_path: Path) -> None:
    (tmp_path / "ref.png").write_bytes(PNG)
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"prompt": "bad one"}\n{"prompt": "slow one"}\n{"prompt": "lost one"}\n'
        '{"prompt": "with a file", "reference_images": ["ref.png"]}\n'
    )
    out, journal = tmp_path / "out.jsonl", tmp_path / "run.db"
    options = BatchOptions(input=source, out=out, journal=journal, timeout=1.0, concurrency=1)
    fake = FakeKeevx(
        fail_if=lambda prompt: prompt.startswith("bad"),
        complete_after=0.01,
        lose_if=lambda prompt: prompt.startswith("slow"),
    )
    async with fake, fake.client(reconcile_after=None) as client:
        fake.inject(500, route="submit", create=False)  # the first submit: outcome unknown
        screen, console = _screen()
        assert await run_batch(client, options, screen) == 1
    statuses = {record["custom_id"]: record["status"] for record in _out(out)}
    assert statuses == {"1": "NOT_SUBMITTED", "2": "ERROR", "3": "SUCCEEDED", "4": "SUCCEEDED"}
    assert "the journal" in console.export_text()
    ref = next(r for r in _out(out) if r["custom_id"] == "4")["request"]
    assert ref["reference_images"] == [str(tmp_path / "ref.png")]  # type: ignore[index]

    async with FakeKeevx() as fake, fake.client() as client:
        screen, _ = _screen()
        assert await run_batch(client, options, screen) == 1
    again = _out(out)[4:]
    assert {r["custom_id"]: r["status"] for r in again}["1"] == "UNKNOWN"
    assert all(r["replayed"] for r in again if r["custom_id"] in ("3", "4"))


@pytest.mark.anyio
async def test_a_failed_task_keeps_its_status(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "bad one"}\n')
    out = tmp_path / "out.jsonl"
    fake = FakeKeevx(fail_if=lambda prompt: prompt.startswith("bad"))
    async with fake, fake.client() as client:
        screen, console = _screen()
        assert await run_batch(client, BatchOptions(input=source, out=out), screen) == 1
    (record,) = _out(out)
    assert record["status"] == "FAILED"
    assert "failures by error" in console.export_text()


def test_a_duplicate_custom_id_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a", "custom_id": "x"}\n{"prompt": "b", "custom_id": "x"}\n')
    journal = str(tmp_path / "run.db")
    code, _, err = _main(capsys, "batch", str(source), "--fake", "--journal", journal)
    assert code == 2
    assert "custom_id" in err


def test_commands_with_a_refused_key_or_no_service(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEVX_API_KEY", "wrong")
    results: list[tuple[int, str, str]] = []

    async def scenario() -> None:
        async with FakeKeevx(api_key="right") as fake, serve_asgi(fake) as server:
            for command in (["status", "i2is-1"], ["generate", "a fox"]):
                argv = [*command, "--base-url", server.url]
                run = functools.partial(_main, capsys, *argv)
                results.append(await anyio.to_thread.run_sync(run))

    anyio.run(scenario)
    assert [code for code, _, _ in results] == [2, 2]
    assert all("refused the API key" in err for _, _, err in results)


def test_download_saves_a_finished_task(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEEVX_API_KEY", "k")
    results: list[tuple[int, str, str]] = []

    async def scenario() -> None:
        fake = FakeKeevx(fail_if=lambda prompt: prompt.startswith("bad"))
        async with fake, serve_asgi(fake) as server:
            fake.image_base_url = server.url + "/files"
            async with fake.client(base_url=server.url) as client:
                done = await client.generate(kx.ImageRequest("a red fox"))
                failed = (await client.submit(kx.ImageRequest("bad"))).tasks[0]
                with pytest.raises(kx.TaskFailedError):
                    await failed.wait()
            argv = ["download", done[0].task_id, str(failed.task_id), "--base-url", server.url]
            argv += ["--out", str(tmp_path), "--listen", "127.0.0.1:0"]
            results.append(await anyio.to_thread.run_sync(lambda: _main(capsys, *argv)))

    anyio.run(scenario)
    ((code, out, _),) = results
    assert code == 1
    assert "not downloadable: FAILED" in out
    assert len(list(tmp_path.glob("i2is-*.png"))) == 1


def test_generate_a_video(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["generate", "the fox runs", "--video", "--image", "https://e.x/a.png"]
    code, out, _ = _main(capsys, *argv, "--duration", "6", "--fake", "--out", str(tmp_path))
    assert "i2v-" in out
    assert code == 0
    assert len(list(tmp_path.glob("i2v-*.mp4"))) == 1
    code, _, err = _main(capsys, *argv, "--model", "KL", "--fake")
    assert code == 2
    assert "image_url" in err
