"""Callback tokens: issuing, verifying, rotating, and where they sit in the URL."""

from __future__ import annotations

import string
from urllib.parse import urlsplit, urlunsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keevx_async._tokens import (
    TOKEN_PARAM,
    CallbackSigner,
    attach_token,
    token_from_target,
    token_from_url,
)

_URLSAFE = string.ascii_letters + string.digits + "-_"

# --- issue / verify --------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["s3cret", b"s3cret", ["s3cret"], None])
def test_issued_token_verifies_to_its_submission_id(
    secret: str | bytes | list[str] | None,
) -> None:
    signer = CallbackSigner(secret)
    submission_id, token = signer.issue()
    assert token.startswith(f"{submission_id}.")
    assert signer.verify(token) == submission_id


def test_every_issue_gives_a_fresh_submission_and_token() -> None:
    signer = CallbackSigner("s3cret")
    issued = [signer.issue() for _ in range(50)]
    assert len({sid for sid, _ in issued}) == 50
    assert len({token for _, token in issued}) == 50


def test_token_characters_are_url_safe() -> None:
    _, token = CallbackSigner("s3cret").issue()
    assert set(token) <= set(_URLSAFE + ".")


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_single_changed_character_is_refused(data: st.DataObject) -> None:
    signer = CallbackSigner("s3cret")
    _, token = signer.issue()  # random: what is drawn below must not depend on it
    position = data.draw(st.integers(0, len(token) - 1), label="position")
    # Another printable character, chosen as a shift from the token's own, so that the
    # draw replays the same whatever the token (a filter on the token would not).
    shift = data.draw(st.integers(1, len(string.printable) - 1), label="shift")
    original = string.printable.index(token[position])
    replacement = string.printable[(original + shift) % len(string.printable)]
    assert replacement != token[position]
    tampered = token[:position] + replacement + token[position + 1 :]
    assert signer.verify(tampered) is None


@given(st.text(max_size=60))
def test_arbitrary_strings_are_refused(text: str) -> None:
    assert CallbackSigner("s3cret").verify(text) is None


@pytest.mark.parametrize("token", ["", None, "nodot", ".mac", "sid.", "."])
def test_empty_missing_or_dotless_token_is_refused(token: str | None) -> None:
    assert CallbackSigner("s3cret").verify(token) is None


@pytest.mark.parametrize("token", ["s\u00efd.mac", "sid.\u00e9", "sid.mac\u2603"])
def test_non_ascii_token_is_refused_not_an_error(token: str) -> None:
    # Query values are percent-decoded, so anyone can send these to the callback URL.
    assert CallbackSigner("s3cret").verify(token) is None


def test_truncated_or_extended_token_is_refused() -> None:
    signer = CallbackSigner("s3cret")
    _, token = signer.issue()
    assert signer.verify(token[:-1]) is None
    assert signer.verify(token + "A") is None
    assert signer.verify(token + ".x") is None


def test_token_of_another_secret_is_refused() -> None:
    _, token = CallbackSigner("secret-a").issue()
    assert CallbackSigner("secret-b").verify(token) is None


def test_random_secret_signers_do_not_accept_each_others_tokens() -> None:
    _, token = CallbackSigner(None).issue()
    assert CallbackSigner(None).verify(token) is None


def test_str_and_bytes_secrets_are_the_same_key() -> None:
    _, token = CallbackSigner("s3cret").issue()
    assert CallbackSigner(b"s3cret").verify(token) is not None


# --- rotation --------------------------------------------------------------------------------


def test_rotated_signer_verifies_tokens_issued_under_the_old_secret() -> None:
    old_sid, old_token = CallbackSigner("old").issue()
    rotated = CallbackSigner(["new", "old"])
    assert rotated.verify(old_token) == old_sid


def test_rotated_signer_issues_under_the_new_secret() -> None:
    sid, token = CallbackSigner(["new", "old"]).issue()
    assert CallbackSigner("new").verify(token) == sid
    assert CallbackSigner("old").verify(token) is None


def test_retired_secret_no_longer_verifies() -> None:
    _, token = CallbackSigner("old").issue()
    assert CallbackSigner(["new"]).verify(token) is None


@pytest.mark.parametrize("secret", ["", b"", [], ["new", ""], [b""]])
def test_empty_secret_or_empty_list_is_refused(secret: str | bytes | list[str | bytes]) -> None:
    with pytest.raises(ValueError, match="callback_secret"):
        CallbackSigner(secret)


