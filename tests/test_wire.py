"""The wire format: request round trips, callbacks, replies and their errors."""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keevx_async as kx
from keevx_async._types import IMAGE_QUALITIES, IMAGE_RATIOS, MODULES
from keevx_async._wire import (
    Envelope,
    WireFormatError,
    decode_callback,
    decode_envelope,
    decode_request,
    decode_snapshot,
    decode_task_ids,
    encode_request,
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
