"""Extension hooks on both serving paths, over real sockets.

The extension used here records every hook call in a file, never caches
(TTL 0), accepts ``Bearer good`` and refuses anything else.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from kura.testing import Response
from tests.support.real import RawClient

CAS = "/api/cache/cas/{}?tenant_id=default"
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}

EXTENSION = """
from kura.auth import Allow, Deny, Headers, Principal

LOG = {log!r}


def _note(line):
    with open(LOG, "a") as handle:
        handle.write(line + "\\n")


def authenticate(ctx):
    _note(f"authenticate {{ctx.method}} {{ctx.route}}")
    if ctx.bearer_token() != "good":
        return Deny(401, "Invalid token", ttl_seconds=0)
    return Principal("tester", kind="user", ttl_seconds=0)


def authorize(ctx, principal):
    _note(f"authorize {{ctx.method}} {{ctx.route}} {{ctx.operation}} {{ctx.tenant_id}}")
    return Allow(ttl_seconds=0)


def response_headers(ctx, principal):
    _note(f"response_headers {{ctx.status_code}}")
    return Headers({{"x-policy": "checked"}})
"""


@pytest.fixture
def extension(tmp_path: Any) -> tuple[str, str]:
    log = f"{tmp_path}/hooks.log"
    script = f"{tmp_path}/policy.py"
    with open(script, "w") as handle:
        handle.write(textwrap.dedent(EXTENSION.format(log=log)))
    return script, log


def _calls(log: str) -> list[str]:
    try:
        with open(log) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    os.unlink(log)
    return lines


def _request(port: int, raw: str, body: bytes = b"") -> Response:
    client = RawClient(port)
    client.send(raw.encode() + body, heads=[raw.startswith("HEAD")])
    [response] = client.read_responses(1)
    client.close()
    return response


def _get(port: int, target: str, token: str) -> Response:
    raw = f"GET {target} HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n\r\n"
    return _request(port, raw)


@pytest.mark.parametrize("layout", [{}, FILES], ids=["database", "files"])
@pytest.mark.parametrize("accelerated", [True, False])
@pytest_twisted.ensureDeferred
async def test_hooks_run_exactly_once_per_request(
    start_node: Any, extension: tuple[str, str], accelerated: bool, layout: dict[str, str]
) -> None:
    """A served GET, a miss and a deny each run the hooks once, on either path,
    whether the body is a file or kept in the database (sent from memory)."""
    script, log = extension
    node = await start_node(
        KURA_EXTENSION_SCRIPT_PATH=script,
        KURA_ACCELERATED_FILE_SERVING_ENABLED=str(accelerated).lower(),
        **layout,
    )
    port = node.public_port
    body = os.urandom(5000)
    upload = (
        f"POST {CAS.format('a')} HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer good\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    assert (await deferToThread(_request, port, upload, body)).status == 204
    _calls(log)

    hit = await deferToThread(_get, port, CAS.format("a"), "good")
    assert hit.status == 200 and hit.body == body
    assert hit.headers["x-policy"] == "checked"
    assert _calls(log) == [
        "authenticate GET /api/cache/cas/{id}",
        "authorize GET /api/cache/cas/{id} artifact.read default",
        "response_headers 200",
    ]
    path = ("splice" if layout == FILES else "memory") if accelerated else "fallback"
    served = node.metrics.registry.get_sample_value(
        "kura_artifact_serving_paths_total", {"path": path}
    )
    assert served == 1

    miss = await deferToThread(_get, port, CAS.format("nope"), "good")
    assert miss.status == 404 and miss.headers["x-policy"] == "checked"
    assert [line.split()[0] for line in _calls(log)] == [
        "authenticate",
        "authorize",
        "response_headers",
    ]

    denied = await deferToThread(_get, port, CAS.format("a"), "bad")
    assert denied.status == 401
    assert denied.json() == {"message": "Invalid token"}
    assert denied.headers["connection"] == "close"
    assert "x-policy" not in denied.headers
    assert _calls(log) == ["authenticate GET /api/cache/cas/{id}"]


@pytest_twisted.ensureDeferred
async def test_nx_denies_are_plain_text(start_node: Any, extension: tuple[str, str]) -> None:
    """Nx rejects anything but text/plain on a 401, so the deny is plain text."""
    script, _ = extension
    node = await start_node(KURA_EXTENSION_SCRIPT_PATH=script)
    denied = await deferToThread(_get, node.public_port, "/v1/cache/123", "bad")
    assert denied.status == 401
    assert denied.headers["content-type"] == "text/plain"
    assert denied.body == b"Invalid token"


@pytest_twisted.ensureDeferred
async def test_denied_upload_never_transfers_its_body(
    start_node: Any, extension: tuple[str, str]
) -> None:
    """A 50 MB upload with a refused token is answered from its head alone."""
    script, log = extension
    node = await start_node(KURA_EXTENSION_SCRIPT_PATH=script)

    def attempt() -> tuple[bytes, bool]:
        client = RawClient(node.public_port)
        client.send(
            f"PUT /api/cache/gradle/k1?tenant_id=default HTTP/1.1\r\nHost: k\r\n"
            f"Authorization: Bearer bad\r\nContent-Length: {50 * 1024 * 1024}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        answer = client.read_raw(65536)
        closed = client.server_closed(timeout=5)
        client.close()
        return answer, closed

    answer, closed = await deferToThread(attempt)
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"100 Continue" not in answer
    assert closed
    assert node.store.tmp_budget.used == 0
    assert os.listdir(node.store.layout.uploads) == []
    assert _calls(log) == ["authenticate PUT /api/cache/gradle/{cache_key}"]
