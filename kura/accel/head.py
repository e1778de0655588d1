"""The accelerator's strict HTTP/1.1 request-head parser.

The fast path and twisted.web's ``HTTPChannel`` read the same byte stream, so
any head the two would frame differently is a request-smuggling bug.
:func:`parse_head` therefore accepts only a small, unambiguous subset: a
bodiless ``GET`` that twisted.web 26.10 parses as exactly one request with the
same method, target and headers, ending exactly at :attr:`RequestHead.length`,
and that h11 and llhttp accept as well. Everything else returns ``None`` and
the caller replays the bytes, untouched, into twisted.web, which then produces
its own answer (including its own 400s).

Speed matters (a fast path has roughly 10 µs of Python per request to spend),
so the work is done by one precompiled regex over the whole head,
``bytes.split`` and a short loop over the header lines; there is no per-byte
Python loop.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_TARGET_BYTES",
    "RequestHead",
    "find_head_end",
    "parse_head",
    "parse_query",
]

#: Largest head (request line, header lines and the final CRLFCRLF) the fast
#: path serves. It is at most twisted's ``totalHeadersSize`` (which does not
#: count CRLFs), so twisted's own limit can never trigger on a served head.
MAX_HEAD_BYTES: Final = 16 * 1024

#: Largest request-target the fast path serves.
MAX_TARGET_BYTES: Final = 8 * 1024

#: Most header lines the fast path serves (twisted's ``maxHeaders`` is 500).
MAX_HEADERS: Final = 100

_HEAD_TERMINATOR: Final = b"\r\n\r\n"

# RFC 9110 5.6.2 tchar, as a regex character-class body.
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"

# Request-target bytes: VCHAR (0x21-0x7E) except '#' (a fragment never goes on
# the wire), '%' (percent-decoding is where paths and queries diverge between
# parsers) and '\' (some stacks treat it as '/'). Twisted would also take DEL
# and 0x80-0xB0 here; h11 and llhttp would not, so neither do we.
_TARGET_BYTE = rb"[\x21\x22\x24\x26-\x5b\x5d-\x7e]"

# The whole head up to and including the blank line, in one pass:
#   * the request line is exactly ``GET SP origin-form SP HTTP/1.1`` (a leading
#     empty line, which twisted silently eats once, cannot match);
#   * each header line is ``token ":" value CRLF`` where the value is HTAB or
#     printable ASCII only. This excludes, with no further checks: bare CR and
#     bare LF anywhere, obs-fold (a line starting with SP/HTAB is not a token),
#     whitespace before the colon, NUL/CTL/DEL and obs-text (>= 0x80) in values.
_HEAD = re.compile(
    rb"GET (/"
    + _TARGET_BYTE
    + b"{0,%d}" % (MAX_TARGET_BYTES - 1)
    + rb") HTTP/1\.1\r\n((?:["
    + _TCHAR
    + rb"]+:[\t\x20-\x7e]*\r\n)*)\r\n"
)

# One header line of a block _HEAD validated: the name and the raw value.
_FIELD = re.compile(rb"([^:]+):([^\r]*)\r\n")

# Dot segments and empty segments anywhere in the path: ``//``, ``/./``,
# ``/../`` and a trailing ``/.`` or ``/..`` (the path ends at '?' or the end).
# Routers and file layers normalise these differently, so never serve them.
_BAD_SEGMENT = re.compile(rb"//|/\.\.?(?:[/?]|\Z)")

# Query bytes parse_query accepts: printable ASCII except those whose meaning
# differs between decoders: '%' and '+' (decoded), ';' (twisted's request.args
# splits on it, urllib's parse_qs does not) and '#'.
_QUERY = re.compile(rb"[\x21\x22\x24\x26-\x2a\x2c-\x3a\x3c-\x7e]*")

# What to do when a header name appears.
_FORBIDDEN = 1  # never servable: framing or protocol switches we do not follow
_SINGLE = 2  # servable at most once (a duplicate means "which one?")

_SPECIAL_HEADERS: Final[dict[bytes, int]] = {
    # Twisted honours any Transfer-Encoding (even ``identity`` next to a
    # Content-Length) and reads a body; TE/Expect/Upgrade/HTTP2-Settings ask
    # for behaviour (100 Continue, protocol switch) the fast path never gives.
    b"transfer-encoding": _FORBIDDEN,
    b"te": _FORBIDDEN,
    b"expect": _FORBIDDEN,
    b"upgrade": _FORBIDDEN,
    b"http2-settings": _FORBIDDEN,
    # A duplicate of any of these is read as "the last one" by twisted's
    # getHeader, "the first one" elsewhere and "both" by kura's header map.
    b"host": _SINGLE,
    b"authorization": _SINGLE,
    b"proxy-authorization": _SINGLE,
    b"cookie": _SINGLE,
    b"range": _SINGLE,
    b"if-range": _SINGLE,
    b"connection": _SINGLE,
    b"content-length": _SINGLE,
    b"x-request-id": _SINGLE,
}

_CONNECTION_TOKENS: Final = frozenset({b"keep-alive", b"close"})


def find_head_end(buffer: bytes, search_from: int) -> int:
    """Where the first request head in ``buffer`` ends.

    Args:
        buffer: the bytes received so far on the connection, starting at the
            first byte of the request.
        search_from: how much of ``buffer`` was already searched without
            success (callers pass the buffer's previous length). The search
            restarts 3 bytes earlier, so a terminator split across reads is
            still found, and never from 0: however the bytes trickle in, the
            total scanning work stays linear in the head's size.

    Returns:
        The index just past the first ``b"\\r\\n\\r\\n"`` that ends at or after
        ``search_from``, or -1 when there is none yet.
    """
    index = buffer.find(_HEAD_TERMINATOR, search_from - 3 if search_from > 3 else 0)
    return index if index < 0 else index + 4


class RequestHead(NamedTuple):
    """A request head the fast path may serve.

    A named tuple: one is made per request, and a tuple is the cheapest
    immutable record Python has (a frozen ``attrs`` class cost four times as
    much to create).

    Attributes:
        method: the method as sent (always ``b"GET"``).
        target: the raw request-target.
        path: ``target`` before the first ``?``.
        query: the raw bytes after the first ``?``, ``b""`` if there is none.
        version: the protocol version (always ``b"HTTP/1.1"``).
        headers: ``(name, value)`` pairs in arrival order, names lower-cased,
            values with surrounding SP/HTAB removed (as twisted.web stores them).
        length: bytes of the head including the final CRLFCRLF; the next
            request on the connection starts at this offset.
        plain: the only header of ``_SPECIAL_HEADERS`` is one Host (as
            nearly every GET): no Range, If-Range, Connection, X-Request-Id
            or credentials, so callers may skip looking for them. ``False``
            promises nothing.
    """

    method: bytes
    target: bytes
    path: bytes
    query: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    length: int
    plain: bool = False

    def get(self, name: bytes) -> bytes | None:
        """The value of header ``name`` (any case) if it appears exactly once.

        Returns ``None`` when the header is absent *or repeated*: a repeated
        header has no single value, and picking one is how parsers disagree.
        (:func:`parse_head` already refuses duplicates of every header whose
        value matters to kura, see ``_SPECIAL_HEADERS``.)
        """
        name = name.lower()
        found: bytes | None = None
        for header, value in self.headers:
            if header == name:
                if found is not None:
                    return None
                found = value
        return found

    @property
    def keep_alive(self) -> bool:
        """``False`` iff a ``Connection`` token is ``close`` (any case)."""
        for header, value in self.headers:
            if header == b"connection" and b"close" in _connection_tokens(value):
                return False
        return True


def _connection_tokens(value: bytes) -> list[bytes]:
    """The comma-separated tokens of a Connection value, trimmed and lower-cased."""
    return [token.strip(b" \t").lower() for token in value.split(b",")]


def _connection_is_unambiguous(value: bytes) -> bool:
    """Whether a Connection value means the same to the fast path, twisted and h11.

    Every comma-separated token must be ``keep-alive`` or ``close``. Twisted
    (``HTTPChannel.checkPersistence``) looks for ``close`` among the
    *space*-separated words instead, so ``close,keep-alive`` keeps a twisted
    connection open while RFC parsers close it: such values must fall back.
    """
    tokens = _connection_tokens(value)
    if not _CONNECTION_TOKENS.issuperset(tokens):
        return False
    twisted_closes = b"close" in [word.lower() for word in value.split(b" ")]
    return (b"close" in tokens) == twisted_closes


def parse_head(data: bytes, length: int = -1) -> RequestHead | None:
    """Parse the request head at the start of ``data`` if the fast path may serve it.

    Args:
        data: bytes starting at the first byte of a request. Anything after the
            first CRLFCRLF (a pipelined request, a smuggled body) is ignored.
        length: the index just past that CRLFCRLF when the caller already
            found it (:func:`find_head_end`), else -1.

    Returns:
        A :class:`RequestHead` only for an unambiguous, bodiless ``GET`` that
        twisted.web would parse as exactly one request with the same method,
        target and headers, ending at ``length``. ``None`` for everything else,
        including a head not yet complete within :data:`MAX_HEAD_BYTES`; the
        caller then hands the untouched bytes to twisted.web. Never raises.

    The rules (each has a test in ``tests/accel/test_head.py``):

    * request line exactly ``GET SP target SP HTTP/1.1``; no leading empty line;
    * target in origin form, bytes 0x21-0x7E only, no ``%``, ``#``, ``\\``,
      ``//``, ``/./``, ``/../``, trailing ``/.`` or ``/..``, at most 8 KiB;
    * CRLF line endings only; no obs-fold; header names are tokens directly
      followed by ``:``; values are HTAB or printable ASCII;
    * no Transfer-Encoding, TE, Expect, Upgrade or HTTP2-Settings; a
      Content-Length only as a single ``0``; Connection tokens only
      keep-alive/close (and read the same way by twisted);
    * exactly one Host; at most one Authorization, Proxy-Authorization,
      Cookie, Range, If-Range, Connection, Content-Length, X-Request-Id;
    * at most :data:`MAX_HEADERS` headers and :data:`MAX_HEAD_BYTES` bytes.
    """
    if length < 0:
        length = data.find(_HEAD_TERMINATOR, 0, MAX_HEAD_BYTES) + 4
        if length < 4:
            return None
    elif length > MAX_HEAD_BYTES:
        return None
    match = _HEAD.fullmatch(data, 0, length)
    if match is None:
        return None
    target, block = match.groups()
    # The substring tests are cheap and almost always false; the regex decides.
    if (b"//" in target or b"/." in target) and _BAD_SEGMENT.search(target) is not None:
        return None

    # The block is validated: each line is ``name ":" value CRLF`` and names
    # cannot contain ':', so _FIELD splits exactly where twisted does; the
    # value loses its surrounding SP/HTAB, as in twisted.
    fields = _FIELD.findall(block)
    if len(fields) > MAX_HEADERS:
        return None
    headers = []
    special = []
    # One loop, not two list comprehensions: cheaper for one header or ten.
    for name, value in fields:
        pair = (name.lower(), value.strip(b" \t"))
        headers.append(pair)
        if pair[0] in _SPECIAL_HEADERS:
            special.append(pair)
    # Almost every client sends Host as the only special header.
    lone_host = len(special) == 1 and special[0][0] == b"host"
    if not lone_host and not _special_headers_servable(special):
        return None
    path, _, query = target.partition(b"?")
    # tuple.__new__ directly: the named tuple's own __new__ is a Python function.
    return _new_head(
        RequestHead, (b"GET", target, path, query, b"HTTP/1.1", tuple(headers), length, lone_host)
    )


_new_head = tuple.__new__


def _special_headers_servable(special: list[tuple[bytes, bytes]]) -> bool:
    """Whether the headers named in ``_SPECIAL_HEADERS`` (in order) are servable."""
    seen: set[bytes] = set()
    for name, value in special:
        if _SPECIAL_HEADERS[name] == _FORBIDDEN or name in seen:
            return False
        seen.add(name)
        if name == b"content-length":
            if value != b"0":
                return False
        elif name == b"connection" and not _connection_is_unambiguous(value):
            return False
    # HTTP/1.1 requires exactly one Host (RFC 9112 3.2); h11 refuses a request
    # without one while twisted accepts it, so a Host-less head falls back.
    return b"host" in seen


def parse_query(raw: bytes) -> dict[str, list[str]] | None:
    """The query parameters of ``raw``, if no decoder could read them differently.

    Args:
        raw: the raw query (:attr:`RequestHead.query`).

    Returns:
        ``{name: [values in order]}``, with values possibly repeated (callers
        reject duplicates). It equals both ``urllib.parse.parse_qs(raw,
        keep_blank_values=True)`` (kura's fallback) and twisted's decoded
        ``request.args`` for every input where it is not ``None``. Empty
        fields (``a=1&&b=2``, a trailing ``&``) are skipped, as both do.

        ``None`` (not servable) when decoding could change anything: a byte
        outside printable ASCII, ``%`` or ``+`` (percent/plus decoding), ``;``
        (a separator to twisted, a literal to urllib), a field without ``=``
        (twisted drops it, urllib keeps it as ``""``), or an empty name.
    """
    if _QUERY.fullmatch(raw) is None:
        return None
    params: dict[str, list[str]] = {}
    for field in raw.split(b"&"):
        if not field:
            continue
        name, equals, value = field.partition(b"=")
        if not equals or not name:
            return None
        params.setdefault(name.decode("ascii"), []).append(value.decode("ascii"))
    return params
