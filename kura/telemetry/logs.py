"""Log observers: one JSON object per line (production) or plain text.

Events are written with ``twisted.logger`` and PEP-3101 format strings whose
fields stay structured; the JSON observer keeps every JSON-serializable field
next to the rendered message, so operators can filter on ``route``,
``status`` or ``request_id`` without parsing text.

A busy node logs one access line per request; writing and flushing each
one on the reactor thread cost a third of the accelerated throughput. So
access lines skip ``twisted.logger``: :meth:`BatchedLineWriter.write_access`
(through :func:`log_access`) renders, from the request's bytes in one formatting
step, the fields and values the JSON observer would render for the access
event, and queues the line; a writer thread writes what has queued up
every :data:`FLUSH_INTERVAL` seconds and everything at exit, so a slow disk
or a full pipe on stdout does not stop the reactor for them. (Formatting
on the writer thread instead was measured and is worse: a batch of
thousands of lines holds the GIL for milliseconds, and the reactor's p99
went from 1 ms to 12 ms.) Every other event is written at once through the
same writer, behind the access lines queued before it, as before.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import os
import sys
import threading
import time
from typing import IO, Any, TextIO

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

_INTERNAL_FIELDS = frozenset(
    {
        "log_format",
        "log_level",
        "log_namespace",
        "log_time",
        "log_source",
        "log_logger",
        "log_io",
        "log_text",
        "log_system",
        "log_failure",
        "log_trace",
        "log_flattened",
        "log_legacy",
        "message",
        "format",
        "isError",
        "system",
        "time",
        "why",
        "failure",
    }
)


def event_as_json_line(event: LogEvent) -> str:
    """Render one event as a single JSON line (with a trailing newline)."""
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key in _INTERNAL_FIELDS or key.startswith("_"):
            continue
        if isinstance(value, str | int | float | bool) or value is None:
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str) + "\n"


def json_lines_observer(out: IO[str]) -> ILogObserver:
    """Write and flush each event's JSON line to ``out`` at once (tests, tools)."""
    return FileLogObserver(out, event_as_json_line)


_json_string = json.encoder.encode_basestring_ascii  # what json.dumps uses, in C


#: The namespace of access lines (:func:`log_access`; in the text format
#: through ``Logger(namespace=ACCESS_NAMESPACE)``).
ACCESS_NAMESPACE = "kura.http"

#: Bytes that stand for themselves inside a JSON string: printable ASCII but ``"`` and ``\\``.
_PLAIN_JSON = bytes(byte for byte in range(0x20, 0x7F) if byte not in b'"\\')
# Maps every byte a JSON string must escape (and 0x00 -> 0x01) to another
# byte and every other byte to itself, so ``value.translate(_MARK_ESCAPED) ==
# value`` says whether *value* goes into a JSON string as it is: one table
# pass (translate with a deletion set builds its table on every call).
_MARK_ESCAPED = bytes(
    byte if byte in _PLAIN_JSON else (1 if byte == 0 else 0) for byte in range(256)
)
# Methods whose bytes need no escaping (the check for any other is the table's).
_PLAIN_METHODS = frozenset({b"GET", b"HEAD", b"PUT", b"POST", b"DELETE", b"OPTIONS", b"PATCH"})
# Status codes as the line writes them (``%d`` of an int is several times a
# look-up's cost); a code outside this range is rendered on the spot.
_STATUS_TEXT = {status: b"%d" % status for status in range(100, 600)}


def _json_inner(value: bytes) -> bytes:
    """*value* as the inside of a JSON string, as :func:`json.dumps` writes it
    (ASCII; a byte outside ASCII is U+FFFD, as the event's ``replace`` decode made it)."""
    if value.translate(_MARK_ESCAPED) == value:
        return value
    return _json_string(value.decode("ascii", "replace")).encode("ascii")[1:-1]


def _access_template(route: str) -> bytes:
    """The access line of *route* with the request's parts left as ``%`` fields:
    time, then method, path, status and request id for ``message`` and again
    for their own fields."""
    constant = b'"namespace": %s, ' % _json_string(ACCESS_NAMESPACE).encode("ascii")
    route_json = _json_string(route).encode("ascii").replace(b"%", b"%%")
    return (
        b'{"time": %s, "level": "info", '
        + constant.replace(b"%", b"%%")
        + b'"message": "%s %s %s %s", "method": "%s", "path": "%s", "status": %s, '
        + b'"request_id": "%s", "route": '
        + route_json
        + b"}\n"
    )


