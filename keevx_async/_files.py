"""Files: local reference images up to the service, result files down to disk.

Two jobs, apart from the client that composes them:

* `Uploader`: a local reference image (a path, or bytes) goes to the service's upload
  endpoint through the HTTP engine, once per distinct content per client. Contents are
  keyed by their SHA-256, and a file seen before (same path, inode, size and modification
  time) is not even read again, so the same file in ten thousand requests is read once and
  uploaded once. An upload creates nothing billable, so every transient failure of it is
  retried (``retry_safe``). At most ``max_uploads`` files are read or sent at once, which
  also bounds the memory they take.
* `Downloader`: a result file is streamed with an ``httpx.AsyncClient`` of its own, which
  never carries the API key or any header of the API's, into a temporary file in the
  target directory, then fsynced and renamed into place: a crash never leaves a partial
  file under the final name. Status, ``Content-Type`` and ``Content-Length`` are checked;
  transient failures (connection errors, timeouts, bodies cut short, 5xx, 429) are retried
  with backoff, honouring ``Retry-After``. At most ``max_downloads`` run at once, and what
  they do on a disk (creating the directory, writing, fsync, rename) runs on a worker
  thread, under the download's slot: the event loop never waits for a write, and ten
  thousand tasks finishing at once never become ten thousand thread calls. (Looking for an
  existing file in a directory already made is one ``stat``, made in place.)

`file_name` is the naming rule, a pure function: one safe path component from a task ID
or a URL, with an extension from the URL, else from the ``Content-Type``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import mimetypes
import os
import re
import secrets
import stat
from collections import OrderedDict
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread
import attrs
import httpx

from ._exceptions import (
    APIError,
    AuthenticationError,
    DownloadError,
    InvalidRequestError,
    KeevxError,
    TransportError,
)
from ._hints import Hint
from ._kinds import kind_of_result
from ._models import (
    UploadedFile,
    check_image_size,
    is_local,
    local_name,
)
from ._throttle import backoff_delay, parse_retry_after
from ._types import IMAGE_CONTENT_TYPES
from ._wire import WireFormatError, decode_upload_envelope, decode_upload_reply

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

    from ._http import HTTPEngine
    from ._kinds import AnyRequest, AnyResult
    from ._models import ReferenceImage

__all__ = [
    "IMAGE_KINDS",
    "MEDIA_KINDS",
    "UPLOAD_PATH",
    "Downloader",
    "Uploader",
    "build_download_client",
    "file_name",
    "multipart_body",
]

logger = logging.getLogger("keevx_async")

UPLOAD_PATH: Final = "/v1/figure-resource/upload/file"
IMAGE_KINDS: Final = ("image/",)
"""The ``Content-Type`` a result image must have."""
MEDIA_KINDS: Final = ("image/", "video/")
"""The ``Content-Type`` a file fetched by URL alone may have."""
FLUSH_BYTES: Final = 1024 * 1024
"""Bytes of a download kept in memory before they are written out (on a worker thread)."""
MAX_STEM_BYTES: Final = 150
"""The longest name (UTF-8 bytes) given to a file, before its extension."""
_DIGEST_CACHE_SIZE: Final = 4096
_IOV_MAX: Final = 512  # buffers per writev call, well under every system's IOV_MAX
# A new file, never an existing one, not inherited by child processes, bytes as they are
# (O_BINARY: Windows would otherwise translate newlines).
_CREATE_NEW: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)

# What a file's extension may be when it is taken from a URL; anything else comes from
# the Content-Type.
_URL_EXTENSIONS: Final = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".mp4", ".mov", ".webm"}
)
_TYPE_EXTENSIONS: Final = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/x-ms-bmp": ".bmp",
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/webm": ".webm",
}
_UNSAFE: Final = re.compile(r"[^\w.-]+")
_SAFE_EXTENSION: Final = re.compile(r"\.[a-z0-9]{1,8}")
_EXPIRED_STATUSES: Final = frozenset({403, 404, 410})
# Never sent, and retrying cannot help.
_UNSENDABLE: Final = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def shown(url: str) -> str:
    """``url`` for a message: without its query string, which may hold a signature."""
    base, question, _ = url.partition("?")
    base = base.partition("#")[0]
    return base + ("?..." if question else "")


# --- naming ------------------------------------------------------------------------------


def _safe_stem(text: str) -> str:
    """``text`` as the stem of a file name: word characters, dots and dashes only, no
    leading or trailing dot (so never ``.`` or ``..``), at most `MAX_STEM_BYTES`."""
    cleaned = _UNSAFE.sub("_", text).strip("._")
    return cleaned.encode()[:MAX_STEM_BYTES].decode(errors="ignore").rstrip(".")


def _last_segment(url: str) -> str:
    """The last component of the URL's path, decoded; an encoded ``/`` or ``\\`` in it
    separates components too, so ``..%2F..%2Fx`` gives ``x``."""
    path = unquote(urlsplit(url).path)
    return re.split(r"[/\\]", path)[-1]


def extension_for(content_type: str | None) -> str:
    """The file extension (``".png"``) for a ``Content-Type``, ``""`` when none fits."""
    media = (content_type or "").partition(";")[0].strip().lower()
    known = _TYPE_EXTENSIONS.get(media)
    if known is not None:
        return known
    guessed = mimetypes.guess_extension(media) if media else None
    return guessed if guessed and _SAFE_EXTENSION.fullmatch(guessed) else ""


def url_extension(url: str) -> str | None:
    """The extension of the URL's file name (``".png"``) when it is a known image or video
    one, else ``None``."""
    stem, dot, extension = _last_segment(url).rpartition(".")
    found = f".{extension.lower()}"
    return found if dot and stem and found in _URL_EXTENSIONS else None


def file_name(url: str, stem: str | None = None, content_type: str | None = None) -> str:
    """The name of a downloaded file in its directory: always one safe path component.

    ``stem`` (a task ID) names the file, else the URL's own file name does (never a path
    of it: ``../../x.png`` gives ``x.png``), else ``download``. The extension is the URL's
    when it is a known image or video one, else the ``Content-Type``'s.
    """
    extension = url_extension(url)
    if stem is None:
        base = _last_segment(url)
        if extension is not None:
            base = base[: -len(extension)]
        stem = base
    if extension is None:
        extension = extension_for(content_type)
    return (_safe_stem(stem) or "download") + extension


# --- uploads -----------------------------------------------------------------------------


def _quoted(filename: str) -> str:
    # As browsers write a multipart file name (WHATWG HTML "multipart/form-data encoding").
    return filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart_body(content: bytes, filename: str) -> tuple[bytes, str]:
    """The upload's body (one part ``file``) and its ``Content-Type``."""
    boundary = secrets.token_hex(16)
    extension = filename.rpartition(".")[2].lower()
    media = IMAGE_CONTENT_TYPES.get(extension, "application/octet-stream")
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{_quoted(filename)}"\r\n'
        f"Content-Type: {media}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return b"".join((head, content, tail)), f"multipart/form-data; boundary={boundary}"


