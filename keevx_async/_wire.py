"""The wire format: one cattrs converter, built once at import.

Every body the SDK sends or reads passes through here. Reading is strict about the
fields the SDK relies on (a missing or mistyped one raises `WireFormatError`
naming it, as ``data.task_id``), lenient about the ones it only passes on (an odd
``task_type``, ``msg`` or ``thumbnail_url`` must not cost a user their image), and keeps
every field as received in ``raw``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ._models import (
    CallbackPayload,
    ImageRequest,
    TaskSnapshot,
    UploadedFile,
    make_callback_payload,
    unencodable_at,
)
from ._types import FINISHED_OK

try:
    # Optional (the ``orjson`` extra): parses a callback several times faster than json.
    import orjson

    _fast_loads: Callable[[bytes], Any] | None = orjson.loads
except ImportError:  # pragma: no cover (the stdlib path is tested in a subprocess)
    _fast_loads = None

# The json module's own scanner, as json.loads runs it (a decoder with the default
# settings), called without json.loads' wrappers: see _scan_object.
_scan_once: Final[Callable[[str, int], tuple[Any, int]]] = vars(json.JSONDecoder())["scan_once"]

# Every digit becomes "0", everything else a space: a long number shows as a run of zeros.
_DIGITS_AS_ZERO: Final = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGIT_RUN: Final = b"0" * 19

__all__ = [
    "WireFormatError",
    "converter",
    "decode_callback",
    "decode_envelope",
    "decode_request",
    "decode_snapshot",
    "decode_task_ids",
    "decode_upload_reply",
    "encode_request",
    "load_json",
]


class WireFormatError(ValueError):
    """A body did not have the shape the SDK needs; ``field`` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# --- wire-only shapes ------------------------------------------------------------------
# These mirror the JSON exactly; the public models are built from them.


@attrs.frozen
class Envelope:
    """``{"code": ..., "msg": ..., "data": ...}``, the frame of every reply and callback."""

    code: int
    msg: str | None = None
    data: Any = None


@attrs.frozen
class _SubmitData:
    task_ids: list[str]


@attrs.frozen
class _TaskData:
    task_id: str
    status: str
    # Read leniently (see _text): only a SUCCEEDED task's image_url must be a string.
    image_url: Any = None
    thumbnail_url: Any = None
    error_message: Any = None


@attrs.frozen
class UploadEnvelope:
    """The upload endpoint's own frame: ``{"code", "success", "message", "result"}``.

    ``message`` is the service's explanation, read as text (it comes as
    ``{"global": "..."}``); ``ok`` says whether the reply is a success.
    """

    code: int | None
    success: bool | None
    message: str
    result: Any

    @property
    def ok(self) -> bool:
        """Neither ``success`` false nor a ``code`` other than 0."""
        return self.success is not False and (self.code is None or self.code == 0)


@attrs.frozen
class _UploadFrame:
    code: int | None = None
    success: bool | None = None
    message: Any = None
    result: Any = None


@attrs.frozen
class _UploadResult:
    url: str
    file_id: str
    # Passed on, never relied upon: read leniently.
    file_name: Any = None


@attrs.frozen
class _CallbackBody:
    data: _TaskData
    # Passed on, never relied upon: read leniently.
    code: Any = 0
    msg: Any = None
    task_type: Any = None


def _text(value: object) -> str:
    """A lenient string field: strings as they are, nothing for null, text for the rest."""
    if isinstance(value, str):
        return value
    return "" if value is None else json.dumps(value)


def _strict_str(value: object, _: object) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _strict_bool(value: object, _: object) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def _strict_int(value: object, _: object) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _build_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(bool, _strict_bool)
    for cls in (Envelope, _SubmitData, _TaskData, _CallbackBody, _UploadFrame):
        conv.register_structure_hook(cls, make_dict_structure_fn(cls, conv))
    conv.register_structure_hook(
        _UploadResult,
        make_dict_structure_fn(
            _UploadResult,
            conv,
            file_id=override(rename="fileId"),
            file_name=override(rename="fileName"),
        ),
    )
    # The request body: tuples go out as lists; callback_url only when there is one.
    conv.register_unstructure_hook(
        ImageRequest,
        make_dict_unstructure_fn(
            ImageRequest,
            conv,
            callback_url=override(omit_if_default=True),
            custom_id=override(omit=True),  # the caller's own: never sent
        ),
    )
    return conv


