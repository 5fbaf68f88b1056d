"""``VideoRequest``: the per-model rules, the wire body, and agreement with FakeKeevx.

FakeKeevx checks video submits with rules of its own, written from the service's table
(keevx_async/testing/_rules.py imports none of the SDK's validators), so the property
below compares two independent readings of the table.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wiring import API_KEY, wired

import keevx_async as kx
from keevx_async._kinds import (
    IMAGE,
    KINDS,
    VIDEO,
    kind_named,
    kind_of,
    kind_of_callback,
    kind_of_result,
    kind_of_task_id,
    kind_of_task_type,
)
from keevx_async._router import decode_request_record, encode_request_record
from keevx_async._wire import WireFormatError, decode_callback, decode_snapshot
from keevx_async.testing._rules import validate_video

if TYPE_CHECKING:
    from pathlib import Path

START = "https://cdn.example.test/start.png"
END = "https://cdn.example.test/end.webp"


def ref(i: int) -> str:
    return f"https://cdn.example.test/ref{i}.jpg"


# --- the rules, one by one ---------------------------------------------------------------


def test_defaults_and_resolved_duration() -> None:
    request = kx.VideoRequest("p", image_url=START)
    assert (request.model, request.aspect_ratio, request.aspect_resolution) == (
        "V",
        "16:9",
        "1080p",
    )
    assert (request.duration, request.generate_audio, request.generate_count) == (8, False, 1)
    assert request == kx.VideoRequest("p", image_url=START, duration=8)
    multi = kx.VideoRequest("p", reference_images=[ref(0)])
    assert multi.duration == 8
    kl = kx.VideoRequest("p", model="KL", reference_images=[ref(0)])
    assert kl.duration == 5
    assert isinstance(kl, kx.TaskRequest)
    assert kl.custom_id is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"model": "Z"}, "model"),
        ({"image_url": None}, "image_url"),  # V with no image at all
        ({"image_url": "ftp://x/a.png"}, "image_url"),
        ({"image_url": "https://x/a.txt"}, "image_url"),
        ({"end_image_url": 3}, "end_image_url"),
        ({"image_url": None, "end_image_url": END, "reference_images": [ref(0)]}, "end_image_url"),
        ({"reference_images": [ref(0)]}, "reference_images"),  # both modes at once
        ({"image_url": None, "reference_images": [ref(i) for i in range(4)]}, "reference_images"),
        ({"image_url": None, "reference_images": "https://x/a.png"}, "reference_images"),
        ({"image_url": None, "reference_images": ["nope"]}, "reference_images[0]"),
        ({"aspect_ratio": "1:1"}, "aspect_ratio"),
        ({"aspect_resolution": "480p"}, "aspect_resolution"),
        ({"duration": 5}, "duration"),
        ({"duration": True}, "duration"),
        ({"duration": 8.0}, "duration"),
        ({"image_url": None, "reference_images": [ref(0)], "duration": 4}, "duration"),
        ({"generate_audio": 1}, "generate_audio"),
        ({"generate_count": 5}, "generate_count"),
        ({"generate_count": 0}, "generate_count"),
        ({"generate_count": True}, "generate_count"),
        ({"callback_url": "not a url"}, "callback_url"),
        ({"custom_id": ""}, "custom_id"),
        ({"custom_id": "x" * 257}, "custom_id"),
        ({"custom_id": 7}, "custom_id"),
        ({"custom_id": "\ud800"}, "custom_id"),
        ({"model": "KL", "reference_images": [ref(0)]}, "image_url"),
        ({"model": "KL", "image_url": None, "end_image_url": END}, "end_image_url"),
        ({"model": "KL", "image_url": None}, "reference_images"),
        (
            {"model": "KL", "image_url": None, "reference_images": [ref(i) for i in range(8)]},
            "reference_images",
        ),
        (
            {
                "model": "KL",
                "image_url": None,
                "reference_images": [ref(0)],
                "aspect_resolution": "4k",
            },
            "aspect_resolution",
        ),
        (
            {
                "model": "KL",
                "image_url": None,
                "reference_images": [ref(0)],
                "generate_audio": True,
            },
            "generate_audio",
        ),
        (
            {"model": "KL", "image_url": None, "reference_images": [ref(0)], "duration": 8},
            "duration",
        ),
    ],
)
def test_each_broken_rule_names_its_field(fields: dict[str, Any], field: str) -> None:
    arguments: dict[str, Any] = {"prompt": "p", "image_url": START, **fields}
    prompt = arguments.pop("prompt")
    with pytest.raises(kx.InvalidRequestError) as caught:
        kx.VideoRequest(prompt, **arguments)
    assert caught.value.field == field
    assert field.split("[", maxsplit=1)[0] in str(caught.value)


def test_local_images_are_checked_when_built(tmp_path: Path) -> None:
    image = tmp_path / "start.png"
    image.write_bytes(b"\x89PNG....")
    request = kx.VideoRequest("p", image_url=image, end_image_url=END)
    assert request.image_url == image
    with pytest.raises(kx.InvalidRequestError) as caught:
        kx.VideoRequest("p", image_url=tmp_path / "missing.png")
    assert caught.value.field == "image_url"
    with pytest.raises(kx.InvalidRequestError) as caught:
        kx.VideoRequest("p", model="KL", reference_images=[image, tmp_path / "x.txt"])
    assert caught.value.field == "reference_images[1]"


def test_every_valid_duration_of_each_mode_is_accepted() -> None:
    for duration in (4, 6, 8):
        assert kx.VideoRequest("p", image_url=START, duration=duration).duration == duration
    assert kx.VideoRequest("p", reference_images=[ref(0)], duration=8).duration == 8
    for duration in (5, 10):
        request = kx.VideoRequest("p", model="KL", reference_images=[ref(0)], duration=duration)
        assert request.duration == duration


# --- the wire body ------------------------------------------------------------------------


def test_the_body_carries_every_field_with_defaults_and_never_custom_id() -> None:
    request = kx.VideoRequest("p", image_url=START, end_image_url=END, custom_id="row-1")
    body = json.loads(VIDEO.encode(request, "https://app.test/cb?t=1", None))
    assert body == {
        "prompt": "p",
        "model": "V",
        "image_url": START,
        "end_image_url": END,
        "reference_images": [],
        "aspect_ratio": "16:9",
        "aspect_resolution": "1080p",
        "duration": 8,
        "generate_audio": False,
        "generate_count": 1,
        "callback_url": "https://app.test/cb?t=1",
    }
    multi = kx.VideoRequest("p", model="KL", reference_images=[ref(0), ref(1)])
    body = json.loads(VIDEO.encode(multi, None, None))
    assert "image_url" not in body
    assert "end_image_url" not in body
    assert "callback_url" not in body
    assert "custom_id" not in body
    assert (body["reference_images"], body["duration"]) == ([ref(0), ref(1)], 5)


def test_uploaded_urls_take_the_places_of_local_images(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    request = kx.VideoRequest("p", image_url=image, end_image_url=END)
    images = VIDEO.images(request)
    assert images == (("image_url", image), ("end_image_url", END))
    body = json.loads(VIDEO.encode(request, None, ["https://up/a.png", END]))
    assert (body["image_url"], body["end_image_url"]) == ("https://up/a.png", END)
    kl = kx.VideoRequest("p", model="KL", reference_images=[ref(0), image])
    assert [field for field, _ in VIDEO.images(kl)] == [
        "reference_images[0]",
        "reference_images[1]",
    ]


def test_the_image_body_never_carries_custom_id() -> None:
    request = kx.ImageRequest("p", custom_id="mine")
    assert "custom_id" not in json.loads(IMAGE.encode(request, None, None))
    assert request.custom_id == "mine"


# --- agreement with FakeKeevx's own rules -----------------------------------------------

_IMAGES = st.one_of(st.none(), st.just(START))


@st.composite
def video_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments over the whole space of the table, valid and not."""
    return {
        "model": draw(st.sampled_from(["V", "KL", "X"])),
        "image_url": draw(_IMAGES),
        "end_image_url": draw(st.one_of(st.none(), st.just(END))),
        "reference_images": [ref(i) for i in range(draw(st.integers(0, 8)))],
        "aspect_ratio": draw(st.sampled_from(["16:9", "9:16", "1:1"])),
        "aspect_resolution": draw(st.sampled_from(["720p", "1080p", "4k", "480p"])),
        "duration": draw(st.sampled_from([None, 4, 5, 6, 7, 8, 10])),
        "generate_audio": draw(st.booleans()),
        "generate_count": draw(st.integers(0, 5)),
    }