def _unreadable(field: str, name: str, exc: OSError) -> InvalidRequestError:
    if isinstance(exc, FileNotFoundError):
        return InvalidRequestError(f"{field}: no such file: {name!r}", field=field)
    return InvalidRequestError(f"{field}: cannot read {name!r}: {exc.strerror or exc}", field=field)


_FileIdentity = tuple[str, int, int, int, int]


def _identity(name: str, field: str) -> _FileIdentity:
    """What tells a file apart without reading it (worker thread); the file's rules are
    checked again, since it may have changed since its request was built."""
    try:
        status = Path(name).stat()
    except OSError as exc:
        raise _unreadable(field, name, exc) from None
    if not stat.S_ISREG(status.st_mode):
        raise InvalidRequestError(
            f"{field} is not a regular file (a directory?): {name!r}", field=field
        )
    check_image_size(status.st_size, field, name)
    absolute = str(Path(name).absolute())
    return (absolute, status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def _read(name: str, field: str) -> tuple[bytes, str]:
    """The file's content and its SHA-256 (worker thread)."""
    try:
        content = Path(name).read_bytes()
    except OSError as exc:
        raise _unreadable(field, name, exc) from None
    check_image_size(len(content), field, name)
    return content, hashlib.sha256(content).hexdigest()


@attrs.define(eq=False)
class _InFlight:
    """Work under way (reading a path, or uploading a content); others wait for it."""

    done: anyio.Event = attrs.Factory(anyio.Event)
    result: UploadedFile | None = None
    error: APIError | TransportError | None = None


def _failed_upload(error: KeevxError, what: str, request: AnyRequest | None) -> KeevxError:
    """An upload's error (the HTTP engine raises an ``APIError`` or a ``TransportError``),
    said of ``what`` and ``request``; ``maybe_created`` false: nothing was submitted."""
    if isinstance(error, APIError):
        return type(error)(
            f"{what} could not be uploaded: {error.msg}",
            code=error.code,
            status_code=error.status_code,
            request=request,
            response=error.response,
            retry_after=error.retry_after,
        )
    return TransportError(f"{what} could not be uploaded: {error}", request=request)


class Uploader:
    """Uploads local files, each distinct content once (see the module's docstring).

    Args:
        engine: the client's HTTP engine (headers, throttle, retries).
        max_uploads: files read or sent at once.
    """

    __slots__ = ("_digests", "_engine", "_flights", "_slots", "_uploads", "_url")

    def __init__(self, engine: HTTPEngine, *, max_uploads: int) -> None:
        self._engine = engine
        self._url = engine.url(UPLOAD_PATH)
        self._slots = anyio.Semaphore(max_uploads)
        # SHA-256 -> the uploaded file.
        self._uploads: dict[str, UploadedFile] = {}
        # ("path", name) or ("sha256", digest) -> the work under way for it.
        self._flights: dict[tuple[str, str], _InFlight] = {}
        # A file's identity -> its SHA-256, so a file seen before is not read again.
        self._digests: OrderedDict[_FileIdentity, str] = OrderedDict()

    async def image_urls(
        self, request: AnyRequest, images: Sequence[tuple[str, ReferenceImage]]
    ) -> tuple[str, ...]:
        """A request's input images (each with the field holding it) as URLs, its local
        files uploaded.

        Raises:
            InvalidRequestError: a local file no longer passes the rules (it changed).
            APIError, TransportError: an upload failed (``maybe_created=False``: nothing
                was submitted).
        """
        urls = []
        for field, image in images:
            if not is_local(image):
                assert isinstance(image, str)
                urls.append(image)
                continue
            assert isinstance(image, os.PathLike)  # checked when the request was built
            name = local_name(image)
            uploaded = await self.upload_path(name, field, f"{field} ({Path(name).name})", request)
            urls.append(uploaded.url)
        return tuple(urls)

    async def upload_path(
        self,
        name: str,
        field: str,
        what: str,
        request: AnyRequest | None = None,
        filename: str | None = None,
    ) -> UploadedFile:
        """Upload the file at ``name`` (as ``filename``, default its own name) unless its
        content was uploaded before (under whatever name).

        Calls for the same path at once share one reading and one upload (and its
        failure: it was the same upload). ``field`` names the argument in errors about
        the file, ``what`` the file in errors about its upload.
        """
        work = functools.partial(self._upload_path, name, field, filename or Path(name).name)
        return await self._shared(("path", name), work, what, request)

    async def upload_bytes(self, content: bytes, filename: str) -> UploadedFile:
        """Upload ``content`` as ``filename`` unless it was uploaded before."""
        digest = await anyio.to_thread.run_sync(_sha256, content)
        work = functools.partial(self._upload_content, digest, content, filename)
        return await self._shared(("sha256", digest), work, repr(filename), None)

    async def _shared(
        self,
        key: tuple[str, str],
        work: Callable[[], Awaitable[UploadedFile]],
        what: str,
        request: AnyRequest | None,
    ) -> UploadedFile:
        """``work()``, or the same work under way for ``key``, awaited; an upload's error
        said of ``what`` and ``request`` (``maybe_created`` false: nothing was submitted)."""
        try:
            return await self._once(key, work)
        except (APIError, TransportError) as exc:
            raise _failed_upload(exc, what, request) from exc

    async def _once(
        self, key: tuple[str, str], work: Callable[[], Awaitable[UploadedFile]]
    ) -> UploadedFile:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.result is not None:
                return flight.result
            # A refused file or a cancelled caller: each waiter goes on by itself.
        flight = self._flights[key] = _InFlight()
        try:
            flight.result = await work()
        except (APIError, TransportError) as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
        return flight.result

    async def _upload_path(self, name: str, field: str, filename: str) -> UploadedFile:
        identity = await anyio.to_thread.run_sync(_identity, name, field)
        seen = self._digests.get(identity)
        if seen is not None:
            self._digests.move_to_end(identity)
            known = self._uploads.get(seen)
            if known is not None:
                return known
        async with self._slots:
            content, digest = await anyio.to_thread.run_sync(_read, name, field)
        self._digests[identity] = digest
        if len(self._digests) > _DIGEST_CACHE_SIZE:
            self._digests.popitem(last=False)
        work = functools.partial(self._upload_content, digest, content, filename)
        return await self._once(("sha256", digest), work)

    async def _upload_content(self, digest: str, content: bytes, filename: str) -> UploadedFile:
        known = self._uploads.get(digest)
        if known is None:
            try:
                known = await self._send(content, filename)
            except KeevxError as exc:
                logger.warning(
                    "uploading %s failed; nothing was submitted for it: %s", filename, exc
                )
                raise
            self._uploads[digest] = known
        return known

    async def _send(self, content: bytes, filename: str) -> UploadedFile:
        async with self._slots:
            body, content_type = multipart_body(content, filename)
            response = await self._engine.send(
                "POST",
                self._url,
                body,
                retry_safe=True,
                paced=False,
                content_type=content_type,
            )
        return _read_upload_reply(response)


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _read_upload_reply(response: httpx.Response) -> UploadedFile:
    """The uploaded file of a 2xx reply, or the error the reply stands for."""
    try:
        envelope = decode_upload_envelope(response.content)
        if envelope.ok:
            return decode_upload_reply(envelope.result)
    except WireFormatError as exc:
        raise APIError(
            f"unreadable upload reply: {exc}",
            status_code=response.status_code,
            response=response,
        ) from None
    error_class = AuthenticationError if envelope.code in (401, 403) else APIError
    raise error_class(
        envelope.message or "the service refused the upload",
        code=envelope.code,
        status_code=response.status_code,
        response=response,
    )


# --- downloads ---------------------------------------------------------------------------


def _media_types(result: AnyResult) -> tuple[str, ...]:
    """The ``Content-Type`` prefixes a result's file may have (``image/`` for an image)."""
    kind = kind_of_result(result)
    assert kind is not None  # a result of a known kind: the callers have one
    return kind.media_types


def build_download_client(max_downloads: int, timeout: httpx.Timeout) -> httpx.AsyncClient:
    """The client's own HTTP client for result files: no API header, redirects followed
    (file hosts redirect to CDNs), a pool as large as ``max_downloads``."""
    limits = httpx.Limits(max_connections=max_downloads, max_keepalive_connections=max_downloads)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=True)


