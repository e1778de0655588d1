"""Request heads for the accelerator's parser: typical servable GETs and smuggling attempts.

Each :class:`Case` says whether :func:`kura.accel.head.parse_head` serves it.
The malformed ones are the known request-smuggling shapes: CL.TE, TE.CL, TE.TE
obfuscations, duplicate/signed/list/hex Content-Length, obs-fold, bare LF/CR,
NUL/DEL/obs-text, absolute-form, a leading empty line, ``get``, HTTP/1.0 and
header bombs. Most of them carry an embedded second request (:data:`SMUGGLED`)
for another tenant, the request a desync would dispatch.
"""

from __future__ import annotations

import attrs

#: The request a smuggling attempt tries to get dispatched.
SMUGGLED = b"GET /api/cache/cas/victim?tenant_id=other HTTP/1.1\r\nHost: kura\r\n\r\n"

#: A well-formed request line for an artifact download.
REQUEST_LINE = b"GET /api/cache/cas/0123abcd?tenant_id=acme&namespace_id=ios HTTP/1.1"

HOST = b"Host: kura.example.com:4000"


@attrs.frozen
class Case:
    """One corpus entry: ``data`` starts at the first byte of a request."""

    name: str
    data: bytes
    serve: bool


def head(*headers: bytes, request_line: bytes = REQUEST_LINE, tail: bytes = b"") -> bytes:
    """``request_line``, the header lines, the blank line, then ``tail`` (body or next request)."""
    return b"".join(line + b"\r\n" for line in (request_line, *headers)) + b"\r\n" + tail


def _chunked_smuggle() -> bytes:
    # A chunked body that ends early, so SMUGGLED follows as "the next request".
    return b"0\r\n\r\n" + SMUGGLED


def _sized_to(total: int) -> bytes:
    """A servable head of exactly ``total`` bytes (padding in one header)."""
    base = head(HOST, b"X-Pad: ")
    return head(HOST, b"X-Pad: " + b"p" * (total - len(base)))


def _target_of(size: int) -> bytes:
    return b"/" + b"t" * (size - 1)


def _servable() -> list[Case]:
    typical = (
        HOST,
        b"User-Agent: xcodebuild (16.0)",
        b"Accept: */*",
        b"Accept-Encoding: gzip, deflate, br",
        b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjaSJ9.c2lnbmF0dXJl",
        b"X-Request-Id: 5f0c9c9e-3f43-4f5e-9d0e-7d0a2c9b1e11",
    )
    ranged = (
        *typical,
        b"Range: bytes=0-1023",
        b'If-Range: "sha256-9f86d081884c7d659a2feaa0c55ad015"',
    )
    return [
        Case("minimal", head(HOST), True),
        Case("typical cache client", head(*typical), True),
        Case("range and etag if-range", head(*ranged), True),
        Case(
            "if-range date",
            head(HOST, b"Range: bytes=100-", b"If-Range: Wed, 21 Oct 2015 07:28:00 GMT"),
            True,
        ),
        Case("connection keep-alive", head(*typical, b"Connection: keep-alive"), True),
        Case("connection close", head(*typical, b"Connection: close"), True),
        Case("connection Close", head(HOST, b"Connection: Close"), True),
        Case("connection HTAB close", head(HOST, b"Connection:\tclose"), True),
        Case("connection keep-alive, close", head(HOST, b"Connection: keep-alive, close"), True),
        Case("content-length 0", head(HOST, b"Content-Length: 0"), True),
        Case("content-length 0 with OWS", head(HOST, b"Content-Length:  0 \t"), True),
        Case("lower-case names", head(b"host: kura", b"authorization: Bearer t0k3n"), True),
        Case("empty value", head(HOST, b"X-Empty:"), True),
        Case("OWS around values", head(b"Host:   kura \t", b"User-Agent:\tcurl/8.5.0  "), True),
        Case("repeated harmless header", head(HOST, b"Accept: a/b", b"Accept: c/d"), True),
        Case(
            "repeated query parameter (the caller rejects it)",
            head(HOST, request_line=b"GET /a?tenant_id=a&tenant_id=b HTTP/1.1"),
            True,
        ),
        Case("root target", head(HOST, request_line=b"GET / HTTP/1.1"), True),
        Case("empty query", head(HOST, request_line=b"GET /a? HTTP/1.1"), True),
        Case(
            "target punctuation",
            head(HOST, request_line=b"GET /a-b_c.d~e!$&'()*+,;=:@/f?g=h/i?j HTTP/1.1"),
            True,
        ),
        Case("dotted names", head(HOST, request_line=b"GET /a/.b/..c/.../d. HTTP/1.1"), True),
        Case(
            "target of 8 KiB",
            head(HOST, request_line=b"GET " + _target_of(8192) + b" HTTP/1.1"),
            True,
        ),
        Case(
            "100 headers",
            head(HOST, *(b"X-H%d: v" % i for i in range(99))),
            True,
        ),
        Case("head of 16384 bytes", _sized_to(16384), True),
        Case("pipelined follow-up", head(*typical, tail=SMUGGLED), True),
    ]