_FIELDS = {a.name for a in attrs.fields(kx.VideoRequest)}


def _build(inputs: dict[str, Any]) -> kx.VideoRequest | kx.InvalidRequestError:
    try:
        return kx.VideoRequest("p", **inputs)
    except kx.InvalidRequestError as exc:
        return exc


@settings(max_examples=400)
@given(video_inputs())
def test_the_sdk_and_the_fake_agree_on_every_combination(inputs: dict[str, Any]) -> None:
    raw_body = {key: value for key, value in inputs.items() if value is not None}
    raw_body["prompt"] = "p"
    request = _build(inputs)
    if isinstance(request, kx.InvalidRequestError):
        assert request.field is not None
        assert request.field.split("[")[0] in _FIELDS
        # What the SDK refuses, the service refuses too (when sent as is).
        assert isinstance(validate_video(raw_body), tuple), raw_body
        return
    accepted = validate_video(json.loads(VIDEO.encode(request, None, None)))
    assert isinstance(accepted, dict), accepted
    assert accepted["duration"] == request.duration
    assert accepted["model"] == request.model
    assert accepted["generate_count"] == request.generate_count
    # The same request without the SDK's resolving: the fake's defaults agree.
    assert isinstance(validate_video(raw_body), dict)


@settings(max_examples=100)
@given(video_inputs(), st.one_of(st.none(), st.text(min_size=1, max_size=20)))
def test_a_router_record_gives_back_the_same_request(
    inputs: dict[str, Any], custom_id: str | None
) -> None:
    try:
        request = kx.VideoRequest("p", **inputs, custom_id=custom_id)
    except kx.InvalidRequestError:
        return
    kind, text = encode_request_record(request)
    assert kind == "video"
    assert decode_request_record(text, kind) == request


