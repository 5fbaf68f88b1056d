"""The video kind: ``POST /v1/image_to_video``, ``i2v-`` task IDs, a
[`VideoResult`][keevx_async.VideoResult] per task.

Every rule of the service's per-model table is checked when a
[`VideoRequest`][keevx_async.VideoRequest] is built:

| field | model ``V`` | model ``KL`` |
| --- | --- | --- |
| ``image_url`` (start frame) | one of ``image_url`` or ``reference_images`` | not allowed |
| ``end_image_url`` | only with ``image_url`` | not allowed |
| ``reference_images`` | 1..3 (multi-image mode) | required, 1..7 |
| ``aspect_ratio`` | ``16:9``, ``9:16`` | same |
| ``aspect_resolution`` | ``720p``, ``1080p``, ``4k`` | ``720p``, ``1080p`` |
| ``duration`` | with ``image_url``: 4, 6, 8; multi-image: 8; ``None``: 8 | 5, 10; ``None``: 5 |
| ``generate_audio`` | bool | must be False |
| ``generate_count`` | 1..4 | 1..4 |
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from keevx_async._exceptions import InvalidRequestError
from keevx_async._kinds._kind import Kind
from keevx_async._models import (
    FINISHED_OK,
    ReferenceImage,
    TaskRequest,
    check_callback_url,
    check_custom_id,
    check_image,
    check_prompt,
    to_images,
)

if TYPE_CHECKING:
    from keevx_async._models import CallbackPayload

__all__ = ["VIDEO", "VideoRequest", "VideoResult"]

VideoModel = Literal["V", "KL"]
AspectRatio = Literal["16:9", "9:16"]
AspectResolution = Literal["720p", "1080p", "4k"]

MODELS: Final = ("V", "KL")
ASPECT_RATIOS: Final = ("16:9", "9:16")
RESOLUTIONS: Final = MappingProxyType({"V": ("720p", "1080p", "4k"), "KL": ("720p", "1080p")})
MAX_VIDEO_COUNT: Final = 4
MAX_REFERENCE_IMAGES: Final = MappingProxyType({"V": 3, "KL": 7})
DEFAULT_DURATION: Final = MappingProxyType({"V": 8, "KL": 5})


def _choices(values: Sequence[object]) -> str:
    return ", ".join(repr(value) for value in values)


def _one_of(allowed: Sequence[object]) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or value not in allowed:
            raise InvalidRequestError(
                f"{attribute.name} must be one of {_choices(allowed)}; got {value!r}",
                field=attribute.name,
            )

    return check


def _check_optional_image(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        check_image(value, attribute.name)


def _to_reference_images(value: object) -> tuple[ReferenceImage, ...]:
    return to_images(value, "reference_images")


def _check_reference_images(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    assert isinstance(value, tuple)  # the converter guarantees it
    for position, image in enumerate(value):
        check_image(image, f"reference_images[{position}]")


def _check_duration(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidRequestError(
            f"duration must be an int (seconds) or None; got {type(value).__name__}",
            field="duration",
        )


def _check_bool(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidRequestError(
            f"{attribute.name} must be True or False; got {type(value).__name__}",
            field=attribute.name,
        )


def _check_generate_count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(
            f"generate_count must be an int; got {type(value).__name__}", field="generate_count"
        )
    if not 1 <= value <= MAX_VIDEO_COUNT:
        raise InvalidRequestError(
            f"generate_count must be 1..{MAX_VIDEO_COUNT}; got {value}", field="generate_count"
        )


@attrs.frozen
class VideoRequest(TaskRequest):
    """One call to the image-to-video endpoint. Immutable and validated.

    Every rule of the service's per-model table is checked here, at construction; a
    broken one raises [`InvalidRequestError`][keevx_async.InvalidRequestError] naming
    the field and what is allowed:

    | field | model ``"V"`` | model ``"KL"`` |
    | --- | --- | --- |
    | ``image_url`` | one of ``image_url`` or ``reference_images`` | not allowed |
    | ``end_image_url`` | only with ``image_url`` | not allowed |
    | ``reference_images`` | 1..3 (multi-image mode) | required, 1..7 |
    | ``aspect_resolution`` | ``720p``, ``1080p``, ``4k`` | ``720p``, ``1080p`` |
    | ``duration`` | with ``image_url``: 4, 6, 8; multi-image: 8 | 5, 10 |
    | ``generate_audio`` | ``True`` or ``False`` | ``False`` |

    Images (``image_url``, ``end_image_url``, ``reference_images``) are absolute
    http(s) URL strings or local files as path objects (uploaded when the request is
    submitted, as an [`ImageRequest`][keevx_async.ImageRequest]'s are).

    Args:
        prompt: what happens in the video, 1..1000 characters.
        model: ``"V"`` (a start frame, optionally an end frame, or 1..3 reference
            images) or ``"KL"`` (1..7 reference images).
        image_url: the start frame (model ``"V"`` only).
        end_image_url: the end frame (model ``"V"``, with ``image_url`` only).
        reference_images: the images of multi-image mode.
        aspect_ratio: ``"16:9"`` or ``"9:16"``.
        aspect_resolution: ``"720p"``, ``"1080p"`` or (model ``"V"``) ``"4k"``.
        duration: seconds of video; ``None`` (the default) means the model's default,
            8 for ``"V"`` and 5 for ``"KL"``. The attribute holds the resolved number
            (never ``None`` once built), which is what the submit body carries: a
            request built with ``duration=None`` equals one built with the default
            spelled out.
        generate_audio: whether the video has sound (model ``"V"`` only).
        generate_count: how many videos, 1..4; each becomes its own task.
        callback_url: where the service calls back for this request; default: the
            client's ``callback_url``.
        custom_id: your own identifier of the request, 1..256 characters; never sent.

    Example:
        >>> import keevx_async as kx
        >>> request = kx.VideoRequest("waves at dusk", image_url="https://example.com/a.png")
        >>> request.duration
        8
    """

    prompt: str = attrs.field(validator=check_prompt)
    model: VideoModel = attrs.field(default="V", kw_only=True, validator=_one_of(MODELS))
    image_url: ReferenceImage | None = attrs.field(
        default=None, kw_only=True, validator=_check_optional_image
    )
    end_image_url: ReferenceImage | None = attrs.field(
        default=None, kw_only=True, validator=_check_optional_image
    )
    reference_images: tuple[ReferenceImage, ...] = attrs.field(
        default=(), kw_only=True, converter=_to_reference_images, validator=_check_reference_images
    )
    aspect_ratio: AspectRatio = attrs.field(
        default="16:9", kw_only=True, validator=_one_of(ASPECT_RATIOS)
    )
    aspect_resolution: AspectResolution = attrs.field(
        default="1080p", kw_only=True, validator=_one_of(RESOLUTIONS["V"])
    )
    duration: int | None = attrs.field(default=None, kw_only=True, validator=_check_duration)
    generate_audio: bool = attrs.field(default=False, kw_only=True, validator=_check_bool)
    generate_count: int = attrs.field(default=1, kw_only=True, validator=_check_generate_count)
    callback_url: str | None = attrs.field(default=None, kw_only=True, validator=check_callback_url)
    custom_id: str | None = attrs.field(default=None, kw_only=True, validator=check_custom_id)

    def __attrs_post_init__(self) -> None:
        """The rules between fields, per model (each field alone is checked already)."""
        if self.model == "V":
            self._check_v()
        else:
            self._check_kl()
        allowed = self._durations()
        if self.duration is None:
            object.__setattr__(self, "duration", DEFAULT_DURATION[self.model])
        elif self.duration not in allowed:
            mode = (
                "multi-image mode"
                if self.model == "V" and self.image_url is None
                else f"model {self.model!r}" + (" with image_url" if self.model == "V" else "")
            )
            raise InvalidRequestError(
                f"duration must be one of {_choices(allowed)} for {mode} (or None for "
                f"{DEFAULT_DURATION[self.model]}); got {self.duration}",
                field="duration",
            )

    def _check_v(self) -> None:
        if self.image_url is None and not self.reference_images:
            raise InvalidRequestError(
                "model 'V' needs a start frame (image_url) or 1..3 reference_images",
                field="image_url",
            )
        if self.image_url is not None and self.reference_images:
            raise InvalidRequestError(
                "model 'V' takes image_url or reference_images, not both",
                field="reference_images",
            )
        if self.end_image_url is not None and self.image_url is None:
            raise InvalidRequestError(
                "end_image_url needs image_url (the start frame)", field="end_image_url"
            )
        if len(self.reference_images) > MAX_REFERENCE_IMAGES["V"]:
            raise InvalidRequestError(
                f"model 'V' takes at most {MAX_REFERENCE_IMAGES['V']} reference_images; "
                f"got {len(self.reference_images)}",
                field="reference_images",
            )

    def _check_kl(self) -> None:
        for field in ("image_url", "end_image_url"):
            if getattr(self, field) is not None:
                raise InvalidRequestError(
                    f"model 'KL' does not take {field} (use reference_images)", field=field
                )
        if not 1 <= len(self.reference_images) <= MAX_REFERENCE_IMAGES["KL"]:
            raise InvalidRequestError(
                f"model 'KL' needs 1..{MAX_REFERENCE_IMAGES['KL']} reference_images; "
                f"got {len(self.reference_images)}",
                field="reference_images",
            )
        if self.aspect_resolution not in RESOLUTIONS["KL"]:
            raise InvalidRequestError(
                f"aspect_resolution must be one of {_choices(RESOLUTIONS['KL'])} for model "
                f"'KL'; got {self.aspect_resolution!r}",
                field="aspect_resolution",
            )
        if self.generate_audio:
            raise InvalidRequestError(
                "model 'KL' cannot generate audio: generate_audio must be False",
                field="generate_audio",
            )

    def _durations(self) -> tuple[int, ...]:
        if self.model == "KL":
            return (5, 10)
        return (4, 6, 8) if self.image_url is not None else (8,)


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return value if isinstance(value, MappingProxyType) else MappingProxyType(dict(value))


@attrs.frozen
class VideoResult:
    """A finished, successful video task: the video and where it came from.

    ``raw`` is the callback's (or lookup's) ``data`` object as received, extra fields
    included. The service keeps ``video_url`` for about 7 days: download what you want
    to keep ([`AsyncKeevx.download`][keevx_async.AsyncKeevx.download], or
    ``download_to=`` of a batch). ``path`` is the local file it was saved to, ``None``
    unless downloaded. ``duration``, ``width`` and ``height`` are what the service
    reported (``None`` where it did not).
    """

    task_id: str
    video_url: str
    request: VideoRequest
    index: int
    thumbnail_url: str = ""
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    status: str = FINISHED_OK
    task_type: str = "image_to_video"
    raw: Mapping[str, Any] = attrs.field(
        default=_EMPTY, converter=_frozen_mapping, eq=False, repr=False
    )
    path: Path | None = None

    @property
    def url(self) -> str:
        """The result file's URL: ``video_url`` (every result kind has ``url``)."""
        return self.video_url

    @property
    def custom_id(self) -> str | None:
        """The request's ``custom_id``."""
        return self.request.custom_id