@attrs.frozen
class _Placement:
    """Where a download goes: the directory, and the name when it is known before the
    reply (else it comes from the ``Content-Type``)."""

    directory: Path
    name: str | None
    stem: str | None
    existing: Path | None


def means_directory(dest: str | os.PathLike[str]) -> bool:
    """Whether ``dest`` names a directory: an existing one, a ``str`` ending with a path
    separator, or a path whose last component has no extension (``out``, not ``out.png``)."""
    if isinstance(dest, str) and dest.endswith(("/", os.sep)):
        return True
    path = Path(dest)
    if path.is_dir():
        return True
    return not path.exists() and not path.suffix


def _place(
    dest: str | os.PathLike[str],
    url: str,
    stem: str | None,
    *,
    overwrite: bool,
    as_directory: bool,
    make_directory: bool = True,
) -> _Placement:
    """Resolve ``dest``: create its directory (unless known to exist), find an existing
    target. A worker thread's job, but for a directory known to exist, where it is one
    ``stat`` (cheaper in place than the thread call)."""
    path = Path(dest)
    if as_directory or means_directory(dest):
        directory, name = path, None
        if url_extension(url) is not None:
            name = file_name(url, stem)
    else:
        directory, name = path.parent, path.name
    if make_directory:
        directory.mkdir(parents=True, exist_ok=True)
    existing = None
    if not overwrite:
        # Named from the Content-Type, the file may exist with any of the known extensions.
        candidates = (
            [name]
            if name is not None
            else [file_name(url, stem, media) for media in sorted(_TYPE_EXTENSIONS)]
        )
        for candidate in candidates:
            target = directory / candidate
            if target.is_file():
                existing = target
                break
    return _Placement(directory=directory, name=name, stem=stem, existing=existing)


