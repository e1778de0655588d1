"""HTTPS and HTTP/2 are served by twisted.web (never the accelerator).

HTTPS listens on ``KURA_HTTPS_PORT`` with ALPN offering ``h2``; on the
plaintext port an HTTP/2 prior-knowledge preface is handed to twisted.web's
HTTP/2 connection. HTTP/2 is driven with curl (built with nghttp2).
"""

from __future__ import annotations

import datetime
import http.client
import os
import shutil
import ssl
import subprocess
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.threads import deferToThread

from tests.support.real import free_port

CAS = "/api/cache/cas/{}?tenant_id=default"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture
def certificate(tmp_path: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kura-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = f"{tmp_path}/cert.pem", f"{tmp_path}/key.pem"
    with open(cert_path, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


async def _tls_node(start_node: Any, certificate: tuple[str, str]) -> tuple[Any, int]:
    https_port = free_port()
    node = await start_node(
        KURA_PUBLIC_TLS_CERT_PATH=certificate[0],
        KURA_PUBLIC_TLS_KEY_PATH=certificate[1],
        KURA_HTTPS_PORT=str(https_port),
    )
    return node, https_port


def _https(port: int, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    connection.request(method, target, body=body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        check=False,
    )


@pytest_twisted.ensureDeferred
async def test_https_round_trip(start_node: Any, certificate: tuple[str, str]) -> None:
    """An upload and a download over HTTPS (HTTP/1.1) round-trip byte-exact."""
    node, port = await _tls_node(start_node, certificate)
    body = os.urandom(200_000)
    status, _ = await deferToThread(_https, port, "POST", CAS.format("tls"), body)
    assert status == 204
    status, received = await deferToThread(_https, port, "GET", CAS.format("tls"))
    assert (status, received) == (200, body)
    served = node.metrics.registry.get_sample_value(
        "kura_artifact_serving_paths_total", {"path": "fallback"}
    )
    assert served == 1


@needs_curl
@pytest_twisted.ensureDeferred
async def test_http2_over_alpn(
    start_node: Any, certificate: tuple[str, str], tmp_path: Any
) -> None:
    """curl negotiates h2 through ALPN, uploads and downloads an artifact."""
    _, port = await _tls_node(start_node, certificate)
    source = f"{tmp_path}/payload"
    with open(source, "wb") as handle:
        handle.write(os.urandom(300_000))
    url = f"https://127.0.0.1:{port}{CAS.format('h2')}"
    upload = await deferToThread(
        _curl,
        "--http2",
        "-k",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        "--data-binary",
        f"@{source}",
        url,
    )
    assert upload.stdout == b"2 204", upload.stderr
    download = await deferToThread(
        _curl, "--http2", "-k", "-o", f"{tmp_path}/copy", "-w", "%{http_version} %{http_code}", url
    )
    assert download.stdout == b"2 200", download.stderr
    with open(source, "rb") as a, open(f"{tmp_path}/copy", "rb") as b:
        assert a.read() == b.read()


@needs_curl
@pytest_twisted.ensureDeferred
async def test_http2_prior_knowledge_on_the_plain_port(start_node: Any, tmp_path: Any) -> None:
    """An h2c prior-knowledge preface on the plaintext port is handed to twisted.web."""
    node = await start_node()
    url = f"http://127.0.0.1:{node.public_port}{CAS.format('h2c')}"
    upload = await deferToThread(
        _curl,
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        "--data-binary",
        "hello over h2c",
        url,
    )
    assert upload.stdout == b"2 204", upload.stderr
    download = await deferToThread(
        _curl, "--http2-prior-knowledge", "-w", " %{http_version} %{http_code}", url
    )
    assert download.stdout == b"hello over h2c 2 200", download.stderr
    handed_off = node.metrics.registry.get_sample_value(
        "kura_accelerator_fallbacks_total", {"reason": "h2c"}
    )
    assert handed_off == 2
