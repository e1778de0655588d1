"""Differential tests: the fast-path parser never serves what twisted.web would frame differently.

The oracle is twisted.web itself: a real ``HTTPChannel`` on a
``StringTransport``, whose request factory records what it parsed and
finishes without application logic. h11 and httptools (llhttp) are second
opinions. For every head that :func:`parse_head` serves, all three must see
exactly one bodiless GET with the same target and headers, ending at
``RequestHead.length``.
"""

from __future__ import annotations

import itertools
import urllib.parse
from collections.abc import Sequence

import attrs
import h11
import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http

from kura.accel.head import _SPECIAL_HEADERS, RequestHead, find_head_end, parse_head, parse_query
from tests.accel.corpus import CASES, SMUGGLED, Case

#: The pipelined control request appended after every served head.
NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


@attrs.frozen
class Parsed:
    """One request as twisted.web's channel delivered it to the application."""

    method: bytes
    uri: bytes
    version: bytes
    headers: dict[bytes, list[bytes]]
    body_length: int


@attrs.frozen
class TwistedView:
    """Everything twisted.web parsed from a byte stream, and what it wrote back."""

    requests: list[Parsed]
    output: bytes


def twisted_parse(chunks: Sequence[bytes]) -> TwistedView:
    """Feed ``chunks`` (one ``dataReceived`` each) to a real ``HTTPChannel``."""
    parsed: list[Parsed] = []

    class Recorder(http.Request):
        def process(self) -> None:
            assert self.content is not None
            parsed.append(
                Parsed(
                    method=self.method,
                    uri=self.uri,
                    version=self.clientproto,
                    headers={
                        name.lower(): list(values)
                        for name, values in self.requestHeaders.getAllRawHeaders()
                    },
                    body_length=len(self.content.read()),
                )
            )
            # Finishing lets the channel go on to a pipelined request.
            self.finish()  # type: ignore[no-untyped-call]

    channel = http.HTTPChannel()
    channel.requestFactory = Recorder
    transport = StringTransport()
    channel.makeConnection(transport)
    for chunk in chunks:
        channel.dataReceived(chunk)
    output = transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    return TwistedView(parsed, output)


def headers_by_name(head: RequestHead) -> dict[bytes, list[bytes]]:
    """The parsed head's headers grouped as twisted groups them."""
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in head.headers:
        grouped.setdefault(name, []).append(value)
    return grouped


def assert_twisted_agrees(data: bytes, head: RequestHead, chunks: Sequence[bytes]) -> None:
    """Twisted parses one identical GET ending exactly at ``head.length``.

    ``chunks`` is ``data[:head.length] + NEXT`` cut into TCP segments.
    """
    view = twisted_parse(chunks)
    # Nothing but the recorder's own response: no 400, no interim 100 Continue.
    assert view.output.startswith(b"HTTP/1.1 200 OK\r\n")
    assert view.requests, "twisted has no complete request"
    assert view.requests[0] == Parsed(
        method=head.method,
        uri=head.target,
        version=head.version,
        headers=headers_by_name(head),
        body_length=0,
    )
    if head.keep_alive:
        # The pipelined control request starts exactly where the head ends.
        assert [r.uri for r in view.requests] == [head.target, b"/next"]
    else:
        # Twisted closes after a "Connection: close" request, like the fast path.
        assert len(view.requests) == 1

    # One byte short of the boundary, twisted has no complete request yet: it
    # does not end the request earlier (e.g. leaving a CRLF it would eat).
    assert twisted_parse([data[: head.length - 1]]).requests == []