# --- wire ------------------------------------------------------------------------------


def _images(request: VideoRequest) -> tuple[tuple[str, ReferenceImage], ...]:
    images: list[tuple[str, ReferenceImage]] = []
    if request.image_url is not None:
        images.append(("image_url", request.image_url))
    if request.end_image_url is not None:
        images.append(("end_image_url", request.end_image_url))
    images.extend(
        (f"reference_images[{position}]", image)
        for position, image in enumerate(request.reference_images)
    )
    return tuple(images)


def encode(request: VideoRequest, callback_url: str | None, urls: Sequence[str] | None) -> bytes:
    """The JSON body of a video submit: every field under its own name, defaults and the
    resolved ``duration`` included, ``image_url``/``end_image_url`` only when set, never
    ``custom_id``. ``urls``: every image as a URL (aligned with the kind's ``images``)
    when some are local files."""
    if urls is None:
        urls = [image for _, image in _images(request)]  # type: ignore[misc] # all str
    position = 0
    body: dict[str, Any] = {"prompt": request.prompt, "model": request.model}
    for field in ("image_url", "end_image_url"):
        if getattr(request, field) is not None:
            body[field] = urls[position]
            position += 1
    body["reference_images"] = list(urls[position:])
    body["aspect_ratio"] = request.aspect_ratio
    body["aspect_resolution"] = request.aspect_resolution
    body["duration"] = request.duration
    body["generate_audio"] = request.generate_audio
    body["generate_count"] = request.generate_count
    if callback_url is not None:
        body["callback_url"] = callback_url
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def decode_request(body: bytes | str | Mapping[str, Any]) -> VideoRequest:
    """A [`VideoRequest`][keevx_async.VideoRequest] rebuilt from a submit body (every rule
    checked again)."""
    value = body if isinstance(body, Mapping) else json.loads(body)
    if not isinstance(value, Mapping):
        raise InvalidRequestError("a video request body must be a JSON object")
    known = {a.name for a in attrs.fields(VideoRequest)} - {"prompt", "custom_id"}
    fields = {k: v for k, v in value.items() if k in known}
    return VideoRequest(value.get("prompt"), **fields)  # type: ignore[arg-type]


def _number(value: object) -> Any:
    return value if type(value) in (int, float) else None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _int(value: object) -> int | None:
    return value if type(value) is int else None


def _result(payload: CallbackPayload, request: VideoRequest, index: int) -> VideoResult:
    data = payload.raw
    return VideoResult(
        task_id=payload.task_id,
        video_url=_text(data.get("video_url")),  # the decoders check it when it matters
        request=request,
        index=index,
        thumbnail_url=_text(data.get("thumbnail_url")),
        duration=_number(data.get("duration")),
        width=_int(data.get("width")),
        height=_int(data.get("height")),
        status=payload.status,
        task_type=payload.task_type,
        raw=data,
    )


VIDEO: Final = Kind(
    name="video",
    task_type="image_to_video",
    submit_path="/v1/image_to_video",
    prefixes=("i2v-",),
    request_type=VideoRequest,
    result_type=VideoResult,
    url_field="video_url",
    media_types=("video/",),
    images=_images,
    encode=encode,
    decode_request=decode_request,
    result=_result,
)
"""Image to video (``POST /v1/image_to_video``)."""
