"""The JSON log lines: the access line shortcut and the batched writer."""

from __future__ import annotations

import io
import json
import os
import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest
from twisted.logger import Logger, LogPublisher

from kura.telemetry import logs
from kura.telemetry.logs import (
    BatchedJsonObserver,
    BatchedLineWriter,
    access_line,
    event_as_json_line,
)
from kura.web import site
from kura.web.routing import RouteSpec

NOW = 1764683000.123456

ACCESS_CASES = [
    ("GET", "/api/cache/cas/abc", 200, "0a1b2c3d4e5f0000000001", "/api/cache/cas/<id>"),
    ("HEAD", '/quote"and\\back', 404, "req-1", "/x"),
    ("PUT", "/\ufffd\ufffd/caf\ufffd", 499, "id:2", "/<tenant>/{weird}"),
    ("GET", "/tab\there\nnew", 206, "x", ""),
]


def _event_line(method: str, path: str, status: int, request_id: str, route: str) -> str:
    events: list[Any] = []
    publisher = LogPublisher(events.append)
    Logger(namespace="kura.http", observer=publisher).info(
        site.ACCESS, method=method, path=path, status=status, request_id=request_id, route=route
    )
    events[0]["log_time"] = NOW
    return event_as_json_line(events[0])


@pytest.mark.parametrize(("method", "path", "status", "request_id", "route"), ACCESS_CASES)
def test_access_line_is_the_events_json_line(
    method: str, path: str, status: int, request_id: str, route: str, monkeypatch: Any
) -> None:
    monkeypatch.setattr(logs, "time", SimpleNamespace(time=lambda: NOW))
    expected = _event_line(method, path, status, request_id, route)
    assert expected.endswith("\n") and "1764683000.123456" in expected
    assert access_line(method, path, status, request_id, route, "kura.http") == expected
    assert json.loads(expected)["message"] == f"{method} {path} {status} {request_id}"


def test_log_access_writes_the_same_line_through_the_sink(monkeypatch: Any) -> None:
    monkeypatch.setattr(logs, "time", SimpleNamespace(time=lambda: NOW))
    out = io.StringIO()
    writer = BatchedLineWriter(out, interval=3600)
    monkeypatch.setattr(logs, "_access_writer", writer)
    spec = cast(RouteSpec, SimpleNamespace(template="/api/cache/cas/<id>"))
    try:
        site.log_access(b"GET", b"/api/cache/cas/abc", 200, b"rid-7", spec)
        assert out.getvalue() == ""  # queued, not written on the caller's thread
        writer.flush()
    finally:
        writer.close()
    expected = _event_line("GET", "/api/cache/cas/abc", 200, "rid-7", "/api/cache/cas/<id>")
    assert out.getvalue() == expected


def test_writer_keeps_order_and_close_writes_everything() -> None:
    out = io.StringIO()
    writer = BatchedLineWriter(out, interval=3600)
    for n in range(1000):
        writer.write(f"{n}\n")
    writer.close()
    assert out.getvalue() == "".join(f"{n}\n" for n in range(1000))
    writer.write("after close\n")  # written at once
    assert out.getvalue().endswith("999\nafter close\n")


def test_writer_thread_writes_within_its_interval() -> None:
    written = threading.Event()

    class Out(io.StringIO):
        def flush(self) -> None:
            super().flush()
            if self.getvalue():
                written.set()

    out = Out()
    writer = BatchedLineWriter(out, interval=0.01)
    try:
        writer.write("line\n")
        assert written.wait(timeout=10)
        assert out.getvalue() == "line\n"
    finally:
        writer.close()


def test_writer_drops_and_counts_beyond_its_bound() -> None:
    out = io.StringIO()
    writer = BatchedLineWriter(out, interval=3600, max_pending=3)
    for n in range(5):
        writer.write(f"{n}\n")
    writer.close()
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["0", "1", "2"]
    warning = json.loads(lines[3])
    assert warning["level"] == "warn" and warning["dropped"] == 2
    assert len(lines) == 4


def test_observer_writes_events_at_once_after_the_queued_access_lines() -> None:
    out = io.StringIO()
    writer = BatchedLineWriter(out, interval=3600)
    observer = BatchedJsonObserver(writer)
    try:
        writer.write("access 1\n")
        writer.write("access 2\n")
        assert out.getvalue() == ""
        Logger(namespace="kura.test", observer=observer).warn("hello {who}", who="you")
        lines = out.getvalue().splitlines()
    finally:
        writer.close()
    assert lines[:2] == ["access 1", "access 2"]
    record = json.loads(lines[2])
    assert record["message"] == "hello you" and record["who"] == "you"
    assert record["namespace"] == "kura.test" and record["level"] == "warn"


def test_a_forked_child_gets_its_own_writer_thread() -> None:
    read_end, write_end = os.pipe()
    out = os.fdopen(write_end, "w")
    writer = BatchedLineWriter(out, interval=0.01)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        alive = writer._thread.is_alive()
        writer.write("from the child\n")
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
