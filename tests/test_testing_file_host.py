"""FakeKeevx's upload endpoint and file host, spoken to over HTTP as the service would be."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import anyio
import httpx
import pytest
from wiring import API_KEY

from keevx_async._files import multipart_body
from keevx_async.testing import FakeKeevx
from keevx_async.testing.__main__ import build_parser, fake_from_args
from keevx_async.testing._file_host import mp4_bytes, parse_multipart, png_bytes

pytestmark = pytest.mark.anyio

UPLOAD = "/v1/figure-resource/upload/file"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The chunks of a PNG, each checked against its CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        at += 12 + length
    return chunks


async def upload(
    http: httpx.AsyncClient, content: bytes, filename: str, **headers: str
) -> httpx.Response:
    body, content_type = multipart_body(content, filename)
    return await http.post(
        UPLOAD, content=body, headers={**AUTH, "Content-Type": content_type, **headers}
    )


# --- the bytes it serves -------------------------------------------------------------------


@pytest.mark.parametrize("size", [None, 100, 200_000])
def test_png_bytes_are_a_valid_png_of_the_size_asked(size: int | None) -> None:
    data = png_bytes("seed", size=size)
    kinds = [kind for kind, _ in png_chunks(data)]
    assert kinds[:2] == [b"IHDR", b"IDAT"]
    assert kinds[-1] == b"IEND"
    if size is not None and size > 100:
        assert len(data) == size
    [(_, header)] = [chunk for chunk in png_chunks(data) if chunk[0] == b"IHDR"]
    assert struct.unpack(">II", header[:8]) == (8, 8)
    assert png_bytes("seed") == png_bytes("seed") != png_bytes("other")


def test_mp4_bytes_start_with_an_ftyp_box() -> None:
    data = mp4_bytes("seed", size=5000)
    assert data[4:8] == b"ftyp"
    assert len(data) == 5000
    (ftyp_size,) = struct.unpack(">I", data[:4])
    assert data[ftyp_size + 4 : ftyp_size + 8] == b"mdat"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (None, b""),
        ("application/json", b"{}"),
        ("multipart/form-data", b"--x--"),  # no boundary
        ("multipart/form-data; boundary=x", b"no delimiter at all"),
        ("multipart/form-data; boundary=x", b"--x\r\nno blank line--x--"),
    ],
)
def test_what_is_not_a_multipart_body_is_none(content_type: str | None, body: bytes) -> None:
    assert parse_multipart(content_type, body) is None


# --- the upload endpoint -----------------------------------------------------------------


async def test_an_upload_is_stored_and_served_back() -> None:
    async with FakeKeevx(api_key=API_KEY) as fake, fake.http_client() as http:
        reply = await upload(http, png_bytes("v"), "Vase Photo.PNG")
        body = reply.json()
        served = await http.get(body["result"]["url"])
    assert reply.status_code == 200
    assert (body["code"], body["success"], body["message"]) == (0, True, {"global": "success"})
    assert body["result"]["fileName"].endswith(".png")
    assert fake.uploads[body["result"]["fileId"]].content == png_bytes("v")
    assert served.content == png_bytes("v")
    assert served.headers["content-type"] == "image/png"
    assert fake.upload_calls == 1


@pytest.mark.parametrize(
    ("content", "filename", "says"),
    [
        (b"x", "notes.txt", "file type not allowed"),
        (b"x", ".png", "file type not allowed"),
        (b"", "a.png", "empty"),
        (b"\0" * (20 * 1024 * 1024 + 1), "big.png", "larger than 20 MB"),
    ],
)
async def test_an_upload_breaking_a_rule_is_refused(
    content: bytes, filename: str, says: str
) -> None:
    async with FakeKeevx() as fake, fake.http_client() as http:
        reply = await upload(http, content, filename)
    body = reply.json()
    assert (reply.status_code, body["code"], body["success"]) == (200, 100001, False)
    assert says in body["message"]["global"]
    assert fake.uploads == {}


async def test_an_upload_without_the_file_part_or_not_multipart_is_refused() -> None:
    async with FakeKeevx() as fake, fake.http_client() as http:
        body, content_type = multipart_body(b"x", "a.png")
        other = await http.post(
            UPLOAD,
            content=body.replace(b'name="file"', b'name="image"'),
            headers={**AUTH, "Content-Type": content_type},
        )
        nameless = await http.post(
            UPLOAD,
            content=body.replace(b'; filename="a.png"', b""),
            headers={**AUTH, "Content-Type": content_type},
        )
        not_multipart = await http.post(UPLOAD, json={"file": "x"}, headers=AUTH)
        wrong_method = await http.get(UPLOAD, headers=AUTH)
    assert other.json()["message"]["global"] == "the part 'file' is required"
    assert "file name" in nameless.json()["message"]["global"]
    assert (not_multipart.status_code, not_multipart.json()["success"]) == (400, False)
    assert wrong_method.status_code == 405
    assert fake.upload_calls == 3


async def test_an_upload_needs_the_api_key_and_takes_injected_faults() -> None:
    async with FakeKeevx(api_key=API_KEY) as fake, fake.http_client() as http:
        refused = await upload(http, b"x", "a.png", Authorization="Bearer nope")
        fake.inject(503, retry_after=2, route="upload")
        faulted = await upload(http, b"x", "a.png")
        accepted = await upload(http, b"x", "a.png")
    assert (refused.status_code, refused.json()["success"]) == (401, False)
    assert faulted.status_code == 503
    assert faulted.headers["retry-after"] == "2"
    assert faulted.json() == {
        "code": 503,
        "success": False,
        "message": {"global": "injected fault: HTTP 503"},
        "result": None,
    }
    assert accepted.json()["success"] is True


def test_faults_need_a_known_route_and_file_faults_a_known_kind() -> None:
    fake = FakeKeevx()
    with pytest.raises(ValueError, match="route must be one of"):
        fake.inject(500, route="files")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="create=True only applies"):
        fake.inject(500, route="upload", create=True)
    with pytest.raises(ValueError, match="kind must be"):
        fake.inject_file_fault("slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="times must be at least 1"):
        fake.inject_file_fault("cut", times=0)


# --- the file host -----------------------------------------------------------------------


async def finished_task(fake: FakeKeevx, http: httpx.AsyncClient) -> Any:
    reply = await http.post("/v1/image_generate", json={"prompt": "x"}, headers=AUTH)
    [task_id] = reply.json()["data"]["task_ids"]
    await fake.wait_idle()
    return fake.tasks[task_id]


async def test_result_urls_point_at_the_fake_and_serve_pngs_without_a_key() -> None:
    async with FakeKeevx(api_key=API_KEY, file_size=3000) as fake, fake.http_client() as http:
        task = await finished_task(fake, http)
        image = await http.get(task.image_url)
        thumbnail = await http.get(task.thumbnail_url)
        head = await http.head(task.image_url)
    assert task.image_url == f"{fake.base_url}/files/{task.task_id}.png"
    assert (image.status_code, image.headers["content-type"]) == (200, "image/png")
    assert image.content == png_bytes(f"{task.task_id}.png", size=3000)
    assert len(thumbnail.content) < 100
    png_chunks(thumbnail.content)
    assert (head.status_code, head.headers["content-length"], head.content) == (200, "3000", b"")
    assert fake.file_requests == 3
    assert all("authorization" not in headers for headers in fake.file_request_headers)


async def test_the_file_host_answers_404_405_and_serves_video_urls() -> None:
    async with FakeKeevx() as fake, fake.http_client() as http:
        task = await finished_task(fake, http)
        unknown = await http.get("/files/i2is-nobody.png")
        odd = await http.get("/files/readme.txt")
        other_name = await http.get(f"/files/{task.task_id}.mp4")
        posted = await http.post(task.image_url)
        task.image_url = task.image_url.replace(".png", ".mp4")  # as a video task's would be
        video = await http.get(task.image_url)
    assert [r.status_code for r in (unknown, odd, other_name)] == [404, 404, 404]
    assert (posted.status_code, posted.headers["allow"]) == (405, "GET, HEAD")
    assert (video.status_code, video.headers["content-type"]) == (200, "video/mp4")
    assert video.content[4:8] == b"ftyp"


async def test_an_explicit_image_base_url_wins() -> None:
    async with FakeKeevx(image_base_url="https://img.example") as fake, fake.http_client() as http:
        task = await finished_task(fake, http)
        assert fake.image_base_url == "https://img.example"
        fake.image_base_url = None
        assert fake.image_base_url == f"{fake.base_url}/files"
    assert task.image_url == f"https://img.example/{task.task_id}.png"


async def test_file_faults_are_served_in_order_over_loopback() -> None:
    async with (
        FakeKeevx(file_size=4000) as fake,
        fake.serve() as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        task = await finished_task(fake, http)
        fake.inject(429, retry_after=1, route="file")
        fake.inject_file_fault("content_type")
        fake.inject_file_fault("cut")
        limited = await http.get(task.image_url)
        error_page = await http.get(task.image_url)
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(task.image_url)
        whole = await http.get(task.image_url)
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "1")
    assert error_page.status_code == 200
    assert error_page.headers["content-type"].startswith("text/html")
    assert len(whole.content) == 4000


async def test_held_files_stream_their_first_part_then_wait() -> None:
    async with (
        FakeKeevx(file_size=80_000) as fake,
        fake.serve() as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        task = await finished_task(fake, http)
        fake.hold_files()
        fake.hold_files()  # holding twice is holding
        async with http.stream("GET", task.image_url) as response:
            chunks = response.aiter_raw()
            first = await anext(chunks)
            await fake.wait_for_file_requests(1)
            assert fake.files_in_flight == 1
            fake.release_files()
            rest = b"".join([chunk async for chunk in chunks])
        fake.release_files()  # releasing nothing held is fine
    assert 0 < len(first) < 80_000
    assert len(first + rest) == 80_000
    assert fake.max_files_in_flight == 1


async def test_files_held_when_the_fake_stops_are_let_go() -> None:
    fake = FakeKeevx()
    got: list[httpx.Response] = []
    async with fake.http_client() as http, anyio.create_task_group() as group:

        async def fetch(url: str) -> None:
            got.append(await http.get(url))

        async with fake:
            task = await finished_task(fake, http)
            fake.hold_files()
            group.start_soon(fetch, task.image_url)
            await fake.wait_for_file_requests(1)
        # Stopping the fake released the body: the download completes.
    [response] = got
    assert response.content == png_bytes(f"{task.task_id}.png")


async def test_the_counters_start_over_but_files_are_still_served() -> None:
    async with FakeKeevx() as fake, fake.http_client() as http:
        task = await finished_task(fake, http)
        await upload(http, b"x", "a.png")
        await http.get(task.image_url)
        fake.reset_metrics()
        again = await http.get(task.image_url)
    assert again.status_code == 200
    assert (fake.file_requests, fake.upload_calls, fake.uploads) == (1, 0, {})
    assert len(fake.file_request_headers) == 1


def test_the_command_line_sets_the_file_knobs() -> None:
    args = build_parser().parse_args(
        ["--port", "0", "--file-size", "200000", "--file-delay", "0.5", "--file-ttl", "60"]
    )
    fake = fake_from_args(args)
    assert (fake.file_size, fake.file_delay, fake.file_ttl) == (200_000, 0.5, 60.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--port", "0", "--file-size", "0"])
