"""The request side of an HTTP/2 test client, written with the ``h2`` library.

:class:`H2Requests` opens client streams on an ``h2`` connection that
advertises a chosen flow-control window; the deterministic client in
``tests/web/test_h2.py`` and the raw-socket client of the fault suite add
their own transport and event handling.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.settings

#: HTTP/2's default flow-control window.
DEFAULT_WINDOW = 65_535


class H2Requests:
    """A client-side ``h2`` connection that opens request streams.

    Args:
        window: the flow-control window advertised, for every stream and
            for the connection.

    Attributes:
        h2: the connection; its bytes to send are ``h2.data_to_send()``.
    """

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        if window > DEFAULT_WINDOW:
            self.h2.increment_flow_control_window(window - DEFAULT_WINDOW)
        self._next_stream = 1

    def get(self, target: str) -> int:
        """Open a stream with a complete GET; return its id."""
        return self._open(b"GET", target, [], end_stream=True)

    def post_head(self, target: str, length: int) -> int:
        """Open a stream with a POST's headers (its body follows); return its id."""
        return self._open(b"POST", target, [(b"content-length", b"%d" % length)], end_stream=False)

    def _open(
        self, method: bytes, target: str, extra: list[tuple[bytes, bytes]], *, end_stream: bool
    ) -> int:
        stream_id = self._next_stream
        self._next_stream += 2
        head = [
            (b":method", method),
            (b":path", target.encode("ascii")),
            (b":scheme", b"http"),
            (b":authority", b"kura"),
        ]
        self.h2.send_headers(stream_id, head + extra, end_stream=end_stream)
        return stream_id