def test_a_submit_body_decodes_back_to_its_request() -> None:
    request = kx.VideoRequest("p", image_url=START, end_image_url=END, duration=4)
    body = VIDEO.encode(request, "https://app.test/cb", None)
    assert VIDEO.decode_request(body) == attrs.evolve(request, callback_url="https://app.test/cb")
    assert VIDEO.decode_request(body.decode()).duration == 4
    with pytest.raises(kx.InvalidRequestError):
        VIDEO.decode_request(b"[1]")


def test_unreadable_records_read_as_none() -> None:
    assert decode_request_record("[1]", "video") is None
    assert decode_request_record('{"prompt": ""}', "video") is None
    assert decode_request_record("{}", "no such kind") is None


# --- kinds ------------------------------------------------------------------------------


def test_kinds_are_told_by_request_result_prefix_and_task_type() -> None:
    assert KINDS == (IMAGE, VIDEO)
    assert kind_of(kx.ImageRequest("p")) is IMAGE
    assert kind_of(kx.VideoRequest("p", image_url=START)) is VIDEO
    with pytest.raises(TypeError, match="ImageRequest or VideoRequest"):
        kind_of("p")  # type: ignore[arg-type]
    assert kind_of_task_id("i2v-1") is VIDEO
    assert kind_of_task_id("i2is-1") is IMAGE
    assert kind_of_task_id("other-1") is IMAGE
    assert kind_of_task_type("image_to_video") is VIDEO
    assert kind_of_task_type("nope") is None
    assert kind_of_callback("x-1", "image_to_video") is VIDEO
    assert kind_of_callback("x-1", None) is IMAGE
    assert kind_of_callback("i2v-1", "image_generate") is VIDEO
    assert kind_named(None) is IMAGE
    assert kind_named("video") is VIDEO
    with pytest.raises(kx.InvalidRequestError):
        kind_named("audio")
    assert kind_of_result(object()) is None
    assert VIDEO.lookup_path("i2v-1") == "/v1/image_to_video/i2v-1"
    assert "image_to_video" in repr(VIDEO)


def test_a_subclassed_request_keeps_its_kind() -> None:
    @attrs.frozen
    class Mine(kx.VideoRequest):
        pass

    assert kind_of(Mine("p", image_url=START)) is VIDEO


# --- reading video callbacks and lookups ------------------------------------------------


