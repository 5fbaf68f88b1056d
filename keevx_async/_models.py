"""Value objects: the request, the result, the snapshot and the callback payload.

Every rule of the service is checked when an [`ImageRequest`][keevx_async.ImageRequest] is built,
so nothing
invalid is ever sent. These classes know nothing of JSON; `keevx_async._wire` does.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs

from ._exceptions import InvalidRequestError
from ._types import (
    FINISHED_OK,
    IMAGE_EXTENSIONS,
    IMAGE_QUALITIES,
    IMAGE_RATIOS,
    MAX_GENERATE_COUNT,
    MAX_IMAGE_BYTES,
    MAX_PROMPT_LENGTH,
    MAX_REFERENCE_IMAGES,
    MODULES,
    UNFINISHED_STATUSES,
    ImageQuality,
    ImageRatio,
    Module,
)

__all__ = [
    "FINISHED_OK",
    "CallbackOutcome",
    "CallbackPayload",
    "ImageRequest",
    "ImageResult",
    "ReferenceImage",
    "TaskRequest",
    "TaskSnapshot",
    "UploadedFile",
    "check_local_image",
    "is_finished",
    "is_local",
    "local_name",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})

ReferenceImage = str | os.PathLike[str]
"""A reference image: an absolute http(s) URL string, or a local file (a path object)."""


def is_finished(status: str) -> bool:
    """Whether ``status`` is a finished one (success or failure)."""
    return status not in UNFINISHED_STATUSES


def _frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return value if isinstance(value, MappingProxyType) else MappingProxyType(dict(value))


# --- building the hot path's objects for less -----------------------------------------------
#
# A frozen attrs class's __init__ sets each field through object.__setattr__; setting the
# slots directly is the same for values that need no converter or validator, for about two
# thirds of the cost. Only the callback path (one payload and one result per callback) uses
# it; tests pin each builder against its class.

_new_object = object.__new__


def _slot_setters(cls: type[Any]) -> tuple[Callable[[Any, Any], None], ...]:
    """The setter of each field's slot of the frozen, slotted attrs class ``cls``, in field
    order."""
    return tuple(vars(cls)[field.name].__set__ for field in attrs.fields(cls))


# --- validation --------------------------------------------------------------------------


def _one_of(allowed: tuple[str, ...]) -> Any:
    choices = ", ".join(repr(a) for a in allowed)

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in allowed:
            raise InvalidRequestError(
                f"{attribute.name} must be one of {choices}; got {value!r}", field=attribute.name
            )

    return check


def unencodable_at(text: str) -> int | None:
    """The index of the first character of ``text`` that UTF-8 cannot encode (a lone
    surrogate such as ``"\\ud800"``, which JSON escapes and Python strings allow), or
    ``None`` when the whole text encodes."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_text(value: str, field: str) -> str:
    """Return ``value`` if UTF-8 can encode it, else raise naming ``field``.

    Every text the SDK will send (request fields, task IDs, URLs) goes through here where
    it enters, so that no ``UnicodeEncodeError`` can surface later, after other requests
    were already sent.
    """
    index = unencodable_at(value)
    if index is not None:
        raise InvalidRequestError(
            f"{field} is not valid Unicode: it has a lone surrogate {value[index]!r} at "
            f"index {index}, which cannot be sent (UTF-8 cannot encode it)",
            field=field,
        )
    return value


def check_prompt(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """``prompt``: a string of 1..1000 characters UTF-8 can encode (every request kind's)."""
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"prompt must be a string; got {type(value).__name__}", field="prompt"
        )
    if not 1 <= len(value) <= MAX_PROMPT_LENGTH:
        raise InvalidRequestError(
            f"prompt must be 1..{MAX_PROMPT_LENGTH} characters; got {len(value)}",
            field="prompt",
        )
    check_text(value, "prompt")


def _check_generate_count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(
            f"generate_count must be an int; got {type(value).__name__}", field="generate_count"
        )
    if not 1 <= value <= MAX_GENERATE_COUNT:
        raise InvalidRequestError(
            f"generate_count must be 1..{MAX_GENERATE_COUNT}; got {value}",
            field="generate_count",
        )


