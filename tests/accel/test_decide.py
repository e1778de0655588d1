"""The accelerator's serve-or-fall-back decisions (kura.accel.decide), as pure functions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kura.accel import reasons
from kura.accel.classify import Candidate
from kura.accel.decide import Fallback, Serve, admit, decide, is_file_backed
from kura.accel.head import parse_head
from kura.domain.artifacts import Manifest, Target
from kura.web.routing import RouteSpec

SPEC = RouteSpec("xcode_cas_get", "/api/cache/cas/{id}", accelerable=True)


def candidate(*headers: str) -> Candidate:
    raw = "GET /api/cache/cas/a?tenant_id=default HTTP/1.1\r\nHost: k\r\n"
    raw += "".join(f"{line}\r\n" for line in headers) + "\r\n"
    head = parse_head(raw.encode("latin-1"))
    assert head is not None
    return Candidate(head, SPEC, {"id": "a"}, Target(), {"tenant_id": ["default"]}, "a1")


def manifest(*, size: int = 100, inline: bool = False, blob: str | None = "ab/a1-x") -> Manifest:
    return Manifest(
        artifact_id="a1",
        producer="xcode",
        namespace_id="",
        key="a",
        content_type="application/octet-stream",
        inline=inline,
        blob_path=None if inline else blob,
        size=size,
        version_ms=7,
        created_at_ms=7,
    )


def opened(size: int = 100) -> SimpleNamespace:
    return SimpleNamespace(size=size)


def test_a_request_is_admitted_unless_draining_or_saturated() -> None:
    """Draining wins over saturation; with a permit free and no drain, the look-up goes on."""
    assert admit(draining=False, permits_free=True) is None
    assert admit(draining=True, permits_free=True) == Fallback(reasons.DRAINING)
    assert admit(draining=True, permits_free=False) == Fallback(reasons.DRAINING)
    assert admit(draining=False, permits_free=False) == Fallback(reasons.SATURATED)


def test_a_whole_file_is_served_with_twisted_webs_head() -> None:
    """An intact file-backed artifact is served whole: 200, its length, ranges, ETag."""
    decision = decide(candidate(), manifest(), opened())
    assert isinstance(decision, Serve)
    response = decision.response
    assert response.status == 200
    assert dict(response.headers) == {
        b"Content-Type": b"application/octet-stream",
        b"Content-Length": b"100",
        b"Accept-Ranges": b"bytes",
        b"ETag": b'"7-100"',
    }
    assert (response.body.offset, response.body.length) == (0, 100)


def test_a_satisfiable_range_is_served_partially() -> None:
    """A single satisfiable range is a 206 of exactly that slice."""
    decision = decide(candidate("Range: bytes=10-19"), manifest(), opened())
    assert isinstance(decision, Serve)
    response = decision.response
    assert response.status == 206
    assert dict(response.headers)[b"Content-Range"] == b"bytes 10-19/100"
    assert (response.body.offset, response.body.length) == (10, 10)


def test_a_range_with_a_stale_if_range_is_served_whole() -> None:
    """If-Range naming another version turns the range into the whole artifact."""
    decision = decide(candidate("Range: bytes=10-19", 'If-Range: "6-100"'), manifest(), opened())
    assert isinstance(decision, Serve) and decision.response.status == 200


@pytest.mark.parametrize(
    ("found", "lease", "reason"),
    [
        (None, None, reasons.MISS),
        (manifest(inline=True), None, reasons.INLINE),
        (manifest(blob=None), None, reasons.INLINE),
        (manifest(), None, reasons.OPEN),
        (manifest(size=100), opened(size=60), reasons.RANGE_OR_DAMAGE),
    ],
    ids=["miss", "inline", "no-file", "open-failed", "damaged"],
)
def test_what_cannot_be_served_here_falls_back_with_its_reason(
    found: Manifest | None, lease: SimpleNamespace | None, reason: str
) -> None:
    """A miss, an inline value, a file that would not open and a damaged file fall back."""
    assert decide(candidate(), found, lease) == Fallback(reason)


def test_an_unsatisfiable_range_falls_back_so_twisted_web_answers_416() -> None:
    """A range past the end is twisted.web's 416 (after authorization), never served here."""
    decision = decide(candidate("Range: bytes=500-"), manifest(), opened())
    assert decision == Fallback(reasons.RANGE_OR_DAMAGE)


def test_only_file_backed_manifests_have_a_file_to_open() -> None:
    """A missing or inline artifact is never opened."""
    assert is_file_backed(manifest())
    assert not is_file_backed(None)
    assert not is_file_backed(manifest(inline=True))


def test_every_reason_is_a_distinct_label() -> None:
    """The fallback labels are unique (each one a kura_accelerator_fallbacks_total series)."""
    assert len(set(reasons.ALL)) == len(reasons.ALL) == 16
