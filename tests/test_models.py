"""ImageRequest validation, and the value semantics of the result models."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import keevx_async as kx
from keevx_async._models import (
    CallbackPayload,
    is_finished,
    make_callback_payload,
    make_image_result,
)
from keevx_async._types import IMAGE_EXTENSIONS, IMAGE_QUALITIES, IMAGE_RATIOS, MODULES

# --- strategies ---------------------------------------------------------------------------

_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
_HOST = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_NAME.filter(lambda s: s[0].isalnum()), min_size=1, max_size=3),
    st.sampled_from(["com", "cn", "test", "example"]),
)
_SCHEME = st.sampled_from(["http", "https", "HTTPS", "Http"])
_QUERY = st.one_of(
    st.just(""),
    st.builds(lambda k, v: f"?{k}={v}", _NAME, st.text(alphabet="abc.xyz/=&", max_size=12)),
)


def randomly_cased(text: str) -> st.SearchStrategy[str]:
    """``text`` with each letter upper-cased or not."""
    return st.lists(st.booleans(), min_size=len(text), max_size=len(text)).map(
        lambda flips: "".join(c.upper() if up else c for c, up in zip(text, flips, strict=True))
    )


@st.composite
def image_urls(draw: st.DrawFn) -> str:
    """Absolute http(s) URLs whose last path segment is a listed image type or has no dot."""
    directories = draw(st.lists(_NAME, max_size=3))
    stem = draw(_NAME)
    if draw(st.booleans()):
        extension = draw(st.sampled_from(sorted(IMAGE_EXTENSIONS)).flatmap(randomly_cased))
        last = f"{stem}.{extension}"
    else:
        last = stem if draw(st.booleans()) else ""
    path = "/".join(["", *directories, last]) if directories or last else ""
    return f"{draw(_SCHEME)}://{draw(_HOST)}{path}{draw(_QUERY)}"


_BAD_EXTENSIONS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6
).filter(lambda e: e.lower() not in IMAGE_EXTENSIONS)

valid_requests = st.builds(
    kx.ImageRequest,
    st.text(min_size=1, max_size=1000),
    reference_images=st.lists(image_urls(), max_size=5).map(tuple),
    module=st.sampled_from(MODULES),
    generate_count=st.integers(1, 8),
    image_quality=st.sampled_from(IMAGE_QUALITIES),
    image_ratio=st.sampled_from(IMAGE_RATIOS),
    callback_url=st.one_of(st.none(), image_urls()),
)


def _refused(field: str, **kwargs: Any) -> kx.InvalidRequestError:
    prompt = kwargs.pop("prompt", "a red fox")
    with pytest.raises(kx.InvalidRequestError) as caught:
        kx.ImageRequest(prompt, **kwargs)
    error = caught.value
    assert isinstance(error, ValueError)
    assert isinstance(error, kx.KeevxError)
    assert error.field == field
    return error


# --- accepted -----------------------------------------------------------------------------


def test_defaults_match_the_service_defaults() -> None:
    request = kx.ImageRequest("a red fox")
    assert request.reference_images == ()
    assert request.module == "std"
    assert request.generate_count == 1
    assert request.image_quality == "2K"
    assert request.image_ratio == "9:16"
    assert request.callback_url is None


_VALID_FIELDS = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=1000),
        "reference_images": st.lists(image_urls(), max_size=5),
        "module": st.sampled_from(MODULES),
        "generate_count": st.integers(1, 8),
        "image_quality": st.sampled_from(IMAGE_QUALITIES),
        "image_ratio": st.sampled_from(IMAGE_RATIOS),
        "callback_url": st.one_of(st.none(), image_urls()),
        "custom_id": st.one_of(st.none(), st.text(min_size=1, max_size=256)),
    }
)


@settings(max_examples=75, deadline=None)
@given(_VALID_FIELDS)
def test_valid_request_is_accepted_and_kept_exactly(fields: dict[str, Any]) -> None:
    request = kx.ImageRequest(**fields)
    assert attrs.asdict(request) == {
        **fields,
        "reference_images": tuple(fields["reference_images"]),
    }
    assert isinstance(request.reference_images, tuple)


def test_reference_images_accept_any_iterable_and_become_a_tuple() -> None:
    urls = ["https://a.test/1.png", "https://a.test/2.jpg"]
    request = kx.ImageRequest("x", reference_images=iter(urls))
    assert request.reference_images == tuple(urls)


@pytest.mark.parametrize("length", [1, 1000])
def test_prompt_length_bounds_are_inclusive(length: int) -> None:
    assert len(kx.ImageRequest("p" * length).prompt) == length


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.test/a.PNG",
        "https://cdn.test/a.JpEg",
        "https://cdn.test/a.webp",
        "https://cdn.test/a.GIF",
        "https://cdn.test/a.bmp",
        "https://cdn.test/a.jpg",
        "https://cdn.test/image",
        "https://cdn.test/",
        "https://cdn.test",
        "https://cdn.test/dir.v2/image",
        "https://cdn.test/a.png?size=large.txt",
        "https://cdn.test/download?file=a.exe",
        "https://cdn.test/a.png#frag.exe",
        "http://cdn.test:8080/a.png",
    ],
)
def test_reference_image_extension_rule_accepts(url: str) -> None:
    assert kx.ImageRequest("x", reference_images=[url]).reference_images == (url,)


# --- refused: prompt ------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1001, 5000])
def test_prompt_length_out_of_range_is_refused(length: int) -> None:
    error = _refused("prompt", prompt="p" * length)
    assert "1..1000" in str(error)


@given(st.one_of(st.integers(), st.none(), st.binary(min_size=1), st.lists(st.text())))
def test_non_string_prompt_is_refused(prompt: object) -> None:
    _refused("prompt", prompt=prompt)


# --- refused: reference_images ------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(image_urls(), min_size=6, max_size=8))
def test_more_than_five_reference_images_are_refused(urls: list[str]) -> None:
    error = _refused("reference_images", reference_images=urls)
    assert "at most 5" in str(error)


@pytest.mark.parametrize("value", ["https://cdn.test/a.png", b"https://cdn.test/a.png", 5, None])
def test_reference_images_must_be_a_collection_not_a_bare_string(value: object) -> None:
    _refused("reference_images", reference_images=value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://cdn.test/a.png",
        "/images/a.png",
        "a.png",
        "//cdn.test/a.png",
        "https:///a.png",
        "file:///tmp/a.png",
        "https://[::1/a.png",
        "",
    ],
)
def test_non_http_or_relative_reference_image_is_refused(url: str) -> None:
    error = _refused("reference_images[0]", reference_images=[url])
    assert "http(s)" in str(error) or "not a valid URL" in str(error)


def test_non_string_reference_image_is_refused_naming_its_position() -> None:
    _refused("reference_images[1]", reference_images=["https://cdn.test/a.png", 42])


@settings(max_examples=50, deadline=None)
@given(
    good=st.lists(image_urls(), max_size=4),
    extension=_BAD_EXTENSIONS,
    query=_QUERY,
    data=st.data(),
)
def test_unlisted_extension_is_refused_naming_position_and_allowed_types(
    good: list[str], extension: str, query: str, data: st.DataObject
) -> None:
    extension = data.draw(randomly_cased(extension))
    bad = f"https://cdn.test/img/picture.{extension}{query}"
    urls = [*good, bad]
    error = _refused(f"reference_images[{len(good)}]", reference_images=urls)
    for allowed in ("jpg", "jpeg", "png", "bmp", "webp", "gif"):
        assert allowed in str(error)


def test_image_extension_in_the_query_does_not_hide_a_bad_path_extension() -> None:
    _refused("reference_images[0]", reference_images=["https://cdn.test/a.exe?as=.png"])


# --- refused: enums ---------------------------------------------------------------------------


_NOT_A_STRING = st.one_of(st.integers(), st.none(), st.lists(st.text(), max_size=2))


@pytest.mark.parametrize(
    ("field", "allowed"),
    [("module", MODULES), ("image_quality", IMAGE_QUALITIES), ("image_ratio", IMAGE_RATIOS)],
)
@given(value=st.one_of(st.text(), _NOT_A_STRING))
def test_enum_field_refuses_values_outside_its_list_and_names_them(
    field: str, allowed: tuple[str, ...], value: object
) -> None:
    assume(value not in allowed)
    error = _refused(field, **{field: value})
    for choice in allowed:
        assert repr(choice) in str(error)


@pytest.mark.parametrize("value", ["STD", "Pro", " std"])
def test_module_is_case_sensitive(value: str) -> None:
    _refused("module", module=value)


# --- refused: generate_count --------------------------------------------------------------------


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=9)))
def test_generate_count_outside_1_to_8_is_refused(count: int) -> None:
    error = _refused("generate_count", generate_count=count)
    assert "1..8" in str(error)


@pytest.mark.parametrize("count", [True, False, 2.0, "2", None])
def test_generate_count_must_be_a_real_int(count: object) -> None:
    _refused("generate_count", generate_count=count)


# --- refused: callback_url --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["ftp://app.test/cb", "/cb", "app.test/cb", "https://", "", 123, b"https://a.test/"]
)
def test_callback_url_must_be_an_absolute_http_url(url: object) -> None:
    _refused("callback_url", callback_url=url)


# --- value semantics ----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(valid_requests)
def test_request_is_frozen(request: kx.ImageRequest) -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.prompt = "changed"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.reference_images = ()  # type: ignore[misc]


@settings(max_examples=50, deadline=None)
@given(valid_requests)
def test_equal_requests_are_equal_and_hash_alike(request: kx.ImageRequest) -> None:
    twin = attrs.evolve(request, reference_images=list(request.reference_images))
    assert twin == request
    assert hash(twin) == hash(request)
    assert len({request, twin}) == 1


def test_requests_differing_in_one_field_are_not_equal() -> None:
    request = kx.ImageRequest("a red fox")
    assert request != attrs.evolve(request, generate_count=2)
    assert request != attrs.evolve(request, prompt="a blue fox")


def test_evolve_validates_the_new_value() -> None:
    with pytest.raises(kx.InvalidRequestError) as caught:
        attrs.evolve(kx.ImageRequest("a"), generate_count=9)
    assert caught.value.field == "generate_count"


# --- ImageResult / TaskSnapshot ---------------------------------------------------------------


def test_image_result_raw_is_read_only_copy_and_excluded_from_equality() -> None:
    source = {"task_id": "t1", "extra": 1}
    request = kx.ImageRequest("x")
    result = kx.ImageResult(
        task_id="t1", image_url="https://i/1.png", request=request, index=0, raw=source
    )
    source["extra"] = 2
    assert result.raw["extra"] == 1
    with pytest.raises(TypeError):
        result.raw["extra"] = 3  # type: ignore[index]
    twin = kx.ImageResult(
        task_id="t1", image_url="https://i/1.png", request=request, index=0, raw={"other": True}
    )
    assert twin == result
    assert hash(twin) == hash(result)
    assert result.status == "SUCCEEDED"
    assert result.task_type == "image_generate"


def test_image_results_differing_in_url_or_index_are_not_equal() -> None:
    request = kx.ImageRequest("x")
    one = kx.ImageResult(task_id="t1", image_url="https://i/1.png", request=request, index=0)
    assert one != attrs.evolve(one, image_url="https://i/2.png")
    assert one != attrs.evolve(one, index=1)


def test_task_snapshot_raw_is_read_only_and_excluded_from_equality() -> None:
    snapshot = kx.TaskSnapshot(task_id="t1", status="GENERATING", raw={"a": 1})
    with pytest.raises(TypeError):
        snapshot.raw["a"] = 2  # type: ignore[index]
    assert snapshot == kx.TaskSnapshot(task_id="t1", status="GENERATING", raw={"b": 2})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        snapshot.status = "SUCCEEDED"  # type: ignore[misc]


@pytest.mark.parametrize("status", ["GENERATING", "PENDING", "PROCESSING"])
def test_snapshot_with_unfinished_status_is_not_done(status: str) -> None:
    assert not kx.TaskSnapshot(task_id="t", status=status).done
    assert not CallbackPayload(task_id="t", status=status).done


@pytest.mark.parametrize("status", ["SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "generating"])
def test_snapshot_with_finished_or_unknown_status_is_done(status: str) -> None:
    assert kx.TaskSnapshot(task_id="t", status=status).done
    assert is_finished(status)


@given(st.text().filter(lambda s: s not in {"GENERATING", "PENDING", "PROCESSING"}))
def test_any_status_but_the_three_unfinished_ones_is_done(status: str) -> None:
    assert kx.TaskSnapshot(task_id="t", status=status).done


# --- CallbackOutcome ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "text"),
    [
        (kx.CallbackOutcome.RESOLVED, "resolved"),
        (kx.CallbackOutcome.BUFFERED, "buffered"),
        (kx.CallbackOutcome.DUPLICATE, "duplicate"),
        (kx.CallbackOutcome.PROGRESS, "progress"),
    ],
)
def test_callback_outcome_reads_as_its_value(outcome: kx.CallbackOutcome, text: str) -> None:
    assert str(outcome) == text
    assert f"{outcome}" == text
    assert outcome == text
    assert kx.CallbackOutcome(text) is outcome


# --- the hot path's builders make the very objects the classes make ---------------------------

_TEXT = st.text(max_size=12)


@settings(max_examples=200)
@given(_TEXT, _TEXT, _TEXT, _TEXT, _TEXT, st.integers(), _TEXT, st.dictionaries(_TEXT, _TEXT))
def test_make_callback_payload_builds_what_the_class_builds(  # noqa: PLR0917
    task_id: str,
    status: str,
    image_url: str,
    error_message: str,
    task_type: str,
    code: int,
    msg: str,
    raw: dict[str, str],
) -> None:
    values = (task_id, status, image_url, error_message, task_type, code, msg)
    built = make_callback_payload(*values, MappingProxyType(raw))
    expected = CallbackPayload(*values, raw)
    assert type(built) is CallbackPayload
    # Every field, raw included (eq=False on it, so compare it apart).
    assert attrs.astuple(built, recurse=False) == attrs.astuple(expected, recurse=False)
    assert built == expected
    assert hash(built) == hash(expected)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.status = "other"  # type: ignore[misc]


@settings(max_examples=200)
@given(_TEXT, _TEXT, st.integers(0, 9), _TEXT, _TEXT, st.dictionaries(_TEXT, _TEXT))
def test_make_image_result_builds_what_the_class_builds(  # noqa: PLR0917
    task_id: str, image_url: str, index: int, status: str, task_type: str, raw: dict[str, str]
) -> None:
    request = kx.ImageRequest("a lighthouse")
    frozen = MappingProxyType(raw)
    built = make_image_result(task_id, image_url, request, index, status, task_type, frozen)
    expected = kx.ImageResult(task_id, image_url, request, index, status, task_type, frozen)
    assert type(built) is kx.ImageResult
    assert attrs.astuple(built, recurse=False) == attrs.astuple(expected, recurse=False)
    assert built == expected
    assert repr(built) == repr(expected)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.image_url = "other"  # type: ignore[misc]


# --- text the SDK cannot send is refused where it enters -----------------------------------------


@settings(max_examples=100)
@given(
    st.text(min_size=0, max_size=20),
    st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]),
    st.text(min_size=0, max_size=20),
)
def test_a_lone_surrogate_in_any_text_field_names_the_field(
    before: str, lone: str, after: str
) -> None:
    assume(len(before) + len(after) < 900)
    with pytest.raises(kx.InvalidRequestError, match="lone surrogate") as caught:
        kx.ImageRequest(before + lone + after)
    assert caught.value.field == "prompt"
    url = f"https://img.test/{lone}.png"
    with pytest.raises(kx.InvalidRequestError, match="lone surrogate") as caught:
        kx.ImageRequest("ok", reference_images=["https://img.test/a.png", url])
    assert caught.value.field == "reference_images[1]"
    with pytest.raises(kx.InvalidRequestError, match="lone surrogate") as caught:
        kx.ImageRequest("ok", callback_url=f"https://app.test/cb?{lone}")
    assert caught.value.field == "callback_url"


def test_any_other_unicode_is_kept_as_given() -> None:
    prompt = "un renard \u00e9carlate \U0001f98a \u72d0\u72f8"
    assert kx.ImageRequest(prompt).prompt == prompt
