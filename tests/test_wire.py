"""The wire format: request round trips, callbacks, replies and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keevx_async as kx
from keevx_async._models import CallbackPayload
from keevx_async._types import IMAGE_QUALITIES, IMAGE_RATIOS, MODULES
from keevx_async._wire import (
    Envelope,
    WireFormatError,
    _decode_callback,
    _decode_callback_fast,
    _scan_object,
    converter,
    decode_callback,
    decode_envelope,
    decode_request,
    decode_snapshot,
    decode_task_ids,
    encode_request,
    load_json,
)

# --- strategies ----------------------------------------------------------------------------

_URL = st.builds(
    lambda host, path, query: f"https://{host}.test/{path}{query}",
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10),
    st.sampled_from(["", "a.png", "img/b.JPG", "c", "d.webp"]),
    st.sampled_from(["", "?x=1", "?a=b&c=d.png"]),
)

requests = st.builds(
    kx.ImageRequest,
    st.text(min_size=1, max_size=300),
    reference_images=st.lists(_URL, max_size=5),
    module=st.sampled_from(MODULES),
    generate_count=st.integers(1, 8),
    image_quality=st.sampled_from(IMAGE_QUALITIES),
    image_ratio=st.sampled_from(IMAGE_RATIOS),
    callback_url=st.one_of(st.none(), _URL),
)

_JSON_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
)
_JSON = st.recursive(
    _JSON_SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_DATA_FIELDS = {"task_id", "status", "image_url", "thumbnail_url", "error_message"}
_TOP_FIELDS = {"code", "msg", "data", "task_type"}


@st.composite
def callbacks(draw: st.DrawFn) -> dict[str, Any]:
    """A valid callback body, with random statuses, task types and extra fields."""
    status = draw(
        st.one_of(
            st.sampled_from(["SUCCEEDED", "FAILED", "GENERATING", "PENDING", "PROCESSING"]),
            st.text(min_size=1, max_size=12),
        )
    )
    image_url = draw(st.one_of(st.none(), st.just(""), _URL))
    if status == "SUCCEEDED" and not image_url:
        image_url = draw(_URL)
    data: dict[str, Any] = draw(
        st.dictionaries(
            st.text(max_size=8).filter(lambda k: k not in _DATA_FIELDS), _JSON, max_size=4
        )
    )
    data["task_id"] = draw(st.text(min_size=1, max_size=30))
    data["status"] = status
    if image_url is not None or draw(st.booleans()):
        data["image_url"] = image_url
    error_message = draw(st.one_of(st.none(), st.text(max_size=20)))
    if error_message is not None or draw(st.booleans()):
        data["error_message"] = error_message
    body: dict[str, Any] = draw(
        st.dictionaries(
            st.text(max_size=8).filter(lambda k: k not in _TOP_FIELDS), _JSON, max_size=4
        )
    )
    body["data"] = data
    if draw(st.booleans()):
        body["code"] = draw(st.integers())
    if draw(st.booleans()):
        body["msg"] = draw(st.one_of(st.none(), st.text(max_size=10)))
    if draw(st.booleans()):
        body["task_type"] = draw(
            st.one_of(st.none(), st.sampled_from(["image_generate", "i2i", "video"]), st.text())
        )
    return body


def _valid_callback(**data: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "task_id": "i2is-1",
        "status": "SUCCEEDED",
        "image_url": "https://cdn.test/1.png",
        "error_message": "",
    }
    fields.update(data)
    return {"code": 0, "msg": "ok", "task_type": "image_generate", "data": fields}


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


# --- requests ------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(requests)
def test_request_round_trips_through_encode_and_decode(request: kx.ImageRequest) -> None:
    body = encode_request(request, request.callback_url)
    assert decode_request(body) == request
    assert decode_request(body.decode()) == request
    assert decode_request(json.loads(body)) == request


@settings(max_examples=100, deadline=None)
@given(requests)
def test_encode_request_writes_what_the_converter_unstructures(request: kx.ImageRequest) -> None:
    # encode_request is written out by hand for speed; the converter's hook is the reference.
    expected = converter.unstructure(request)
    if request.callback_url is None:
        expected.pop("callback_url", None)
    reference = json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()
    assert encode_request(request, request.callback_url) == reference


@settings(max_examples=50, deadline=None)
@given(requests, _URL)
def test_encode_callback_url_argument_wins_over_the_request(
    request: kx.ImageRequest, callback_url: str
) -> None:
    body = encode_request(request, callback_url)
    assert json.loads(body)["callback_url"] == callback_url
    decoded = decode_request(body)
    assert decoded.callback_url == callback_url
    assert decoded.prompt == request.prompt


@settings(max_examples=30, deadline=None)
@given(requests)
def test_encode_without_callback_url_sends_no_callback_field(request: kx.ImageRequest) -> None:
    sent = json.loads(encode_request(request, None))
    assert "callback_url" not in sent
    assert decode_request(sent).callback_url is None


def test_encoded_request_uses_the_service_field_names_and_lists() -> None:
    request = kx.ImageRequest(
        "狐狸", reference_images=["https://cdn.test/a.png"], generate_count=2, image_ratio="16:9"
    )
    body = encode_request(request, "https://app.test/cb?keevx_token=abc")
    assert json.loads(body) == {
        "prompt": "狐狸",
        "reference_images": ["https://cdn.test/a.png"],
        "module": "std",
        "generate_count": 2,
        "image_quality": "2K",
        "image_ratio": "16:9",
        "callback_url": "https://app.test/cb?keevx_token=abc",
    }
    assert "狐狸".encode() in body  # UTF-8, not \u escapes


def test_decode_request_applies_defaults_and_ignores_unknown_fields() -> None:
    assert decode_request(b'{"prompt": "x", "seed": 7}') == kx.ImageRequest("x")


def test_decode_request_validates_every_rule() -> None:
    with pytest.raises(kx.InvalidRequestError) as caught:
        decode_request({"prompt": "x", "generate_count": 9})
    assert caught.value.field == "generate_count"
    with pytest.raises(kx.InvalidRequestError) as caught:
        decode_request({"module": "std"})
    assert caught.value.field == "prompt"


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", "42"])
def test_decode_request_refuses_a_body_that_is_not_an_object(body: bytes | str) -> None:
    with pytest.raises(WireFormatError):
        decode_request(body)


# --- callbacks: valid ----------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(callbacks())
def test_any_valid_callback_decodes_keeping_fields_and_extras(body: dict[str, Any]) -> None:
    payload = decode_callback(body)
    data = body["data"]
    assert payload.task_id == data["task_id"]
    assert payload.status == data["status"]
    assert payload.image_url == (data.get("image_url") or "")
    assert payload.error_message == (data.get("error_message") or "")
    assert payload.task_type == (body.get("task_type") or "image_generate")
    assert payload.code == body.get("code", 0)
    assert payload.msg == (body.get("msg") or "")
    assert dict(payload.raw) == data


@settings(max_examples=75, deadline=None)
@given(callbacks())
def test_callback_bytes_text_and_mapping_inputs_agree(body: dict[str, Any]) -> None:
    text = json.dumps(body)
    from_bytes = decode_callback(text.encode())
    from_text = decode_callback(text)
    from_mapping = decode_callback(json.loads(text))
    assert from_bytes == from_text == from_mapping
    assert dict(from_bytes.raw) == dict(from_text.raw) == dict(from_mapping.raw)


def test_callback_given_as_a_read_only_mapping_is_accepted() -> None:
    # The contract takes "a mapping", not only a dict.
    body = _valid_callback()
    payload = decode_callback(MappingProxyType(body))
    assert payload == decode_callback(body)


def test_callback_raw_is_a_read_only_copy() -> None:
    body = _valid_callback(extra={"nested": 1})
    payload = decode_callback(body)
    body["data"]["extra"] = "changed"
    assert payload.raw["extra"] == {"nested": 1}
    with pytest.raises(TypeError):
        payload.raw["task_id"] = "other"  # type: ignore[index]


def test_callback_keeps_an_unknown_task_type() -> None:
    body = _valid_callback()
    body["task_type"] = "image_to_image_v2"
    assert decode_callback(body).task_type == "image_to_image_v2"


def test_failed_callback_without_image_url_is_valid() -> None:
    payload = decode_callback(
        {"data": {"task_id": "t", "status": "FAILED", "error_message": "nsfw"}}
    )
    assert payload.done
    assert payload.image_url == ""
    assert payload.error_message == "nsfw"
    assert payload.code == 0


# --- callbacks: malformed ------------------------------------------------------------------


_MALFORMED: list[tuple[str, object, str | None]] = [
    ("not json", b"{not json", None),
    ("invalid utf-8", b"\xff\xfe{}", None),
    ("array", b"[1, 2, 3]", None),
    ("string", '"hello"', None),
    ("data missing", {"code": 0}, "data"),
    ("data null", {"code": 0, "data": None}, "data"),
    ("data a list", {"code": 0, "data": [1]}, "data"),
    ("data a string", {"code": 0, "data": "x"}, "data"),
    ("task_id missing", {"data": {"status": "FAILED"}}, "data.task_id"),
    ("task_id empty", {"data": {"task_id": "", "status": "FAILED"}}, "data.task_id"),
    ("task_id an int", {"data": {"task_id": 123, "status": "FAILED"}}, "data.task_id"),
    ("task_id null", {"data": {"task_id": None, "status": "FAILED"}}, "data.task_id"),
    ("status missing", {"data": {"task_id": "t"}}, "data.status"),
    ("status empty", {"data": {"task_id": "t", "status": ""}}, "data.status"),
    ("status an int", {"data": {"task_id": "t", "status": 3}}, "data.status"),
    ("succeeded, no url", {"data": {"task_id": "t", "status": "SUCCEEDED"}}, "data.image_url"),
    (
        "succeeded, empty url",
        {"data": {"task_id": "t", "status": "SUCCEEDED", "image_url": ""}},
        "data.image_url",
    ),
    (
        "image_url an int",
        {"data": {"task_id": "t", "status": "SUCCEEDED", "image_url": 5}},
        "data.image_url",
    ),
]


@pytest.mark.parametrize(
    ("body", "field"), [(b, f) for _, b, f in _MALFORMED], ids=[i for i, _, _ in _MALFORMED]
)
def test_malformed_callback_raises_wire_format_error_naming_the_field(
    body: Any, field: str | None
) -> None:
    with pytest.raises(WireFormatError) as caught:
        decode_callback(body)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
    if field is not None:
        assert field in str(caught.value)


@given(
    callbacks(),
    st.sampled_from(["task_id", "status"]),
    st.one_of(st.integers(), st.booleans(), st.lists(st.text(), max_size=2)),
)
def test_mistyped_required_callback_field_is_refused(
    body: dict[str, Any], key: str, value: object
) -> None:
    body["data"][key] = value
    with pytest.raises(WireFormatError) as caught:
        decode_callback(body)
    assert caught.value.field == f"data.{key}"


@given(callbacks(), st.sampled_from(["task_id", "status"]))
def test_missing_required_callback_field_is_refused(body: dict[str, Any], key: str) -> None:
    body["data"] = _without(body["data"], key)
    with pytest.raises(WireFormatError) as caught:
        decode_callback(body)
    assert caught.value.field == f"data.{key}"


# --- replies -------------------------------------------------------------------------------


def test_decode_envelope_reads_code_msg_and_data() -> None:
    envelope = decode_envelope(b'{"code": 0, "msg": "ok", "data": {"task_ids": ["a"]}}', "reply")
    assert envelope == Envelope(code=0, msg="ok", data={"task_ids": ["a"]})


def test_decode_envelope_of_a_business_error_has_no_data() -> None:
    envelope = decode_envelope('{"code": 100001, "msg": "parameter error"}', "reply")
    assert envelope == Envelope(code=100001, msg="parameter error", data=None)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"<html>502</html>", None),
        (b"", None),
        (b"[]", None),
        (b'{"msg": "ok"}', "code"),
        (b'{"code": "0"}', "code"),
        (b'{"code": true}', "code"),
        (b'{"code": 0, "msg": 5}', "msg"),
    ],
)
def test_decode_envelope_errors_name_the_field(body: bytes, field: str | None) -> None:
    with pytest.raises(WireFormatError) as caught:
        decode_envelope(body, "reply")
    assert caught.value.field == field
    assert "reply" in str(caught.value)


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=8, unique=True))
def test_decode_task_ids_keeps_service_order(task_ids: list[str]) -> None:
    assert decode_task_ids({"task_ids": task_ids, "extra": 1}) == tuple(task_ids)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (None, "data"),
        ([], "data"),
        ("i2is-1", "data"),
        ({}, "data.task_ids"),
        ({"task_ids": []}, "data.task_ids"),
        ({"task_ids": ["a", ""]}, "data.task_ids"),
        ({"task_ids": ["a", 5]}, "data.task_ids[1]"),
        ({"task_ids": [None]}, "data.task_ids[0]"),
        ({"task_ids": None}, "data.task_ids"),
    ],
)
def test_decode_task_ids_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        decode_task_ids(data)
    assert caught.value.field == field


@pytest.mark.parametrize("task_ids", ["i2is-1", {"i2is-1": "x"}])
def test_decode_task_ids_refuses_a_non_list(task_ids: object) -> None:
    # A bare string is iterable: it must not become one task per character.
    with pytest.raises(WireFormatError) as caught:
        decode_task_ids({"task_ids": task_ids})
    assert caught.value.field == "data.task_ids"


def test_decode_snapshot_reads_fields_and_keeps_extras_in_raw() -> None:
    data = {
        "task_id": "i2is-1",
        "status": "SUCCEEDED",
        "image_url": "https://cdn.test/1.png",
        "thumbnail_url": "https://cdn.test/1.thumb.png",
        "error_message": "",
        "progress": 100,
    }
    snapshot = decode_snapshot(data)
    assert snapshot == kx.TaskSnapshot(
        task_id="i2is-1",
        status="SUCCEEDED",
        image_url="https://cdn.test/1.png",
        thumbnail_url="https://cdn.test/1.thumb.png",
    )
    assert snapshot.done
    assert dict(snapshot.raw) == data


def test_decode_snapshot_turns_nulls_into_empty_strings() -> None:
    snapshot = decode_snapshot(
        {"task_id": "t", "status": "GENERATING", "image_url": None, "thumbnail_url": None}
    )
    assert (snapshot.image_url, snapshot.thumbnail_url, snapshot.error_message) == ("", "", "")
    assert not snapshot.done


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (None, "data"),
        ("x", "data"),
        ({"status": "GENERATING"}, "data.task_id"),
        ({"task_id": "", "status": "GENERATING"}, "data.task_id"),
        ({"task_id": 1, "status": "GENERATING"}, "data.task_id"),
        ({"task_id": "t"}, "data.status"),
        ({"task_id": "t", "status": None}, "data.status"),
    ],
)
def test_decode_snapshot_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        decode_snapshot(data)
    assert caught.value.field == field


def test_decode_snapshot_refuses_an_empty_status() -> None:
    # An empty status would otherwise count as "finished" and fail a waiting task; the
    # callback decoder refuses it for the same reason.
    with pytest.raises(WireFormatError) as caught:
        decode_snapshot({"task_id": "t", "status": ""})
    assert caught.value.field == "data.status"


@pytest.mark.parametrize(
    "extra",
    [
        {"code": "0"},
        {"code": False},
        {"code": 0.0},
        {"msg": 1},
        {"task_type": []},
        {"task_type": 7},
    ],
)
def test_fields_only_passed_on_are_read_leniently(extra: dict[str, object]) -> None:
    body = {"data": {"task_id": "t", "status": "SUCCEEDED", "image_url": "https://i/t.png"}}
    payload = decode_callback({**body, **extra})
    assert (payload.task_id, payload.status, payload.image_url) == (
        "t",
        "SUCCEEDED",
        "https://i/t.png",
    )
    assert payload.code == 0
    assert isinstance(payload.task_type, str)
    assert payload.task_type


@pytest.mark.parametrize(
    ("data", "error_message", "thumbnail_url"),
    [
        ({"error_message": 5, "thumbnail_url": False}, "5", "false"),
        ({"error_message": None, "thumbnail_url": None}, "", ""),
        ({"error_message": {"why": "nsfw"}}, '{"why": "nsfw"}', ""),
    ],
)
def test_odd_optional_task_fields_do_not_lose_the_result(
    data: dict[str, object], error_message: str, thumbnail_url: str
) -> None:
    snapshot = decode_snapshot({"task_id": "t", "status": "FAILED", **data})
    assert (snapshot.error_message, snapshot.thumbnail_url) == (error_message, thumbnail_url)
    callback = decode_callback({"data": {"task_id": "t", "status": "FAILED", **data}})
    assert callback.error_message == error_message


def test_succeeded_task_needs_a_string_image_url() -> None:
    with pytest.raises(WireFormatError) as caught:
        decode_snapshot({"task_id": "t", "status": "SUCCEEDED", "image_url": 5})
    assert caught.value.field == "data.image_url"
    failed = decode_snapshot({"task_id": "t", "status": "FAILED", "image_url": 5})
    assert failed.image_url == ""


def test_repeated_task_ids_are_refused() -> None:
    with pytest.raises(WireFormatError, match="repeats") as caught:
        decode_task_ids({"task_ids": ["i2is-a", "i2is-a"]})
    assert caught.value.field == "data.task_ids"


def test_deeply_nested_json_is_a_wire_format_error() -> None:
    body = b'{"data":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(WireFormatError, match="nested too deeply"):
        decode_callback(body)


# --- the fast callback path reads exactly like the converter ------------------------------------

# Bodies near and beyond the edge of the fast path: odd types where it takes strings, empty
# strings, nulls, mappings that are not dicts.
_ODD = st.one_of(_JSON, st.just(""), st.just("SUCCEEDED"), st.just("GENERATING"))


@st.composite
def near_callbacks(draw: st.DrawFn) -> object:
    """A callback body, valid or not: each field either valid or odd."""
    body = draw(callbacks())
    data = body["data"]
    for key in ("task_id", "status", "image_url", "error_message"):
        if draw(st.integers(0, 3)) == 0:
            if draw(st.booleans()):
                data[key] = draw(_ODD)
            else:
                data.pop(key, None)
    for key in ("code", "msg", "task_type"):
        if draw(st.integers(0, 3)) == 0:
            body[key] = draw(_ODD)
    shape = draw(st.integers(0, 9))
    if shape == 0:
        body["data"] = draw(_JSON)
    elif shape == 1:
        body["data"] = MappingProxyType(data)
    elif shape == 2:
        return MappingProxyType(body)
    elif shape == 3:
        return draw(_JSON)
    return body


def _outcome(body: object) -> tuple[str, object]:
    try:
        payload = _decode_callback(body)
    except WireFormatError as exc:
        return "error", (str(exc), exc.field)
    return "payload", (payload, dict(payload.raw))


@settings(max_examples=400, deadline=None)
@given(near_callbacks())
def test_fast_callback_path_agrees_with_the_converter(body: Any) -> None:
    fast = _decode_callback_fast(body, owned=False)
    if fast is not None:
        assert _outcome(body) == ("payload", (fast, dict(fast.raw)))
        assert fast.code == _decode_callback(body).code
    if not isinstance(body, Mapping):
        # decode_callback would parse it as JSON text; here it is already parsed.
        assert fast is None
        assert _outcome(body)[0] == "error"
        return
    # Whichever path decode_callback takes, it answers as the converter does.
    try:
        answer: tuple[str, object] = ("payload", decode_callback(body))
    except WireFormatError as exc:
        answer = ("error", (str(exc), exc.field))
    expected = _outcome(body)
    if answer[0] == "payload":
        assert isinstance(answer[1], CallbackPayload)
        answer = ("payload", (answer[1], dict(answer[1].raw)))
    assert answer == expected


@settings(max_examples=100, deadline=None)
@given(callbacks())
def test_fast_path_takes_every_plain_valid_callback(body: dict[str, Any]) -> None:
    assert _decode_callback_fast(json.loads(json.dumps(body)), owned=True) is not None


def test_fast_path_leaves_a_succeeded_callback_with_a_null_image_url_to_the_converter() -> None:
    body = _valid_callback(image_url=None)
    assert _decode_callback_fast(body, owned=False) is None
    with pytest.raises(WireFormatError) as caught:
        decode_callback(body)
    assert caught.value.field == "data.image_url"


def test_raw_of_a_parsed_body_is_read_only_without_a_copy_of_a_callers_mapping() -> None:
    data = {"task_id": "t", "status": "FAILED", "x": [1]}
    payload = decode_callback({"data": data})
    data["x"] = "changed"  # the caller's dict: the payload kept its own copy
    assert payload.raw["x"] == [1]
    parsed = decode_callback(json.dumps({"data": data}).encode())
    with pytest.raises(TypeError):
        parsed.raw["x"] = 1  # type: ignore[index]


# --- orjson, when installed, changes speed only ------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": NaN, "b": Infinity}',  # orjson refuses, json reads
        b'{"big": 123456789012345678901234567890}',  # orjson would read a float
        b'{"big": -9223372036854775809, "ok": 9223372036854775807}',
        b'{"big": 18446744073709551616}',
        b"[0.12345678901234567890123, 1e-999]",
        b'\xef\xbb\xbf{"bom": 1}',
        '{"a": 1}'.encode("utf-16"),
        b'{"a": 1.5e999}',
    ],
)
def test_load_json_reads_what_the_json_module_reads(body: bytes | str) -> None:
    try:
        expected: object = ("ok", json.loads(body))
    except ValueError as exc:
        expected = ("error", f"thing is not valid JSON: {exc}")
    try:
        got: object = ("ok", load_json(body, "thing"))
    except WireFormatError as exc:
        got = ("error", str(exc))
    assert repr(got) == repr(expected)


@pytest.mark.parametrize("body", [b"", b"{", b"[1,]", b'{"a": 1} x', b"\xff"])
def test_load_json_errors_are_the_json_modules(body: bytes) -> None:
    with pytest.raises(ValueError, match=r".") as stdlib:
        json.loads(body)
    with pytest.raises(WireFormatError) as ours:
        load_json(body, "thing")
    assert str(ours.value) == f"thing is not valid JSON: {stdlib.value}"


_STDLIB_ONLY = """
import json, sys
sys.modules["orjson"] = None  # as if it were not installed
from keevx_async import _wire
assert _wire._fast_loads is None
body = {"code": 0, "task_type": "image_generate",
        "data": {"task_id": "t-1", "status": "SUCCEEDED", "image_url": "https://x.test/1.png"}}
