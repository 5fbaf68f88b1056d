"""Files: local reference images uploaded once, result files downloaded safely.

Every test runs against FakeKeevx (its upload endpoint and its file host), in-process or
over its loopback server; faults come from its knobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from wiring import API_KEY, CALLBACK_URL, ScriptedApp, closed_port, scripted_client, wired

import keevx_async as kx
from keevx_async._files import file_name, multipart_body
from keevx_async._wire import WireFormatError, decode_upload_envelope, decode_upload_reply
from keevx_async.testing import FakeKeevx
from keevx_async.testing._file_host import parse_multipart, png_bytes

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent
MB = 1024 * 1024


def image_file(directory: Path, name: str = "vase.png", seed: str = "vase") -> Path:
    path = directory / name
    path.write_bytes(png_bytes(seed))
    return path


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


class FileApp:
    """A file host answering every request with one reply, recording the paths asked."""

    def __init__(self, body: bytes, headers: dict[str, str], status: int = 200) -> None:
        self.reply = (status, body, headers)
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        self.paths.append(scope["path"])
        status, body, headers = self.reply
        raw = [(name.encode(), value.encode()) for name, value in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self))


def leftovers(directory: Path) -> list[str]:
    """Temporary files of downloads left in ``directory``."""
    return [name for name in listing(directory) if name.endswith(".part")]


def listing(directory: Path) -> list[str]:
    """The names in ``directory``, sorted."""
    return sorted(path.name for path in directory.iterdir())


def files_under(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()]


async def one_result(client: kx.AsyncKeevx, prompt: str = "a red fox") -> kx.ImageResult:
    [result] = await client.generate(kx.ImageRequest(prompt))
    return result


# --- reference images: checked when the request is built ---------------------------------


def test_a_local_file_is_a_reference_image_and_the_request_keeps_it(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    request = kx.ImageRequest("x", reference_images=[vase, "https://cdn.test/b.jpg"])
    assert request.reference_images == (vase, "https://cdn.test/b.jpg")


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d / "missing.png", "no such file"),
        (lambda d: d, "must be an image"),  # the directory itself: no extension
        (lambda d: (d / "dir.png").mkdir() or d / "dir.png", "not a regular file"),
        (lambda d: image_file(d, "vase.tiff"), "got .tiff"),
        (lambda d: image_file(d, "noext"), "got no extension"),
        (lambda d: empty_file(d / "empty.png"), "empty file"),
    ],
)
def test_a_bad_local_file_is_refused_naming_its_position(
    tmp_path: Path, make: Any, says: str
) -> None:
    bad = make(tmp_path)
    good = image_file(tmp_path, "good.png")
    with pytest.raises(kx.InvalidRequestError, match=says) as caught:
        kx.ImageRequest("x", reference_images=[good, "https://cdn.test/a.png", bad])
    assert caught.value.field == "reference_images[2]"


def test_a_local_file_over_20_mb_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as file:
        file.truncate(20 * MB + 1)  # sparse: no 20 MB written
    with pytest.raises(kx.InvalidRequestError, match="more than the service's 20 MB") as caught:
        kx.ImageRequest("x", reference_images=[big])
    assert caught.value.field == "reference_images[0]"


def test_a_str_is_always_a_url_never_a_path(tmp_path: Path) -> None:
    image_file(tmp_path)
    with pytest.raises(kx.InvalidRequestError, match="http"):
        kx.ImageRequest("x", reference_images=[str(tmp_path / "vase.png")])


@pytest.mark.parametrize("value", [Path("a.png"), 42])
def test_a_single_path_or_a_number_is_not_a_list_of_images(value: object) -> None:
    with pytest.raises(kx.InvalidRequestError) as caught:
        kx.ImageRequest("x", reference_images=[value] if isinstance(value, int) else value)
    assert caught.value.field in ("reference_images", "reference_images[0]")


def test_a_bytes_path_object_is_read_as_its_decoded_name(tmp_path: Path) -> None:
    vase = image_file(tmp_path)

    class BytesPath(os.PathLike[bytes]):
        def __fspath__(self) -> bytes:
            return os.fsencode(vase)

    kx.ImageRequest("x", reference_images=[BytesPath()])


def test_a_path_object_that_gives_no_path_is_refused() -> None:
    class Broken(os.PathLike[str]):
        def __fspath__(self) -> str:
            return 42  # type: ignore[return-value]

    with pytest.raises(kx.InvalidRequestError, match="not a usable path"):
        kx.ImageRequest("x", reference_images=[Broken()])


def test_a_path_through_a_file_is_refused_with_its_reason(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    with pytest.raises(kx.InvalidRequestError, match=r"cannot read .*Not a directory"):
        kx.ImageRequest("x", reference_images=[vase / "inner.png"])


# --- uploads at submit time -----------------------------------------------------------


async def test_a_submit_uploads_its_local_file_and_sends_the_url_only(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    request = kx.ImageRequest("like this", reference_images=["https://cdn.test/a.png", vase])
    async with wired() as (fake, client):
        submission = await client.submit(request)
        [result] = [await task for task in submission.tasks]
    [(file_id, stored)] = fake.uploads.items()
    assert stored.content == vase.read_bytes()
    [task] = fake.tasks.values()
    sent = task.body["reference_images"]
    assert sent[0] == "https://cdn.test/a.png"
    assert sent[1].startswith(fake.base_url + "/files/uploads/" + file_id)
    # The user's request is kept as given, path included.
    assert submission.request is request
    assert result.request.reference_images == ("https://cdn.test/a.png", vase)


async def test_the_same_content_in_many_requests_is_uploaded_once(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    twin = image_file(tmp_path, "twin.jpg")  # the same bytes under another name
    other = image_file(tmp_path, "other.png", seed="other")
    requests = [
        kx.ImageRequest(f"p{i}", reference_images=[vase, twin] if i % 2 else [other, vase])
        for i in range(40)
    ]
    async with wired({"latency": 0.005}, max_concurrency=16) as (fake, client):
        results = await client.generate_many(requests)
        assert client.stats.submitted == 40
        again = await client.upload(vase)  # also from the cache
    assert all(isinstance(r, kx.ImageResult) for rs in results for r in rs)
    assert fake.upload_calls == len(fake.uploads) == 2  # one per distinct content
    assert again.url in {task.body["reference_images"][1] for task in fake.tasks.values()}


async def test_concurrent_uploads_of_one_content_share_the_upload(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    async with wired({"latency": 0.02}) as (fake, client):
        uploaded: list[kx.UploadedFile] = []

        async def upload(source: Path | bytes) -> None:
            uploaded.append(await client.upload(source, filename="x.png"))

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(upload, vase)
                group.start_soon(upload, vase.read_bytes())
    assert fake.upload_calls == 1
    assert len(set(uploaded)) == 1


async def test_a_failed_upload_fails_the_submit_and_nothing_is_submitted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vase = image_file(tmp_path)
    request = kx.ImageRequest("x", reference_images=[vase])
    async with wired() as (fake, client):
        fake.inject(400, route="upload")
        with pytest.raises(kx.APIError) as caught:
            await client.submit(request)
        assert client.stats.submit_errors == 1
        # A batch reports it as the request's fate, like any submit error.
        fake.inject(400, route="upload")
        async with client.batch([request]) as batch:
            [task] = [task async for task in batch]
    error = caught.value
    assert error.maybe_created is False
    assert error.status_code == 400
    assert error.request is request
    assert "reference_images[0] (vase.png) could not be uploaded" in str(error)
    assert task.task_id is None
    assert isinstance(task.exception(), kx.APIError)
    assert fake.submit_calls == 0
    assert fake.upload_calls == 2
    assert "nothing was submitted" in caplog.text


class UploadGate:
    """The fake behind a gate that holds every upload until it is opened."""

    def __init__(self, fake: FakeKeevx) -> None:
        self.fake = fake
        self.open = anyio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["path"].endswith("/upload/file"):
            await self.open.wait()
        await self.fake(scope, receive, send)


async def test_submits_waiting_for_one_upload_share_its_failure(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    requests = [kx.ImageRequest(f"p{i}", reference_images=[vase]) for i in range(4)]
    async with FakeKeevx() as fake:
        gate = UploadGate(fake)
        transport = httpx.ASGITransport(app=gate)
        async with (
            httpx.AsyncClient(transport=transport) as http,
            fake.client(http_client=http) as client,
        ):
            fake.inject(400, route="upload")
            results: list[list[kx.ImageResult | kx.KeevxError]] = []

            async def run() -> None:
                results.extend(await client.generate_many(requests))

            async with anyio.create_task_group() as group:
                group.start_soon(run)
                # Every submit has started: one holds the upload, three wait for it.
                await anyio.wait_all_tasks_blocked()
                gate.open.set()
            # The failure is not remembered: the next submit uploads again.
            await client.submit(requests[0])
    errors = [outcome for [outcome] in results]
    assert all(isinstance(error, kx.APIError) for error in errors)
    assert {error.request for error in errors if isinstance(error, kx.APIError)} == set(requests)
    assert fake.upload_calls == 2
    assert fake.submit_calls == 1


async def test_transient_upload_failures_are_retried(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    async with wired() as (fake, client):
        fake.inject(503, retry_after=0, times=2, route="upload")
        fake.inject(500, route="upload")
        await client.submit(kx.ImageRequest("x", reference_images=[vase]))
    assert fake.upload_calls == 4
    assert len(fake.uploads) == 1
    assert fake.accepted_submits == 1


async def test_an_upload_failing_after_its_retries_is_a_transport_error(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    async with (
        httpx.AsyncClient() as http,
        kx.AsyncKeevx(
            api_key=API_KEY,
            base_url=f"http://127.0.0.1:{closed_port()}",
            http_client=http,
            max_retries=0,
        ) as client,
    ):
        with pytest.raises(kx.TransportError, match="could not be uploaded") as caught:
            await client.submit(kx.ImageRequest("x", reference_images=[vase]))
    assert caught.value.maybe_created is False


async def test_a_file_changed_after_the_request_was_built_is_refused_at_submit(
    tmp_path: Path,
) -> None:
    vase = image_file(tmp_path)
    request = kx.ImageRequest("x", reference_images=["https://cdn.test/a.png", vase])
    vase.unlink()
    async with wired() as (fake, client):
        with pytest.raises(kx.InvalidRequestError, match="no such file") as caught:
            await client.submit(request)
        vase.mkdir()
        with pytest.raises(kx.InvalidRequestError, match="not a regular file"):
            await client.submit(request)
        inner = vase / "inner.png"
        inner.write_bytes(png_bytes("inner"))
        moved = kx.ImageRequest("x", reference_images=[inner])
        vase.rename(tmp_path / "gone")
        vase.write_bytes(b"")  # now a file where the directory was
        with pytest.raises(kx.InvalidRequestError, match=r"cannot read .*Not a directory"):
            await client.submit(moved)
    assert caught.value.field == "reference_images[1]"
    assert fake.upload_calls == fake.submit_calls == 0


async def test_a_file_grown_past_20_mb_after_its_stat_is_refused(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    request = kx.ImageRequest("x", reference_images=[vase])
    with vase.open("ab") as file:
        file.write(b"\0" * (20 * MB))
    async with wired() as (fake, client):
        with pytest.raises(kx.InvalidRequestError, match="20 MB"):
            await client.submit(request)
    assert fake.upload_calls == 0


# --- client.upload ---------------------------------------------------------------------


async def test_upload_takes_a_path_a_str_or_bytes(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    other = image_file(tmp_path, "other.webp", seed="other")
    async with wired() as (fake, client):
        by_path = await client.upload(vase)
        by_str = await client.upload(str(other), filename="renamed.gif")
        by_bytes = await client.upload(png_bytes("third"), filename="third.gif")
    assert [stored.content for stored in fake.uploads.values()] == [
        vase.read_bytes(),
        other.read_bytes(),
        png_bytes("third"),
    ]
    assert by_path.file_id in fake.uploads
    assert by_str.file_name.endswith(".gif")  # uploaded under the name given
    assert by_bytes.url.endswith(".gif")
    for uploaded in (by_path, by_str, by_bytes):
        assert uploaded.url.startswith(fake.base_url)


@pytest.mark.parametrize(
    ("args", "says", "field"),
    [
        ((b"\x89PNG",), "needs filename=", "filename"),
        ((b"\x89PNG",), "must be an image", "filename"),
        ((b"",), "empty", "file"),
        ((b"\x89PNG",), "non-empty string", "filename"),
    ],
)
async def test_upload_refuses_bad_bytes_before_sending(
    args: tuple[bytes], says: str, field: str
) -> None:
    names = {"needs filename=": None, "must be an image": "x.svg", "empty": "x.png"}
    filename = names.get(says, "")
    async with wired() as (fake, client):
        with pytest.raises(kx.InvalidRequestError, match=says) as caught:
            await client.upload(*args, filename=filename)
    assert caught.value.field == field
    assert fake.upload_calls == 0


async def test_upload_refuses_bytes_over_20_mb() -> None:
    async with wired() as (fake, client):
        with pytest.raises(kx.InvalidRequestError, match="20 MB"):
            await client.upload(b"\0" * (20 * MB + 1), filename="big.png")
    assert fake.upload_calls == 0


async def test_upload_refuses_a_missing_file_and_a_bad_filename(tmp_path: Path) -> None:
    vase = image_file(tmp_path)
    async with wired() as (fake, client):
        with pytest.raises(kx.InvalidRequestError, match="no such file") as caught:
            await client.upload(tmp_path / "missing.png")
        with pytest.raises(kx.InvalidRequestError, match="must be an image"):
            await client.upload(vase, filename="vase.txt")
    assert caught.value.field == "file"
    assert fake.upload_calls == 0


def upload_reply(body: object, status: int = 200) -> tuple[int, Any, dict[str, str]]:
    return status, body, {}


@pytest.mark.parametrize(
    ("body", "error", "says"),
    [
        (
            {"code": 100001, "success": False, "message": {"global": "type not allowed"}},
            kx.APIError,
            "type not allowed",
        ),
        ({"code": 0, "success": False, "message": "no"}, kx.APIError, "no"),
        ({"code": 401, "success": False, "message": None}, kx.AuthenticationError, "refused"),
        ({"success": True, "result": {"url": "https://x/a.png"}}, kx.APIError, "fileId"),
        (b"not json", kx.APIError, "unreadable upload reply"),
    ],
)
async def test_an_upload_refused_or_unreadable_is_an_api_error(
    body: object, error: type[kx.APIError], says: str
) -> None:
    app = ScriptedApp(upload_reply(body))
    async with scripted_client(app) as client:
        with pytest.raises(error, match=says) as caught:
            await client.upload(png_bytes("x"), filename="x.png")
    assert caught.value.maybe_created is False
    [(method, path, headers, sent)] = app.requests
    assert (method, path) == ("POST", "/v1/figure-resource/upload/file")
    assert headers["authorization"] == f"Bearer {API_KEY}"
    [part] = parse_multipart(headers["content-type"], sent) or []
    assert (part.name, part.filename, part.content_type) == ("file", "x.png", "image/png")


async def test_an_upload_with_a_wrong_key_is_an_authentication_error(tmp_path: Path) -> None:
    async with FakeKeevx(api_key="right") as fake, fake.client(api_key="wrong") as client:
        with pytest.raises(kx.AuthenticationError):
            await client.upload(image_file(tmp_path))


def test_upload_replies_are_read_leniently_where_they_can_be() -> None:
    envelope = decode_upload_envelope(b'{"success": true, "message": "ok", "result": {}}')
    assert envelope.ok
    assert envelope.message == "ok"
    uploaded = decode_upload_reply({"url": "https://x/a.png", "fileId": "f1"})
    assert uploaded == kx.UploadedFile(url="https://x/a.png", file_id="f1", file_name="")
    with pytest.raises(WireFormatError, match="neither 'code' nor 'success'"):
        decode_upload_envelope(b"{}")
    with pytest.raises(WireFormatError, match="'success'") as caught:
        decode_upload_envelope(b'{"success": "yes"}')
    assert caught.value.field == "success"
    with pytest.raises(WireFormatError, match=r"'result\.url' is empty"):
        decode_upload_reply({"url": "", "fileId": "f1"})
    with pytest.raises(WireFormatError, match="must be a JSON object"):
        decode_upload_reply(None)


@given(
    content=st.binary(max_size=2048),
    filename=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="%"), min_size=1)
    .filter(lambda name: name == name.strip())
    .map(lambda name: name + ".png"),
)
def test_the_upload_body_is_read_back_byte_for_byte(content: bytes, filename: str) -> None:
    body, content_type = multipart_body(content, filename)
    [part] = parse_multipart(content_type, body) or []
    assert (part.name, part.filename, part.content) == ("file", filename, content)


# --- downloads ---------------------------------------------------------------------------


async def test_download_names_a_result_by_its_task_id(tmp_path: Path) -> None:
    async with wired({"file_size": 5000}) as (fake, client):
        result = await one_result(client)
        path = await client.download(result, tmp_path)
        by_url = await client.download(result.image_url, str(tmp_path / "by-url") + "/")
        to_file = await client.download(result, tmp_path / "sub" / "fox.png")
    assert path == tmp_path / f"{result.task_id}.png"
    assert by_url == tmp_path / "by-url" / f"{result.task_id}.png"
    assert to_file == tmp_path / "sub" / "fox.png"
    expected = png_bytes(f"{result.task_id}.png", size=5000)
    for saved in (path, by_url, to_file):
        assert saved.read_bytes() == expected
    assert leftovers(tmp_path) == []
    assert fake.file_requests == 3


async def test_a_dest_without_an_extension_is_a_directory(tmp_path: Path) -> None:
    async with wired() as (_, client):
        result = await one_result(client)
        path = await client.download(result, tmp_path / "new" / "dir")
    assert path.parent == tmp_path / "new" / "dir"


async def test_an_existing_file_is_returned_without_a_request(tmp_path: Path) -> None:
    async with wired() as (fake, client):
        result = await one_result(client)
        first = await client.download(result, tmp_path)
        first.write_bytes(b"mine")
        again = await client.download(result, tmp_path)
        assert (again, fake.file_requests) == (first, 1)
        assert first.read_bytes() == b"mine"
        replaced = await client.download(result, tmp_path, overwrite=True)
    assert replaced == first
    assert fake.file_requests == 2
    assert first.read_bytes().startswith(b"\x89PNG")


async def test_the_extension_comes_from_the_content_type_when_the_url_has_none(
    tmp_path: Path,
) -> None:
    app = FileApp(b"GIF89a...", {"content-type": "image/gif"})
    async with app.client() as files, wired(download_client=files) as (_, client):
        path = await client.download("https://cdn.test/render?id=7", tmp_path)
        again = await client.download("https://cdn.test/render?id=7", tmp_path)
    assert path == again == tmp_path / "render.gif"
    assert path.read_bytes() == b"GIF89a..."
    assert app.paths == ["/render"]  # the second found the file under the type's extension


async def test_the_api_key_and_api_headers_never_reach_the_file_host(tmp_path: Path) -> None:
    # Over loopback, with the download client the SDK builds itself.
    async with FakeKeevx(api_key=API_KEY) as fake, fake.serve() as server:
        async with kx.AsyncKeevx(
            api_key=API_KEY, base_url=server.url, callback_url=CALLBACK_URL
        ) as client:
            fake.deliver_into(client)
            results = await client.generate_many(
                [kx.ImageRequest("a", generate_count=2)], download_to=tmp_path
            )
            [first, _] = results[0]
            assert isinstance(first, kx.ImageResult)
            await client.download(first, tmp_path / "again.png")
    assert fake.file_requests == 3
    for headers in fake.file_request_headers:
        assert "authorization" not in headers
        assert not any(API_KEY in value for value in headers.values())
        assert "keevx" not in headers.get("user-agent", "")
        assert headers.get("content-type") is None
        assert headers.get("accept") == "*/*"


@pytest.mark.parametrize("status", [403, 404])
async def test_an_expired_url_is_a_download_error_saying_so(
    tmp_path: Path, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    async with wired() as (fake, client):
        result = await one_result(client)
        fake.inject(status, times=2, route="file")
        with pytest.raises(kx.DownloadError, match="may have expired") as caught:
            await client.download(result, tmp_path)
        with pytest.raises(kx.DownloadError, match="may have expired"):
            await client.download(result, tmp_path)
    error = caught.value
    assert (error.status_code, error.url, error.result) == (status, result.image_url, result)
    assert fake.file_requests == 2  # each once: not retried
    assert listing(tmp_path) == []
    # The likely cause is named once, not for every file.
    assert caplog.text.count("about 7 days") == 1


async def test_a_file_past_its_ttl_answers_404(tmp_path: Path) -> None:
    async with wired({"file_ttl": 0.0}) as (_, client):
        result = await one_result(client)
        with pytest.raises(kx.DownloadError, match="expired") as caught:
            await client.download(result, tmp_path)
    assert caught.value.status_code == 404


async def test_transient_file_errors_are_retried(tmp_path: Path) -> None:
    # 3 MB: the body is written out in several parts before it is renamed into place.
    async with wired({"file_size": 3 * MB}, max_retries=4) as (fake, client):
        result = await one_result(client)
        fake.inject(503, retry_after=0, route="file")
        fake.inject(429, retry_after=0.05, route="file")
        fake.inject(500, route="file")
        fake.inject_file_fault("cut")
        path = await client.download(result, tmp_path)
    assert fake.file_requests == 5
    assert path.read_bytes() == png_bytes(f"{result.task_id}.png", size=3 * MB)
    assert leftovers(tmp_path) == []


async def test_retries_spent_is_a_download_error_with_the_last_status(tmp_path: Path) -> None:
    async with wired(max_retries=1) as (fake, client):
        result = await one_result(client)
        fake.inject(503, retry_after=0, times=2, route="file")
        with pytest.raises(kx.DownloadError, match="after 2 attempts: HTTP 503") as caught:
            await client.download(result, tmp_path)
    assert caught.value.status_code == 503
    assert listing(tmp_path) == []


async def test_a_retry_after_longer_than_max_retry_wait_is_not_slept(tmp_path: Path) -> None:
    async with wired(max_retry_wait=1) as (fake, client):
        result = await one_result(client)
        fake.inject(429, retry_after=3600, route="file")
        with anyio.fail_after(5), pytest.raises(kx.DownloadError, match="max_retry_wait"):
            await client.download(result, tmp_path)
    assert fake.file_requests == 1


async def test_a_body_always_cut_short_fails_and_leaves_nothing(tmp_path: Path) -> None:
    async with wired({"file_size": 3 * MB}, max_retries=1) as (fake, client):
        result = await one_result(client)
        fake.inject_file_fault("cut", times=2)
        with pytest.raises(kx.DownloadError, match="cut short") as caught:
            await client.download(result, tmp_path)
    assert caught.value.status_code is None
    assert listing(tmp_path) == []  # the part written to disk was removed


async def test_an_error_page_served_as_200_is_not_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with wired() as (fake, client):
        result = await one_result(client)
        fake.inject_file_fault("content_type")
        with pytest.raises(kx.DownloadError, match="text/html") as caught:
            await client.download(result, tmp_path)
    assert caught.value.status_code == 200
    assert fake.file_requests == 1  # not retried
    assert listing(tmp_path) == []
    assert "instead of a file" in caplog.text


@pytest.mark.parametrize(
    ("status", "body", "headers", "says"),
    [
        (200, b"", {"content-type": "image/png"}, "empty"),
        (200, b"x", {"content-type": "video/mp4"}, "not image/*"),
        (200, b"x", {}, "'missing'"),
        (302, b"", {"location": "/elsewhere"}, "HTTP 302"),
        pytest.param(
            200,
            b"broken",
            {"content-type": "image/png", "content-encoding": "gzip"},
            "Decoding",
            # A body that fails to decode leaves httpx's inner stream generator to the
            # garbage collector (trio warns); the SDK closes the iterator it holds.
            marks=pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
        ),
    ],
)
async def test_replies_that_are_no_image_fail(
    tmp_path: Path, status: int, body: bytes, headers: dict[str, str], says: str
) -> None:
    app = FileApp(body, headers, status)
    result = kx.ImageResult("i2is-1", "https://cdn.test/i2is-1.png", kx.ImageRequest("x"), 0)
    async with app.client() as files, wired(download_client=files, max_retries=0) as (_, client):
        with pytest.raises(kx.DownloadError, match=says):
            await client.download(result, tmp_path)
    assert listing(tmp_path) == []


async def test_a_video_url_is_accepted_by_url(tmp_path: Path) -> None:
    app = FileApp(b"\0\0\0\x18ftypisom", {"content-type": "video/mp4"})
    async with app.client() as files, wired(download_client=files) as (_, client):
        path = await client.download("https://cdn.test/clip.mp4?sig=secret", tmp_path)
    assert path == tmp_path / "clip.mp4"


async def test_a_connection_refused_is_retried_then_a_download_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/files/x.png"
    async with kx.AsyncKeevx(api_key=API_KEY, max_retries=1) as client:
        with pytest.raises(kx.DownloadError, match="ConnectError") as caught:
            await client.download(url, tmp_path)
    assert caught.value.status_code is None


async def test_a_slow_body_within_the_timeout_is_saved_and_a_stalled_one_times_out(
    tmp_path: Path,
) -> None:
    async with (
        FakeKeevx(file_delay=0.4, file_size=20_000) as fake,
        fake.serve() as server,
        fake.client(base_url=server.url) as setup,
    ):
        result = await one_result(setup)
        async with kx.AsyncKeevx(
            api_key=API_KEY, base_url=server.url, timeout=5, max_retries=0
        ) as client:
            path = await client.download(result, tmp_path)
        fake.file_delay = 4.0  # half a second between parts
        async with kx.AsyncKeevx(
            api_key=API_KEY, base_url=server.url, timeout=0.1, max_retries=1
        ) as client:
            with pytest.raises(kx.DownloadError, match="ReadTimeout"):
                await client.download(result, tmp_path / "late.png")
    assert path.read_bytes() == png_bytes(path.name, size=20_000)
    assert fake.file_requests == 3
    assert leftovers(tmp_path) == []


async def test_at_most_max_downloads_reach_the_file_host_at_once(tmp_path: Path) -> None:
    async with wired(max_downloads=3) as (fake, client):
        results = await client.generate(kx.ImageRequest("x", generate_count=8))
        fake.hold_files()
        async with anyio.create_task_group() as group:
            for result in results:
                group.start_soon(client.download, result, tmp_path)
            await fake.wait_for_file_requests(3)
            await anyio.wait_all_tasks_blocked()
            assert fake.files_in_flight == 3  # the others wait for a slot
            fake.release_files()
    assert fake.max_files_in_flight == 3
    assert len(listing(tmp_path)) == 8


async def test_two_downloads_of_one_result_keep_one_file(tmp_path: Path) -> None:
    async with wired() as (fake, client):
        result = await one_result(client)
        fake.hold_files()
        paths: list[Path] = []

        async def download() -> None:
            paths.append(await client.download(result, tmp_path))

        async with anyio.create_task_group() as group:
            group.start_soon(download)
            group.start_soon(download)
            await fake.wait_for_file_requests(2)
            fake.release_files()
    assert paths == [tmp_path / f"{result.task_id}.png"] * 2
    assert listing(tmp_path) == [f"{result.task_id}.png"]


async def test_a_cancelled_download_leaves_no_file(tmp_path: Path) -> None:
    async with wired({"file_size": 4 * MB}) as (fake, client):
        result = await one_result(client)
        fake.hold_files()
        async with anyio.create_task_group() as group:
            group.start_soon(client.download, result, tmp_path)
            await fake.wait_for_file_requests(1)
            await anyio.wait_all_tasks_blocked()
            group.cancel_scope.cancel()
        fake.release_files()
    assert listing(tmp_path) == []


async def test_a_crash_mid_download_never_leaves_a_file_under_the_final_name(
    tmp_path: Path,
) -> None:
    async with (
        FakeKeevx(file_size=8 * MB) as fake,
        fake.serve() as server,
        fake.client(base_url=server.url) as setup,
    ):
        result = await one_result(setup)
        final = tmp_path / f"{result.task_id}.png"
        fake.hold_files()  # the body stalls after its first part (1 MB)
        worker = subprocess.Popen(  # noqa: ASYNC220, S603 - our script; killed below
            [sys.executable, str(TESTS / "download_worker.py"), result.image_url, str(tmp_path)]
        )
        try:
            await fake.wait_for_file_requests(1)
            with anyio.fail_after(30):
                # The worker writes what it has to a temporary file: wait until it has.
                while not leftovers(tmp_path):  # noqa: ASYNC110 - another process's disk
                    await anyio.sleep(0.01)
            worker.send_signal(signal.SIGKILL)
        finally:
            worker.kill()
            worker.wait()
            fake.release_files()
    assert worker.returncode == -signal.SIGKILL
    assert not final.exists()
    [part] = leftovers(tmp_path)
    assert part.startswith(f".{final.name}.")
    assert 0 < (tmp_path / part).stat().st_size < 8 * MB


async def test_a_file_that_cannot_be_written_is_a_download_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    async with wired() as (fake, client):
        result = await one_result(client)
        (tmp_path / f"{result.task_id}.png").mkdir()  # a directory where the file would go
        with pytest.raises(kx.DownloadError, match="cannot write the file") as caught:
            await client.download(result, tmp_path)
        with pytest.raises(kx.DownloadError, match="cannot save"):
            await client.download(result, tmp_path / "plain" / "x.png")
    assert caught.value.status_code == 200  # the file came; the disk refused it
    assert fake.file_requests == 1  # not retried
    assert leftovers(tmp_path) == []


async def test_download_checks_its_arguments_before_anything_is_sent(tmp_path: Path) -> None:
    async with wired() as (fake, client):
        with pytest.raises(TypeError, match="VideoResult or a URL"):
            await client.download(42, tmp_path)  # type: ignore[arg-type]
        with pytest.raises(kx.InvalidRequestError, match="http"):
            await client.download("/relative.png", tmp_path)
        with pytest.raises(TypeError, match="dest must be"):
            await client.download("https://cdn.test/a.png", None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="dest must be"):
            await client.download("https://cdn.test/a.png", "")
        with pytest.raises(TypeError, match="overwrite must be"):
            await client.download("https://cdn.test/a.png", tmp_path, overwrite="yes")  # type: ignore[arg-type]
        file = tmp_path / "file"
        file.write_bytes(b"")
        with pytest.raises(kx.DownloadError, match="cannot save"):
            await client.download("https://cdn.test/a.png", str(file) + "/")
    assert fake.file_requests == 0


# --- file naming -------------------------------------------------------------------------

NASTY = st.sampled_from(
    ["..", ".", "", "..%2F..%2Fescape", "%2Fetc%2Fpasswd", "..\\..\\x", "a%00b", "~", " "]
)
SEGMENTS = st.lists(st.one_of(NASTY, st.text(max_size=20)), max_size=4)


@given(
    segments=SEGMENTS,
    extension=st.sampled_from(["", ".png", ".PNG", ".exe", ".mp4"]),
    stem=st.one_of(st.none(), NASTY, st.text(max_size=300)),
    content_type=st.one_of(
        st.none(),
        st.sampled_from(["image/png", "image/jpeg; q=1", "video/mp4", "text/html", "image/x-y"]),
        st.text(max_size=30),
    ),
)
def test_a_file_name_is_one_safe_component_inside_the_directory(
    segments: list[str], extension: str, stem: str | None, content_type: str | None
) -> None:
    url = "https://files.test/" + "/".join(segments) + extension + "?a=../b"
    name = file_name(url, stem, content_type)
    assert name
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert not set(name) & {"/", "\\", "\0"}
    assert len(name.encode()) <= 255
    dest = Path("/srv/out")
    assert (dest / name).resolve().parent == dest


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.test/files/..%2F..%2Fescape.png",
        "https://evil.test/%2Fetc%2Fpasswd",
        "https://evil.test/a/..\\..\\x.png",
        "https://evil.test/../../x.png",
        "https://evil.test/",
    ],
)
async def test_a_url_whose_name_is_a_path_never_writes_outside_dest(
    tmp_path: Path, url: str
) -> None:
    dest = tmp_path / "dest"
    app = FileApp(b"\x89PNG", {"content-type": "image/png"})
    async with app.client() as files, wired(download_client=files) as (_, client):
        path = await client.download(url, dest)
    assert path.parent == dest
    assert files_under(tmp_path) == [path]


# --- batches and generate_many with download_to ------------------------------------------


async def test_a_batch_yields_each_success_once_its_file_is_saved(tmp_path: Path) -> None:
    requests = [kx.ImageRequest(f"p{i}", generate_count=2) for i in range(10)]
    requests.append(kx.ImageRequest("flagged"))
    fake_options = {"fail_if": lambda prompt: prompt == "flagged", "file_size": 1000}
    async with wired(fake_options) as (fake, client):
        async with client.batch(requests, download_to=tmp_path) as batch:
            tasks = [task async for task in batch]
        assert (batch.saved, batch.save_failed, batch.saving) == (20, 0, 0)
    assert len(tasks) == 21
    for task in tasks:
        if task.request.prompt == "flagged":
            assert isinstance(task.exception(), kx.TaskFailedError)
            continue
        result = task.result()
        assert result.path == tmp_path / f"{task.task_id}.png"
        assert result.path.read_bytes() == png_bytes(result.path.name, size=1000)
    assert fake.file_requests == 20


async def test_a_failed_download_yields_its_task_with_the_result_kept(tmp_path: Path) -> None:
    async with wired() as (fake, client):
        fake.inject(404, route="file")
        async with client.batch(["a fox"], download_to=tmp_path) as batch:
            [task] = [task async for task in batch]
    error = task.exception()
    assert isinstance(error, kx.DownloadError)
    assert error.result is not None
    assert error.result.task_id == task.task_id
    assert error.result.path is None
    assert batch.save_failed == 1
    with pytest.raises(kx.DownloadError):
        task.result()


async def test_generate_many_with_download_to_sets_each_path(tmp_path: Path) -> None:
    async with wired() as (fake, client):
        fake.inject(503, retry_after=0, route="file")
        results = await client.generate_many(
            ["a", kx.ImageRequest("b", generate_count=3)], download_to=str(tmp_path)
        )
    assert [len(outcomes) for outcomes in results] == [1, 3]
    for outcomes in results:
        for result in outcomes:
            assert isinstance(result, kx.ImageResult)
            assert result.path is not None
            assert result.path.is_file()


async def test_early_callbacks_are_saved_too(tmp_path: Path) -> None:
    async with wired({"early_callbacks": True}) as (_, client):
        [[result]] = await client.generate_many(["early"], download_to=tmp_path)
    assert isinstance(result, kx.ImageResult)
    assert result.path is not None


async def test_a_slow_file_host_does_not_stall_the_fan_out(tmp_path: Path) -> None:
    requests = [f"p{i}" for i in range(60)]
    async with wired(max_concurrency=8, max_downloads=2) as (fake, client):
        fake.hold_files()  # every file stalls mid-body until released
        async with client.batch(requests, download_to=tmp_path) as batch:
            # Every request is submitted and finished while no file is saved yet.
            await fake.wait_for_submits(len(requests))
            await fake.wait_for_callbacks(len(requests))
            # The first downloads make the directory on a worker thread first.
            await fake.wait_for_file_requests(2)
            await anyio.wait_all_tasks_blocked()
            assert batch.submitted == len(requests)
            assert batch.in_flight == 0
            assert (batch.saved, batch.saving, batch.yielded) == (0, 60, 0)
            assert fake.files_in_flight == 2
            fake.release_files()
            tasks = [task async for task in batch]
    assert len(tasks) == 60
    assert fake.max_files_in_flight == 2
    assert all(task.result().path is not None for task in tasks)


async def test_download_to_an_existing_file_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    file = tmp_path / "results"
    file.write_bytes(b"")
    async with wired() as (fake, client):
        with pytest.raises(NotADirectoryError, match="is an existing file"):
            await client.generate_many(["a"], download_to=file)
        with pytest.raises(TypeError, match="download_to must be"):
            client.batch(["a"], download_to=42)  # type: ignore[arg-type]
        with pytest.raises(NotADirectoryError, match="cannot create the directory"):
            client.batch(["a"], download_to=file / "sub")
    assert fake.submit_calls == 0


async def test_an_unexpected_error_while_saving_is_the_tasks_download_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Exploding(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise RuntimeError("a bug in a transport")

    async with httpx.AsyncClient(transport=Exploding()) as files:
        async with wired(download_client=files) as (_, client):
            [[error]] = await client.generate_many(["a"], download_to=tmp_path)
    assert isinstance(error, kx.DownloadError)
    assert isinstance(error.__cause__, RuntimeError)
    assert error.result is not None
    assert "failed unexpectedly" in caplog.text


# --- options and lifetime ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"max_uploads": 0}, ValueError, "max_uploads"),
        ({"max_downloads": "8"}, TypeError, "max_downloads"),
        ({"download_client": object()}, TypeError, "download_client must be"),
    ],
)
def test_file_options_are_checked_at_construction(
    options: dict[str, Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        kx.AsyncKeevx(api_key=API_KEY, **options)


async def test_own_download_client_is_closed_and_an_injected_one_is_not() -> None:
    own = kx.AsyncKeevx(api_key=API_KEY)
    await own.aclose()
    assert own._downloader._http.is_closed
    async with httpx.AsyncClient() as files:
        async with kx.AsyncKeevx(api_key=API_KEY, download_client=files) as client:
            pass
        assert not files.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        await client.download("https://cdn.test/a.png", ".")
    with pytest.raises(RuntimeError, match="closed"):
        await client.upload(b"x", filename="x.png")


def test_a_result_has_no_path_until_it_is_saved() -> None:
    result = kx.ImageResult("t", "https://cdn.test/t.png", kx.ImageRequest("x"), 0)
    assert result.path is None
    saved = attrs.evolve(result, path=Path("out/t.png"))
    assert saved.path == Path("out/t.png")
    assert saved != result
