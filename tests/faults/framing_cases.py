"""Header bombs and request-smuggling shapes, each carrying an embedded second request.

Every case is built so that the embedded
request (:func:`embedded`, a GET of a marker id on the CAS route) is
dispatched *only* by a server that frames the bytes wrongly: where a lenient
reading exists that is still one request, the declared length swallows the
embedded request as body. The outer request never uses the CAS route, so any
count on ``/api/cache/cas/{id}`` means the embedded request got through.
"""

from __future__ import annotations

import attrs

#: The outer request's artifact; tests store it so clean GETs are accelerable.
PRESENT = "/api/cache/gradle/present?tenant_id=default"
HOST = b"Host: kura"


def embedded(marker: str) -> bytes:
    """The request a desync would dispatch: a GET of ``marker`` on the CAS route."""
    return f"GET /api/cache/cas/{marker}?tenant_id=default HTTP/1.1\r\nHost: kura\r\n\r\n".encode()


@attrs.frozen
class Case:
    """One attack: ``data`` is everything the client sends on a fresh connection."""

    name: str
    data: bytes


def _head(request_line: bytes, *headers: bytes, end: bytes = b"\r\n") -> bytes:
    return b"".join(line + end for line in (request_line, *headers)) + end


def _get(*headers: bytes) -> bytes:
    return _head(b"GET " + PRESENT.encode() + b" HTTP/1.1", HOST, *headers)


def _put(key: str, *headers: bytes) -> bytes:
    line = f"PUT /api/cache/gradle/{key}?tenant_id=default HTTP/1.1".encode()
    return _head(line, HOST, *headers)


def _cl(tail: bytes) -> bytes:
    """A Content-Length that makes ``tail`` (embedded request included) one body."""
    return b"Content-Length: %d" % len(tail)


def cases(marker: str) -> list[Case]:
    """Every framing case, each ending with (or hiding) the embedded request."""
    smuggled = embedded(marker)
    after_last_chunk = b"0\r\n\r\n" + smuggled
    chunk_of_it = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    return [
        # -- CL.TE and TE.CL: both framings present ---------------------------------
        Case(
            "CL.TE",
            _put("s1", _cl(after_last_chunk), b"Transfer-Encoding: chunked") + after_last_chunk,
        ),
        Case(
            "TE.CL", _put("s2", b"Transfer-Encoding: chunked", b"Content-Length: 4") + chunk_of_it
        ),
        Case(
            "CL.TE on a GET",
            _get(_cl(after_last_chunk), b"Transfer-Encoding: chunked") + after_last_chunk,
        ),
        # -- TE.TE: obfuscated Transfer-Encoding next to a covering length ------------
        Case(
            "TE xchunked",
            _put("s3", _cl(after_last_chunk), b"Transfer-Encoding: xchunked") + after_last_chunk,
        ),
        Case(
            "TE chunked, identity",
            _put("s4", _cl(after_last_chunk), b"Transfer-Encoding: chunked, identity")
            + after_last_chunk,
        ),
        Case(
            "TE twice",
            _put("s5", b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity")
            + after_last_chunk,
        ),
        Case(
            "TE space before colon",
            _put("s6", _cl(after_last_chunk), b"Transfer-Encoding : chunked") + after_last_chunk,
        ),
        Case(
            "TE identity with length",
            _put("s7", b"Transfer-Encoding: identity", _cl(smuggled)) + smuggled,
        ),
        Case(
            "chunk size in hex notation",
            _put("s8", b"Transfer-Encoding: chunked") + b"0x5\r\nhello\r\n0\r\n\r\n" + smuggled,
        ),
        Case(
            "chunk extension with LF",
            _put("s9", b"Transfer-Encoding: chunked")
            + b"5;ext\nx\r\nhello\r\n0\r\n\r\n"
            + smuggled,
        ),
        # -- Content-Length variants ---------------------------------------------------
        Case("CL twice, differing", _put("c1", _cl(smuggled), b"Content-Length: 0") + smuggled),
        Case("CL twice, equal", _put("c2", _cl(smuggled), _cl(smuggled)) + smuggled),
        Case("CL signed", _put("c3", b"Content-Length: +%d" % len(smuggled)) + smuggled),
        Case(
            "CL list",
            _put("c4", b"Content-Length: %d, %d" % (len(smuggled), len(smuggled))) + smuggled,
        ),
        Case("CL hex", _put("c5", b"Content-Length: 0x%x" % len(smuggled)) + smuggled),
        Case(
            "CL space before colon", _put("c6", b"Content-Length : %d" % len(smuggled)) + smuggled
        ),
        Case("CL 10^23 on a GET", _get(b"Content-Length: " + b"1" + b"0" * 23) + smuggled),
        Case("CL on a GET covering the rest", _get(_cl(smuggled)) + smuggled),
        # -- obs-fold ----------------------------------------------------------------
        Case(
            "obs-fold carries CL", _put("f1", b"Content-Length:", b" %d" % len(smuggled)) + smuggled
        ),
        Case(
            "obs-fold carries TE",
            _put("f2", _cl(after_last_chunk), b"X-Pad: a", b" Transfer-Encoding: chunked")
            + after_last_chunk,
        ),
        # -- line endings and control bytes ---------------------------------------------
        Case(
            "bare LF line endings",
            _head(b"GET " + PRESENT.encode() + b" HTTP/1.1", HOST, end=b"\n") + smuggled,
        ),
        Case("bare LF inside a value", _put("l1", b"X-Foo: x\n" + _cl(smuggled)) + smuggled),
        Case("bare CR inside a value", _put("l2", b"X-Foo: x\r" + _cl(smuggled)) + smuggled),
        Case("NUL in a value", _get(b"X-Foo: a\x00b") + smuggled),
        Case(
            "NUL in the target",
            b"GET /api/cache/gradle/pre\x00sent?tenant_id=default "
            b"HTTP/1.1\r\nHost: kura\r\n\r\n" + smuggled,
        ),
        Case("leading empty line", b"\r\n" + _get(_cl(smuggled)) + smuggled),
        Case(
            "absolute-form target",
            _head(b"GET http://kura" + PRESENT.encode() + b" HTTP/1.1", HOST, _cl(smuggled))
            + smuggled,
        ),
        Case(
            "HTTP/1.0 keep-alive with a body",
            _head(
                b"GET " + PRESENT.encode() + b" HTTP/1.0", b"Connection: keep-alive", _cl(smuggled)
            )
            + smuggled,
        ),
        Case(
            "lower-case method with a body",
            _head(b"get " + PRESENT.encode() + b" HTTP/1.1", HOST, _cl(smuggled)) + smuggled,
        ),
        # -- header bombs (C7) -------------------------------------------------------------
        Case("501 headers", _get(*(b"X-H%d: v" % i for i in range(500))) + smuggled),
        Case("16385 header bytes", _exactly(16385) + smuggled),
        Case("64 KiB header line", _get(b"X-Big: " + b"b" * 65536) + smuggled),
        Case(
            "20 KiB request line",
            _head(b"GET /api/cache/gradle/" + b"r" * 20480 + b"?tenant_id=default HTTP/1.1", HOST)
            + smuggled,
        ),
    ]


def _exactly(total: int) -> bytes:
    """A GET head whose line lengths (CRLFs excluded, as twisted counts) sum to ``total``."""
    base = _get(b"X-Pad: ")
    used = sum(len(line) for line in base.split(b"\r\n"))
    return _get(b"X-Pad: " + b"p" * (total - used))