def _writev(fd: int, buffers: list[bytes]) -> int:
    """``os.writev``, or one ``os.write`` of the buffers joined where there is none
    (Windows)."""
    if _os_writev is not None:
        return _os_writev(fd, buffers)
    return os.write(fd, b"".join(buffers))  # pragma: no cover - Windows


_os_writev: Final[Callable[[int, list[bytes]], int] | None] = getattr(os, "writev", None)


def _write_all(fd: int, chunks: list[bytes]) -> None:
    """Write ``chunks`` to ``fd`` with as few system calls as it takes (no joined copy)."""
    while chunks:
        batch = chunks[:_IOV_MAX]
        written = _writev(fd, batch)
        for index, chunk in enumerate(batch):
            if written < len(chunk):
                chunks = [chunk[written:], *batch[index + 1 :], *chunks[len(batch) :]]
                break
            written -= len(chunk)
        else:
            chunks = chunks[len(batch) :]


class _PartFile:
    """A download's temporary file in the target directory, renamed into place once
    complete. `flush` and `commit` run on a worker thread; `discard` anywhere."""

    __slots__ = ("_chunks", "_fd", "_pending", "directory", "name", "temp")

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.temp: Path | None = None
        self._fd: int | None = None
        self._chunks: list[bytes] = []
        self._pending = 0

    def add(self, chunk: bytes) -> bool:
        """Keep ``chunk``; whether enough is kept to be written out."""
        self._chunks.append(chunk)
        self._pending += len(chunk)
        return self._pending >= FLUSH_BYTES

    def flush(self) -> int:
        """Write what is kept (worker thread), creating the temporary file first; its
        file descriptor."""
        fd = self._fd
        if fd is None:
            # Hidden, unique, and in the same directory: the rename stays atomic.
            token = secrets.token_hex(4)
            self.temp = self.directory / f".{self.name[:100]}.{token}.part"
            fd = self._fd = os.open(self.temp, _CREATE_NEW, 0o666)
        _write_all(fd, self._chunks)
        self._chunks = []
        self._pending = 0
        return fd

    def commit(self, *, overwrite: bool) -> Path:
        """Write the rest, fsync, rename into place (worker thread); the final path.

        Without ``overwrite``, a file that appeared under the name meanwhile (another
        download of the same result) is kept and this one dropped.
        """
        fd = self.flush()
        assert self.temp is not None
        os.fsync(fd)
        self._fd = None
        os.close(fd)
        target = self.directory / self.name
        if not overwrite and target.is_file():
            self.temp.unlink()
        else:
            self.temp.replace(target)
        self.temp = None
        return target

    def discard(self) -> None:
        """Close and remove the temporary file, if any (after a failure or a cancel)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)
            self.temp = None


@attrs.frozen
class _Failure:
    """Why one download attempt failed, and whether another may succeed."""

    reason: str
    status_code: int | None = None
    transient: bool = True
    retry_after: float | None = None
    expired: bool = False


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def _check_reply(response: httpx.Response, kinds: tuple[str, ...]) -> _Failure | None:
    """The failure a reply's head stands for, or ``None`` for a body worth reading."""
    status = response.status_code
    if status == 200:
        content_type = response.headers.get("content-type", "")
        media = content_type.partition(";")[0].strip().lower()
        if media.startswith(kinds):
            return None
        wanted = " or ".join(f"{kind}*" for kind in kinds)
        return _Failure(
            f"the Content-Type is {content_type or 'missing'!r}, not {wanted}",
            status_code=status,
            transient=False,
        )
    reason = f"HTTP {status} {response.reason_phrase}".rstrip()
    if status in _EXPIRED_STATUSES:
        return _Failure(reason, status_code=status, transient=False, expired=True)
    transient = status in (408, 429) or status >= 500
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    return _Failure(reason, status_code=status, transient=transient, retry_after=retry_after)