def is_local_host(host: str) -> bool:
    """Whether ``host`` (a URL's hostname) names this machine or a private network: a
    service on the internet cannot reach it."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: whether it resolves to a public address is not ours to ask
    return address.is_loopback or address.is_private or address.is_link_local


def check_http_url(value: object, field: str) -> str:
    """Return ``value`` if it is an absolute http(s) URL, else raise naming ``field``."""
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"{field} must be a URL string; got {type(value).__name__}", field=field
        )
    check_text(value, field)
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError as exc:
        raise InvalidRequestError(f"{field} is not a valid URL: {value!r}", field=field) from exc
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequestError(
            f"{field} must be an absolute http(s) URL; got {value!r}", field=field
        )
    return value


def is_local(image: object) -> bool:
    """Whether a reference image is a local file (a path object; a ``str`` is a URL)."""
    return not isinstance(image, str)


def local_name(path: os.PathLike[Any]) -> str:
    """The file name of a path object, as a ``str`` (bytes paths decoded)."""
    name = os.fspath(path)
    return os.fsdecode(name) if isinstance(name, bytes) else name


def _extension_error(field: str, extension: str, where: str) -> InvalidRequestError:
    allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
    got = f".{extension}" if extension else "no extension"
    return InvalidRequestError(
        f"{field} must be an image of type {allowed}; got {got} in {where!r}", field=field
    )


def check_image_name(name: str, field: str) -> None:
    """Raise naming ``field`` unless the file name ``name`` has an allowed image extension."""
    stem, dot, extension = name.rpartition(".")
    extension = extension.lower() if dot and stem else ""
    if extension not in IMAGE_EXTENSIONS:
        raise _extension_error(field, extension, name)


def check_image_size(size: int, field: str, name: str) -> None:
    """Raise naming ``field`` unless ``size`` bytes is 1..20 MB (what the service takes)."""
    if size == 0:
        raise InvalidRequestError(f"{field} is an empty file: {name!r}", field=field)
    if size > MAX_IMAGE_BYTES:
        raise InvalidRequestError(
            f"{field} is {size / 2**20:.1f} MB, more than the service's "
            f"{MAX_IMAGE_BYTES // 2**20} MB: {name!r}",
            field=field,
        )


def check_local_image(path: object, field: str) -> str:
    """Check a local reference image; return its file name (``str``) for messages.

    It must be a path object (``os.PathLike``) of an existing regular file with an allowed
    extension, of at most 20 MB; each broken rule raises
    [`InvalidRequestError`][keevx_async.InvalidRequestError] naming ``field``. Its
    content is read later, when it is uploaded.
    """
    if not isinstance(path, os.PathLike):
        raise InvalidRequestError(
            f"{field} must be a URL string or a local file (a pathlib.Path); "
            f"got {type(path).__name__}",
            field=field,
        )
    try:
        name = local_name(path)
    except TypeError as exc:  # a __fspath__ returning something else than str or bytes
        raise InvalidRequestError(f"{field} is not a usable path: {exc}", field=field) from None
    check_text(name, field)
    check_image_name(Path(name).name, field)
    try:
        status = Path(name).stat()
    except FileNotFoundError:
        raise InvalidRequestError(f"{field}: no such file: {name!r}", field=field) from None
    except OSError as exc:
        raise InvalidRequestError(
            f"{field}: cannot read {name!r}: {exc.strerror or exc}", field=field
        ) from None
    if not stat.S_ISREG(status.st_mode):
        raise InvalidRequestError(
            f"{field} is not a regular file (a directory?): {name!r}", field=field
        )
    check_image_size(status.st_size, field, name)
    return name


def _to_reference_images(value: object) -> tuple[ReferenceImage, ...]:
    return to_images(value, "reference_images")


def _check_reference_images(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    assert isinstance(value, tuple)  # the converter guarantees it
    if len(value) > MAX_REFERENCE_IMAGES:
        raise InvalidRequestError(
            f"reference_images takes at most {MAX_REFERENCE_IMAGES} images; got {len(value)} "
            "(the service would silently drop the rest)",
            field="reference_images",
        )
    for position, image in enumerate(value):
        check_image(image, f"reference_images[{position}]")


def check_callback_url(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """``callback_url``: ``None``, or an absolute http(s) URL (every request kind's)."""
    if value is not None:
        check_http_url(value, "callback_url")


MAX_CUSTOM_ID_LENGTH = 256


def check_custom_id(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """``custom_id``: ``None``, or a string of 1..256 characters UTF-8 can encode."""
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"custom_id must be a string; got {type(value).__name__}", field="custom_id"
        )
    if not 1 <= len(value) <= MAX_CUSTOM_ID_LENGTH:
        raise InvalidRequestError(
            f"custom_id must be 1..{MAX_CUSTOM_ID_LENGTH} characters; got {len(value)}",
            field="custom_id",
        )
    check_text(value, "custom_id")


def check_image(image: object, field: str) -> None:
    """Check one input image: a local file (a path object, see `check_local_image`), or
    an absolute http(s) URL whose file name, when it has an extension, has an allowed one."""
    if is_local(image):
        check_local_image(image, field)
        return
    check_http_url(image, field)
    assert isinstance(image, str)
    last_segment = urlsplit(image).path.rsplit("/", 1)[-1]
    if "." in last_segment:
        extension = last_segment.rsplit(".", 1)[-1].lower()
        if extension not in IMAGE_EXTENSIONS:
            raise _extension_error(field, extension, image)


def to_images(value: object, field: str) -> tuple[ReferenceImage, ...]:
    """A list of input images as a tuple; a lone string or path is refused naming
    ``field`` (a string is iterable too: it would make one-letter "URLs")."""
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Iterable):
        raise InvalidRequestError(
            f"{field} must be a list of URL strings or local paths; got {type(value).__name__}",
            field=field,
        )
    return tuple(value)


