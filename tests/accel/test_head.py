"""Unit tests for the accelerator's strict request-head parser (kura.accel.head)."""

from __future__ import annotations

import time

import pytest
from twisted.web.http import HTTPChannel

from kura.accel.head import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_TARGET_BYTES,
    RequestHead,
    find_head_end,
    parse_head,
    parse_query,
)

HOST = b"Host: kura"


def request(*headers: bytes, line: bytes = b"GET /a?b=c HTTP/1.1", tail: bytes = b"") -> bytes:
    """A request head from its request line and header lines, then ``tail``."""
    return b"".join(h + b"\r\n" for h in (line, *headers)) + b"\r\n" + tail


def target(raw: bytes) -> bytes:
    """A request for ``raw`` as its request-target (with a Host)."""
    return request(HOST, line=b"GET " + raw + b" HTTP/1.1")


# --- find_head_end ---------------------------------------------------------------------


class CountingBytes(bytes):
    """Bytes that record how many bytes each ``find`` call had to look at."""

    scanned = 0

    def find(self, sub: object, start: object = None, end: object = None) -> int:
        assert isinstance(sub, bytes)
        assert isinstance(start, int)
        assert end is None
        CountingBytes.scanned += len(self) - start
        return super().find(sub, start)


def test_find_head_end_returns_the_index_after_the_blank_line() -> None:
    """The result is the offset just past the first CRLFCRLF."""
    data = request(HOST, tail=b"GET /next")
    assert find_head_end(data, 0) == data.index(b"GET /next")


def test_find_head_end_without_a_terminator_is_minus_one() -> None:
    """An incomplete head gives -1."""
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0) == -1
    assert find_head_end(b"", 0) == -1


def test_find_head_end_finds_a_terminator_split_across_reads() -> None:
    """Resuming from the previous length still finds a CRLFCRLF that straddles it."""
    data = request(HOST)
    for split in range(len(data) - 3, len(data)):
        assert find_head_end(data[:split], 0) == -1
        assert find_head_end(data, split) == len(data)


def test_find_head_end_does_not_rescan_what_was_searched() -> None:
    """Bytes more than 3 before ``search_from`` are not searched again."""
    data = b"\r\n\r\n" + b"x" * 10
    assert find_head_end(data, 0) == 4
    assert find_head_end(data, 8) == -1


def test_find_head_end_is_linear_when_trickled_one_byte_at_a_time() -> None:
    """Feeding a 16 KiB head byte by byte scans each byte a bounded number of times."""
    data = request(HOST, b"X-Pad: " + b"p" * (MAX_HEAD_BYTES - 40))
    CountingBytes.scanned = 0
    end = -1
    for size in range(1, len(data) + 1):
        end = find_head_end(CountingBytes(data[:size]), size - 1)
        if end != -1:
            break
    assert end == len(data)
    # Each call looks at the new byte plus at most 3 old ones: 4n, not n^2/2.
    assert CountingBytes.scanned <= 4 * len(data)


# --- parse_head: what is served ----------------------------------------------------------


def test_parse_head_serves_a_typical_get() -> None:
    """A plain GET is parsed into its parts; bytes after the head are ignored."""
    data = request(
        b"Host: kura:4000",
        b"Authorization:  Bearer abc \t",
        b"RANGE: bytes=0-9",
        b"X-Empty:",
        line=b"GET /api/cache/cas/k?tenant_id=t&x=1?y HTTP/1.1",
        tail=b"GET /next HTTP/1.1\r\n\r\n",
    )
    head = parse_head(data)
    assert head == RequestHead(
        method=b"GET",
        target=b"/api/cache/cas/k?tenant_id=t&x=1?y",
        path=b"/api/cache/cas/k",
        query=b"tenant_id=t&x=1?y",
        version=b"HTTP/1.1",
        headers=(
            (b"host", b"kura:4000"),
            (b"authorization", b"Bearer abc"),
            (b"range", b"bytes=0-9"),
            (b"x-empty", b""),
        ),
        length=data.index(b"GET /next"),
    )


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"Host: kura", b"kura"),
        (b"HOST:kura:4000", b"kura:4000"),
        (b"hOsT: \t k \t ", b"k"),
        (b"Host:", b""),
        (b"Host: a:b:c", b"a:b:c"),
    ],
)
def test_a_host_only_head_parses_as_any_other(line: bytes, value: bytes) -> None:
    """A head whose only header is Host has the same parts as when another
    header follows it (however Host is spelt)."""
    alone = parse_head(request(line))
    followed = parse_head(request(line, b"X-Other: 1"))
    assert alone is not None and followed is not None
    assert alone.headers == ((b"host", value),) == followed.headers[:1]
    assert alone.plain and followed.plain
    assert alone[:5] == followed[:5]


