"""Reading ``keevx batch`` input: JSONL or CSV lines into requests, with line numbers.

Every line becomes either a request (an [`ImageRequest`][keevx_async.ImageRequest], or a
[`VideoRequest`][keevx_async.VideoRequest] with ``"kind": "video"``) or an `InvalidLine`
naming its line number and field: a bad line is reported and skipped, never fatal. A line's
``custom_id`` is kept; without one, the line number is its ``custom_id``, so a journal
knows the line again when the same input is run a second time.
"""

from __future__ import annotations

import csv
import json
from typing import TYPE_CHECKING, Any, Final

import attrs

from .._exceptions import InvalidRequestError
from .._kinds import VideoRequest
from .._models import ImageRequest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["InputError", "InvalidLine", "Line", "count_lines", "read_input"]

_INT_FIELDS: Final = frozenset({"generate_count", "duration"})
_BOOL_FIELDS: Final = frozenset({"generate_audio"})
_LIST_FIELDS: Final = frozenset({"reference_images"})
_FILE_FIELDS: Final = frozenset({"reference_images", "image_url", "end_image_url"})
_KINDS: Final = {"image": ImageRequest, "video": VideoRequest}
_TRUE: Final = frozenset({"true", "1", "yes", "y"})
_FALSE: Final = frozenset({"false", "0", "no", "n"})
SUFFIXES: Final = (".jsonl", ".ndjson", ".csv")


class InputError(Exception):
    """The input as a whole cannot be read (missing file, unknown format, bad header)."""


@attrs.frozen
class Line:
    """One valid input line: its number and the request it describes."""

    number: int
    request: ImageRequest | VideoRequest


@attrs.frozen
class InvalidLine:
    """One input line that is not a valid request: reported, skipped."""

    number: int
    field: str | None
    message: str


def _fields(kind: type[ImageRequest | VideoRequest]) -> frozenset[str]:
    return frozenset(field.name for field in attrs.fields(kind))


_FIELDS: Final = {name: _fields(kind) for name, kind in _KINDS.items()}


def _file_or_url(value: object, base: Path) -> object:
    """A string that is not an http(s) URL names a local file, relative to the input."""
    if isinstance(value, str) and value and not value.startswith(("http://", "https://")):
        return base / value
    return value


def _coerce_csv(field: str, text: str) -> object:
    """A CSV cell as the value its field takes."""
    if field in _INT_FIELDS:
        try:
            return int(text)
        except ValueError:
            raise InvalidRequestError(
                f"{field} must be an integer; got {text!r}", field=field
            ) from None
    if field in _BOOL_FIELDS:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise InvalidRequestError(f"{field} must be true or false; got {text!r}", field=field)
    if field in _LIST_FIELDS:
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as error:
                message = f"{field} is not a JSON array: {error.msg}"
                raise InvalidRequestError(message, field=field) from None
        return [item.strip() for item in text.split("|") if item.strip()]
    return text


def build_request(values: dict[str, Any], number: int, base: Path) -> ImageRequest | VideoRequest:
    """The request one line describes (``values``: field name -> value, ``kind`` included).

    Raises:
        InvalidRequestError: an unknown kind or field, or a value the request refuses;
            ``field`` names it.
    """
    values = dict(values)
    kind_name = values.pop("kind", None) or "image"
    if kind_name not in _KINDS:
        raise InvalidRequestError(
            f"kind must be 'image' or 'video'; got {kind_name!r}", field="kind"
        )
    kind = _KINDS[kind_name]
    unknown = sorted(set(values) - _FIELDS[kind_name])
    if unknown:
        raise InvalidRequestError(
            f"{unknown[0]} is not a field of a {kind_name} request", field=unknown[0]
        )
    if "prompt" not in values:
        raise InvalidRequestError("prompt is required", field="prompt")
    for field in _FILE_FIELDS & set(values):
        value = values[field]
        if isinstance(value, list):
            values[field] = [_file_or_url(item, base) for item in value]
        else:
            values[field] = _file_or_url(value, base)
    if values.get("custom_id") is None:
        values["custom_id"] = str(number)
    prompt = values.pop("prompt")
    try:
        request: ImageRequest | VideoRequest = kind(prompt, **values)
    except TypeError as error:  # a value of the wrong type for attrs itself
        raise InvalidRequestError(str(error)) from None
    return request


def _jsonl(path: Path, base: Path) -> Iterator[Line | InvalidLine]:
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                values = json.loads(text)
            except json.JSONDecodeError as error:
                yield InvalidLine(number, None, f"not JSON: {error.msg}")
                continue
            if not isinstance(values, dict):
                yield InvalidLine(number, None, "not a JSON object")
                continue
            try:
                yield Line(number, build_request(values, number, base))
            except InvalidRequestError as error:
                yield InvalidLine(number, error.field, str(error))


def _csv(path: Path, base: Path) -> Iterator[Line | InvalidLine]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, strict=True)
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise InputError(f"{path}: the first row must be a header naming a 'prompt' column")
        number = reader.line_num
        for row in reader:
            start, number = number + 1, reader.line_num
            if None in row:
                yield InvalidLine(start, None, "more cells than the header has columns")
                continue
            try:
                values = {
                    field: _coerce_csv(field, cell)
                    for field, cell in row.items()
                    if field == "prompt" or cell not in ("", None)
                }
                yield Line(start, build_request(values, start, base))
            except InvalidRequestError as error:
                yield InvalidLine(start, error.field, str(error))


def read_input(path: Path) -> Iterator[Line | InvalidLine]:
    """Every line of ``path`` (``.jsonl``/``.ndjson`` or ``.csv``), lazily, in order.

    Raises:
        InputError: the file is missing, unreadable, of an unknown format, or (CSV) has
            no header with a ``prompt`` column.
    """
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"{path}: the input must be a .jsonl or a .csv file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    base = path.resolve().parent
    try:
        if path.suffix.lower() == ".csv":
            yield from _csv(path, base)
        else:
            yield from _jsonl(path, base)
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason})") from None
    except csv.Error as error:
        raise InputError(f"{path}: not valid CSV ({error})") from None


def count_lines(path: Path) -> int:
    """How many requests ``path`` holds, about (non-blank lines, less a CSV header)."""
    count = 0
    with path.open("rb") as handle:
        for raw in handle:
            count += bool(raw.strip())
    return max(0, count - 1) if path.suffix.lower() == ".csv" else count
