"""The fake's file host: every result URL serves real bytes, with the faults of real hosts.

The service keeps result files on a file host (for about 7 days), and accepts reference
images through its upload endpoint. Code that downloads results must meet what file hosts
do: a 503 or a 429 with ``Retry-After``, a body cut short, an error page served as 200
``text/html``, a URL that expired (403/404), a body trickling in. This module serves, under
``/files/``, a valid PNG for every succeeded task (``{task_id}.png``, and
``{task_id}_thumb.png``), an MP4-like body for a task whose result URL ends in ``.mp4``,
and every uploaded file, streamed in parts so that slow and cut bodies reach a client as
they would from a real host. It records what it saw (every request's headers, the
requests in flight at once) so tests can check what reached it.

It is also where uploads are read: the multipart body, parsed exactly (no parser of the
standard library reads a binary part byte for byte), and the stored files.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from email.message import Message
from typing import TYPE_CHECKING, Final, Literal

import anyio
import attrs

from keevx_async.testing._http_server import STREAM_RESPONSE
from keevx_async.testing._rules import format_retry_after

if TYPE_CHECKING:
    from keevx_async._asgi import Scope, Send
    from keevx_async.testing._fake import FakeKeevx

__all__ = [
    "FILES_PATH",
    "FileFault",
    "FileHost",
    "FormPart",
    "StoredFile",
    "mp4_bytes",
    "parse_multipart",
    "png_bytes",
]

FILES_PATH: Final = "/files"
"""Where the fake serves files: ``{base_url}/files/...``."""
FILE_PARTS: Final = 8
"""A file body is sent in this many parts (fewer for a tiny one)."""
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_PADDING_CHUNK: Final = b"kxPd"  # ancillary, private, safe to copy: readers skip it

FileFault = Literal["cut", "content_type"]
"""A fault of the file host besides an HTTP status: ``"cut"`` (the body stops halfway,
under a ``Content-Length`` of the whole), ``"content_type"`` (an HTML error page served as
200)."""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bytes(seed: str, *, size: int | None = None, side: int = 8) -> bytes:
    """A valid PNG: ``side`` x ``side`` pixels of one colour drawn from ``seed``, padded
    to ``size`` bytes (when larger) with a private chunk that readers skip."""
    red, green, blue = hashlib.sha256(seed.encode()).digest()[:3]
    row = b"\x00" + bytes((red, green, blue)) * side  # filter type 0, then RGB pixels
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    image = b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(row * side)),
        )
    )
    end = _png_chunk(b"IEND", b"")
    missing = (size or 0) - len(image) - len(end) - 12  # a chunk costs 12 bytes around it
    if missing > 0:
        image += _png_chunk(_PADDING_CHUNK, b"\x00" * missing)
    return image + end


def mp4_bytes(seed: str, *, size: int | None = None) -> bytes:
    """An MP4-like body: an ``ftyp`` box and an ``mdat`` box (of ``size`` bytes in all,
    when larger); enough for a client that checks what it saved, not for a player."""
    ftyp = b"ftyp" + b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41"
    ftyp = struct.pack(">I", len(ftyp) + 4) + ftyp
    payload = hashlib.sha256(seed.encode()).digest()
    payload += b"\x00" * max(0, (size or 0) - len(ftyp) - 8 - len(payload))
    return ftyp + struct.pack(">I", len(payload) + 8) + b"mdat" + payload


@attrs.frozen
class StoredFile:
    """A file the fake keeps: an upload (as received) or what it serves."""

    name: str
    content: bytes
    content_type: str


@attrs.frozen
class FormPart:
    """One part of a ``multipart/form-data`` body."""

    name: str | None
    filename: str | None
    content_type: str | None
    content: bytes


def _header_params(name: str, value: str) -> Message:
    message = Message()
    message[name] = value
    return message


def _unquote_filename(filename: str) -> str:
    # What browsers (and httpx) escape in a multipart file name.
    return filename.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")


def parse_multipart(content_type: str | None, body: bytes) -> list[FormPart] | None:
    """The parts of a ``multipart/form-data`` body, or ``None`` if it is not one."""
    if not content_type:
        return None
    header = _header_params("content-type", content_type)
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        return None
    delimiter = b"--" + boundary.encode("latin-1")
    sections = body.split(delimiter)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        return None
    parts = []
    for section in sections[1:-1]:
        head, separator, content = section.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            return None
        headers: dict[str, str] = {}
        # Clients write a part's file name in UTF-8 (as browsers do).
        for line in head.decode(errors="replace").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip().lower()] = value.strip()
        disposition = _header_params("content-disposition", headers.get("content-disposition", ""))
        name = disposition.get_param("name", header="content-disposition")
        filename = disposition.get_filename()
        parts.append(
            FormPart(
                name=name if isinstance(name, str) else None,
                filename=None if filename is None else _unquote_filename(filename),
                content_type=headers.get("content-type"),
                content=content.removesuffix(b"\r\n"),
            )
        )
    return parts


def _split(body: bytes, parts: int) -> list[bytes]:
    size = max(1, -(-len(body) // parts))
    return [body[start : start + size] for start in range(0, len(body), size)] or [b""]


class FileHost:
    """Serves ``/files/...`` for a [`FakeKeevx`][keevx_async.testing.FakeKeevx], reading
    its knobs (``file_delay``, ``file_size``, ``file_ttl``) live, counting into it, and
    keeping its uploads."""

    def __init__(self, fake: FakeKeevx) -> None:
        self._fake = fake
        self._stored: dict[str, StoredFile] = {}
        self._faults: list[tuple[FileFault, int]] = []
        self._held: anyio.Event | None = None

    # -- state -------------------------------------------------------------------------

    def store(self, path: str, stored: StoredFile) -> None:
        """Serve ``stored`` at ``/files/{path}`` from now on."""
        self._stored[path] = stored

    def add_fault(self, kind: FileFault, times: int) -> None:
        """Queue ``kind`` for the next ``times`` files served."""
        if kind not in ("cut", "content_type"):
            raise ValueError(f"kind must be 'cut' or 'content_type', not {kind!r}")
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        self._faults.append((kind, times))

    def _take_fault(self) -> FileFault | None:
        if not self._faults:
            return None
        kind, times = self._faults[0]
        if times == 1:
            self._faults.pop(0)
        else:
            self._faults[0] = (kind, times - 1)
        return kind

    def hold(self) -> None:
        """Stop every file body after its first part until `release`."""
        if self._held is None:
            self._held = anyio.Event()

    def release(self) -> None:
        """Let held file bodies (and later ones) go on."""
        held, self._held = self._held, None
        if held is not None:
            held.set()

    # -- serving -----------------------------------------------------------------------

    async def handle(self, scope: Scope, send: Send) -> None:
        """Answer one request under ``/files/``."""
        fake = self._fake
        fake.file_requests += 1
        fake.file_request_headers.append(
            {bytes(k).decode("latin-1"): bytes(v).decode("latin-1") for k, v in scope["headers"]}
        )
        fake.files_in_flight += 1
        fake.max_files_in_flight = max(fake.max_files_in_flight, fake.files_in_flight)
        fake._file_milestones.count_is(fake.file_requests)
        try:
            await self._answer(scope, send)
        finally:
            fake.files_in_flight -= 1

    async def _answer(self, scope: Scope, send: Send) -> None:
        method: str = scope["method"]
        if method not in ("GET", "HEAD"):
            await _plain(send, 405, f"method {method} not allowed", [(b"allow", b"GET, HEAD")])
            return
        fault = self._fake._faults.take("file")
        if fault is not None:
            headers = []
            if fault.retry_after is not None:
                value = format_retry_after(fault.retry_after)
                headers.append((b"retry-after", value.encode("latin-1")))
            await _plain(send, fault.status, f"injected fault: HTTP {fault.status}", headers)
            return
        name = scope["path"].removeprefix(FILES_PATH + "/")
        found = self._find(name)
        if found is None:
            await _plain(send, 404, "no such file (or it expired)")
            return
        kind = self._take_fault()
        if kind == "content_type":
            await _plain(send, 200, "<html><body>Service unavailable</body></html>", html=True)
            return
        await self._stream(send, found, cut=kind == "cut")

    def _find(self, name: str) -> StoredFile | None:
        stored = self._stored.get(name)
        if stored is not None:
            return stored
        fake = self._fake
        for suffix in ("_thumb.png", ".png", ".mp4"):
            if name.endswith(suffix):
                task = fake._registry.get(name.removesuffix(suffix))
                break
        else:
            return None
        if task is None or name not in (
            _basename(task.image_url),
            _basename(task.video_url),
            _basename(task.thumbnail_url),
        ):
            return None
        assert task.finished_at is not None  # it has a result URL
        if fake.file_ttl is not None and anyio.current_time() > task.finished_at + fake.file_ttl:
            return None
        if name.endswith(".mp4"):
            return StoredFile(name, mp4_bytes(task.task_id, size=fake.file_size), "video/mp4")
        thumbnail = name.endswith("_thumb.png")
        size = None if thumbnail else fake.file_size
        return StoredFile(name, png_bytes(name, size=size, side=4 if thumbnail else 8), "image/png")

    async def _stream(self, send: Send, stored: StoredFile, *, cut: bool) -> None:
        body = stored.content
        headers = [
            (b"content-type", stored.content_type.encode("latin-1")),
            (b"content-length", b"%d" % len(body)),
        ]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": headers,
                STREAM_RESPONSE: True,
            }
        )
        parts = _split(body, FILE_PARTS)
        if cut:
            parts = parts[: max(1, len(parts) // 2)] if len(parts) > 1 else [body[: len(body) // 2]]
        pause = self._fake.file_delay / len(parts)
        for index, part in enumerate(parts):
            held = self._held
            if index and held is not None:
                await held.wait()
            if pause:
                await anyio.sleep(pause)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _basename(url: str) -> str:
    return url.rpartition("/")[2]


async def _plain(
    send: Send,
    status: int,
    text: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    html: bool = False,
) -> None:
    body = text.encode() + b"\n"
    content_type = b"text/html; charset=utf-8" if html else b"text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(body)),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