payload = _wire.decode_callback(json.dumps(body).encode())
assert (payload.task_id, payload.image_url) == ("t-1", "https://x.test/1.png"), payload
try:
    _wire.decode_callback(b"{")
except _wire.WireFormatError as exc:
    assert "callback body is not valid JSON" in str(exc)
else:
    raise AssertionError("no error")
print("stdlib ok")
"""


def test_without_orjson_the_json_module_does_the_reading() -> None:
    done = subprocess.run(  # noqa: S603 (our own interpreter, our own code)
        [sys.executable, "-c", _STDLIB_ONLY], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stdlib ok"


_NUMBERS_AND_MORE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(_NUMBERS_AND_MORE, st.booleans())
def test_load_json_reads_any_document_exactly_as_the_json_module(
    value: object, ascii_only: bool
) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    # repr tells 1 from 1.0, -0.0 from 0.0 and a float from a long integer.
    assert repr(load_json(body, "thing")) == repr(json.loads(body))


@settings(max_examples=400, deadline=None)
@given(near_callbacks())
def test_callback_bytes_decode_as_the_json_module_and_converter_read_them(body: Any) -> None:
    if isinstance(body, MappingProxyType) or (
        isinstance(body, dict) and isinstance(body.get("data"), MappingProxyType)
    ):
        return  # not JSON: covered as mappings above
    raw = json.dumps(body).encode()
    try:
        answer: tuple[str, object] = ("payload", decode_callback(raw))
    except WireFormatError as exc:
        answer = ("error", (str(exc), exc.field))
    if answer[0] == "payload":
        assert isinstance(answer[1], CallbackPayload)
        answer = ("payload", (answer[1], dict(answer[1].raw)))
    assert repr(answer) == repr(_outcome(json.loads(raw)))


@pytest.mark.parametrize(
    ("code", "extra"),
    [(2**70, None), (-(2**63) - 1, None), (0, 2**64), (0, 1.5), (0, [2**65])],
)
def test_plain_callback_with_long_integers_keeps_them_exact(code: int, extra: object) -> None:
    body = _valid_callback()
    body["code"] = code
    if extra is not None:
        body["data"]["big"] = extra
    payload = decode_callback(json.dumps(body).encode())
    assert payload.code == code
    assert type(payload.code) is int
    if extra is not None:
        assert repr(payload.raw["big"]) == repr(extra)


@pytest.mark.parametrize(
    ("where", "key"),
    [("data", "image_url"), ("data", "error_message"), ("top", "task_type"), ("top", "msg")],
)
def test_plain_shaped_callback_with_a_null_field_reads_as_ever(where: str, key: str) -> None:
    body = _valid_callback(status="FAILED", image_url="")
    (body["data"] if where == "data" else body)[key] = None
    raw = json.dumps(body).encode()
    assert decode_callback(raw) == _decode_callback(json.loads(raw))


# --- without orjson: the scanner json.loads runs, without its wrappers ------------------------


@settings(max_examples=300, deadline=None)
@given(_NUMBERS_AND_MORE, st.booleans(), st.sampled_from(["", " ", "\n", "\ufeff", " x"]))
def test_scan_object_reads_what_json_loads_reads_or_nothing(
    value: object, ascii_only: bool, around: str
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    for body in ((text + around).encode(), (around + text).encode()):
        scanned = _scan_object(body)
        if scanned is None:
            continue  # goes to load_json: the json module's own reading and messages
        assert repr(scanned) == repr(json.loads(body))
    # A document alone, as a callback is posted, is read here (not left to load_json).
    if value is not None:
        assert repr(_scan_object(text.encode())) == repr(value)


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"a": 1} x', b" {}", b"{} ", b"\xff", b'"\xed\xa0\x80"', b"[1,]"]
)
def test_scan_object_leaves_anything_unusual_to_the_json_module(body: bytes) -> None:
    assert _scan_object(body) is None


# --- lone surrogates: refused where they enter, naming the field --------------------------------

_LONE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])


@pytest.mark.parametrize("body", [b'{"text": "\\ud800"}', '{"text": "\\udfff"}'])
def test_load_json_refuses_a_lone_surrogate_naming_the_field(body: bytes | str) -> None:
    with pytest.raises(WireFormatError, match="field 'text' is not valid Unicode") as caught:
        load_json(body, "thing")
    assert caught.value.field == "text"


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["task_id", "status", "image_url", "error_message", "extra"]),
    _LONE,
    st.sampled_from(["bytes", "text", "mapping", "utf8-bytes"]),
)
def test_a_callback_with_a_lone_surrogate_anywhere_is_refused_naming_it(
    where: str, lone: str, form: str
) -> None:
    data: dict[str, Any] = {
        "task_id": "t-1",
        "status": "SUCCEEDED",
        "image_url": "https://x.test/1.png",
        "error_message": "",
        "extra": ["ok"],
    }
    if where == "extra":
        data["extra"] = ["ok", f"a{lone}b"]
    else:
        data[where] = f"{data[where]}{lone}"
    document = {"code": 0, "msg": "ok", "task_type": "image_generate", "data": data}
    body: bytes | str | Mapping[str, Any]
    if form == "bytes":
        body = json.dumps(document).encode()  # the escape, \\udXXX
    elif form == "text":
        body = json.dumps(document, ensure_ascii=False)  # the character itself
    elif form == "utf8-bytes":
        body = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
    else:
        body = document
    with pytest.raises(WireFormatError, match="not valid Unicode") as caught:
        decode_callback(body)
    field = "data.extra[1]" if where == "extra" else f"data.{where}"
    if form == "utf8-bytes":
        # Not UTF-8 as the json module reads it either way: refused as such or by field.
        assert caught.value.field in (None, field)
    else:
        assert caught.value.field == field


def test_a_surrogate_pair_is_a_character_and_reads_fine() -> None:
    body = b'{"data": {"task_id": "t", "status": "SUCCEEDED", "image_url": "https://x/\\ud83d\\ude00.png"}}'
    assert decode_callback(body).image_url == "https://x/\U0001f600.png"