# --- models ------------------------------------------------------------------------------


class TaskRequest:
    """What every request kind has: a prompt, where to call back, the caller's own ID.

    The base of [`ImageRequest`][keevx_async.ImageRequest] and
    [`VideoRequest`][keevx_async.VideoRequest], for typing code that takes either (each
    declares these fields itself, so that they keep their places in its signature).

    Attributes:
        prompt: what to generate.
        callback_url: where the service calls back for this request (``None``: the
            client's).
        custom_id: the caller's own identifier of the request (a CSV row's ID, say):
            1..256 characters, never sent to the service, kept on the request, its tasks
            and their results.
    """

    __slots__ = ()

    if TYPE_CHECKING:
        prompt: str
        callback_url: str | None
        custom_id: str | None


@attrs.frozen
class ImageRequest(TaskRequest):
    """One call to the image generation endpoint. Immutable and validated.

    Every rule of the service is checked here, at construction; a broken one raises
    [`InvalidRequestError`][keevx_async.InvalidRequestError] naming the field and what is allowed.

    Args:
        prompt: what to draw, 1..1000 characters.
        reference_images: at most 5 JPG/JPEG/PNG/BMP/WebP/GIF images, each an absolute
            http(s) URL string (a URL without a file extension is allowed) or a local
            file as a path object (``pathlib.Path``; a ``str`` is always a URL). A local
            file must exist, be a regular file and be at most 20 MB, checked here; the
            client uploads it when the request is submitted (see
            [`AsyncKeevx.upload`][keevx_async.AsyncKeevx.upload]), and the request keeps
            the path as given.
        module: ``"std"`` or ``"pro"``.
        generate_count: how many images, 1..8; each image becomes its own task.
        image_quality: ``"1K"``, ``"2K"`` or ``"4K"``.
        image_ratio: one of ``"1:1" "3:2" "2:3" "3:4" "4:3" "4:5" "5:4" "9:16" "16:9"
            "21:9"``.
        callback_url: where the service calls back for this request; default: the
            client's ``callback_url``.
        custom_id: your own identifier of the request (a CSV row's ID, say), 1..256
            characters; never sent to the service, kept on the request, its tasks and
            their results (``task.custom_id``, ``result.custom_id``). In a journaled run
            it is the request's identity (see [durable runs](../guides/durable-runs.md)),
            so it must be unique in the run.

    Example:
        >>> import keevx_async as kx
        >>> kx.ImageRequest("a red fox in the snow", generate_count=2, image_ratio="16:9")
        ImageRequest(prompt='a red fox in the snow', reference_images=(), module='std', \
generate_count=2, image_quality='2K', image_ratio='16:9', callback_url=None, custom_id=None)
    """

    prompt: str = attrs.field(validator=check_prompt)
    reference_images: tuple[ReferenceImage, ...] = attrs.field(
        default=(), kw_only=True, converter=_to_reference_images, validator=_check_reference_images
    )
    module: Module = attrs.field(default="std", kw_only=True, validator=_one_of(MODULES))
    generate_count: int = attrs.field(default=1, kw_only=True, validator=_check_generate_count)
    image_quality: ImageQuality = attrs.field(
        default="2K", kw_only=True, validator=_one_of(IMAGE_QUALITIES)
    )
    image_ratio: ImageRatio = attrs.field(
        default="9:16", kw_only=True, validator=_one_of(IMAGE_RATIOS)
    )
    callback_url: str | None = attrs.field(default=None, kw_only=True, validator=check_callback_url)
    custom_id: str | None = attrs.field(default=None, kw_only=True, validator=check_custom_id)


