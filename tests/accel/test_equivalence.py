"""With the accelerator on or off, every answer is the same.

The same requests are replayed against one data directory twice: once with
the accelerator enabled, once with the kill switch off. Status, headers (but
``Date`` and ``X-Request-Id``), body and whether the connection stays usable
must be identical.

Both layouts of small bodies are replayed: kept in the database (sent from
memory with their head) and in files (sent by the kernel).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from kura.testing import Response
from tests.support.real import RawClient

IGNORED = {"date", "x-request-id"}
CAS = "/api/cache/cas/{}?tenant_id=default"
#: Small bodies in files, as a store written before metadata schema 4 keeps them.
FILES = {"KURA_MEMORY_BODY_MAX_BYTES": "0"}

REQUESTS = [
    f"GET {CAS.format('small')} HTTP/1.1\r\nHost: k\r\n\r\n",
    f"GET {CAS.format('empty')} HTTP/1.1\r\nHost: k\r\n\r\n",
    f"GET {CAS.format('small')} HTTP/1.1\r\nHost: k\r\nRange: bytes=0-9\r\n\r\n",
    f"GET {CAS.format('small')} HTTP/1.1\r\nHost: k\r\nRange: bytes=-5\r\n\r\n",
    f"GET {CAS.format('small')} HTTP/1.1\r\nHost: k\r\nRange: bytes=4000-\r\n\r\n",
    f"GET {CAS.format('small')} HTTP/1.1\r\nHost: k\r\nRange: bytes=99999-\r\n\r\n",
    f"GET {CAS.format('small')} HTTP/1.1\r\nHost: k\r\nRange: bytes=0-1,5-6\r\n\r\n",
    f'GET {CAS.format("small")} HTTP/1.1\r\nHost: k\r\nRange: bytes=0-1\r\nIf-Range: "x"\r\n\r\n',
    f"GET {CAS.format('small')} HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n",
    f"GET {CAS.format('missing')} HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/cache/cas/small HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/cache/cas/small?tenant_id=other HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/cache/cas/small?tenant_id=DEFAULT HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/cache/cas/small?tenant_id=default&tenant_id=x HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/cache/cas/small?account_handle=default HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /v1/cache/123 HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /v1/cache/missing HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/metro/cache/abc HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/cache/keyvalue/kv1?tenant_id=default HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/cache/module/x?tenant_id=default&hash=h&name=n HTTP/1.1\r\nHost: k\r\n\r\n",
    "GET /api/cache/module/x?tenant_id=default HTTP/1.1\r\nHost: k\r\n\r\n",
    f"HEAD {CAS.format('small')} HTTP/1.1\r\nHost: k\r\n\r\n",
    f"GET {CAS.format('small')} HTTP/1.0\r\nHost: k\r\n\r\n",
    "GET /_internal/status HTTP/1.1\r\nHost: k\r\n\r\n",
]


def _seed(port: int) -> None:
    bodies = {
        CAS.format("small"): os.urandom(4096),
        CAS.format("empty"): b"",
        "/v1/cache/123": b"nx-artifact",
        "/api/metro/cache/abc": b"metro-artifact",
    }
    for target, body in bodies.items():
        method = "POST" if "cas" in target else "PUT"
        client = RawClient(port)
        head = f"{method} {target} HTTP/1.1\r\nHost: k\r\nContent-Length: {len(body)}\r\n\r\n"
        client.send(head.encode() + body, heads=[False])
        [response] = client.read_responses(1)
        assert response.status in (200, 201, 204), response
        client.close()
    kv = b'{"cas_id": "kv1", "entries": [{"value": "x"}]}'
    client = RawClient(port)
    client.send(
        f"PUT /api/cache/keyvalue?tenant_id=default HTTP/1.1\r\nHost: k\r\n"
        f"Content-Length: {len(kv)}\r\n\r\n".encode()
        + kv,
        heads=[False],
    )
    assert client.read_responses(1)[0].status == 204
    client.close()


def _replay(port: int) -> list[tuple[int, dict[str, str], bytes, bool]]:
    outcomes = []
    for raw in REQUESTS:
        client = RawClient(port)
        client.send(raw.encode(), heads=[raw.startswith("HEAD")])
        [response] = client.read_responses(1)
        # Is the connection still usable? Ask a second question on it.
        try:
            client.send(b"GET /up HTTP/1.1\r\nHost: k\r\n\r\n", heads=[False])
            follow_up = client.read_responses(1)
        except OSError:
            follow_up = []
        client.close()
        outcomes.append((*_shape(response), bool(follow_up)))
    return outcomes


def _shape(response: Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k not in IGNORED}
    return response.status, headers, response.body


@pytest.mark.parametrize(
    ("environ", "path", "least"),
    [({}, "memory", 8), (FILES, "splice", 8)],
    ids=["database", "files"],
)
@pytest_twisted.ensureDeferred
async def test_accelerator_on_and_off_answer_identically(
    start_node: Any, tmp_path: Any, environ: dict[str, str], path: str, least: int
) -> None:
    """Every response equals, byte for byte and in connection state, its twisted.web twin."""
    data_dir = f"{tmp_path}/shared"
    accelerated = await start_node(data_dir=data_dir, **environ)
    await deferToThread(_seed, accelerated.public_port)
    with_accelerator = await deferToThread(_replay, accelerated.public_port)
    served_fast = accelerated.metrics.registry.get_sample_value(
        "kura_artifact_serving_paths_total", {"path": path}
    )
    await accelerated.stopService()

    plain = await start_node(
        data_dir=data_dir, KURA_ACCELERATED_FILE_SERVING_ENABLED="false", **environ
    )
    without_accelerator = await deferToThread(_replay, plain.public_port)

    assert served_fast and served_fast >= least, "the accelerator served nothing: the test is void"
    for raw, on, off in zip(REQUESTS, with_accelerator, without_accelerator, strict=True):
        assert on == off, raw