#: Most seconds a line waits in a :class:`BatchedLineWriter` before it is written.
FLUSH_INTERVAL = 0.1
#: Most lines queued in a :class:`BatchedLineWriter`; beyond, lines are dropped and counted.
MAX_PENDING_LINES = 200_000


class BatchedLineWriter:
    """Lines written by a background thread, in the order they were queued.

    :meth:`write` and :meth:`write_access` only append to a queue (safe
    from any thread, never block); the writer thread writes and flushes the
    queued lines every ``interval`` seconds. :meth:`close` (also run at
    exit) writes what is left and stops the thread; after it, a queued line
    is written at once. When ``max_pending`` lines are queued (the output is
    stuck), further lines are dropped and a warning line counts them once
    writing resumes, so memory stays bounded.

    Args:
        out: where the lines go (bytes: the lines are ASCII JSON).
        interval: seconds between writes.
        max_pending: most lines queued at once.
    """

    def __init__(
        self,
        out: IO[bytes],
        *,
        interval: float = FLUSH_INTERVAL,
        max_pending: int = MAX_PENDING_LINES,
    ) -> None:
        self._out = out
        self._interval = interval
        self._max_pending = max_pending
        self._pending: collections.deque[bytes] = collections.deque()
        self._dropped = 0
        self._closed = False
        self._stop = threading.Event()
        # write_access's memory: the route's line template, and the time as
        # rendered for the millisecond it was last rendered in.
        self._templates: dict[str, bytes] = {}
        self._millisecond = -1
        self._time_text = b""
        self._start_thread()
        # twistd forks when it daemonizes, after the observer exists; a
        # child has no writer thread until this makes it one.
        os.register_at_fork(after_in_child=self._start_thread)

    def _start_thread(self) -> None:
        # Held while lines are taken off the queue and written: keeps the
        # writer thread and close() from interleaving their batches.
        self._drain_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kura-log-writer", daemon=True)
        if not self._closed:
            self._thread.start()

    def write(self, line: bytes) -> None:
        """Queue ``line`` (a whole line, newline included)."""
        pending = self._pending
        if len(pending) >= self._max_pending:
            self._dropped += 1
            return
        pending.append(line)
        if self._closed:
            self.flush()

    def write_access(
        self, method: bytes, path: bytes, status: int, request_id: bytes, route: str
    ) -> None:
        """Queue the access line of one request.

        It has the fields and values :func:`event_as_json_line` renders for
        ``Logger(namespace=ACCESS_NAMESPACE).info("{method} {path} {status}
        {request_id}", method=..., path=..., status=..., request_id=...,
        route=...)`` with the bytes decoded as ASCII (``tests/test_logs.py``
        compares them), the time to the millisecond. It runs once per
        request on the reactor thread, so it is one formatting step with
        nothing called that need not be: the route's template is made once,
        the time rendered once per millisecond, and *method* and *path*
        escaped only when a byte needs it. *request_id* must be one of
        :class:`~kura.web.request_ids.RequestIds`' (``[A-Za-z0-9._:-]``).
        """
        if method not in _PLAIN_METHODS or path.translate(_MARK_ESCAPED) != path:
            method, path = _json_inner(method), _json_inner(path)
        status_text = _STATUS_TEXT.get(status) or b"%d" % status
        millisecond = time.time_ns() // 1_000_000  # exact, and cheaper than int(time() * 1000)
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            self._time_text = b"%d.%03d" % divmod(millisecond, 1000)
        template = self._templates.get(route)
        if template is None:
            template = self._templates[route] = _access_template(route)
        pending = self._pending
        if len(pending) >= self._max_pending:
            self._dropped += 1
            return
        pending.append(
            template
            % (
                self._time_text,
                method,
                path,
                status_text,
                request_id,
                method,
                path,
                status_text,
                request_id,
            )
        )
        if self._closed:
            self.flush()

    def flush(self) -> None:
        """Write every queued line now (on the calling thread)."""
        with self._drain_lock:
            # Only what is queued now: lines queued meanwhile wait for the
            # next turn. starmap calls popleft from C, no bytecode per line.
            lines = list(
                itertools.starmap(self._pending.popleft, itertools.repeat((), len(self._pending)))
            )
            dropped, self._dropped = self._dropped, 0
            if dropped:
                lines.append(_dropped_line(dropped))
            if lines:
                try:
                    self._out.write(b"".join(lines))
                    self._out.flush()
                except (OSError, ValueError):
                    pass  # nowhere left to report it: stdout is gone

    def close(self) -> None:
        """Write what is queued and stop the thread (idempotent)."""
        self._closed = True
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()