converter: Final = _build_converter()
"""The converter that owns the wire format. Built once; hooks registered explicitly."""


def _field_of(exc: BaseException) -> str | None:
    """The dotted path of the first field that failed, from cattrs' error notes."""
    messages = cattrs.transform_error(exc, path="$")
    first = messages[0] if messages else ""
    _, _, where = first.rpartition(" @ $")
    return where.lstrip(".") or None


def _structure(value: object, cls: type[Any], what: str, prefix: str = "") -> Any:
    try:
        return converter.structure(value, cls)
    except (cattrs.ClassValidationError, cattrs.IterableValidationError) as exc:
        inner = _field_of(exc)
        field = f"{prefix}{inner}" if inner else None
        reason = cattrs.transform_error(exc, path="")[0].split(" @ ")[0]
        where = f" field {field!r}" if field else ""
        raise WireFormatError(f"{what}{where} is invalid: {reason}", field=field) from None


def load_json(body: bytes | str, what: str) -> Any:
    """Parse JSON, raising `WireFormatError` that names ``what`` on failure.

    With orjson installed it parses bytes first; whatever it refuses (it is stricter: NaN,
    infinities, other encodings than UTF-8) goes to the json module, and so does a body
    with a run of 19 digits or more (orjson reads an integer beyond 64 bits as a float;
    json keeps it exact). So the same bodies are read alike, and fail with the same
    messages, with or without it.
    """
    if (
        _fast_loads is not None
        and type(body) is bytes
        and _LONG_DIGIT_RUN not in body.translate(_DIGITS_AS_ZERO)
    ):
        try:
            return _fast_loads(body)  # it refuses lone surrogates: json.loads reads them
        except ValueError:
            pass
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireFormatError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise WireFormatError(f"{what} is nested too deeply to be read") from None
    if _may_hold_surrogates(body):
        require_unicode(value, what)
    return value


def _may_hold_surrogates(body: bytes | str) -> bool:
    """Whether JSON text ``body`` may decode to a lone surrogate: only through a
    ``\\uD800``-``\\uDFFF`` escape, UTF-8 bytes of a surrogate (json.loads reads bytes with
    ``surrogatepass``) or, in a ``str``, the character itself."""
    if type(body) is bytes:
        return b"\\ud" in body or b"\\uD" in body or b"\xed" in body
    return not body.isascii() or "\\ud" in body or "\\uD" in body


def require_unicode(value: object, what: str) -> None:
    """Raise `WireFormatError` naming the field if any text in the parsed JSON ``value``
    (keys included) holds a lone surrogate, which no later encoding could write."""
    found = _lone_surrogate(value, "")
    if found is not None:
        field, index = found
        where = f" field {field!r}" if field else ""
        raise WireFormatError(
            f"{what}{where} is not valid Unicode: a lone surrogate at index {index}",
            field=field or None,
        )


def _lone_surrogate(value: object, path: str) -> tuple[str, int] | None:
    if isinstance(value, str):
        index = unencodable_at(value)
        return None if index is None else (path, index)
    items: Iterable[tuple[object, object]]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip(".")
        if isinstance(key, str) and (index := unencodable_at(key)) is not None:
            return f"{path}.{key!a}".lstrip("."), index
        found = _lone_surrogate(item, where)
        if found is not None:
            return found
    return None


