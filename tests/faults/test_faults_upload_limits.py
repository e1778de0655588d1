"""Upload limits under attack, against real ``twistd kura`` processes.

The trickle attack: one upload declares the whole ``KURA_TMP_DIR_MAX_BYTES``
and sends a byte a second. Reserving the declared length up front made every
other upload 503 until it left; reserved as bytes arrive, it holds one step.
And one address opening more uploads than ``KURA_MAX_UPLOADS_PER_CLIENT``
gets 429 for the excess while another address is served.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import threading
import time
from pathlib import Path

import pytest

from tests.faults.support import (
    CAS,
    GRADLE,
    MiB,
    call,
    control_round_trip,
    metric,
    metric_sum,
    staged_files,
    wait_for,
)
from tests.support.real import RawClient, RealNode

pytestmark = pytest.mark.faults

BUDGET = 64 * MiB
#: What one upload reserves per step (kura.storage.staging.RESERVATION_STEP).
STEP = MiB
#: Generous: a 1 MiB upload on loopback takes milliseconds.
PROMPT = 5.0


def _upload_head(target: str, length: int) -> bytes:
    return f"POST {target} HTTP/1.1\r\nHost: k\r\nContent-Length: {length}\r\n\r\n".encode()


def _still_connected(client: RawClient) -> bool:
    """Whether the server has neither answered nor closed ``client``'s connection."""
    readable, _, _ = select.select([client.sock], [], [], 0)
    return not readable


def _call_from(
    node: RealNode, source: str, method: str, target: str, body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One request from the local address ``source`` (loopback accepts all of 127/8)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", node.port, timeout=10, source_address=(source, 0)
    )
    try:
        conn.request(method, target, body=body)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def test_trickle_attack_on_the_staging_budget_blocks_nobody(tmp_path: Path) -> None:
    """An upload declaring the whole staging budget and trickling a byte a second holds one
    step; normal uploads meanwhile are answered 2xx promptly, and once the attacker leaves
    nothing of it is published or staged."""
    node = RealNode(str(tmp_path / "data"), KURA_TMP_DIR_MAX_BYTES=str(BUDGET)).start()
    try:
        control_round_trip(node)
        attacker = RawClient(node.port)
        attacker.send(_upload_head(CAS.format("attack"), BUDGET) + b"a", heads=[False])
        stop = threading.Event()
        trickled = [1]
        errors: list[BaseException] = []

        def trickle() -> None:
            try:
                while not stop.wait(1.0):
                    attacker.sock.sendall(b"a")
                    trickled[0] += 1
            except OSError as error:
                errors.append(error)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            wait_for(lambda: trickled[0] >= 3, what="the attacker trickles")
            assert metric(node, "kura_tmp_dir_bytes") == STEP, "one step, not the declared length"

            body = os.urandom(MiB)
            started = time.monotonic()
            status, _, _ = call(node, "POST", CAS.format("normal"), body, timeout=PROMPT)
            cas_seconds = time.monotonic() - started
            assert status == 204
            started = time.monotonic()
            status, _, _ = call(node, "PUT", GRADLE.format("normal"), body, timeout=PROMPT)
            gradle_seconds = time.monotonic() - started
            assert status == 201
            assert cas_seconds < PROMPT and gradle_seconds < PROMPT
            # ... all while the attacker is still connected and trickling.
            assert thread.is_alive() and not errors, errors
            assert _still_connected(attacker)
            print(
                f"trickle attack: 1 MiB CAS POST {cas_seconds * 1000:.0f} ms, Gradle PUT "
                f"{gradle_seconds * 1000:.0f} ms, attacker at byte {trickled[0]} of {BUDGET}"
            )
        finally:
            stop.set()
            thread.join(5)
            attacker.close()
        wait_for(
            lambda: not staged_files(node.data_dir) and metric(node, "kura_tmp_dir_bytes") == 0,
            what="the attacker's staging file and reservation are gone",
        )
        assert call(node, "GET", CAS.format("attack"))[0] == 404
        assert call(node, "GET", CAS.format("normal"))[2] == body
        assert metric_sum(node, "kura_http_requests_total", status="503") == 0
    finally:
        node.kill()


def test_one_address_over_the_cap_gets_429_while_another_is_served(tmp_path: Path) -> None:
    """An address holding KURA_MAX_UPLOADS_PER_CLIENT uploads gets 429 + Retry-After for the
    next one, while another address (127.0.0.2) is served; a slot comes back when one of its
    uploads completes or its client leaves."""
    cap = 4
    node = RealNode(str(tmp_path / "data"), KURA_MAX_UPLOADS_PER_CLIENT=str(cap)).start()
    held: list[RawClient] = []
    try:
        control_round_trip(node)
        for n in range(cap):
            client = RawClient(node.port)
            client.send(_upload_head(CAS.format(f"held{n}"), MiB) + b"h", heads=[False])
            held.append(client)
        wait_for(
            lambda: metric(node, "kura_tmp_dir_bytes") == cap * STEP,
            what="every held upload is staging",
        )
        started = time.monotonic()
        status, headers, body = call(node, "POST", CAS.format("excess"), os.urandom(1024))
        refused_seconds = time.monotonic() - started
        assert status == 429
        assert headers["retry-after"] == "1"
        assert json.loads(body)["message"] == "Too many concurrent uploads from this client"
        assert metric(node, "kura_upload_rejections_total", reason="client_uploads") == 1

        started = time.monotonic()
        other = os.urandom(MiB)
        status, _, _ = _call_from(node, "127.0.0.2", "POST", CAS.format("other"), other)
        other_seconds = time.monotonic() - started
        assert status == 204
        assert all(_still_connected(client) for client in held)
        print(
            f"per-client cap: excess refused in {refused_seconds * 1000:.0f} ms, "
            f"other address served in {other_seconds * 1000:.0f} ms"
        )

        held[0].send(b"h" * (MiB - 1))
        assert held[0].read_responses(1)[0].status == 204
        held[1].reset()
        wait_for(
            lambda: metric(node, "kura_tmp_dir_bytes") == (cap - 2) * STEP,
            what="the finished and the abandoned upload gave their steps back",
        )
        # Exactly those two slots came back: two more uploads fit, a third does not.
        for n in range(2):
            client = RawClient(node.port)
            client.send(_upload_head(CAS.format(f"again{n}"), MiB) + b"h", heads=[False])
            held.append(client)
        wait_for(
            lambda: metric(node, "kura_tmp_dir_bytes") == cap * STEP,
            what="the new uploads are staging",
        )
        assert call(node, "POST", CAS.format("excess"), b"x")[0] == 429
        assert metric(node, "kura_upload_rejections_total", reason="client_uploads") == 2
        assert call(node, "GET", CAS.format("excess"))[0] == 404
        assert call(node, "GET", CAS.format("held1"))[0] == 404
    finally:
        for client in held:
            client.close()
        node.kill()
