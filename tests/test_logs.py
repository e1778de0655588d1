"""The JSON log lines: the access line shortcut and the batched writer."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.logger import Logger, LogPublisher

from kura.telemetry import logs
from kura.telemetry.logs import BatchedJsonObserver, BatchedLineWriter, event_as_json_line

NOW = 1764683000.123456

ACCESS_CASES = [
    (b"GET", b"/api/cache/cas/abc", 200, b"0a1b2c3d4e5f0000000001", "/api/cache/cas/<id>"),
    (b"HEAD", b'/quote"and\\back', 404, b"req-1", "/x"),
    (b"PUT", b"/\xc3\xa9/caf\xe9", 499, b"id:2", "/<tenant>/{weird}"),
    (b"GET", b"/tab\there\nnew\x7f", 206, b"x", ""),
    (b'G"T', b"/", 200, b"x", '/"route"'),
    (b"PROPFIND", b"/plain", 1000, b"x", "/"),  # a method and a status outside the tables
    (b"GET", b"/\x00/\x01", 99, b"x", "/"),  # NUL and the byte the table marks it with
]


def frozen_clock(now: Callable[[], float]) -> SimpleNamespace:
    """A stand-in for the ``time`` module of :mod:`kura.telemetry.logs` that reads *now*."""
    return SimpleNamespace(time=now, time_ns=lambda: round(now() * 1e9))


def _event_line(method: bytes, path: bytes, status: int, request_id: bytes, route: str) -> str:
    """The line twisted.logger's event for this request renders to (at :data:`NOW`)."""
    events: list[Any] = []
    publisher = LogPublisher(events.append)
    Logger(namespace="kura.http", observer=publisher).info(
        logs.ACCESS_FORMAT,
        method=method.decode("ascii", "replace"),
        path=path.decode("ascii", "replace"),
        status=status,
        request_id=request_id.decode("ascii"),
        route=route,
    )
    events[0]["log_time"] = NOW
    return event_as_json_line(events[0])


def _same_record(line: str, event_line: str) -> None:
    """The same fields with the same values, in the same order; the time to the millisecond."""
    assert line.endswith("\n") and "\n" not in line[:-1]
    record, expected = json.loads(line), json.loads(event_line)
    assert list(record) == list(expected)
    assert record.pop("time") == pytest.approx(expected.pop("time"), abs=0.001)
    assert record == expected


def access_line(method: bytes, path: bytes, status: int, request_id: bytes, route: str) -> str:
    """The line a writer queues for one request, as text."""
    out = io.BytesIO()
    writer = BatchedLineWriter(out, interval=3600)
    try:
        writer.write_access(method, path, status, request_id, route)
        assert out.getvalue() == b""  # queued, not written on the caller's thread
    finally:
        writer.close()
    return out.getvalue().decode("ascii")


@pytest.mark.parametrize(("method", "path", "status", "request_id", "route"), ACCESS_CASES)
def test_access_line_is_the_events_json_line(
    method: bytes, path: bytes, status: int, request_id: bytes, route: str, monkeypatch: Any
) -> None:
    monkeypatch.setattr(logs, "time", frozen_clock(lambda: NOW))
    expected = _event_line(method, path, status, request_id, route)
    line = access_line(method, path, status, request_id, route)
    _same_record(line, expected)
    assert '"time": 1764683000.123, ' in line
    method_text, path_text = method.decode("ascii", "replace"), path.decode("ascii", "replace")
    message = json.loads(line)["message"]
    assert message == f"{method_text} {path_text} {status} {request_id.decode()}"


def test_the_escape_table_marks_exactly_the_bytes_json_escapes() -> None:
    """``value.translate(_MARK_ESCAPED) != value`` for a byte iff json.dumps would escape it."""
    for byte in range(256):
        value = bytes([byte]) * 3
        escaped = json.dumps(value.decode("latin-1"))[1:-1] != value.decode("latin-1")
        assert (value.translate(logs._MARK_ESCAPED) != value) is escaped, byte