@attrs.frozen
class ImageResult:
    """A finished, successful task: the image and where it came from.

    ``raw`` is the callback's ``data`` object as received, extra fields included. The
    service keeps ``image_url`` for about 7 days: download what you want to keep
    ([`AsyncKeevx.download`][keevx_async.AsyncKeevx.download], or ``download_to=`` of a
    batch). ``path`` is the local file it was saved to by a batch's ``download_to``,
    ``None`` unless downloaded.
    """

    task_id: str
    image_url: str
    request: ImageRequest
    index: int
    status: str = FINISHED_OK
    task_type: str = "image_generate"
    raw: Mapping[str, Any] = attrs.field(
        default=_EMPTY, converter=_frozen_mapping, eq=False, repr=False
    )
    path: Path | None = None

    @property
    def url(self) -> str:
        """The result file's URL: ``image_url`` (every result kind has ``url``)."""
        return self.image_url

    @property
    def custom_id(self) -> str | None:
        """The request's ``custom_id``."""
        return self.request.custom_id


(
    _r_task_id,
    _r_image_url,
    _r_request,
    _r_index,
    _r_status,
    _r_task_type,
    _r_raw,
    _r_path,
) = _slot_setters(ImageResult)


def make_image_result(  # noqa: PLR0917 (positional, in field order: see the class)
    task_id: str,
    image_url: str,
    request: ImageRequest,
    index: int,
    status: str,
    task_type: str,
    raw: Mapping[str, Any],
) -> ImageResult:
    """``ImageResult(task_id, image_url, ..., raw)`` with ``raw`` already read-only (a
    `CallbackPayload`'s is), built for less: a task finishing from a callback. The same
    object (pinned by a test)."""
    result: ImageResult = _new_object(ImageResult)
    _r_task_id(result, task_id)
    _r_image_url(result, image_url)
    _r_request(result, request)
    _r_index(result, index)
    _r_status(result, status)
    _r_task_type(result, task_type)
    _r_raw(result, raw)
    _r_path(result, None)
    return result


def image_result_of(payload: CallbackPayload, request: ImageRequest, index: int) -> ImageResult:
    """The result of a task that finished with ``payload`` (SUCCEEDED): `make_image_result`
    from the payload's fields, in one call (the image kind's ``result``: a task finishing
    from a callback calls it once)."""
    result: ImageResult = _new_object(ImageResult)
    _r_task_id(result, payload.task_id)
    _r_image_url(result, payload.image_url)
    _r_request(result, request)
    _r_index(result, index)
    _r_status(result, payload.status)
    _r_task_type(result, payload.task_type)
    _r_raw(result, payload.raw)
    _r_path(result, None)
    return result