@pytest.mark.parametrize("line", [b"Hostx: kura", b"Hos: kura", b"X-Host: kura"])
def test_a_lone_header_that_is_not_host_falls_back(line: bytes) -> None:
    """A lone header merely resembling Host is no Host: the head falls back."""
    assert parse_head(request(line)) is None


@pytest.mark.parametrize(
    "raw",
    [b"/", b"/a", b"/a?", b"/a/b.c/.d/..e/...", b"/a?x=/b", b"/~user!$&'()*+,;=:@"],
)
def test_parse_head_serves_plain_targets(raw: bytes) -> None:
    """Origin-form targets without dot segments, '%', '#' or '\\' are served."""
    head = parse_head(target(raw))
    assert head is not None
    assert head.target == raw


@pytest.mark.parametrize(
    "line",
    [b"Connection: keep-alive", b"Connection: close", b"Connection:\tClose", b"Content-Length: 0"],
)
def test_parse_head_serves_harmless_framing_headers(line: bytes) -> None:
    """A single keep-alive/close Connection and a single ``Content-Length: 0`` are servable."""
    assert parse_head(request(HOST, line)) is not None


def test_parse_head_serves_repeated_headers_that_do_not_matter() -> None:
    """Repeating a header kura never reads (Accept) is servable; both values are kept."""
    head = parse_head(request(HOST, b"Accept: a/b", b"accept: c/d"))
    assert head is not None
    assert head.headers[1:] == ((b"accept", b"a/b"), (b"accept", b"c/d"))


def test_parse_head_serves_up_to_the_limits() -> None:
    """8 KiB targets, 100 headers and 16 KiB heads are still served."""
    assert parse_head(target(b"/" + b"t" * (MAX_TARGET_BYTES - 1))) is not None
    assert parse_head(request(HOST, *(b"X-%d: v" % i for i in range(MAX_HEADERS - 1)))) is not None
    pad = MAX_HEAD_BYTES - len(request(HOST, b"X-Pad: "))
    exact = request(HOST, b"X-Pad: " + b"p" * pad)
    assert len(exact) == MAX_HEAD_BYTES
    assert parse_head(exact) is not None


def test_served_heads_stay_within_twisted_limits() -> None:
    """The fast path's limits are tighter than twisted's, so twisted's own 400s never differ."""
    # totalHeadersSize counts line bytes without CRLF, so a head of
    # MAX_HEAD_BYTES has fewer counted bytes than that.
    assert HTTPChannel.totalHeadersSize >= MAX_HEAD_BYTES
    assert HTTPChannel.maxHeaders >= MAX_HEADERS


# --- parse_head: the rules that refuse -----------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"get /a HTTP/1.1",
        b"HEAD /a HTTP/1.1",
        b"POST /a HTTP/1.1",
        b"GET /a HTTP/1.0",
        b"GET /a HTTP/2.0",
        b"GET /a http/1.1",
        b"GET /a",
        b"GET  /a HTTP/1.1",
        b"GET /a  HTTP/1.1",
        b"GET /a HTTP/1.1 ",
        b" GET /a HTTP/1.1",
        b"GET\t/a HTTP/1.1",
        b"GET /a b HTTP/1.1",
    ],
)
def test_request_line_must_be_exactly_get_target_http11(line: bytes) -> None:
    """Only ``GET SP target SP HTTP/1.1`` with single spaces is served."""
    assert parse_head(request(HOST, line=line)) is None