# --- placement: query --------------------------------------------------------------------------

_QUERY_PART = st.text(alphabet=_URLSAFE + "%.~", min_size=1, max_size=10)


@given(
    path=st.sampled_from(["", "/", "/cb", "/hooks/keevx/", "/a.b/c"]),
    pairs=st.lists(st.tuples(_QUERY_PART, _QUERY_PART), max_size=4),
)
def test_query_token_keeps_the_users_query_exactly_and_is_found_again(
    path: str, pairs: list[tuple[str, str]]
) -> None:
    _, token = CallbackSigner("s3cret").issue()
    query = "&".join(f"{k}={v}" for k, v in pairs)
    url = f"https://app.test{path}" + (f"?{query}" if query else "")
    with_token = attach_token(url, token, "query")
    parts = urlsplit(with_token)
    assert parts.path == path
    if query:
        assert parts.query == f"{query}&{TOKEN_PARAM}={token}"
    else:
        assert parts.query == f"{TOKEN_PARAM}={token}"
    assert token_from_url(with_token) == token


def test_query_token_keeps_the_fragment() -> None:
    url = attach_token("https://app.test/cb?a=1#frag", "sid.mac", "query")
    assert url == f"https://app.test/cb?a=1&{TOKEN_PARAM}=sid.mac#frag"


def test_our_token_wins_over_a_user_parameter_of_the_same_name() -> None:
    url = attach_token(f"https://app.test/cb?{TOKEN_PARAM}=theirs", "sid.mac", "query")
    assert token_from_url(url) == "sid.mac"


# --- placement: path -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://app.test/cb", "https://app.test/cb/sid.mac"),
        ("https://app.test/cb/", "https://app.test/cb/sid.mac"),
        ("https://app.test", "https://app.test/sid.mac"),
        ("https://app.test/", "https://app.test/sid.mac"),
        ("https://app.test/cb?a=1&b=2", "https://app.test/cb/sid.mac?a=1&b=2"),
    ],
)
def test_path_token_is_the_last_segment(url: str, expected: str) -> None:
    with_token = attach_token(url, "sid.mac", "path")
    assert with_token == expected
    assert token_from_url(with_token) == "sid.mac"


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["/cb", "/cb/", "/a/b/c", ""]))
def test_issued_token_in_path_verifies_after_extraction(path: str) -> None:
    signer = CallbackSigner("s3cret")
    sid, token = signer.issue()
    url = attach_token(f"https://app.test{path}", token, "path")
    assert signer.verify(token_from_url(url)) == sid


# --- extraction --------------------------------------------------------------------------------


def test_query_parameter_wins_over_the_path_segment() -> None:
    assert token_from_target("/cb/path-token", f"{TOKEN_PARAM}=query-token") == "query-token"


def test_path_segment_is_used_when_the_query_has_no_token() -> None:
    assert token_from_target("/cb/path-token/", "a=1&b=2") == "path-token"


def test_last_of_repeated_query_tokens_wins() -> None:
    assert token_from_target("/cb", f"{TOKEN_PARAM}=first&{TOKEN_PARAM}=second") == "second"


@pytest.mark.parametrize("path", ["", "/", "///"])
def test_no_token_anywhere_gives_none(path: str) -> None:
    assert token_from_target(path, "") is None


def test_token_from_an_unparseable_url_is_none() -> None:
    assert token_from_url("https://[::1/cb") is None


# --- the fast read of a URL agrees with the full parse ---------------------------------------


