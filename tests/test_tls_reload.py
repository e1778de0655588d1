"""TLS material reloaded when its files change (cert-manager rotates them in place)."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock

from kura.config import TlsFiles
from kura.tls import Reloading, public_https_options
from tests.support.mesh import wait_for
from tests.support.real import RealNode


def write_identity(directory: Path, common: str) -> tuple[str, str, int]:
    """A self-signed certificate for ``common`` written over cert.pem/key.pem; its serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    # In place, as a rotator does (the same paths, new contents).
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path), serial


class Counting:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.builds = 0

    def __call__(self) -> bytes:
        self.builds += 1
        data = self.path.read_bytes()
        if data.startswith(b"bad"):
            raise ValueError("not a certificate")
        return data


def test_the_files_are_looked_at_once_per_interval_and_rebuilt_when_changed(
    tmp_path: Path,
) -> None:
    material = tmp_path / "cert.pem"
    material.write_bytes(b"one")
    clock = Clock()
    build = Counting(material)
    reloading = Reloading(build, [str(material)], clock, interval=10)
    assert reloading.get() == b"one" and build.builds == 1
    material.write_bytes(b"two!")
    assert reloading.get() == b"one"  # not due yet
    clock.advance(10)
    assert reloading.get() == b"two!" and build.builds == 2
    clock.advance(10)
    assert reloading.get() == b"two!" and build.builds == 2  # unchanged: no rebuild


def test_a_bad_rewrite_keeps_the_old_material_and_is_tried_again(tmp_path: Path) -> None:
    material = tmp_path / "cert.pem"
    material.write_bytes(b"good")
    clock = Clock()
    reloading = Reloading(Counting(material), [str(material)], clock, interval=1)
    material.write_bytes(b"bad, half written")
    clock.advance(1)
    assert reloading.get() == b"good"
    material.write_bytes(b"good again")
    clock.advance(1)
    assert reloading.get() == b"good again"


def test_zero_interval_never_looks_again(tmp_path: Path) -> None:
    material = tmp_path / "cert.pem"
    material.write_bytes(b"one")
    clock = Clock()
    reloading = Reloading(Counting(material), [str(material)], clock, interval=0)
    material.write_bytes(b"two!")
    clock.advance(3600)
    assert reloading.get() == b"one"


def test_bad_files_at_start_stop_the_node_there(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(b"-----BEGIN DUMMY-----\n")
    (tmp_path / "key.pem").write_bytes(b"")
    files = TlsFiles(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    with pytest.raises(ValueError, match="no PEM certificate"):
        public_https_options(files, Clock(), 10)


def served_serial(port: int) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.realnode
def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(
    tmp_path: Path,
) -> None:
    cert, key, first = write_identity(tmp_path, "before")
    node = RealNode(
        str(tmp_path / "data"),
        KURA_PUBLIC_TLS_CERT_PATH=cert,
        KURA_PUBLIC_TLS_KEY_PATH=key,
        KURA_TLS_RELOAD_INTERVAL_MS="100ms",
    )
    node.start()
    try:
        assert served_serial(node.https_port) == first
        pid = node.process.pid
        _, _, second = write_identity(tmp_path, "after")
        wait_for("the new certificate", lambda: served_serial(node.https_port) == second, 10)
        assert node.process.pid == pid and node.process.poll() is None
        assert "reloaded TLS material" in node.log()
    finally:
        node.stop()
    assert os.path.exists(cert)