def _transfer_encoding() -> list[Case]:
    chunked_smuggle = _chunked_smuggle()
    return [
        Case(
            "CL.TE",
            head(
                HOST,
                b"Content-Length: %d" % len(chunked_smuggle),
                b"Transfer-Encoding: chunked",
                tail=chunked_smuggle,
            ),
            False,
        ),
        Case(
            "TE.CL",
            head(
                HOST,
                b"Transfer-Encoding: chunked",
                b"Content-Length: 4",
                tail=b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
            ),
            False,
        ),
        Case(
            "TE chunked alone",
            head(HOST, b"Transfer-Encoding: chunked", tail=chunked_smuggle),
            False,
        ),
        Case(
            "TE chunked, identity",
            head(HOST, b"Transfer-Encoding: chunked, identity", tail=chunked_smuggle),
            False,
        ),
        Case(
            "TE extra space",
            head(HOST, b"Transfer-Encoding:  chunked", tail=chunked_smuggle),
            False,
        ),
        Case(
            "TE xchunked",
            head(HOST, b"Transfer-Encoding: xchunked", tail=chunked_smuggle),
            False,
        ),
        Case(
            "TE HTAB before colon",
            head(HOST, b"Transfer-Encoding\t: chunked", tail=chunked_smuggle),
            False,
        ),
        Case(
            "TE SP before colon",
            head(HOST, b"Transfer-Encoding : chunked", tail=chunked_smuggle),
            False,
        ),
        Case(
            "TE folded value",
            head(HOST, b"Transfer-Encoding:", b" chunked", tail=chunked_smuggle),
            False,
        ),
        Case(
            "TE as a continuation line",
            head(HOST, b"X-Foo: bar", b" Transfer-Encoding: chunked", tail=chunked_smuggle),
            False,
        ),
        Case(
            "TE identity with CL",
            head(
                HOST,
                b"Transfer-Encoding: identity",
                b"Content-Length: %d" % len(SMUGGLED),
                tail=SMUGGLED,
            ),
            False,
        ),
        Case(
            "TE chunked and TE cow",
            head(
                HOST,
                b"Transfer-Encoding: chunked",
                b"Transfer-encoding: cow",
                tail=chunked_smuggle,
            ),
            False,
        ),
        Case("TE header (not Transfer-Encoding)", head(HOST, b"TE: trailers"), False),
    ]


def _content_length() -> list[Case]:
    def cl(*values: bytes, name: str) -> Case:
        lines = [b"Content-Length: " + value for value in values]
        return Case(name, head(HOST, *lines, tail=SMUGGLED), False)

    return [
        cl(b"0", b"0", name="CL 0 twice"),
        cl(b"0", b"%d" % len(SMUGGLED), name="CL 0 then N"),
        cl(b"%d" % len(SMUGGLED), name="CL carrying the next request"),
        cl(b"+0", name="CL +0"),
        cl(b"-0", name="CL -0"),
        cl(b"0, 0", name="CL list 0, 0"),
        cl(b"0,0", name="CL list 0,0"),
        cl(b"0x0", name="CL hex 0x0"),
        cl(b"00", name="CL 00"),
        cl(b"0 0", name="CL 0 SP 0"),
        cl(b"", name="CL empty"),
        cl(b"99999999999999999999999", name="CL 10^23"),
        cl(b"\xd9\xa0", name="CL Arabic-Indic zero"),
        Case(
            "CL lower-case duplicate",
            head(HOST, b"Content-Length: 0", b"content-length: 0", tail=SMUGGLED),
            False,
        ),
    ]


def _obs_fold() -> list[Case]:
    n = b"%d" % len(SMUGGLED)
    return [
        Case(
            "obs-fold carrying CL", head(HOST, b"Content-Length:", b" " + n, tail=SMUGGLED), False
        ),
        Case(
            "obs-fold HTAB carrying CL",
            head(HOST, b"Content-Length:", b"\t" + n, tail=SMUGGLED),
            False,
        ),
        Case(
            "obs-fold turning CL 0 into a list",
            head(HOST, b"Content-Length: 0", b" " + n, tail=SMUGGLED),
            False,
        ),
        Case("obs-fold on another header", head(HOST, b"X-Foo: a", b" b"), False),
        Case(
            "continuation line that looks like CL",
            head(HOST, b"X-Foo: a", b" Content-Length: " + n, tail=SMUGGLED),
            False,
        ),
        Case("first header folded", head(b" X-Foo: a", HOST), False),
    ]


