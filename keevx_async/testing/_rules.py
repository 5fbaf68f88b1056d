"""The service's rules and envelopes: what a submit must look like, and how every answer reads.

This is the part of [`FakeKeevx`][keevx_async.testing.FakeKeevx] that has to match the real
service byte for byte, so it lives apart from the machinery (scheduling, delivery, ASGI)
and holds no state: request validation with the service's defaults, the ``{"code", "msg",
"data"}`` envelope and its error replies, the task-state snapshot of the GET endpoint and
the body of a callback. A change in the service's contract is a change to this file only.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any, Final

import attrs

from keevx_async._types import (
    IMAGE_EXTENSIONS,
    IMAGE_QUALITIES,
    IMAGE_RATIOS,
    MAX_GENERATE_COUNT,
    MAX_IMAGE_BYTES,
    MAX_PROMPT_LENGTH,
    MAX_REFERENCE_IMAGES,
    MODULES,
)

if TYPE_CHECKING:
    from keevx_async.testing._task import FakeTask

SUBMIT_PATH: Final = "/v1/image_generate"
VIDEO_SUBMIT_PATH: Final = "/v1/image_to_video"
VIDEO_TASK_ID_PREFIX: Final = "i2v-"
UPLOAD_PATH: Final = "/v1/figure-resource/upload/file"
TASK_ID_PREFIX: Final = "i2is-"
CODE_OK: Final = 0
CODE_PARAMETER_ERROR: Final = 100001
CODE_TASK_NOT_FOUND: Final = 110002

# The business codes of the video endpoint's refusals (HTTP 200, ``data`` null).
CODE_VIDEO_PARAMETER: Final = 100001
"""A field is missing or has the wrong type or value (prompt, aspect_ratio,
generate_count, a malformed image URL...)."""
CODE_VIDEO_MODEL: Final = 100002
"""``model`` is not one the service supports (``V``, ``KL``)."""
CODE_VIDEO_IMAGE_COUNT: Final = 100003
"""The images do not fit the model: ``V`` needs ``image_url`` or 1..3
``reference_images`` (not both; ``end_image_url`` only with ``image_url``), ``KL``
needs 1..7 ``reference_images``."""
CODE_VIDEO_DURATION: Final = 100004
"""``duration`` is not one the model allows in its mode (``V`` with ``image_url``: 4, 6,
8; ``V`` multi-image: 8; ``KL``: 5, 10)."""
CODE_VIDEO_RESOLUTION: Final = 100005
"""``aspect_resolution`` is not one the model allows (``V``: 720p, 1080p, 4k; ``KL``:
720p, 1080p)."""
CODE_VIDEO_AUDIO: Final = 100006
"""``generate_audio`` is true for a model that cannot make sound (``KL``)."""
CODE_VIDEO_IMAGE_URL: Final = 100007
"""``image_url`` or ``end_image_url`` was sent for a model that takes no start or end
frame (``KL``)."""
MODERATION_MESSAGE: Final = "content moderation rejected the prompt"
"""``error_message`` of tasks failed by ``fail_if``."""
RANDOM_FAILURE_MESSAGE: Final = "image processing error: generation failed"
"""``error_message`` of tasks failed by ``fail_rate``."""

# The service's defaults for the optional request fields.
_DEFAULT_MODULE: Final = "std"
_DEFAULT_GENERATE_COUNT: Final = 1
_DEFAULT_IMAGE_QUALITY: Final = "2K"
_DEFAULT_IMAGE_RATIO: Final = "9:16"


@attrs.define
class Reply:
    """One HTTP answer of the service: status, JSON envelope, extra headers."""

    status: int
    payload: dict[str, Any]
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)


def envelope(code: int, msg: str, data: object = None) -> dict[str, Any]:
    """The service's reply envelope."""
    return {"code": code, "msg": msg, "data": data}


def error_reply(status: int, msg: str, *, code: int | None = None) -> Reply:
    """An error: the envelope's ``code`` is the HTTP status unless a business code is given."""
    return Reply(status, envelope(status if code is None else code, msg))