def assert_h11_agrees(data: bytes, head: RequestHead) -> None:
    """h11 sees one identical bodiless request and leaves the rest unread."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data[: head.length] + NEXT)
    request = connection.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target, request.http_version) == (
        head.method,
        head.target,
        b"1.1",
    )
    assert list(request.headers) == list(head.headers)
    assert isinstance(connection.next_event(), h11.EndOfMessage)
    assert connection.trailing_data == (NEXT, False)


def assert_httptools_agrees(data: bytes, head: RequestHead) -> None:
    """llhttp sees one identical bodiless request (and /next after a keep-alive one)."""
    urls: list[bytes] = []
    headers: list[tuple[bytes, bytes]] = []
    keep_alive: list[bool] = []
    body: list[bytes] = []
    complete: list[bool] = []

    class Callbacks:
        def on_url(self, url: bytes) -> None:
            urls.append(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            headers.append((name.lower(), value.strip(b" \t")))

        def on_headers_complete(self) -> None:
            keep_alive.append(parser.should_keep_alive())

        def on_body(self, chunk: bytes) -> None:
            body.append(chunk)

        def on_message_complete(self) -> None:
            complete.append(True)

    parser = httptools.HttpRequestParser(Callbacks())
    # llhttp refuses any byte after a "Connection: close" message, rightly.
    parser.feed_data(data[: head.length] + (NEXT if head.keep_alive else b""))
    expected_urls = [head.target, b"/next"] if head.keep_alive else [head.target]
    assert urls == expected_urls
    assert len(complete) == len(expected_urls)
    assert body == []
    assert headers[: len(head.headers)] == list(head.headers)
    assert keep_alive[0] == head.keep_alive
    assert parser.get_method() == b"GET"


def assert_oracles_agree(data: bytes, head: RequestHead, chunks: Sequence[bytes]) -> None:
    """Twisted (fed ``chunks``), h11 and llhttp all parse ``head`` from ``data``."""
    assert_twisted_agrees(data, head, chunks)
    assert_h11_agrees(data, head)
    assert_httptools_agrees(data, head)


def check_served(data: bytes, chunks: Sequence[bytes] | None = None) -> RequestHead | None:
    """Parse ``data``; when it is served, assert that all three oracles agree."""
    head = parse_head(data)
    if head is None:
        return None
    assert data[: head.length].endswith(b"\r\n\r\n")
    assert head.length == find_head_end(data, 0)
    stream = data[: head.length] + NEXT
    assert_oracles_agree(data, head, [stream] if chunks is None else chunks)
    assert_plain_is_true(head)
    return head


def assert_plain_is_true(head: RequestHead) -> None:
    """``plain`` is set exactly when Host is the one header callers look up by name."""
    looked_up = [name for name, _ in head.headers if name in _SPECIAL_HEADERS]
    assert head.plain == (looked_up == [b"host"])
    if head.plain:
        assert head.keep_alive
        for name in (b"range", b"if-range", b"x-request-id", b"authorization", b"cookie"):
            assert head.get(name) is None


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_corpus(case: Case) -> None:
    """Each corpus head is served or refused as listed, and served ones match every oracle."""
    assert (check_served(case.data) is not None) is case.serve


_SERVED = [case for case in CASES if case.serve]


@pytest.mark.parametrize("case", _SERVED, ids=[case.name for case in _SERVED])
def test_corpus_byte_at_a_time(case: Case) -> None:
    """A served head trickled one byte per read parses the same in twisted."""
    head = parse_head(case.data)
    assert head is not None
    stream = case.data[: head.length] + NEXT
    assert_twisted_agrees(case.data, head, [bytes([b]) for b in stream])


def lax_parse(data: bytes) -> RequestHead:
    """A deliberately lax parser with upstream Kura's weak spots.

    It upper-cases the method, collapses duplicate headers (last wins) and
    assumes a GET has no body. Used only to show the oracles catch it.
    """
    end = data.index(b"\r\n\r\n") + 4
    request_line, *lines = data[: end - 4].split(b"\r\n")
    method, target, version = request_line.split(b" ")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    path, _, query = target.partition(b"?")
    return RequestHead(
        method=method.upper(),
        target=target,
        path=path,
        query=query,
        version=version,
        headers=tuple(headers.items()),
        length=end,
    )


@pytest.mark.parametrize(
    "name",
    [
        "CL carrying the next request",
        "TE identity with CL",
        "method get",
        "duplicate Host",
        "DEL in target",
        "0xB0 in target",
        "SP before colon",
        "Connection close,keep-alive",
        "missing Host",
    ],
)
def test_oracles_catch_a_lax_parser(name: str) -> None:
    """The differential check has teeth: a lax parse of a refused corpus case fails it."""
    data = case_data(name)
    assert parse_head(data) is None
    with pytest.raises((AssertionError, h11.RemoteProtocolError, httptools.HttpParserError)):
        assert_oracles_agree(data, lax_parse(data), [data[: lax_parse(data).length] + NEXT])


def case_data(name: str) -> bytes:
    """The bytes of the corpus case called ``name``."""
    return next(case.data for case in CASES if case.name == name)


# --- Hypothesis: mutated valid heads ------------------------------------------------

_SEGMENTS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=1, max_size=12
).filter(lambda segment: segment.strip(".") != "")
_TARGET_PUNCTUATION = st.sampled_from(list(b"!\"$&'()*+,-.:;<=>@[]^_`{|}~"))

_TOKENS = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    min_size=1,
    max_size=8,
)
_FIELD_VALUES = st.text(alphabet="".join(map(chr, range(0x20, 0x7F))) + "\t", max_size=16)

_OPTIONAL_HEADERS = (
    b"User-Agent: xcodebuild (16.0)",
    b"Accept: */*",
    b"Accept-Encoding: gzip, deflate",
    b"Authorization: Bearer eyJ0eXAiOiJKV1QifQ.e30.c2ln",
    b"X-Request-Id: 5f0c9c9e-3f43-4f5e-9d0e-7d0a2c9b1e11",
    b"Range: bytes=0-1023",
    b'If-Range: "sha256-abc"',
    b'If-None-Match: "sha256-abc"',
    b"Cookie: session=abc",
    b"Connection: keep-alive",
    b"Connection: close",
    b"Content-Length: 0",
    b"X-Empty:",
    b"X-Padded: \t value \t",
)

_FRAMING_LINES = (
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding\t: chunked",
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length: +0",
    b"Content-Length: 0, 0",
    b"Content-Length:",
    b" 5",
    b"\tContent-Length: 5",
    b"Expect: 100-continue",
    b"Upgrade: h2c",
    b"TE: trailers",
    b"Connection: close, keep-alive",
    b"Host: other",
)

_INSERTED_BYTES = st.sampled_from([b"\r", b"\n", b" ", b"\t", b"\x00", b"\x7f", b"\xb0"])

_TAILS = st.sampled_from([b"", SMUGGLED, b"0\r\n\r\n" + SMUGGLED, b"hello", b"\r\n" + SMUGGLED])


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A servable request: (request line, header lines)."""
    segments = draw(st.lists(_SEGMENTS, min_size=1, max_size=4))
    path = "/" + "/".join(segments)
    if draw(st.booleans()):
        path += "/" + bytes([draw(_TARGET_PUNCTUATION)]).decode() + "x"
    if draw(st.booleans()):
        pairs = draw(st.lists(st.tuples(_SEGMENTS, _SEGMENTS), max_size=3))
        path += "?" + "&".join(f"{k}={v}" for k, v in pairs)
    optional = draw(st.lists(st.sampled_from(_OPTIONAL_HEADERS), max_size=6, unique=True))
    # Keep at most one of each single-valued header so the unmutated head is servable.
    kept: dict[bytes, bytes] = {}
    for line in optional:
        kept.setdefault(line.split(b":", 1)[0].lower(), line)
    # Extension headers with any token name and any printable value.
    extensions = [
        b"X-" + name.encode() + b":" + value.encode()
        for name, value in draw(st.lists(st.tuples(_TOKENS, _FIELD_VALUES), max_size=2))
    ]
    lines = draw(st.permutations([b"Host: kura.example:4000", *kept.values(), *extensions]))
    return b"GET " + path.encode() + b" HTTP/1.1", list(lines)