@pytest.mark.parametrize("prefix", [b"\r\n", b"\n", b"\r\n\r\n"])
def test_leading_empty_line_falls_back(prefix: bytes) -> None:
    """Twisted eats one leading empty line; the fast path does not guess and falls back."""
    assert parse_head(prefix + request(HOST)) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"http://kura/a",
        b"kura:4000",
        b"*",
        b"a/b",
        b"/a%2e",
        b"/a?x=%41",
        b"/a//b",
        b"//a",
        b"/a/./b",
        b"/a/../b",
        b"/a/..",
        b"/a/.",
        b"/..",
        b"/.",
        b"/a/..?x",
        b"/a/.?x",
        b"/a\\b",
        b"/a#b",
        b"/a\x7f",
        b"/a\xb0",
        b"/a\x80",
        b"/a\x00",
        b"/a\x1f",
        b"/" + b"t" * MAX_TARGET_BYTES,
    ],
)
def test_target_must_be_plain_origin_form(raw: bytes) -> None:
    """Non-origin forms, '%', '#', '\\', dot/empty segments, non-VCHAR, 8 KiB+ targets: None."""
    assert parse_head(target(raw)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET /a HTTP/1.1\nHost: kura\n\n",
        b"GET /a HTTP/1.1\nHost: kura\r\n\r\n",
        b"GET /a HTTP/1.1\rHost: kura\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: kura\n\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: kura\r\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: kura\r\nX: a\nContent-Length: 5\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: kura\r\nX: a\rContent-Length: 5\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: kura\r\nX: a\nb\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: kura\r\n\n\r\n\r\n",
    ],
)
def test_only_crlf_ends_lines(data: bytes) -> None:
    """A bare LF or bare CR anywhere in the head falls back."""
    assert parse_head(data) is None


@pytest.mark.parametrize(
    "line",
    [
        b" X-Foo: folded",
        b"\tX-Foo: folded",
        b"Host : kura",
        b"X-Foo\t: a",
        b": empty-name",
        b"X-Foo",
        b"X(Foo): a",
        b"X/Foo: a",
        b"X\x00Foo: a",
        b"X-F\xf6o: a",
    ],
)
def test_header_lines_must_be_token_colon_value(line: bytes) -> None:
    """obs-fold, whitespace before the colon, a missing colon and non-token names fall back."""
    assert parse_head(request(HOST, line)) is None


def test_obs_fold_carrying_a_content_length_falls_back() -> None:
    """``Content-Length:`` folded onto ``33`` (twisted reads a 33-byte body) falls back."""
    assert parse_head(request(HOST, b"Content-Length:", b" 33", tail=b"x" * 33)) is None


@pytest.mark.parametrize(
    "value",
    [b"a\x00b", b"a\x01b", b"a\x0bb", b"a\x0cb", b"\x1b[0m", b"a\x7fb", b"caf\xc3\xa9", b"a\xb0b"],
)
def test_header_values_must_be_printable_ascii(value: bytes) -> None:
    """NUL, other CTLs (HTAB aside), DEL and non-ASCII bytes in a value fall back."""
    assert parse_head(request(HOST, b"X-Foo: " + value)) is None


def test_htab_inside_a_value_is_served() -> None:
    """HTAB is allowed inside a value (RFC 9110 field-content)."""
    head = parse_head(request(HOST, b"X-Foo: a\tb"))
    assert head is not None
    assert head.get(b"x-foo") == b"a\tb"