def ok_reply(data: object) -> Reply:
    """A successful answer carrying ``data``."""
    return Reply(200, envelope(CODE_OK, "ok", data))


def parameter_error(detail: str, *, status: int = 200) -> Reply:
    """A request the service refuses: business code 100001 (with HTTP 200 for a bad field,
    400 for a body that is not a JSON object)."""
    return error_reply(status, f"parameter error: {detail}", code=CODE_PARAMETER_ERROR)


def task_not_found() -> Reply:
    """The GET endpoint's answer for an unknown task ID."""
    return error_reply(200, "task not found", code=CODE_TASK_NOT_FOUND)


def method_not_allowed(method: str, path: str, allowed: str) -> Reply:
    """HTTP 405 with the ``Allow`` header."""
    reply = error_reply(405, f"method {method} not allowed on {path}")
    reply.headers.append((b"allow", allowed.encode()))
    return reply


def auth_error(authorization: str | None, api_key: str | None) -> Reply | None:
    """The 401 for an ``Authorization`` header the service refuses, else ``None``.

    A bearer token is required; with ``api_key`` set it must be that key.
    """
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return error_reply(401, "missing or malformed Authorization header")
    if api_key is not None and not secrets.compare_digest(token.encode(), api_key.encode()):
        return error_reply(401, "invalid api key")
    return None


def upload_error(status: int, message: str, *, code: int | None = None) -> Reply:
    """An upload refused, in the upload endpoint's own envelope (``success`` false)."""
    return Reply(
        status,
        {
            "code": status if code is None else code,
            "success": False,
            "message": {"global": message},
            "result": None,
        },
    )


def upload_reply(url: str, file_id: str, file_name: str) -> Reply:
    """A successful upload: where the file is kept."""
    return Reply(
        200,
        {
            "code": CODE_OK,
            "success": True,
            "message": {"global": "success"},
            "result": {"url": url, "fileId": file_id, "fileName": file_name},
        },
    )


def check_upload(filename: str | None, content: bytes) -> str | None:
    """The service's rules for an uploaded file; what is wrong, or ``None``."""
    if not filename:
        return "the part 'file' must carry a file name"
    stem, dot, extension = filename.rpartition(".")
    if not (dot and stem) or extension.lower() not in IMAGE_EXTENSIONS:
        allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
        return f"file type not allowed: {filename!r} (allowed: {allowed})"
    if not content:
        return "the file is empty"
    if len(content) > MAX_IMAGE_BYTES:
        return f"the file is larger than {MAX_IMAGE_BYTES // 2**20} MB"
    return None


def format_retry_after(value: float | str) -> str:
    """A ``Retry-After`` value: a number as seconds, a string (an HTTP date) verbatim."""
    if isinstance(value, str):
        return value
    # Seconds without float noise: 2.0 -> "2", 0.25 -> "0.25" (never exponent notation).
    return format(value, "f").rstrip("0").rstrip(".")