def render(request_line: bytes, lines: Sequence[bytes], tail: bytes = b"") -> bytes:
    """The wire form of a request line and header lines, then ``tail``."""
    return b"".join(line + b"\r\n" for line in (request_line, *lines)) + b"\r\n" + tail


# Edits of the request line: (old, new), applied once.
_LINE_EDITS = (
    (b"GET ", b"get "),
    (b"GET ", b"HEAD "),
    (b"GET ", b"POST "),
    (b"GET ", b"GET  "),
    (b"GET ", b"GET\t"),
    (b" HTTP/1.1", b" HTTP/1.0"),
    (b" HTTP/1.1", b" HTTP/1.2"),
    (b" HTTP/1.1", b" http/1.1"),
    (b" HTTP/1.1", b" HTTP/1.1 "),
    (b" HTTP/1.1", b"/.. HTTP/1.1"),
    (b" HTTP/1.1", b"/. HTTP/1.1"),
    (b"GET /", b"GET http://kura/"),
    (b"GET /", b"GET //"),
    (b"GET /", b"GET /./"),
    (b"GET /", b"GET /../"),
    (b"GET /", b"GET /%2e%2e/"),
    (b"GET /", b"GET /\x7f"),
    (b"GET /", b"GET /\xb0"),
    (b"GET /", b"GET /a#"),
    (b"GET /", b"GET /\\"),
)