@pytest.mark.parametrize(
    "line",
    [
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: identity",
        b"transfer-encoding: chunked, identity",
        b"Transfer-Encoding: xchunked",
        b"TE: trailers",
        b"Expect: 100-continue",
        b"Upgrade: h2c",
        b"HTTP2-Settings: AAMAAABk",
    ],
)
def test_framing_and_protocol_switch_headers_fall_back(line: bytes) -> None:
    """Any Transfer-Encoding, TE, Expect, Upgrade or HTTP2-Settings header falls back."""
    assert parse_head(request(HOST, line)) is None


@pytest.mark.parametrize(
    "value", [b"5", b"00", b"+0", b"-0", b"0, 0", b"0,0", b"0x0", b"0 0", b"", b"1e0"]
)
def test_content_length_other_than_zero_falls_back(value: bytes) -> None:
    """A Content-Length other than exactly ``0`` falls back."""
    assert parse_head(request(HOST, b"Content-Length: " + value)) is None


@pytest.mark.parametrize(
    "value",
    [
        b"upgrade",
        b"keep-alive, upgrade",
        b"x-custom",
        b"",
        b"keep-alive,",
        b"close, keep-alive",
        b"close,keep-alive",
        b"close\t,keep-alive",
    ],
)
def test_connection_tokens_other_than_keep_alive_or_close_fall_back(value: bytes) -> None:
    """Other tokens, empty tokens, and lists twisted would read differently fall back."""
    # twisted's checkPersistence splits on SP, so "close,keep-alive" keeps
    # its connection open while RFC parsers close it.
    assert parse_head(request(HOST, b"Connection: " + value)) is None


@pytest.mark.parametrize(
    "name",
    [
        b"Host",
        b"Authorization",
        b"Proxy-Authorization",
        b"Cookie",
        b"Range",
        b"If-Range",
        b"Connection",
        b"Content-Length",
        b"X-Request-Id",
    ],
)
def test_duplicate_meaningful_headers_fall_back(name: bytes) -> None:
    """A repeated header whose value kura reads falls back, whatever the name's case."""
    value = b"0" if name == b"Content-Length" else b"close"
    data = request(HOST, name + b": " + value, name.lower() + b": " + value)
    if name == b"Host":
        data = request(b"Host: a", b"host: b")
    assert parse_head(data) is None


def test_missing_host_falls_back() -> None:
    """HTTP/1.1 without Host falls back (h11 refuses it, twisted accepts it)."""
    assert parse_head(request(b"Accept: */*")) is None


def test_limits_fall_back() -> None:
    """101 headers, a head over 16 KiB or a head without an end in 16 KiB fall back."""
    assert parse_head(request(HOST, *(b"X-%d: v" % i for i in range(MAX_HEADERS)))) is None
    pad = MAX_HEAD_BYTES + 1 - len(request(HOST, b"X-Pad: "))
    assert parse_head(request(HOST, b"X-Pad: " + b"p" * pad)) is None
    assert parse_head(request(HOST)[:-2] + b"X: y\r\n" * 3000) is None
    assert parse_head(request(HOST)[:-2]) is None