def _scan_object(body: bytes) -> Any:
    """What ``json.loads(body)`` gives for a body that is one JSON document in UTF-8 with
    nothing before or after it (a callback as posted); ``None`` for any other body, which
    then goes to `load_json`, and so to the json module's own reading and messages.

    The same scanner with the same settings as ``json.loads``, without its wrappers (the
    encoding sniffing and the two whitespace searches cost as much as the scan). Strict
    UTF-8 decodes the same text as json.loads' ``surrogatepass`` wherever it succeeds;
    a document (not whitespace, not a BOM) at index 0 and the end at ``len(text)`` is
    where ``JSONDecoder.decode`` takes the very same ``raw_decode`` result.
    """
    try:
        text = body.decode()
        value, end = _scan_once(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return None
    return value if end == len(text) else None


def _require_object(value: object, what: str, field: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        where = f" field {field!r}" if field else ""
        raise WireFormatError(
            f"{what}{where} must be a JSON object; got {type(value).__name__}", field=field
        )
    return value


# --- requests ----------------------------------------------------------------------------


def encode_request(
    request: ImageRequest,
    callback_url: str | None,
    reference_urls: Sequence[str] | None = None,
) -> bytes:
    """The JSON body of a submit; ``callback_url`` (already carrying its token) wins.

    ``reference_urls`` replaces the request's ``reference_images`` when some of them are
    local files: the same images, each local one by the URL it was uploaded to. The body
    never carries a path.

    Built field by field (what the converter's unstructure hook gives, pinned by a test):
    it runs once per submit, at fan-out rates.
    """
    images = request.reference_images if reference_urls is None else reference_urls
    body: dict[str, Any] = {
        "prompt": request.prompt,
        "reference_images": list(images),
        "module": request.module,
        "generate_count": request.generate_count,
        "image_quality": request.image_quality,
        "image_ratio": request.image_ratio,
    }
    if callback_url is not None:
        body["callback_url"] = callback_url
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def decode_request(body: bytes | str | Mapping[str, Any]) -> ImageRequest:
    """Rebuild an [`ImageRequest`][keevx_async.ImageRequest] from a submit body (validating every
    rule).
    """
    value = body if isinstance(body, Mapping) else load_json(body, "request body")
    fields = dict(_require_object(value, "request body"))
    fields.setdefault("reference_images", ())
    prompt = fields.pop("prompt", None)
    known = {a.name for a in attrs.fields(ImageRequest)} - {"custom_id"}  # never sent
    return ImageRequest(prompt, **{k: v for k, v in fields.items() if k in known})


# --- replies -----------------------------------------------------------------------------


def decode_envelope(body: bytes | str, what: str) -> Envelope:
    """Read the ``code``/``msg``/``data`` frame of a reply."""
    value = _require_object(load_json(body, what), what)
    code = value.get("code")
    msg = value.get("msg")
    if type(code) is int and (msg is None or type(msg) is str):
        # The common shape, read directly: the converter is for everything else (and
        # for the messages naming what is wrong).
        return Envelope(code, msg, value.get("data"))
    envelope: Envelope = _structure(value, Envelope, what)
    return envelope


def decode_task_ids(data: object) -> tuple[str, ...]:
    """The task IDs of a successful submit reply's ``data``."""
    value = _require_object(data, "submit reply", "data")
    ids = value.get("task_ids")
    if (
        type(ids) is list
        and ids
        and all(type(task_id) is str and task_id for task_id in ids)
        and len(set(ids)) == len(ids)
    ):
        return tuple(ids)  # the common shape; anything else is checked in full below
    if not isinstance(ids, list):
        # cattrs would happily read a string as a list of one-letter task IDs.
        raise WireFormatError(
            "submit reply field 'data.task_ids' must be a JSON array", field="data.task_ids"
        )
    submit: _SubmitData = _structure(value, _SubmitData, "submit reply", "data.")
    if not submit.task_ids or not all(submit.task_ids):
        raise WireFormatError(
            "submit reply field 'data.task_ids' holds no task ID", field="data.task_ids"
        )
    if len(set(submit.task_ids)) != len(submit.task_ids):
        raise WireFormatError(
            "submit reply field 'data.task_ids' repeats a task ID", field="data.task_ids"
        )
    return tuple(submit.task_ids)


def decode_snapshot(
    data: object, url_field: str = "image_url", task_type: str = "image_generate"
) -> TaskSnapshot:
    """A [`TaskSnapshot`][keevx_async.TaskSnapshot] from the GET reply's ``data``.

    ``url_field`` is the field of the task's kind holding its file's URL (a string for a
    SUCCEEDED task), ``task_type`` the kind's (the GET reply does not say it).
    """
    value = _require_object(data, "task reply", "data")
    task: _TaskData = _structure(value, _TaskData, "task reply", "data.")
    _require_task_id(task.task_id, "task reply")
    if not task.status:
        raise WireFormatError("task reply field 'data.status' is empty", field="data.status")
    if url_field == "image_url":
        image_url = _image_url(task, "task reply")
        video_url = ""
    else:
        image_url = task.image_url if isinstance(task.image_url, str) else ""
        url = _result_url(value, url_field, task.status, "task reply")
        video_url = url if url_field == "video_url" else ""
    return TaskSnapshot(
        task_id=task.task_id,
        status=task.status,
        image_url=image_url,
        thumbnail_url=_text(task.thumbnail_url),
        error_message=_text(task.error_message),
        raw=value,
        video_url=video_url,
        duration=_number(value.get("duration")),
        width=_integer(value.get("width")),
        height=_integer(value.get("height")),
        task_type=task_type,
    )


def _number(value: object) -> Any:
    """A lenient number field: an int or a float as it is, ``None`` for anything else."""
    return value if type(value) in (int, float) else None


def _integer(value: object) -> int | None:
    return value if type(value) is int else None


# --- uploads -----------------------------------------------------------------------------


def _message_text(message: object) -> str:
    """The upload reply's ``message``: ``{"global": text}`` as the service sends it, a
    plain string, or anything else as JSON text."""
    if isinstance(message, Mapping) and isinstance(message.get("global"), str):
        return str(message["global"])
    return _text(message)


def decode_upload_envelope(body: bytes | str) -> UploadEnvelope:
    """Read the upload endpoint's frame (its envelope differs from the other endpoints')."""
    value = _require_object(load_json(body, "upload reply"), "upload reply")
    frame: _UploadFrame = _structure(value, _UploadFrame, "upload reply")
    if frame.code is None and frame.success is None:
        raise WireFormatError("upload reply has neither 'code' nor 'success'")
    return UploadEnvelope(frame.code, frame.success, _message_text(frame.message), frame.result)


def decode_upload_reply(result: object) -> UploadedFile:
    """The [`UploadedFile`][keevx_async.UploadedFile] of a successful upload reply's
    ``result``."""
    value = _require_object(result, "upload reply", "result")
    try:
        uploaded: _UploadResult = _structure(value, _UploadResult, "upload reply", "result.")
    except WireFormatError as exc:
        # Named as the service spells it, not as the attribute is called.
        field = exc.field and exc.field.replace("file_id", "fileId")
        message = str(exc).replace("file_id", "fileId")
        raise WireFormatError(message, field=field) from None
    for field, text in (("url", uploaded.url), ("fileId", uploaded.file_id)):
        if not text:
            raise WireFormatError(
                f"upload reply field 'result.{field}' is empty", field=f"result.{field}"
            )
    return UploadedFile(
        url=uploaded.url, file_id=uploaded.file_id, file_name=_text(uploaded.file_name)
    )


# --- callbacks ---------------------------------------------------------------------------


def decode_callback(body: bytes | str | Mapping[str, Any]) -> CallbackPayload:
    """A `CallbackPayload` from a callback body (bytes, text or parsed mapping)."""
    if type(body) is bytes:
        if _fast_loads is not None:
            # The hot path: orjson, and no check for long integers (see load_json), because
            # a plain callback has none: every value of it is a string or a 64-bit int.
            try:
                value = _fast_loads(body)
            except ValueError:
                pass
            else:
                payload = _decode_callback_fast(value, owned=True, plain=True)
                if payload is not None:
                    return payload
        elif not _may_hold_surrogates(body):
            # The hot path without orjson: what json.loads reads, read for less.
            value = _scan_object(body)
            if value is not None:
                return _decode_callback_fast(value, owned=True) or _decode_callback(value)
    # Bytes first: that is what a receiver has, and isinstance(..., Mapping) is slow.
    if type(body) is bytes or not isinstance(body, Mapping):
        value = load_json(body, "callback body")  # refuses lone surrogates
        return _decode_callback_fast(value, owned=True) or _decode_callback(value)
    require_unicode(body, "callback body")
    return _decode_callback_fast(body, owned=False) or _decode_callback(body)


def _decode_callback_fast(  # noqa: PLR0912 (flat on purpose: every call costs here)
    value: object, *, owned: bool, plain: bool = False
) -> CallbackPayload | None:
    """The common case of `_decode_callback`, read by hand; ``None`` for anything else.

    It accepts a subset of what the converter does and builds the same payload from it;
    whatever it does not accept goes through the converter, which raises the error that
    names the field. ``owned``: ``value`` was parsed here, so nobody else can change it.
    ``plain``: accept only the shape the service documents, exactly: ``code`` (an int),
    ``msg``, ``task_type`` and ``data``, whose only fields are ``task_id``, ``status``,
    ``image_url`` and ``error_message``, all strings.
    """
    if type(value) is not dict:
        return None
    data = value.get("data")
    if type(data) is not dict:
        return None
    if plain and (len(value) != 4 or len(data) != 4):
        return None
    task_id = data.get("task_id")
    status = data.get("status")
    if type(task_id) is not str or type(status) is not str or not task_id or not status:
        return None
    image_url = data.get("image_url")
    if type(image_url) is not str:
        if plain or image_url is not None or status == FINISHED_OK:
            return None
        image_url = ""
    elif status == FINISHED_OK and not image_url:
        return None
    # Each lenient field is usually a string already: skip the call to _text then.
    error_message = data.get("error_message")
    if type(error_message) is not str:
        if plain:
            return None
        error_message = _text(error_message)
    task_type = value.get("task_type")
    if type(task_type) is not str:
        if plain:
            return None
        task_type = _text(task_type)
    msg = value.get("msg")
    if type(msg) is not str:
        if plain:
            return None
        msg = _text(msg)
    code = value.get("code", 0)
    if type(code) is not int:
        if plain:
            return None
        code = 0
    if owned:
        # Frozen without a copy, since nobody else holds the dict; built without the
        # class's __init__ (see make_callback_payload).
        return make_callback_payload(
            task_id,
            status,
            image_url,
            error_message,
            task_type or "image_generate",
            code,
            msg,
            MappingProxyType(data),
        )
    # Positional, in field order: eight keywords cost more than the rest of this function.
    return CallbackPayload(
        task_id, status, image_url, error_message, task_type or "image_generate", code, msg, data
    )


def _decode_callback(value: object) -> CallbackPayload:
    value = _require_object(value, "callback body")
    _require_object(value.get("data"), "callback body", "data")
    parsed: _CallbackBody = _structure(value, _CallbackBody, "callback body")
    data = parsed.data
    _require_task_id(data.task_id, "callback body")
    if not data.status:
        raise WireFormatError("callback body field 'data.status' is empty", field="data.status")
    # The kind says which field holds a finished task's file (images' image_url is the
    # fast path's, above); only here, off the hot path, is it asked.
    from ._kinds import kind_of_callback  # noqa: PLC0415 (the kinds import this module)

    url_field = kind_of_callback(data.task_id, parsed.task_type).url_field
    if url_field != "image_url":
        image_url = data.image_url if isinstance(data.image_url, str) else ""
        _result_url(value["data"], url_field, data.status, "callback body")
    else:
        if data.status == FINISHED_OK and not data.image_url:
            raise WireFormatError(
                f"callback body reports {FINISHED_OK} but field 'data.image_url' is empty",
                field="data.image_url",
            )
        image_url = _image_url(data, "callback body")
    return CallbackPayload(
        task_id=data.task_id,
        status=data.status,
        image_url=image_url,
        error_message=_text(data.error_message),
        task_type=_text(parsed.task_type) or "image_generate",
        code=parsed.code if type(parsed.code) is int else 0,
        msg=_text(parsed.msg),
        raw=value["data"],
    )


def _image_url(task: _TaskData, what: str) -> str:
    """The image URL: a string for a SUCCEEDED task; anything goes for the others."""
    if task.status != FINISHED_OK:
        return task.image_url if isinstance(task.image_url, str) else ""
    if not isinstance(task.image_url, str):
        raise WireFormatError(
            f"{what} field 'data.image_url' must be a string; got {type(task.image_url).__name__}",
            field="data.image_url",
        )
    return task.image_url


def _result_url(data: Mapping[str, Any], field: str, status: str, what: str) -> str:
    """The result file's URL in ``data[field]``: a non-empty string for a SUCCEEDED task;
    anything goes (read as ``""``) for the others."""
    url = data.get(field)
    if status != FINISHED_OK:
        return url if isinstance(url, str) else ""
    if not isinstance(url, str):
        raise WireFormatError(
            f"{what} field 'data.{field}' must be a string; got {type(url).__name__}",
            field=f"data.{field}",
        )
    if not url:
        raise WireFormatError(
            f"{what} reports {FINISHED_OK} but field 'data.{field}' is empty",
            field=f"data.{field}",
        )
    return url


def _require_task_id(task_id: str, what: str) -> None:
    if not task_id:
        raise WireFormatError(f"{what} field 'data.task_id' is empty", field="data.task_id")