@attrs.frozen
class UploadedFile:
    """A file the service stores for you (see
    [`AsyncKeevx.upload`][keevx_async.AsyncKeevx.upload]): put ``url`` in
    ``reference_images``.

    Attributes:
        url: where the service keeps the file.
        file_id: the service's ID of the file.
        file_name: the name the service gave it.
    """

    url: str
    file_id: str
    file_name: str


@attrs.frozen
class TaskSnapshot:
    """One task's state as the GET endpoint reported it (see ``AsyncKeevx.retrieve``).

    ``raw`` is the reply's ``data`` object, extra fields included.
    """

    task_id: str
    status: str
    image_url: str = ""
    thumbnail_url: str = ""
    error_message: str = ""
    raw: Mapping[str, Any] = attrs.field(
        default=_EMPTY, converter=_frozen_mapping, eq=False, repr=False
    )
    video_url: str = ""
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    task_type: str = "image_generate"

    @property
    def done(self) -> bool:
        """Whether the task has finished (successfully or not)."""
        return is_finished(self.status)

    @property
    def url(self) -> str:
        """The result file's URL: ``image_url`` of an image task, ``video_url`` of a video
        task (``""`` while there is none)."""
        return self.image_url or self.video_url


@attrs.frozen
class CallbackPayload:
    """A parsed callback (or a finished snapshot): what the registry applies to a task."""

    task_id: str
    status: str
    image_url: str = ""
    error_message: str = ""
    task_type: str = "image_generate"
    code: int = 0
    msg: str = ""
    raw: Mapping[str, Any] = attrs.field(
        default=_EMPTY, converter=_frozen_mapping, eq=False, repr=False
    )

    @property
    def done(self) -> bool:
        """Whether the payload reports a finished task."""
        return is_finished(self.status)


(
    _p_task_id,
    _p_status,
    _p_image_url,
    _p_error_message,
    _p_task_type,
    _p_code,
    _p_msg,
    _p_raw,
) = _slot_setters(CallbackPayload)


def make_callback_payload(  # noqa: PLR0917 (positional, in field order: see the class)
    task_id: str,
    status: str,
    image_url: str,
    error_message: str,
    task_type: str,
    code: int,
    msg: str,
    raw: MappingProxyType[str, Any],
) -> CallbackPayload:
    """``CallbackPayload(task_id, status, ..., raw)`` for values that need no conversion
    (``raw`` already read-only), built for less: the callback decoder's hot path.

    The same object: pinned by a test against the class itself.
    """
    payload: CallbackPayload = _new_object(CallbackPayload)
    _p_task_id(payload, task_id)
    _p_status(payload, status)
    _p_image_url(payload, image_url)
    _p_error_message(payload, error_message)
    _p_task_type(payload, task_type)
    _p_code(payload, code)
    _p_msg(payload, msg)
    _p_raw(payload, raw)
    return payload


class CallbackOutcome(str, enum.Enum):
    """What feeding one callback did."""

    RESOLVED = "resolved"
    """A waiting task was completed by this callback."""
    BUFFERED = "buffered"
    """The task ID is not known yet (the submit reply has not arrived): the callback is
    kept and applied when the reply registers the task. With a
    [`RedisRouter`][keevx_async.RedisRouter], it is kept in Redis, for any process.
    """
    DUPLICATE = "duplicate"
    """The task had already finished: nothing changed."""
    PROGRESS = "progress"
    """A non-finished status (``GENERATING``, ...): the task's status was updated."""
    FORWARDED = "forwarded"
    """The task is waited for in another process: the callback was recorded by the
    client's router and that process notified (see
    [`RedisRouter`][keevx_async.RedisRouter])."""

    def __str__(self) -> str:
        return self.value