def _video_callback(**data: Any) -> dict[str, Any]:
    base = {"task_id": "i2v-1", "status": "SUCCEEDED", "video_url": "https://f/v.mp4"}
    return {"code": 0, "msg": "ok", "task_type": "image_to_video", "data": {**base, **data}}


def test_a_video_callback_is_read_and_checked() -> None:
    payload = decode_callback(json.dumps(_video_callback(duration=8)).encode())
    assert (payload.task_id, payload.status, payload.task_type) == (
        "i2v-1",
        "SUCCEEDED",
        "image_to_video",
    )
    assert payload.raw["video_url"] == "https://f/v.mp4"
    with pytest.raises(WireFormatError) as caught:
        decode_callback(_video_callback(video_url=""))
    assert caught.value.field == "data.video_url"
    with pytest.raises(WireFormatError) as caught:
        decode_callback(_video_callback(video_url=5))
    assert caught.value.field == "data.video_url"
    failed = decode_callback(_video_callback(status="FAILED", video_url=None, error_message="no"))
    assert (failed.status, failed.error_message) == ("FAILED", "no")


def test_a_video_snapshot_is_read_and_checked() -> None:
    data = {
        "task_id": "i2v-1",
        "status": "SUCCEEDED",
        "video_url": "https://f/v.mp4",
        "thumbnail_url": "https://f/t.png",
        "duration": 6,
        "width": 1280,
        "height": 720.5,
    }
    snapshot = decode_snapshot(data, "video_url", "image_to_video")
    assert (snapshot.video_url, snapshot.url, snapshot.duration) == ("https://f/v.mp4",) * 2 + (6,)
    assert (snapshot.width, snapshot.height, snapshot.task_type) == (1280, None, "image_to_video")
    with pytest.raises(WireFormatError) as caught:
        decode_snapshot({**data, "video_url": None}, "video_url", "image_to_video")
    assert caught.value.field == "data.video_url"
    running = decode_snapshot({"task_id": "i2v-1", "status": "PROCESSING"}, "video_url")
    assert (running.done, running.url, running.duration) == (False, "", None)


# --- FakeKeevx's refusals over HTTP -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"prompt": "p"}, 100003),
        ({"prompt": "", "image_url": START}, 100001),
        ({"prompt": "p", "model": "Z", "image_url": START}, 100002),
        ({"prompt": "p", "image_url": START, "reference_images": [ref(0)]}, 100003),
        ({"prompt": "p", "image_url": START, "duration": 10}, 100004),
        (
            {"prompt": "p", "model": "KL", "reference_images": [ref(0)], "aspect_resolution": "4k"},
            100005,
        ),
        (
            {"prompt": "p", "model": "KL", "reference_images": [ref(0)], "generate_audio": True},
            100006,
        ),
        ({"prompt": "p", "model": "KL", "image_url": START, "reference_images": [ref(0)]}, 100007),
        ({"prompt": "p", "image_url": "start.png"}, 100001),
        ({"prompt": "p", "reference_images": "https://x/a.png"}, 100001),
        ({"prompt": "p", "image_url": START, "aspect_ratio": "1:1"}, 100001),
        ({"prompt": "p", "image_url": START, "generate_audio": "yes"}, 100001),
        ({"prompt": "p", "image_url": START, "generate_count": 5}, 100001),
        ({"prompt": "p", "image_url": START, "duration": "8"}, 100001),
        ({"prompt": "p", "image_url": START, "callback_url": 5}, 100001),
        ({"prompt": "p", "reference_images": [ref(0)], "end_image_url": END}, 100003),
        ({"prompt": "p", "reference_images": [ref(i) for i in range(4)]}, 100003),
        ({"prompt": "p", "model": "KL"}, 100003),
        ({"prompt": "p", "model": "KL", "reference_images": [ref(0)], "duration": 8}, 100004),
    ],
)
async def test_the_fake_refuses_with_the_documented_codes(body: dict[str, Any], code: int) -> None:
    async with wired() as (fake, client):
        response = await client._engine.http.post(
            f"{fake.base_url}/v1/image_to_video",
            json=body,
            headers={"authorization": f"Bearer {API_KEY}"},
        )
    assert response.status_code == 200
    assert response.json()["code"] == code
    assert response.json()["data"] is None
    assert fake.tasks == {}
