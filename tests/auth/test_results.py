"""Typed hook results and the errors a deny becomes."""

from __future__ import annotations

import warnings

import pytest

from kura.auth import Allow, Anonymous, Deny, Headers, Principal, SignRequest
from kura.auth.results import deny_error
from kura.domain.errors import BadRequest, Forbidden, KuraError, ServiceUnavailable, Unauthorized


def test_principal_defaults_and_read_only_attributes() -> None:
    """A principal has kind 'subject' by default and attributes a hook cannot change later."""
    grants = {"projects": ["acme/ios"]}
    principal = Principal("user-1", attributes=grants)
    grants["projects"] = []
    assert principal.kind == "subject"
    assert principal.attributes["projects"] == ["acme/ios"]
    with pytest.raises(TypeError):
        principal.attributes["x"] = 1  # type: ignore[index]


@pytest.mark.parametrize("ttl", [-1, float("nan"), "60", True])
def test_bad_ttls_are_refused(ttl: object) -> None:
    """ttl_seconds must be a non-negative number."""
    with pytest.raises((TypeError, ValueError)):
        Allow(ttl_seconds=ttl)  # type: ignore[arg-type]


def test_headers_ttl_is_deprecated() -> None:
    """Headers(ttl_seconds=...) still builds (it is ignored) but warns, naming the caller."""
    with pytest.warns(DeprecationWarning, match="ttl_seconds") as caught:
        headers = Headers({"x-a": "b"}, ttl_seconds=60)
    assert headers.headers == {"x-a": "b"}
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Headers({"x-a": "b"})


@pytest.mark.parametrize("status", [200, 302, 600, "401", True])
def test_deny_needs_an_error_status(status: object) -> None:
    """A deny with a non-error status is itself an error (so a hook returning it fails closed)."""
    with pytest.raises(ValueError):
        Deny(status, "nope")  # type: ignore[arg-type]


def test_results_validate_their_types() -> None:
    """Ids, messages and sign requests are type-checked at construction."""
    with pytest.raises(TypeError):
        Principal(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Deny(401, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Headers({}, sign="x-sig")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SignRequest("x-sig", "primary", 42)  # type: ignore[arg-type]
    assert Anonymous(ttl_seconds=0).ttl_seconds == 0


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, Unauthorized), (403, Forbidden), (400, BadRequest), (503, ServiceUnavailable)],
)
def test_deny_maps_to_the_named_error(status: int, kind: type[KuraError]) -> None:
    """The usual deny statuses become their KuraError subclasses with the hook's message."""
    error = Deny(status, "why").to_error()
    assert isinstance(error, kind)
    assert (error.status, error.message) == (status, "why")


def test_deny_503_has_no_retry_after_and_other_statuses_keep_theirs() -> None:
    """A 503 deny carries no Retry-After; an unusual status is kept on a plain KuraError."""
    assert deny_error(503, "down").retry_after is None
    teapot = deny_error(429, "slow down")
    assert type(teapot) is KuraError
    assert teapot.status == 429
    assert KuraError.status == 500