def test_the_access_time_moves_with_each_millisecond(monkeypatch: Any) -> None:
    """The rendered time is reused within a millisecond, never across one."""
    now = [NOW]
    monkeypatch.setattr(logs, "time", frozen_clock(lambda: now[0]))
    out = io.BytesIO()
    writer = BatchedLineWriter(out, interval=3600)
    for moment in (NOW, NOW + 0.0004, NOW + 0.0009, 1764683001.0005):
        now[0] = moment
        writer.write_access(b"GET", b"/", 200, b"x", "/")
    writer.close()
    times = [json.loads(line)["time"] for line in out.getvalue().splitlines()]
    assert times == [1764683000.123, 1764683000.123, 1764683000.124, 1764683001.0]


def test_log_access_writes_the_same_line_through_the_writer(monkeypatch: Any) -> None:
    monkeypatch.setattr(logs, "time", frozen_clock(lambda: NOW))
    out = io.BytesIO()
    writer = BatchedLineWriter(out, interval=3600)
    monkeypatch.setattr(logs, "_access_writer", writer)
    try:
        route = "/api/cache/cas/<id>"
        logs.log_access(b"GET", b"/api/cache/cas/abc", 200, b"rid-7", route)
        logs.log_access(b"GET", b"/api/cache/cas/def", 404, "rid-8", route)  # twisted.web's str
        assert out.getvalue() == b""  # queued, not written on the caller's thread
        writer.flush()
    finally:
        writer.close()
    first, second = out.getvalue().decode("ascii").splitlines(keepends=True)
    _same_record(
        first, _event_line(b"GET", b"/api/cache/cas/abc", 200, b"rid-7", "/api/cache/cas/<id>")
    )
    _same_record(
        second, _event_line(b"GET", b"/api/cache/cas/def", 404, b"rid-8", "/api/cache/cas/<id>")
    )


def test_writer_keeps_order_and_close_writes_everything() -> None:
    out = io.BytesIO()
    writer = BatchedLineWriter(out, interval=3600)
    for n in range(1000):
        writer.write(b"%d\n" % n)
    writer.close()
    assert out.getvalue() == b"".join(b"%d\n" % n for n in range(1000))
    writer.write(b"after close\n")  # written at once
    assert out.getvalue().endswith(b"999\nafter close\n")


def test_writer_thread_writes_within_its_interval() -> None:
    written = threading.Event()

    class Out(io.BytesIO):
        def flush(self) -> None:
            super().flush()
            if self.getvalue():
                written.set()

    out = Out()
    writer = BatchedLineWriter(out, interval=0.01)
    try:
        writer.write(b"line\n")
        assert written.wait(timeout=10)
        assert out.getvalue() == b"line\n"
    finally:
        writer.close()


def test_writer_drops_and_counts_beyond_its_bound() -> None:
    out = io.BytesIO()
    writer = BatchedLineWriter(out, interval=3600, max_pending=3)
    for n in range(4):
        writer.write(b"%d\n" % n)
    writer.write_access(b"GET", b"/", 200, b"x", "/")  # access lines count against the bound too
    writer.close()
    lines = out.getvalue().splitlines()
    assert lines[:3] == [b"0", b"1", b"2"]
    warning = json.loads(lines[3])
    assert warning["level"] == "warn" and warning["dropped"] == 2
    assert len(lines) == 4


def test_observer_writes_events_at_once_after_the_queued_access_lines() -> None:
    out = io.BytesIO()
    writer = BatchedLineWriter(out, interval=3600)
    observer = BatchedJsonObserver(writer)
    try:
        writer.write(b"access 1\n")
        writer.write(b"access 2\n")
        assert out.getvalue() == b""
        Logger(namespace="kura.test", observer=observer).warn("hello {who}", who="you")
        lines = out.getvalue().splitlines()
    finally:
        writer.close()
    assert lines[:2] == [b"access 1", b"access 2"]
    record = json.loads(lines[2])
    assert record["message"] == "hello you" and record["who"] == "you"
    assert record["namespace"] == "kura.test" and record["level"] == "warn"


def test_a_forked_child_gets_its_own_writer_thread() -> None:
    read_end, write_end = os.pipe()
    out = os.fdopen(write_end, "wb")
    writer = BatchedLineWriter(out, interval=0.01)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        alive = writer._thread.is_alive()
        writer.write(b"from the child\n")
        writer.close()
        os._exit(0 if alive else 1)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        writer.close()
        out.close()
    with os.fdopen(read_end) as received:
        assert received.read() == "from the child\n"
    assert os.waitstatus_to_exitcode(status) == 0
