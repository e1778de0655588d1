"""Log observers: one JSON object per line (production) or plain text.

Events are written with ``twisted.logger`` and PEP-3101 format strings whose
fields stay structured; the JSON observer keeps every JSON-serializable field
next to the rendered message, so operators can filter on ``route``,
``status`` or ``request_id`` without parsing text.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    textFileLogObserver,
)

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
    return FileLogObserver(out, event_as_json_line)


def observer_for(log_format: str, out: IO[str] | None = None) -> ILogObserver:
    """The observer for ``KURA_LOG_FORMAT`` (``json`` or ``text``), on stdout."""
    stream = out if out is not None else sys.stdout
    if log_format == "text":
        return textFileLogObserver(stream)
    return json_lines_observer(stream)
