"""The built-in authorizers: read/write tokens, and open mode."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from kura.auth import AccessConfig, OpenAccess, Principal, TokenAccess
from kura.auth.builtin import CHALLENGE, presented_token
from kura.config.access import Scope, parse_token
from kura.domain.errors import Forbidden, Unauthorized
from kura.testing import failed, succeeded
from tests.auth.support import context, run

WRITE = "ci-write-token-0123456789"
READ = "dev-read-token-0123456789"


def tokens(**rules: Any) -> TokenAccess:
    return TokenAccess(
        AccessConfig(
            tokens=(parse_token(WRITE, Scope.WRITE, "ci"), parse_token(READ, Scope.READ)),
            **rules,
        )
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def basic(value: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(value.encode()).decode()}


READ_CTX: dict[str, Any] = {}
WRITE_CTX = {"method": "PUT", "operation": "artifact.write"}
CLEAN_CTX = {"method": "DELETE", "operation": "namespace.delete", "artifact_key": None}


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        (bearer("abc"), "abc"),
        (basic("gradle:abc"), "abc"),
        (basic(":abc"), "abc"),
        (basic("gradle"), None),
        (basic("gradle:"), None),
        ({"authorization": "Basic !!!"}, None),
        ({"authorization": "Digest abc"}, None),
        ({}, None),
    ],
)
def test_tokens_come_from_bearer_or_the_basic_password(
    headers: dict[str, str], token: str | None
) -> None:
    """Bearer tokens and Basic passwords are tokens; anything malformed is none."""
    assert presented_token(context(headers=headers)) == token


def test_a_write_token_does_everything_a_read_token_only_reads() -> None:
    """Write tokens read, write and clean; read tokens read and are refused the rest."""
    access = tokens()
    caller = succeeded(run(access.check, context(headers=bearer(WRITE), **CLEAN_CTX)))
    assert caller == Principal("ci", "token", {"scope": "write"})
    assert isinstance(succeeded(run(access.check, context(headers=bearer(READ)))), Principal)
    for fields in (WRITE_CTX, CLEAN_CTX):
        error = failed(run(access.check, context(headers=bearer(READ), **fields)))
        assert isinstance(error, Forbidden)
        assert "may only read" in error.message


def test_no_token_or_an_unknown_one_is_401_with_a_challenge() -> None:
    """Missing and unknown tokens are refused; the answer invites Bearer or Basic."""
    access = tokens()
    for headers in ({}, bearer("somebody-elses-token-xyz"), basic("u:wrong-token-123456")):
        error = failed(run(access.check, context(headers=headers)))
        assert isinstance(error, Unauthorized)
        assert error.challenge == CHALLENGE


def test_anonymous_reads_skip_the_check_but_not_for_writes() -> None:
    """With anonymous reads on, reads are not even checked; writes still need a token."""
    access = tokens(anonymous_read=True)
    assert not access.checks("artifact.read")
    assert access.checks("artifact.write") and access.checks("namespace.delete")
    anonymous = context(headers={})
    assert succeeded(run(access.check, anonymous)).__class__.__name__ == "Anonymous"
    assert isinstance(failed(run(access.check, context(headers={}, **WRITE_CTX))), Unauthorized)
    assert tokens().checks("artifact.read")


def test_request_operations_are_reads_when_their_method_is() -> None:
    """A status GET or a WebDAV PROPFIND is a read; an events POST is a write."""
    access = tokens()
    for method in ("GET", "PROPFIND"):
        ctx = context(headers=bearer(READ), operation="request", method=method)
        assert isinstance(succeeded(run(access.check, ctx)), Principal)
    ctx = context(headers=bearer(READ), operation="request", method="POST")
    assert isinstance(failed(run(access.check, ctx)), Forbidden)


def test_open_mode_checks_only_destructive_operations() -> None:
    """Open mode builds no context for reads and writes, and refuses anonymous wipes."""
    access = OpenAccess()
    assert access.mode == "open"
    assert not access.checks("artifact.read") and not access.checks("artifact.write")
    assert access.checks("namespace.delete") and access.checks("artifact.delete")
    error = failed(run(access.check, context(**CLEAN_CTX)))
    assert isinstance(error, Forbidden) and "KURA_ALLOW_ANONYMOUS_DELETE" in error.message
    allowed = OpenAccess(allow_anonymous_delete=True)
    assert not allowed.checks("namespace.delete")
    assert succeeded(run(allowed.check, context(**CLEAN_CTX))).__class__.__name__ == "Anonymous"


def test_built_in_authorizers_add_no_headers_and_hold_no_cache() -> None:
    """Only extensions add response headers or keep results to drop under pressure."""
    for access in (tokens(), OpenAccess()):
        assert succeeded(run(access.response_headers, context(status_code=200), None)) == []
        assert access.clear_caches() == 0
        assert succeeded(access.close()) is None
