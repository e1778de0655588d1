"""The peer protocol's formats: encoding, strict parsing, page documents."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from kura.domain.artifacts import Producer
from kura.domain.errors import BadRequest
from kura.replication import wire


def decoded(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def test_everything_but_unreserved_characters_is_percent_encoded() -> None:
    """Query values keep A-Z a-z 0-9 - . _ ~ and encode the rest (space, +, /, &, UTF-8)."""
    assert wire.encode_query([("key", "a-b.c_d~e")]) == "key=a-b.c_d~e"
    assert wire.encode_query([("key", "a b+c/d&e=f")]) == "key=a%20b%2Bc%2Fd%26e%3Df"
    assert wire.encode_query([("key", "é")]) == "key=%C3%A9"


def test_upsert_messages_round_trip_through_a_url() -> None:
    """What the sender encodes is exactly what the receiver parses."""
    message = wire.UpsertMessage(
        Producer.MODULE, "", "builds/h+1/App=Name@2", "application/json; charset=utf-8", False, 17
    )
    url = wire.url("http://peer:7443", wire.REPLICATE_ARTIFACT_PATH, message.params())
    assert url.startswith("http://peer:7443/_internal/replicate/artifact?producer=module&")
    assert wire.UpsertMessage.parse(decoded(url)) == message


def test_delete_messages_round_trip() -> None:
    """Namespace deletes carry the namespace (possibly empty) and the version."""
    message = wire.DeleteMessage("", 99)
    url = wire.url("http://p:1", wire.REPLICATE_NAMESPACE_PATH, message.params())
    assert wire.DeleteMessage.parse(decoded(url)) == message


@pytest.mark.parametrize("limit", ["0", "-1", "x", "1e3", "99999999999999999999"])
def test_page_limits_must_be_positive_integers(limit: str) -> None:
    """``limit`` must parse as an integer above 0."""
    with pytest.raises(BadRequest):
        wire.PageRequest.parse({"limit": [limit]})


def test_page_limits_are_capped() -> None:
    """A huge page request is served at the cap; the default is 256."""
    assert wire.PageRequest.parse({"limit": ["100000"]}).limit == wire.MAX_PAGE_LIMIT
    assert wire.PageRequest.parse({}) == wire.PageRequest(256, None)


def test_last_page_has_no_cursor() -> None:
    """``next_after`` names the last item of a full page and is null otherwise."""
    assert wire.page_json("x", [1, 2], 2, "b") == {"x": [1, 2], "next_after": "b"}
    assert wire.page_json("x", [1], 2, "a") == {"x": [1], "next_after": None}


@pytest.mark.parametrize(
    "change",
    [
        {"size": True},
        {"size": -1},
        {"artifact_id": "ABC"},
        {"inline": "no"},
        {"version_ms": None},
    ],
)
def test_peer_manifests_are_parsed_strictly(change: dict[str, object]) -> None:
    """A manifest with a missing or mistyped field is refused."""
    data: dict[str, object] = {
        "artifact_id": "a" * 64,
        "producer": "gradle",
        "namespace_id": "",
        "key": "k",
        "content_type": "application/octet-stream",
        "inline": False,
        "size": 3,
        "version_ms": 5,
    }
    assert wire.PeerManifest.from_json(data).size == 3
    data.update(change)
    with pytest.raises(ValueError):
        wire.PeerManifest.from_json(data)


def test_target_labels_strip_scheme_and_path() -> None:
    """The metric label of a target is its host and port."""
    assert wire.target_label("https://10.0.0.2:7443") == "10.0.0.2:7443"
    assert wire.target_label("http://[fd00::1]:7443/") == "[fd00::1]:7443"


def test_urls_compare_without_case_or_trailing_slash() -> None:
    """Node URL identity ignores scheme/host case and a trailing slash."""
    assert wire.normalize_url("HTTP://Node-A:7443/") == wire.normalize_url("http://node-a:7443")
