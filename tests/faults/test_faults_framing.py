"""Framing attacks over TCP, accelerator on and off: header bombs and the smuggling matrix.

Each case (:mod:`tests.faults.framing_cases`)
is sent on a fresh connection to two real nodes, one with the same-port
accelerator and one without. Every case must end as a 400-class refusal
that closes the connection, or as exactly one request; both nodes must answer
byte for byte alike (Date and X-Request-Id aside); and the embedded second
request must never be dispatched: no count on its route, its marker nowhere
in the access log.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kura.testing import parse_responses
from tests.faults.framing_cases import PRESENT, cases
from tests.faults.support import call, metric_sum, node_log
from tests.support.real import RealNode

pytestmark = pytest.mark.faults

IDLE = 1.5
REFUSALS = {400, 408, 413, 414, 431}
NAMES = [case.name for case in cases("x")]
#: Headers that legitimately differ between two nodes.
VOLATILE = ("date", "x-request-id", "etag")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RealNode]]:
    """One node with the accelerator, one without; short head and idle timeouts."""
    base = tmp_path_factory.mktemp("framing")
    timeouts = {
        "KURA_HEADER_TIMEOUT_MS": str(int(IDLE * 1000)),
        "KURA_KEEPALIVE_IDLE_TIMEOUT_MS": str(int(IDLE * 1000)),
    }
    started: dict[str, RealNode] = {}
    try:
        for name, enabled in (("on", "true"), ("off", "false")):
            node = RealNode(
                str(base / name), KURA_ACCELERATED_FILE_SERVING_ENABLED=enabled, **timeouts
            ).start()
            started[name] = node
            assert call(node, "PUT", PRESENT, b"present-body")[0] == 201
        yield started
    finally:
        for node in started.values():
            node.kill()


def _send(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data``; read until the server closes. Returns the bytes and the seconds taken."""
    with socket.create_connection(("127.0.0.1", port), timeout=IDLE + 5) as sock:
        started = time.monotonic()
        # Refused mid-send: what it answered is still readable.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received, time.monotonic() - started


def _normalized(received: bytes) -> tuple[list[Any], bytes]:
    responses, rest = parse_responses(received, [])
    shown = []
    for response in responses:
        headers = {name: value for name, value in response.headers.items() if name not in VOLATILE}
        shown.append((response.status, headers, response.body))
    return shown, rest


@pytest.mark.parametrize("case", NAMES)
def test_framing_case_is_refused_or_one_request_and_never_smuggles(
    nodes: dict[str, RealNode], case: str
) -> None:
    """A 400 + close or one request, the same on both paths; the embedded GET never runs."""
    marker = f"smuggled{NAMES.index(case)}x{time.monotonic_ns()}"
    data = {c.name: c for c in cases(marker)}[case].data
    answers = {}
    for name, node in nodes.items():
        received, elapsed = _send(node.port, data)
        responses, rest = _normalized(received)
        answers[name] = responses
        assert rest == b"", f"{name}: unparsed trailing bytes {rest[:80]!r}"
        assert len(responses) == 1, f"{name}: {[r[0] for r in responses]} (a second request ran)"
        status = responses[0][0]
        assert status < 500, f"{name}: {status}"
        if status in REFUSALS:
            assert elapsed < IDLE - 0.3, f"{name}: {status} without closing the connection"
    assert answers["on"] == answers["off"]
    for name, node in nodes.items():
        assert metric_sum(node, "kura_http_requests_total", route="/api/cache/cas/{id}") == 0
        assert marker not in node_log(node), f"{name} logged the embedded request"
