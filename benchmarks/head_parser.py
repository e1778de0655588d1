"""Per-call cost of the accelerator's request-head parser (kura.accel.head).

Prints microseconds per call for typical request heads, for the limits the
parser accepts, for heads it refuses, and for ``find_head_end`` and
``parse_query``. Each figure is the median of ``--repeat`` timeit runs of
``--number`` calls (min and max in brackets). It asserts nothing about speed.

Usage (from the repository root)::

    .venv/bin/python benchmarks/head_parser.py [--number 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable

# Run the working tree, not a copy installed into the venv.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kura.accel.head import (
    MAX_HEAD_BYTES,
    find_head_end,
    parse_head,
    parse_query,
)

REQUEST_LINE = (
    b"GET /api/cache/cas/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
    b"?tenant_id=acme&namespace_id=ios HTTP/1.1"
)

TYPICAL_HEADERS = (
    b"Host: kura.example.com:4000",
    b"User-Agent: xcodebuild (16.0)",
    b"Accept: */*",
    b"Accept-Encoding: gzip, deflate, br",
    b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjaSJ9.c2lnbmF0dXJl",
)


def head(*headers: bytes, request_line: bytes = REQUEST_LINE) -> bytes:
    """The wire form of a request head."""
    return b"".join(line + b"\r\n" for line in (request_line, *headers)) + b"\r\n"


def cases() -> list[tuple[str, Callable[[], object]]]:
    """(label, zero-argument call) pairs to time."""
    minimal = head(b"Host: kura")
    typical = head(*TYPICAL_HEADERS)
    ranged = head(
        *TYPICAL_HEADERS,
        b"X-Request-Id: 5f0c9c9e-3f43-4f5e-9d0e-7d0a2c9b1e11",
        b"Range: bytes=0-1023",
        b'If-Range: "sha256-9f86d081884c7d659a2feaa0c55ad015"',
        b"Connection: keep-alive",
    )
    hundred = head(b"Host: kura", *(b"X-Header-%d: value-%d" % (i, i) for i in range(99)))
    pad = MAX_HEAD_BYTES - len(head(b"Host: kura", b"X-Pad: "))
    largest = head(b"Host: kura", b"X-Pad: " + b"p" * pad)
    refused_te = head(*TYPICAL_HEADERS, b"Transfer-Encoding: chunked")
    refused_lf = typical.replace(b"\r\nAccept:", b"\nAccept:")
    query = parse_head(typical)
    assert query is not None
    for data in (minimal, typical, ranged, hundred, largest):
        assert parse_head(data) is not None
    return [
        (f"parse_head minimal GET ({len(minimal)} B, 1 header)", lambda: parse_head(minimal)),
        (f"parse_head typical GET ({len(typical)} B, 5 headers)", lambda: parse_head(typical)),
        (f"parse_head ranged GET ({len(ranged)} B, 9 headers)", lambda: parse_head(ranged)),
        (f"parse_head 100 headers ({len(hundred)} B)", lambda: parse_head(hundred)),
        (f"parse_head {len(largest)} B head", lambda: parse_head(largest)),
        ("parse_head refused: Transfer-Encoding", lambda: parse_head(refused_te)),
        ("parse_head refused: bare LF", lambda: parse_head(refused_lf)),
        ("find_head_end typical, from 0", lambda: find_head_end(typical, 0)),
        (
            "find_head_end typical, last segment",
            lambda: find_head_end(typical, len(typical) - 10),
        ),
        (f"parse_query {query.query.decode()!r}", lambda: parse_query(query.query)),
    ]


def main() -> None:
    """Time every case and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per timeit run")
    parser.add_argument("--repeat", type=int, default=7, help="timeit runs per case")
    args = parser.parse_args()
    print(f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"median [min-max] of {args.repeat} runs x {args.number} calls\n")
    print(f"| {'case':<52} | {'µs/call':>22} |")
    print(f"|{'-' * 54}|{'-' * 24}|")
    for label, call in cases():
        runs = timeit.repeat(call, number=args.number, repeat=args.repeat)
        per_call = sorted(run / args.number * 1e6 for run in runs)
        figure = f"{statistics.median(per_call):.2f} [{per_call[0]:.2f}-{per_call[-1]:.2f}]"
        print(f"| {label:<52} | {figure:>22} |")


if __name__ == "__main__":
    main()