def parse_json_object(raw_body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or ``None`` if it is not one."""
    try:
        parsed = json.loads(raw_body)
    except ValueError:  # invalid JSON and invalid UTF-8 alike
        return None
    return parsed if isinstance(parsed, dict) else None


def _optional(body: dict[str, Any], field: str, default: object) -> Any:
    # The service treats an explicit null like an absent optional field.
    value = body.get(field)
    return default if value is None else value


def validate(body: dict[str, Any]) -> dict[str, Any] | str:
    """Apply the service's rules to a submit body: the normalised request, or an error."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        return "prompt is required and must be a string"
    if not 1 <= len(prompt) <= MAX_PROMPT_LENGTH:
        return f"prompt must be 1..{MAX_PROMPT_LENGTH} characters, got {len(prompt)}"
    reference_images = _optional(body, "reference_images", [])
    if not isinstance(reference_images, list) or not all(
        isinstance(url, str) for url in reference_images
    ):
        return "reference_images must be a list of URL strings"
    module = _optional(body, "module", _DEFAULT_MODULE)
    if module not in MODULES:
        return f"module must be one of {', '.join(MODULES)}"
    generate_count = _optional(body, "generate_count", _DEFAULT_GENERATE_COUNT)
    # bool is an int subclass, but JSON true is not a count.
    if (
        isinstance(generate_count, bool)
        or not isinstance(generate_count, int)
        or not 1 <= generate_count <= MAX_GENERATE_COUNT
    ):
        return f"generate_count must be an integer in 1..{MAX_GENERATE_COUNT}"
    image_quality = _optional(body, "image_quality", _DEFAULT_IMAGE_QUALITY)
    if image_quality not in IMAGE_QUALITIES:
        return f"image_quality must be one of {', '.join(IMAGE_QUALITIES)}"
    image_ratio = _optional(body, "image_ratio", _DEFAULT_IMAGE_RATIO)
    if image_ratio not in IMAGE_RATIOS:
        return f"image_ratio must be one of {', '.join(IMAGE_RATIOS)}"
    callback_url = body.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        return "callback_url must be a URL string"
    return {
        "prompt": prompt,
        # The service silently keeps the first five; the SDK refuses more instead.
        "reference_images": reference_images[:MAX_REFERENCE_IMAGES],
        "module": module,
        "generate_count": generate_count,
        "image_quality": image_quality,
        "image_ratio": image_ratio,
        "callback_url": callback_url or None,
    }


# --- image_to_video -----------------------------------------------------------------------
# Written from the service's per-model table, not from the SDK's validators, so that a test
# comparing the two compares two readings of the table.

_VIDEO_MODELS: Final = ("V", "KL")
_VIDEO_RATIOS: Final = ("16:9", "9:16")
_VIDEO_RESOLUTIONS: Final = {"V": ("720p", "1080p", "4k"), "KL": ("720p", "1080p")}
_VIDEO_DEFAULT_DURATION: Final = {"V": 8, "KL": 5}
_VIDEO_MAX_COUNT: Final = 4

VideoRefusal = tuple[int, str]
"""A refused video submit: the business code and the message naming the field."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def validate_video(body: dict[str, Any]) -> dict[str, Any] | VideoRefusal:  # noqa: PLR0912
    """Apply the service's image_to_video rules to a submit body: the normalised request
    (defaults filled in), or the refusal's business code and message."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not 1 <= len(prompt) <= MAX_PROMPT_LENGTH:
        return CODE_VIDEO_PARAMETER, f"prompt must be a string of 1..{MAX_PROMPT_LENGTH} characters"
    model = _optional(body, "model", "V")
    if model not in _VIDEO_MODELS:
        return CODE_VIDEO_MODEL, f"model not supported: {model!r}"
    image_url = body.get("image_url")
    end_image_url = body.get("end_image_url")
    for field, value in (("image_url", image_url), ("end_image_url", end_image_url)):
        if value is not None and not _is_url(value):
            return CODE_VIDEO_PARAMETER, f"{field} must be an http(s) URL"
    references = _optional(body, "reference_images", [])
    if not isinstance(references, list) or not all(_is_url(url) for url in references):
        return CODE_VIDEO_PARAMETER, "reference_images must be a list of http(s) URLs"
    aspect_ratio = _optional(body, "aspect_ratio", "16:9")
    if aspect_ratio not in _VIDEO_RATIOS:
        return CODE_VIDEO_PARAMETER, f"aspect_ratio must be one of {', '.join(_VIDEO_RATIOS)}"
    resolution = _optional(body, "aspect_resolution", "1080p")
    if resolution not in _VIDEO_RESOLUTIONS[model]:
        allowed = ", ".join(_VIDEO_RESOLUTIONS[model])
        return CODE_VIDEO_RESOLUTION, f"aspect_resolution must be one of {allowed} for {model}"
    audio = _optional(body, "generate_audio", False)
    if not isinstance(audio, bool):
        return CODE_VIDEO_PARAMETER, "generate_audio must be a boolean"
    count = _optional(body, "generate_count", 1)
    if not _is_int(count) or not 1 <= count <= _VIDEO_MAX_COUNT:
        return CODE_VIDEO_PARAMETER, f"generate_count must be an integer in 1..{_VIDEO_MAX_COUNT}"
    duration = _optional(body, "duration", _VIDEO_DEFAULT_DURATION[model])
    if not _is_int(duration):
        return CODE_VIDEO_PARAMETER, "duration must be an integer"
    if model == "KL":
        if image_url is not None or end_image_url is not None:
            field = "image_url" if image_url is not None else "end_image_url"
            return CODE_VIDEO_IMAGE_URL, f"{field} is not allowed for model KL"
        if not 1 <= len(references) <= 7:
            return CODE_VIDEO_IMAGE_COUNT, "reference_images must hold 1..7 images for model KL"
        if audio:
            return CODE_VIDEO_AUDIO, "generate_audio is not supported by model KL"
        durations: tuple[int, ...] = (5, 10)
    else:
        if (image_url is None) == (not references):
            return (
                CODE_VIDEO_IMAGE_COUNT,
                "model V takes either image_url or reference_images (1..3)",
            )
        if end_image_url is not None and image_url is None:
            return CODE_VIDEO_IMAGE_COUNT, "end_image_url is only allowed with image_url"
        if len(references) > 3:
            return CODE_VIDEO_IMAGE_COUNT, "reference_images must hold 1..3 images for model V"
        durations = (4, 6, 8) if image_url is not None else (8,)
    if duration not in durations:
        allowed = ", ".join(map(str, durations))
        return CODE_VIDEO_DURATION, f"duration must be one of {allowed} here"
    callback_url = body.get("callback_url")
    if callback_url is not None and not isinstance(callback_url, str):
        return CODE_VIDEO_PARAMETER, "callback_url must be a URL string"
    return {
        "prompt": prompt,
        "model": model,
        "image_url": image_url,
        "end_image_url": end_image_url,
        "reference_images": references,
        "aspect_ratio": aspect_ratio,
        "aspect_resolution": resolution,
        "duration": duration,
        "generate_audio": audio,
        "generate_count": count,
        "callback_url": callback_url or None,
    }


def video_error(code: int, message: str) -> Reply:
    """A refused video submit: HTTP 200 with the business code."""
    return error_reply(200, f"parameter error: {message}", code=code)


_VIDEO_SIZES: Final = {
    ("16:9", "720p"): (1280, 720),
    ("16:9", "1080p"): (1920, 1080),
    ("16:9", "4k"): (3840, 2160),
    ("9:16", "720p"): (720, 1280),
    ("9:16", "1080p"): (1080, 1920),
    ("9:16", "4k"): (2160, 3840),
}


def video_size(body: dict[str, Any]) -> tuple[int, int]:
    """A finished video's width and height, from its validated request."""
    return _VIDEO_SIZES[body["aspect_ratio"], body["aspect_resolution"]]


def video_snapshot(task: FakeTask) -> dict[str, Any]:
    """The video GET endpoint's ``data`` for a task."""
    return {
        "task_id": task.task_id,
        "status": task.status,
        "video_url": task.video_url,
        "thumbnail_url": task.thumbnail_url,
        "error_message": task.error_message,
        "duration": task.duration,
        "width": task.width,
        "height": task.height,
    }


def video_callback_body(task: FakeTask) -> bytes:
    """The exact bytes the service POSTs for a finished video task."""
    return json.dumps(
        {"code": CODE_OK, "msg": "ok", "task_type": "image_to_video", "data": video_snapshot(task)}
    ).encode()


def task_snapshot(task: FakeTask) -> dict[str, Any]:
    """The GET endpoint's ``data`` for a task."""
    return {
        "task_id": task.task_id,
        "status": task.status,
        "image_url": task.image_url,
        "thumbnail_url": task.thumbnail_url,
        "error_message": task.error_message,
    }


def callback_body(task: FakeTask) -> bytes:
    """The exact bytes the service POSTs to a finished task's ``callback_url``."""
    if task.kind == "video":
        return video_callback_body(task)
    return json.dumps(
        {
            "code": CODE_OK,
            "msg": "ok",
            "task_type": "image_generate",
            "data": {
                "task_id": task.task_id,
                "status": task.status,
                "image_url": task.image_url,
                "error_message": task.error_message,
            },
        }
    ).encode()
