"""Range and If-Range resolution for artifact downloads (both serving paths).

Upstream Kura's rules, which differ from ``twisted.web.static.File``:

* only a single ``bytes=`` range is honoured: ``a-b``, ``a-`` or ``-n``;
  multi-range and malformed headers are served whole with 200;
* a range that starts past the end is 416 with ``Content-Range: bytes */SIZE``
  (never widened to a 200);
* a satisfiable range is 206 with ``Content-Range: bytes a-b/SIZE``, even
  when it covers the whole artifact;
* an ``If-Range`` that does not equal the ETag (after trimming) sends the
  whole artifact with 200, even when the range was unsatisfiable.
"""

from __future__ import annotations

import attrs

from kura.domain.errors import RangeNotSatisfiable


@attrs.frozen
class BodySlice:
    """The part of an artifact a response carries.

    Attributes:
        status: 200 for the whole body, 206 for a range.
        offset: first byte.
        length: number of bytes.
        content_range: the ``Content-Range`` value for a 206, else ``None``.
    """

    status: int
    offset: int
    length: int
    content_range: str | None = None


def _digits(text: str) -> int | None:
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def resolve_range(
    range_header: str | None, if_range: str | None, size: int, etag: str
) -> BodySlice:
    """Decide which bytes of a ``size``-byte artifact to send.

    Raises:
        RangeNotSatisfiable: a single well-formed range starts past the end.
    """
    whole = BodySlice(200, 0, size)
    if range_header is None:
        return whole
    if if_range is not None and if_range.strip() != etag:
        return whole
    unit, _, spec = range_header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return whole
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return whole
    first_text, last_text = first_text.strip(), last_text.strip()
    if first_text == "":
        suffix = _digits(last_text)
        if suffix is None:
            return whole
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        first, last = max(0, size - suffix), size - 1
    else:
        start = _digits(first_text)
        if start is None:
            return whole
        if last_text == "":
            end = size - 1
        else:
            parsed_end = _digits(last_text)
            if parsed_end is None or parsed_end < start:
                return whole
            end = parsed_end
        if start >= size:
            raise RangeNotSatisfiable(size)
        first, last = start, min(end, size - 1)
    return BodySlice(206, first, last - first + 1, f"bytes {first}-{last}/{size}")