def _line_endings() -> list[Case]:
    n = b"%d" % len(SMUGGLED)
    return [
        Case(
            "bare LF everywhere",
            b"GET /a HTTP/1.1\nHost: kura\nContent-Length: " + n + b"\n\n" + SMUGGLED,
            False,
        ),
        Case(
            "bare LF inside a value hides CL",
            head(HOST, b"Foo: x\nContent-Length: " + n, tail=SMUGGLED),
            False,
        ),
        Case(
            "bare CR inside a value hides CL",
            head(HOST, b"Foo: x\rContent-Length: " + n, tail=SMUGGLED),
            False,
        ),
        Case("bare LF inside a value", head(HOST, b"X-Foo: a\nb"), False),
        Case("bare CR inside a value", head(HOST, b"X-Foo: a\rb"), False),
        Case("bare LF after the request line", b"GET /a HTTP/1.1\nHost: kura\r\n\r\n", False),
        Case("bare CR after the request line", b"GET /a HTTP/1.1\rHost: kura\r\n\r\n", False),
        Case("LF-terminated blank line", b"GET /a HTTP/1.1\r\nHost: kura\r\n\n" + SMUGGLED, False),
        Case("CR CR LF", head(HOST + b"\r", b"X: y"), False),
        Case("LF CR", head(HOST, b"X: y\n\r"), False),
        Case("leading CRLF", b"\r\n" + head(HOST), False),
        Case("leading LF", b"\n" + head(HOST), False),
        Case("leading SP", b" " + head(HOST), False),
    ]


def _bytes() -> list[Case]:
    def target(raw: bytes, name: str) -> Case:
        return Case(name, head(HOST, request_line=b"GET " + raw + b" HTTP/1.1"), False)

    return [
        Case("NUL in a value", head(HOST, b"X-Foo: a\x00b"), False),
        Case("NUL in a name", head(HOST, b"X-F\x00oo: a"), False),
        target(b"/a\x00b", "NUL in target"),
        target(b"/a\x7fb", "DEL in target"),
        target(b"/a\xb0b", "0xB0 in target"),
        target(b"/a\x80b", "0x80 in target"),
        target(b"/a\xffb", "0xFF in target"),
        target(b"/a\tb", "HTAB in target"),
        Case("DEL in a value", head(HOST, b"X-Foo: a\x7fb"), False),
        Case("0xB0 in a value", head(HOST, b"X-Foo: a\xb0b"), False),
        Case("UTF-8 in a value", head(HOST, "X-Foo: caf\u00e9".encode()), False),
        Case("CTL 0x01 in a value", head(HOST, b"X-Foo: a\x01b"), False),
        Case("VT in a value", head(HOST, b"X-Foo: a\x0bb"), False),
        Case("FF in a value", head(HOST, b"X-Foo: a\x0cb"), False),
        Case("ESC in a value", head(HOST, b"X-Foo: \x1b[31m"), False),
    ]


def _targets() -> list[Case]:
    def target(raw: bytes, name: str) -> Case:
        return Case(name, head(HOST, request_line=b"GET " + raw + b" HTTP/1.1"), False)

    return [
        target(b"http://kura/api/cache/cas/abc?tenant_id=acme", "absolute-form"),
        target(b"kura:4000", "authority-form"),
        target(b"*", "asterisk-form"),
        target(b"/api/cache/cas/..%2fx", "percent-encoded slash"),
        target(b"/api/cache/cas/%2e%2e/x", "percent-encoded dots"),
        target(b"/a?tenant_id=%61cme", "percent in query"),
        target(b"/a//b", "empty segment"),
        target(b"//kura/a", "network-path reference"),
        target(b"/a/./b", "dot segment"),
        target(b"/a/../b", "dot-dot segment"),
        target(b"/a/..", "trailing dot-dot"),
        target(b"/a/.", "trailing dot"),
        target(b"/a/..?x=1", "dot-dot before the query"),
        target(b"/a/.?x=1", "dot before the query"),
        target(b"/..", "root dot-dot"),
        target(b"/a\\..\\b", "backslash"),
        target(b"/a#frag", "fragment"),
        Case(
            "target of 8 KiB + 1",
            head(HOST, request_line=b"GET " + _target_of(8193) + b" HTTP/1.1"),
            False,
        ),
    ]


