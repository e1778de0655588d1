"""The ``Date`` header of responses, formatted once per second: :class:`DateCache`.

Both serving paths stamp every response with the current second; formatting
it (``gmtime`` and string building) is a measurable share of a small
response, and the value only changes once a second.
"""

from __future__ import annotations

import time

from twisted.web.http import datetimeToString


class DateCache:
    """The ``Date`` value, formatted at most once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self, now: float | None = None) -> bytes:
        second = int(time.time() if now is None else now)
        if second != self._second:
            self._second = second
            self._value = datetimeToString(second)
        return self._value