def _dropped_line(count: int) -> bytes:
    return (
        json.dumps(
            {
                "time": time.time(),
                "level": "warn",
                "namespace": __name__,
                "message": f"{count} log lines dropped: the log output did not keep up",
                "dropped": count,
            }
        )
        + "\n"
    ).encode("ascii")


@implementer(ILogObserver)
class BatchedJsonObserver:
    """The JSON-lines observer sharing a :class:`BatchedLineWriter` with the access lines.

    Each event is written at once, on the thread that logs it, after the
    access lines queued before it (so the order of lines is kept): other
    events are rare, and operators and tests expect a warning or an audit
    record in the log as soon as it happened. Only access lines, one per
    request, wait for the writer thread.
    """

    def __init__(self, writer: BatchedLineWriter) -> None:
        self.writer = writer

    def __call__(self, event: LogEvent) -> None:
        writer = self.writer
        writer.write(event_as_json_line(event).encode("utf-8"))
        writer.flush()


#: The writer that takes access lines directly (:meth:`BatchedLineWriter.write_access`):
#: set while the node logs JSON through :func:`observer_for`, so access lines go
#: into the same queue as every other event (the order of lines is kept)
#: instead of through ``twisted.logger``. ``None`` otherwise (text format,
#: tests): :func:`log_access` logs an event.
_access_writer: BatchedLineWriter | None = None


#: The access event's format; its fields are the access line's.
ACCESS_FORMAT = "{method} {path} {status} {request_id}"

_access_log = Logger(namespace=ACCESS_NAMESPACE)


def log_access(
    method: bytes, path: bytes, status: int, request_id: str | bytes, route: str
) -> None:
    """Log the access of one request; both serving paths log through here.

    When the node logs JSON lines, the line goes straight to their writer
    with the fields and values the event would have had, at a fraction of
    the cost; otherwise it is an event of
    ``Logger(namespace=ACCESS_NAMESPACE)`` with :data:`ACCESS_FORMAT`.
    *request_id* is ASCII (twisted.web's requests hold it as text).
    """
    writer = _access_writer  # read as a global: no call on the way, once per request
    if writer is not None:
        if not isinstance(request_id, bytes):
            request_id = request_id.encode("ascii")
        writer.write_access(method, path, status, request_id, route)
        return
    _access_log.info(
        ACCESS_FORMAT,
        method=method.decode("ascii", "replace"),
        path=path.decode("ascii", "replace"),
        status=status,
        request_id=request_id if isinstance(request_id, str) else request_id.decode("ascii"),
        route=route,
    )


def observer_for(log_format: str, out: TextIO | None = None) -> ILogObserver:
    """The node's observer for ``KURA_LOG_FORMAT`` (``json`` or ``text``), on stdout.

    The JSON observer writes through a :class:`BatchedLineWriter` that also
    takes the access lines (:func:`log_access`); it is closed (its lines written) at exit
    or by :func:`flush_logs`.
    """
    global _access_writer  # noqa: PLW0603 - one log output per process
    stream = out if out is not None else sys.stdout
    if log_format == "text":
        return textFileLogObserver(stream)
    # The lines are bytes: written below the text layer, after what it holds.
    stream.flush()
    writer = BatchedLineWriter(stream.buffer)
    atexit.register(writer.close)
    _access_writer = writer
    return BatchedJsonObserver(writer)


def flush_logs() -> None:
    """Write every queued log line now (before the process ends without ``atexit``)."""
    if _access_writer is not None:
        _access_writer.flush()
