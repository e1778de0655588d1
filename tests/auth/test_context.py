"""The hook context: header and query maps, bearer tokens."""

from __future__ import annotations

import pytest

from kura.auth import HookContext, header_map
from tests.auth.support import context


def test_header_map_lowercases_and_joins_repeats() -> None:
    """Names are lower-cased, bytes decoded as latin-1, repeated headers joined with ', '."""
    headers = header_map([(b"Authorization", b"Bearer a"), ("AUTHORIZATION", "Bearer b")])
    assert headers == {"authorization": "Bearer a, Bearer b"}
    raw: dict[str | bytes, str | bytes | list[str | bytes]] = {
        "X-Api-Key": ["k1"],
        b"Cookie": b"\xe9",
    }
    assert header_map(raw) == {
        "x-api-key": "k1",
        "cookie": "\xe9",
    }


def test_context_maps_are_read_only() -> None:
    """A hook cannot alter the headers or query it was given."""
    ctx = context(query={"a": "1"})
    with pytest.raises(TypeError):
        ctx.headers["authorization"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        ctx.query["a"] = "2"  # type: ignore[index]


def test_with_status_sets_only_the_status() -> None:
    """with_status returns a copy carrying the response status."""
    ctx = context()
    answered = ctx.with_status(200)
    assert answered.status_code == 200
    assert ctx.status_code is None
    assert answered.headers == ctx.headers


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc.def-ghi_jkl~+/==", "abc.def-ghi_jkl~+/=="),
        ("bearer  tok", "tok"),
        ("Bearer ", None),
        ("Bearer", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer t\xe9", None),
        ("Bearer a, Bearer b", None),
        ("Bearer a\x00b", None),
        ("tok", None),
    ],
)
def test_bearer_token_accepts_only_well_formed_tokens(value: str, token: str | None) -> None:
    """Missing, empty, other-scheme, non-ASCII or doubled credentials give no token."""
    assert context(headers={"Authorization": value}).bearer_token() == token


def test_missing_authorization_gives_no_token() -> None:
    """Without an Authorization header there is no bearer token."""
    ctx = HookContext(route="/v1/cache/{hash}", method="GET", server_tenant_id="acme")
    assert ctx.bearer_token() is None
    assert ctx.header("Authorization") is None
    assert ctx.operation == "request"