class Downloader:
    """Downloads result files (see the module's docstring).

    Args:
        http: the ``httpx.AsyncClient`` for file hosts; no header is ever added to it.
        owns_http: whether `aclose` closes ``http``.
        max_downloads: downloads at once.
        max_retries: retries of a download after transient failures.
        max_retry_wait: the longest ``Retry-After`` slept through.
    """

    __slots__ = (
        "_directories",
        "_expired_hint",
        "_files",
        "_http",
        "_max_retries",
        "_max_retry_wait",
        "_owns_http",
        "_slots",
        "_type_hint",
        "max_downloads",
    )

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        owns_http: bool,
        max_downloads: int,
        max_retries: int,
        max_retry_wait: float,
    ) -> None:
        self._http = http
        self._owns_http = owns_http
        self.max_downloads = max_downloads
        self._slots = anyio.Semaphore(max_downloads)
        # A file from its request to its rename; at most twice the connections, so a
        # slow disk never has more bodies waiting for it than that.
        self._files = anyio.Semaphore(2 * max_downloads)
        # Destinations made (or found) to be directories by a download before.
        self._directories: set[Path] = set()
        self._max_retries = max_retries
        self._max_retry_wait = max_retry_wait
        self._expired_hint = Hint(
            "a file host answered HTTP %d for %s: result URLs expire (the service keeps "
            "them for about 7 days), so download results as they finish (download_to=)"
        )
        self._type_hint = Hint(
            "a file host answered Content-Type %r for %s instead of a file: an error or "
            "login page, or a proxy in between? check the URL"
        )

    async def aclose(self) -> None:
        """Close the HTTP client if it is ours (an injected one is left open)."""
        if self._owns_http:
            with anyio.CancelScope(shield=True):
                await self._http.aclose()

    async def save_result(self, directory: Path, result: AnyResult) -> AnyResult:
        """Download ``result``'s file (an image, a video) into ``directory`` as
        ``{task_id}{ext}``; the result with its ``path`` set (an existing file is kept,
        not fetched again)."""
        path = await self.download(
            result.url,
            directory,
            stem=result.task_id,
            kinds=_media_types(result),
            overwrite=False,
            as_directory=True,
            result=result,
        )
        return attrs.evolve(result, path=path)

    async def download(
        self,
        url: str,
        dest: str | os.PathLike[str],
        *,
        stem: str | None,
        kinds: tuple[str, ...],
        overwrite: bool,
        as_directory: bool = False,
        result: AnyResult | None = None,
    ) -> Path:
        """Download ``url`` to ``dest``; the path of the file written (or found).

        Raises:
            DownloadError: the file could not be fetched or written, after retries.
        """
        place = functools.partial(
            _place, dest, url, stem, overwrite=overwrite, as_directory=as_directory
        )
        placement: _Placement | None = None
        for attempt in itertools.count():
            # A connection slot while the body is received, and a file slot from the
            # request to the rename: the next transfer starts while this file is written
            # out (an fsync takes as long as a transfer). Every thread call is under one
            # of them: ten thousand tasks finishing at once never become ten thousand
            # thread calls.
            async with self._files:
                async with self._slots:
                    if placement is None:
                        placement = await self._place(dest, url, place, result)
                        if placement.existing is not None:
                            return placement.existing
                    outcome = await self._fetch(url, placement, kinds)
                if isinstance(outcome, _PartFile):
                    return await self._commit(outcome, url, result, overwrite=overwrite)
            wait = (
                outcome.retry_after if outcome.retry_after is not None else backoff_delay(attempt)
            )
            if not outcome.transient or attempt >= self._max_retries:
                raise self._error(url, outcome, attempt + 1, result)
            if wait > self._max_retry_wait:
                raise DownloadError(
                    f"downloading {shown(url)} failed: {outcome.reason}, and the file host "
                    f"asked to wait {wait:g} s, more than max_retry_wait="
                    f"{self._max_retry_wait:g}",
                    url=url,
                    status_code=outcome.status_code,
                    result=result,
                )
            logger.warning(
                "retrying the download of %s in %.2f s (retry %d of %d): %s",
                shown(url), wait, attempt + 1, self._max_retries, outcome.reason,
            )  # fmt: skip
            await anyio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _place(
        self,
        dest: str | os.PathLike[str],
        url: str,
        place: functools.partial[_Placement],
        result: AnyResult | None,
    ) -> _Placement:
        """Where ``url`` goes (see `_place`): on a worker thread, but for a destination
        found to be a directory before, which is one still: no thread call to make it
        again, only a ``stat`` for an existing file."""
        try:
            if Path(dest) in self._directories:
                return place(as_directory=True, make_directory=False)
            placement = await anyio.to_thread.run_sync(place)
        except OSError as exc:
            raise DownloadError(
                f"cannot save {shown(url)} to {os.fspath(dest)!r}: {exc}",
                url=url,
                result=result,
            ) from exc
        if placement.directory == Path(dest):
            self._directories.add(placement.directory)
        return placement

    def _error(
        self, url: str, failure: _Failure, attempts: int, result: AnyResult | None
    ) -> DownloadError:
        if failure.expired:
            assert failure.status_code is not None
            self._expired_hint.say(failure.status_code, shown(url))
            message = (
                f"downloading {shown(url)} failed: {failure.reason}: the URL may have "
                "expired (the service keeps result files for about 7 days)"
            )
        else:
            if failure.status_code == 200:
                self._type_hint.say(failure.reason, shown(url))
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            message = f"downloading {shown(url)} failed{tries}: {failure.reason}"
        return DownloadError(message, url=url, status_code=failure.status_code, result=result)

    async def _commit(
        self, part: _PartFile, url: str, result: AnyResult | None, *, overwrite: bool
    ) -> Path:
        """Put a received file in place (worker thread); its path."""
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(part.commit, overwrite=overwrite)
            )
        except OSError as exc:
            raise DownloadError(
                f"downloading {shown(url)} failed: cannot write the file: {exc}",
                url=url,
                status_code=200,
                result=result,
            ) from exc
        finally:
            part.discard()  # nothing left to remove once committed

    async def _fetch(
        self, url: str, placement: _Placement, kinds: tuple[str, ...]
    ) -> _PartFile | _Failure:
        """One attempt: the whole body received (its temporary file not yet in place),
        or why it failed."""
        part: _PartFile | None = None
        try:
            async with self._http.stream("GET", url) as response:
                failure = _check_reply(response, kinds)
                if failure is not None:
                    return failure
                name = placement.name or file_name(
                    url, placement.stem, response.headers.get("content-type")
                )
                part = _PartFile(placement.directory, name)
                async with aclosing(_body_of(response)) as chunks:
                    async for chunk in chunks:
                        if part.add(chunk):
                            await anyio.to_thread.run_sync(part.flush)
                expected = _content_length(response)
                received = response.num_bytes_downloaded
                if expected is not None and received != expected:
                    return _Failure(f"the body was cut short: {received} of {expected} bytes")
                if not received:
                    return _Failure("the body was empty")
                received_part, part = part, None
                return received_part
        except httpx.TransportError as exc:
            return _Failure(_describe(exc), transient=not isinstance(exc, _UNSENDABLE))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # undecodable, redirects, a URL
            return _Failure(_describe(exc), transient=False)
        except OSError as exc:
            return _Failure(f"cannot write the file: {exc}", transient=False)
        finally:
            if part is not None:
                part.discard()


def _body_of(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The body's bytes: as they came (an image is compressed already), or decoded when
    the host sent a ``Content-Encoding``. Both are async generators (typed as iterators
    by httpx): the caller closes it, even when it stops early."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    body = response.aiter_raw() if encoding == "identity" else response.aiter_bytes()
    return cast("AsyncGenerator[bytes, None]", body)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