_PREFIXES = (b"\r\n", b"\n", b" ", b"\r\n\r\n")


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid request with random damage.

    Header lines duplicated, dropped, recased or added (framing and protocol
    headers), the request line edited, an empty line or SP put in front, and
    CR/LF/SP/HTAB/NUL/DEL/0xB0 inserted or bytes deleted at random offsets;
    then a body or pipelined request.
    """
    request_line, lines = draw(valid_requests())
    prefix = b""
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        kind = draw(st.sampled_from(["duplicate", "drop", "case", "framing", "line", "prefix"]))
        if kind == "duplicate" and lines:
            index = draw(st.integers(0, len(lines) - 1))
            lines.insert(draw(st.integers(0, len(lines))), lines[index])
        elif kind == "drop" and lines:
            del lines[draw(st.integers(0, len(lines) - 1))]
        elif kind == "case" and lines:
            index = draw(st.integers(0, len(lines) - 1))
            name, colon, value = lines[index].partition(b":")
            recase = draw(st.sampled_from([bytes.upper, bytes.lower, bytes.swapcase]))
            lines[index] = recase(name) + colon + value
        elif kind == "framing":
            lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(_FRAMING_LINES)))
        elif kind == "line":
            old, new = draw(st.sampled_from(_LINE_EDITS))
            request_line = request_line.replace(old, new, 1)
        elif kind == "prefix":
            prefix = draw(st.sampled_from(_PREFIXES))
    data = prefix + render(request_line, lines)
    # Byte damage on only some examples, so structured damage gets tested alone too.
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        offset = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data = data[:offset] + draw(_INSERTED_BYTES) + data[offset:]
        else:
            data = data[:offset] + data[offset + 1 :]
    return data + draw(_TAILS)


def cut(data: bytes, offsets: Sequence[int]) -> list[bytes]:
    """``data`` split at ``offsets`` (any order, any range): the TCP segments."""
    points = sorted({0, len(data), *(o % (len(data) + 1) for o in offsets)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(mutated_requests(), st.lists(st.integers(min_value=0), max_size=6))
def test_mutated_heads_are_never_served_ambiguously(data: bytes, offsets: list[int]) -> None:
    """Whatever the damage, a served head parses alike in twisted (any segments), h11, llhttp."""
    head = parse_head(data)
    if head is not None:
        check_served(data, cut(data[: head.length] + NEXT, offsets))


def single_damages(request_line: bytes, lines: list[bytes], position: int) -> list[bytes]:
    """Every one-step damage of a valid request, at ``position`` where it needs one."""
    at = position % (len(lines) + 1)
    data = render(request_line, lines)
    offset = position % (len(data) + 1)
    variants = [render(request_line, [*lines[:at], extra, *lines[at:]]) for extra in _FRAMING_LINES]
    variants += [render(request_line.replace(old, new, 1), lines) for old, new in _LINE_EDITS]
    variants += [prefix + data for prefix in _PREFIXES]
    variants += [
        data[:offset] + byte + data[offset:]
        for byte in (b"\r", b"\n", b" ", b"\t", b"\x00", b"\x7f", b"\xb0")
    ]
    for index, line in enumerate(lines):
        others = lines[:index] + lines[index + 1 :]
        variants.append(render(request_line, others))
        variants.append(render(request_line, [*lines, line]))
        variants.append(render(request_line, [*others, line.swapcase()]))
    return variants


@given(valid_requests(), st.integers(min_value=0), _TAILS)
def test_every_single_damage_is_never_served_ambiguously(
    request: tuple[bytes, list[bytes]], position: int, tail: bytes
) -> None:
    """Each one-step damage of a valid head is refused, or served and agreed on by every oracle."""
    for variant in single_damages(*request, position):
        check_served(variant + tail)


@given(valid_requests(), _TAILS, st.lists(st.integers(min_value=0), max_size=6))
def test_valid_heads_are_served_and_agree(
    request: tuple[bytes, list[bytes]], tail: bytes, offsets: list[int]
) -> None:
    """Undamaged generated heads are served, and every oracle agrees with them."""
    data = render(*request, tail=tail)
    head = parse_head(data)
    assert head is not None
    check_served(data, cut(data[: head.length] + NEXT, offsets))


@given(mutated_requests(), st.lists(st.integers(min_value=1, max_value=64), max_size=20))
def test_incremental_head_end_matches_a_whole_search(data: bytes, sizes: list[int]) -> None:
    """Searching each new segment from the previous length finds the boundary one search finds."""
    expected = data.find(b"\r\n\r\n")
    expected = expected + 4 if expected >= 0 else -1
    buffer = b""
    found = -1
    offset = 0
    for size in [*sizes, len(data)]:
        previous = len(buffer)
        buffer = data[: offset + size]
        offset += size
        found = find_head_end(buffer, previous)
        if found != -1:
            break
    assert found == expected


# --- parse_query against both decoders ------------------------------------------------

_QUERY_BYTES = st.sampled_from(list(b"ab0=&;%+2e/?!~\x20\x7f\x80"))


def twisted_args(raw: bytes) -> dict[str, list[str]]:
    """twisted.web's ``request.args`` for ``raw``, decoded to text."""
    return {
        k.decode("ascii"): [v.decode("ascii") for v in vs]
        for k, vs in http.parse_qs(raw, 1).items()
    }


@given(st.lists(_QUERY_BYTES, max_size=24).map(bytes))
def test_parse_query_equals_both_decoders(raw: bytes) -> None:
    """Whenever parse_query answers, urllib's parse_qs and twisted's request.args say the same."""
    params = parse_query(raw)
    if params is not None:
        assert params == urllib.parse.parse_qs(raw.decode("ascii"), keep_blank_values=True)
        assert params == twisted_args(raw)


@given(st.binary(max_size=64))
def test_parsers_never_raise(data: bytes) -> None:
    """Arbitrary bytes give a result or None, never an exception."""
    parse_head(data)
    parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n" + data + b"\r\n\r\n")
    parse_query(data)
    find_head_end(data, len(data) // 2)
