"""The wire format: one cattrs converter, built once at import.

Every body the SDK sends or reads passes through here. Reading is strict about the
fields the SDK relies on (a missing or mistyped one raises `WireFormatError`
naming it, as ``data.task_id``), lenient about the ones it only passes on (an odd
``task_type``, ``msg`` or ``thumbnail_url`` must not cost a user their image), and keeps
every field as received in ``raw``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ._models import CallbackPayload, ImageRequest, TaskSnapshot
from ._types import FINISHED_OK

__all__ = [
    "WireFormatError",
    "converter",
    "decode_callback",
    "decode_envelope",
    "decode_request",
    "decode_snapshot",
    "decode_task_ids",
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


def _strict_int(value: object, _: object) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _build_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    for cls in (Envelope, _SubmitData, _TaskData, _CallbackBody):
        conv.register_structure_hook(cls, make_dict_structure_fn(cls, conv))
    # The request body: tuples go out as lists; callback_url only when there is one.
    conv.register_unstructure_hook(
        ImageRequest,
        make_dict_unstructure_fn(ImageRequest, conv, callback_url=override(omit_if_default=True)),
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
    """Parse JSON, raising `WireFormatError` that names ``what`` on failure."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireFormatError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise WireFormatError(f"{what} is nested too deeply to be read") from None


def _require_object(value: object, what: str, field: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        where = f" field {field!r}" if field else ""
        raise WireFormatError(
            f"{what}{where} must be a JSON object; got {type(value).__name__}", field=field
        )
    return value


# --- requests ----------------------------------------------------------------------------


def encode_request(request: ImageRequest, callback_url: str | None) -> bytes:
    """The JSON body of a submit; ``callback_url`` (already carrying its token) wins."""
    body = converter.unstructure(request)
    if callback_url is None:
        body.pop("callback_url", None)
    else:
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
    known = {a.name for a in attrs.fields(ImageRequest)}
    return ImageRequest(prompt, **{k: v for k, v in fields.items() if k in known})


# --- replies -----------------------------------------------------------------------------


def decode_envelope(body: bytes | str, what: str) -> Envelope:
    """Read the ``code``/``msg``/``data`` frame of a reply."""
    value = _require_object(load_json(body, what), what)
    envelope: Envelope = _structure(value, Envelope, what)
    return envelope


def decode_task_ids(data: object) -> tuple[str, ...]:
    """The task IDs of a successful submit reply's ``data``."""
    value = _require_object(data, "submit reply", "data")
    if not isinstance(value.get("task_ids"), list):
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


def decode_snapshot(data: object) -> TaskSnapshot:
    """A [`TaskSnapshot`][keevx_async.TaskSnapshot] from the GET reply's ``data``."""
    value = _require_object(data, "task reply", "data")
    task: _TaskData = _structure(value, _TaskData, "task reply", "data.")
    _require_task_id(task.task_id, "task reply")
    if not task.status:
        raise WireFormatError("task reply field 'data.status' is empty", field="data.status")
    image_url = _image_url(task, "task reply")
    return TaskSnapshot(
        task_id=task.task_id,
        status=task.status,
        image_url=image_url,
        thumbnail_url=_text(task.thumbnail_url),
        error_message=_text(task.error_message),
        raw=value,
    )


# --- callbacks ---------------------------------------------------------------------------


def decode_callback(body: bytes | str | Mapping[str, Any]) -> CallbackPayload:
    """A `CallbackPayload` from a callback body (bytes, text or parsed mapping)."""
    value = body if isinstance(body, Mapping) else load_json(body, "callback body")
    value = _require_object(value, "callback body")
    _require_object(value.get("data"), "callback body", "data")
    parsed: _CallbackBody = _structure(value, _CallbackBody, "callback body")
    data = parsed.data
    _require_task_id(data.task_id, "callback body")
    if not data.status:
        raise WireFormatError("callback body field 'data.status' is empty", field="data.status")
    if data.status == FINISHED_OK and not data.image_url:
        raise WireFormatError(
            f"callback body reports {FINISHED_OK} but field 'data.image_url' is empty",
            field="data.image_url",
        )
    return CallbackPayload(
        task_id=data.task_id,
        status=data.status,
        image_url=_image_url(data, "callback body"),
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


def _require_task_id(task_id: str, what: str) -> None:
    if not task_id:
        raise WireFormatError(f"{what} field 'data.task_id' is empty", field="data.task_id")