def _parsed_token(url: str) -> str | None:
    """What token_from_url answered before it had a fast path: the full parse, always."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return token_from_target(parts.path, parts.query)


# Pieces that make the fast path's guard matter: other parameters named like ours, percent
# escapes, fragments, brackets, control and non-ASCII characters, a token in the path.
_URL_PIECES = st.sampled_from(
    [
        "https://app.test",
        "https://[::1]",
        "https://[::1",
        "/cb",
        "/",
        "/sid.mac",
        "?",
        "&",
        "#frag",
        "%5F",
        "+",
        "\t",
        "é",
        "a=1",
        f"{TOKEN_PARAM}=",
        f"x{TOKEN_PARAM}=",
        "keevx%5Ftoken=",
        "sid.mac",
        "Zm9v-_.bar",
        " ",
    ]
)


@settings(max_examples=500)
@given(st.lists(_URL_PIECES, max_size=8).map("".join))
def test_token_from_url_agrees_with_the_full_parse(url: str) -> None:
    assert token_from_url(url) == _parsed_token(url)


@pytest.mark.parametrize(
    "url",
    [
        f"https://app.test/cb?a=1&{TOKEN_PARAM}=sid.mac",
        f"https://app.test/cb?{TOKEN_PARAM}=sid.mac",
        f"https://app.test/cb/a&{TOKEN_PARAM}=sid.mac",  # no query at all: the path's
        f"https://app.test/cb#x?{TOKEN_PARAM}=sid.mac",  # in the fragment
        f"https://[::1/cb?{TOKEN_PARAM}=sid.mac",  # unparseable
        f"https://app.test/cb?{TOKEN_PARAM}=sid.mac&keevx%5Ftoken=other",
        f"https://app.test/cb?{TOKEN_PARAM}=sid%2Emac",
        f"https://app.tést/cb?{TOKEN_PARAM}=sid.mac",
    ],
)
def test_token_from_url_reads_odd_urls_like_the_full_parse(url: str) -> None:
    assert token_from_url(url) == _parsed_token(url)


# --- the cache of verified MACs ----------------------------------------------------------------


def test_token_of_another_process_verifies_once_then_from_the_cache() -> None:
    sid, token = CallbackSigner("shared").issue()
    receiver = CallbackSigner("shared")
    assert sid not in receiver._macs
    assert receiver.verify(token) == sid
    assert sid in receiver._macs
    assert receiver.verify(token) == sid


def test_cached_submission_with_a_wrong_mac_is_refused() -> None:
    signer = CallbackSigner("s3cret")
    sid, token = signer.issue()
    assert sid in signer._macs
    forged = f"{sid}.{'A' * 22}"
    assert forged != token
    assert signer.verify(forged) is None
    # A forgery does not displace the real MAC.
    assert signer.verify(token) == sid


def test_cache_never_lends_a_submission_id_to_another_token() -> None:
    signer = CallbackSigner("s3cret")
    sid_a, token_a = signer.issue()
    sid_b, token_b = signer.issue()
    mac_a = token_a.partition(".")[2]
    # Submission B's ID with submission A's (cached, valid) MAC is no token at all.
    assert signer.verify(f"{sid_b}.{mac_a}") is None
    assert signer.verify(token_a) == sid_a
    assert signer.verify(token_b) == sid_b


def test_cache_holds_at_most_cache_size_submissions_oldest_out_first() -> None:
    signer = CallbackSigner("s3cret", cache_size=2)
    issued = [signer.issue() for _ in range(5)]
    assert list(signer._macs) == [issued[3][0], issued[4][0]]
    # Evicted or not, every token still verifies (the evicted ones by HMAC).
    for sid, token in issued:
        assert signer.verify(token) == sid
        assert len(signer._macs) <= 2


def test_cache_can_be_turned_off() -> None:
    signer = CallbackSigner("s3cret", cache_size=0)
    sid, token = signer.issue()
    assert signer.verify(token) == sid
    assert not signer._macs


def test_negative_cache_size_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        CallbackSigner("s3cret", cache_size=-1)


def test_rotated_out_secret_is_not_served_from_the_cache_of_another_signer() -> None:
    old_sid, old_token = CallbackSigner("old").issue()
    rotated = CallbackSigner(["new", "old"])
    assert rotated.verify(old_token) == old_sid
    assert CallbackSigner(["new"]).verify(old_token) is None


@pytest.mark.parametrize("secret", [[b"ok", 4.5], ["ok", None]])
def test_secret_of_another_type_is_a_type_error(secret: object) -> None:
    with pytest.raises(TypeError, match="str or bytes"):
        CallbackSigner(secret)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "https://app.example.test/keevx/callback",
        "https://app.example.test",
        "https://app.example.test/",
        "http://127.0.0.1:8080/cb/",
        "https://app.example.test/callback?tenant=7",
        "https://app.example.test/callback#frag",
        "https://[::1]:8443/cb",
    ],
)
def test_attach_token_in_query_matches_the_full_split_and_join(url: str) -> None:
    parts = urlsplit(url)
    query = f"{parts.query}&keevx_token=sid.mac" if parts.query else "keevx_token=sid.mac"
    assert attach_token(url, "sid.mac", "query") == urlunsplit(parts._replace(query=query))
    assert token_from_url(attach_token(url, "sid.mac", "query")) == "sid.mac"