def _request_lines() -> list[Case]:
    def line(raw: bytes, name: str, *extra: bytes) -> Case:
        return Case(name, head(HOST, *extra, request_line=raw), False)

    return [
        line(b"get /a HTTP/1.1", "method get"),
        line(b"Get /a HTTP/1.1", "method Get"),
        line(b"HEAD /a HTTP/1.1", "method HEAD"),
        line(b"POST /a HTTP/1.1", "method POST", b"Content-Length: 0"),
        line(b"PUT /a HTTP/1.1", "method PUT", b"Content-Length: 0"),
        line(b"GET /a HTTP/1.0", "HTTP/1.0"),
        line(b"GET /a HTTP/1.2", "HTTP/1.2"),
        line(b"GET /a HTTP/2.0", "HTTP/2.0"),
        line(b"GET /a http/1.1", "lower-case version"),
        line(b"GET /a", "HTTP/0.9 request line"),
        line(b"GET  /a HTTP/1.1", "double SP after method"),
        line(b"GET /a  HTTP/1.1", "double SP before version"),
        line(b"GET /a HTTP/1.1 ", "trailing SP"),
        line(b"GET\t/a HTTP/1.1", "HTAB separator"),
        line(b"GET /a b HTTP/1.1", "four parts"),
        line(b"PRI * HTTP/2.0", "h2 preface"),
    ]


def _bombs() -> list[Case]:
    return [
        Case("101 headers", head(HOST, *(b"X-H%d: v" % i for i in range(100))), False),
        Case(
            "501 headers carrying a smuggled request",
            head(HOST, *(b"X-H%d: v" % i for i in range(500)), tail=SMUGGLED),
            False,
        ),
        Case("head of 16385 bytes", _sized_to(16385), False),
        Case("one 17 KiB header line", head(HOST, b"X-Big: " + b"b" * 17 * 1024), False),
        Case(
            "20 KiB request line",
            head(HOST, request_line=b"GET " + _target_of(20 * 1024) + b" HTTP/1.1"),
            False,
        ),
        Case("head without an end", head(HOST)[:-2] + b"X-More: 1\r\n" * 2000, False),
    ]


def _headers() -> list[Case]:
    def dup(line: bytes, other: bytes | None = None) -> Case:
        name = line.split(b":")[0].decode()
        return Case(f"duplicate {name}", head(HOST, line, other or line, tail=SMUGGLED), False)

    return [
        Case("missing Host", head(b"Accept: */*"), False),
        dup(b"Host: other", b"host: kura"),
        dup(b"Authorization: Bearer a", b"Authorization: Bearer b"),
        dup(b"Proxy-Authorization: Basic YTpi"),
        dup(b"Cookie: a=b", b"Cookie: c=d"),
        dup(b"Range: bytes=0-1", b"Range: bytes=5-9"),
        dup(b'If-Range: "a"', b'If-Range: "b"'),
        dup(b"Connection: keep-alive", b"Connection: close"),
        dup(b"X-Request-Id: one", b"x-request-id: two"),
        Case("Expect 100-continue", head(HOST, b"Expect: 100-continue"), False),
        Case(
            "h2c upgrade",
            head(
                HOST,
                b"Connection: Upgrade, HTTP2-Settings",
                b"Upgrade: h2c",
                b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
            ),
            False,
        ),
        Case("websocket upgrade", head(HOST, b"Connection: upgrade", b"Upgrade: websocket"), False),
        Case("HTTP2-Settings alone", head(HOST, b"HTTP2-Settings: AAMAAABk"), False),
        Case("Connection upgrade", head(HOST, b"Connection: upgrade"), False),
        Case("Connection close, keep-alive", head(HOST, b"Connection: close, keep-alive"), False),
        Case("Connection close,keep-alive", head(HOST, b"Connection: close,keep-alive"), False),
        Case("Connection empty token", head(HOST, b"Connection: keep-alive,"), False),
        Case("Connection empty", head(HOST, b"Connection:"), False),
        Case("Connection x-custom", head(HOST, b"Connection: x-custom"), False),
        Case("SP before colon", head(b"Host : kura"), False),
        Case("SP before colon on CL", head(HOST, b"Content-Length : 5", tail=b"hello"), False),
        Case("empty header name", head(HOST, b": x"), False),
        Case("header line without colon", head(HOST, b"X-Foo"), False),
        Case("non-token header name", head(HOST, b"X(Foo): x"), False),
        Case("header name with '/'", head(HOST, b"X/Foo: x"), False),
    ]


#: Every corpus case, servable ones first.
CASES: tuple[Case, ...] = (
    *_servable(),
    *_transfer_encoding(),
    *_content_length(),
    *_obs_fold(),
    *_line_endings(),
    *_bytes(),
    *_targets(),
    *_request_lines(),
    *_bombs(),
    *_headers(),
)