def test_a_known_head_length_gives_the_same_answer() -> None:
    """parse_head(data, find_head_end(data, 0)) answers as parse_head(data), limits included."""
    pad = MAX_HEAD_BYTES - len(request(HOST, b"X-Pad: "))
    cases = [
        request(HOST) + b"GET /next HTTP/1.1\r\n",
        request(HOST, b"Range: bytes=0-1", b"Connection: close"),
        request(HOST, b"X-Pad: " + b"p" * pad),
        request(HOST, b"X-Pad: " + b"p" * (pad + 1)),
        request(HOST, *(b"X-%d: v" % i for i in range(MAX_HEADERS))),
        request(b"Accept: */*"),
        b"GET / HTTP/1.1\r\n:\r\n\r\n",
    ]
    for data in cases:
        assert parse_head(data, find_head_end(data, 0)) == parse_head(data)
    assert parse_head(cases[2], find_head_end(cases[2], 0)) is not None
    assert parse_head(cases[3], find_head_end(cases[3], 0)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"GET",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00" * 100 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n:\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: ,,,\r\n\r\n",
    ],
)
def test_parse_head_never_raises(data: bytes) -> None:
    """Degenerate input returns None instead of raising."""
    assert parse_head(data) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n" + b"a" * 16000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nX:" + b" " * 16000 + b"\x01\r\n\r\n",
        b"GET / HTTP/1.1\r\nX:" + b"\t " * 8000 + b"\r\n\r\n",
        b"GET /" + b"/." * 4090 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"a\r\n" * 5000 + b"\r\n",
        b"GET / HTTP/1.1\r\n" + b"Host: x\r\n" * 1500 + b"\r\n",
    ],
)
def test_pathological_heads_parse_in_linear_time(data: bytes) -> None:
    """Worst-case 16 KiB heads take well under a millisecond-scale budget (no regex blow-up)."""

    def cpu_seconds_per_parse() -> float:
        # This thread's CPU time, not the wall clock: a loaded machine (CI, a
        # parallel benchmark) stretches wall time, never the work itself.
        start = time.thread_time()
        for _ in range(10):
            parse_head(data)
        return (time.thread_time() - start) / 10

    # Linear work is ~0.1 ms per parse here; a quadratic regex would take seconds.
    assert min(cpu_seconds_per_parse() for _ in range(3)) < 0.02


# --- RequestHead ----------------------------------------------------------------------------


def _head(*headers: bytes) -> RequestHead:
    head = parse_head(request(HOST, *headers))
    assert head is not None
    return head


def test_get_returns_the_single_value_case_insensitively() -> None:
    """``get`` finds a header whatever case the caller uses."""
    head = _head(b"Range: bytes=1-2")
    assert head.get(b"range") == b"bytes=1-2"
    assert head.get(b"Range") == b"bytes=1-2"


def test_get_absent_is_none() -> None:
    """A header that was not sent has no value."""
    assert _head().get(b"range") is None


def test_get_on_a_duplicate_is_none() -> None:
    """A repeated header has no single value, so ``get`` returns None."""
    head = _head(b"Accept: a/b", b"Accept: c/d")
    assert head.get(b"accept") is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (None, True),
        (b"Connection: keep-alive", True),
        (b"Connection: close", False),
        (b"Connection: CLOSE", False),
        (b"Connection:\tclose ", False),
        (b"Connection: keep-alive, close", False),
    ],
)
def test_keep_alive(line: bytes | None, expected: bool) -> None:
    """The connection persists unless a Connection token is ``close``."""
    head = _head() if line is None else _head(line)
    assert head.keep_alive is expected


# --- parse_query ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", {}),
        (b"tenant_id=acme", {"tenant_id": ["acme"]}),
        (b"a=1&b=2", {"a": ["1"], "b": ["2"]}),
        (b"a=1&a=2", {"a": ["1", "2"]}),
        (b"a=", {"a": [""]}),
        (b"a=b=c", {"a": ["b=c"]}),
        (b"a=1&&b=2&", {"a": ["1"], "b": ["2"]}),
        (b"a=/x?y", {"a": ["/x?y"]}),
        (b"a.b-c_d~=!$'()*,:@", {"a.b-c_d~": ["!$'()*,:@"]}),
    ],
)
def test_parse_query_without_decoding(raw: bytes, expected: dict[str, list[str]]) -> None:
    """Plain queries give every value in order, blank values kept and empty fields skipped."""
    assert parse_query(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"a=%41",
        b"a%3D=b",
        b"a=b+c",
        b"a=1;b=2",
        b"a",
        b"a=1&b",
        b"=v",
        b"a=1&=2",
        b"a=caf\xc3\xa9",
        b"a=b c",
        b"a=\x7f",
        b"a=\x00",
        b"a=#",
    ],
)
def test_parse_query_refuses_what_decoding_could_change(raw: bytes) -> None:
    """'%', '+', ';', a field without '=', an empty name or a byte outside VCHAR gives None."""
    assert parse_query(raw) is None
