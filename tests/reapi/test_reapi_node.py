"""REAPI on real nodes: extension hooks once per RPC, memory shedding, replication to a peer."""

from __future__ import annotations

import json
import os
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kura.reapi.proto import error_details_pb2, re_pb2, status_pb2
from tests.reapi.test_reapi_real import (
    Client,
    blob_name,
    chunks,
    digest_of,
    fails,
    upload_name,
)
from tests.replication.test_repl_tls import _authority, _files, _leaf
from tests.support.mesh import MESH_SECRET, mesh, start_all, wait_for
from tests.support.real import RealNode

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(180)]

Code = grpc.StatusCode
RE = "/build.bazel.remote.execution.v2"
TOKEN = "hook-token-0123456789"

EXTENSION = """
import json

from kura.auth import Allow, Deny, Principal

LOG = {log!r}


def authenticate(ctx):
    if ctx.bearer_token() != {token!r}:
        return Deny(401, "Invalid token", ttl_seconds=0)
    return Principal("ci", kind="user", ttl_seconds=0)


def authorize(ctx, principal):
    with open(LOG, "a") as log:
        log.write(json.dumps({{
            "transport": ctx.transport, "route": ctx.route, "method": ctx.method,
            "operation": ctx.operation, "namespace": ctx.namespace_id,
            "producer": ctx.producer, "key": ctx.artifact_key, "tenant": ctx.tenant_id,
            "principal": principal.id if principal else None,
        }}) + "\\n")
    if ctx.namespace_id == "reapi:read-only" and ctx.operation == "artifact.write":
        return Deny(403, "read-only instance", ttl_seconds=0)
    return Allow(ttl_seconds=0)
"""


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[tuple[RealNode, Path]]:
    log = tmp_path / "hooks.jsonl"
    script = tmp_path / "policy.py"
    script.write_text(textwrap.dedent(EXTENSION.format(log=str(log), token=TOKEN)))
    node = RealNode(str(tmp_path / "data"), KURA_EXTENSION_SCRIPT_PATH=str(script)).start()
    yield node, log
    assert node.stop() == 0, node.log_tail()


def contexts(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_extension_hooks_run_once_per_rpc_with_the_grpc_context(
    hooked: tuple[RealNode, Path],
) -> None:
    node, log = hooked
    with grpc.insecure_channel(node.grpc_target) as channel:
        client = Client(channel, TOKEN)
        data = b"hooked blob"
        digest = digest_of(data)
        instance = "ci/x"
        namespace = "reapi:ci+x"

        def one_call(f: Any) -> dict[str, Any]:
            before = len(contexts(log))
            f()
            seen = contexts(log)[before:]
            assert len(seen) == 1, seen
            return seen[0]

        batch = one_call(lambda: client.put(data, instance=instance))
        assert batch == {
            "transport": "grpc",
            "route": f"{RE}.ContentAddressableStorage/BatchUpdateBlobs",
            "method": "POST",
            "operation": "artifact.write",
            "namespace": namespace,
            "producer": "reapi",
            "key": None,
            "tenant": "default",
            "principal": "ci",
        }
        find = one_call(lambda: client.missing(digest, instance=instance))
        assert (find["route"], find["operation"], find["key"]) == (
            f"{RE}.ContentAddressableStorage/FindMissingBlobs",
            "artifact.read",
            None,
        )
        read = one_call(lambda: client.read(blob_name(digest, instance=instance)))
        assert (read["route"], read["operation"], read["key"], read["namespace"]) == (
            "/google.bytestream.ByteStream/Read",
            "artifact.read",
            digest.hash,
            namespace,
        )
        other = b"written over bytestream"
        write = one_call(
            lambda: client.write(chunks(upload_name(digest_of(other), str(uuid.uuid4())), other))
        )
        assert (write["operation"], write["key"], write["namespace"]) == (
            "artifact.write",
            digest_of(other).hash,
            "reapi:ci+linux=20x86",
        )
        action = digest_of(b"an action")
        update = re_pb2.UpdateActionResultRequest(
            instance_name="read-only", action_digest=action, action_result=re_pb2.ActionResult()
        )
        denied = one_call(
            lambda: fails(Code.PERMISSION_DENIED, client.call, client.ac.UpdateActionResult, update)
        )
        assert (denied["route"], denied["key"], denied["namespace"]) == (
            f"{RE}.ActionCache/UpdateActionResult",
            action.hash,
            "reapi:read-only",
        )
        # No hook runs without credentials getting past authenticate.
        before = len(contexts(log))
        fails(Code.UNAUTHENTICATED, Client(channel, "wrong-token").missing, digest)
        assert len(contexts(log)) == before


def test_critical_memory_pressure_sheds_writes_with_retry_info(tmp_path: Path) -> None:
    """Watermarks far below the process's resident memory: the node is always critical."""
    node = RealNode(
        str(tmp_path / "data"),
        KURA_MEMORY_SOFT_LIMIT_BYTES=str(1 << 20),
        KURA_MEMORY_HARD_LIMIT_BYTES=str(65 << 20),
    ).start()
    try:

        def critical() -> bool:
            with urllib.request.urlopen(node.url + "/status/rollout", timeout=5) as response:
                return bool(json.loads(response.read())["memory_pressure_state"] == 2)

        wait_for("critical memory pressure", critical, 15)
        with grpc.insecure_channel(node.grpc_target) as channel:
            client = Client(channel, None)
            error = fails(Code.UNAVAILABLE, client.put, b"shed me")
            trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
            status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
            info = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(info)
            assert info.retry_delay.seconds == 1
            assert "memory pressure" in status.message
            # Reads keep flowing.
            assert client.missing(digest_of(b"shed me")) == [digest_of(b"shed me").hash]
    finally:
        assert node.stop() == 0, node.log_tail()


def test_reapi_writes_replicate_to_the_peer(tmp_path: Path) -> None:
    nodes = mesh(str(tmp_path), 2, KURA_PEER_SECRET=MESH_SECRET)
    start_all(nodes)
    try:
        first, second = nodes
        targets = [f"{n.host}:{n.grpc_port}" for n in nodes]
        blob = b"replicated over the mesh" * 100
        action = digest_of(f"action {uuid.uuid4()}".encode())
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="out", digest=digest_of(blob))]
        )
        with grpc.insecure_channel(targets[0]) as channel:
            writer = Client(channel, None)
            assert writer.put(blob, instance="mesh/i") == [0]
            writer.call(
                writer.ac.UpdateActionResult,
                re_pb2.UpdateActionResultRequest(
                    instance_name="mesh/i", action_digest=action, action_result=result
                ),
            )
        with grpc.insecure_channel(targets[1]) as channel:
            reader = Client(channel, None)
            get = re_pb2.GetActionResultRequest(instance_name="mesh/i", action_digest=action)

            def replicated() -> bool:
                try:
                    return bool(reader.call(reader.ac.GetActionResult, get) == result)
                except grpc.RpcError:
                    return False

            wait_for("the action result on the peer", replicated, 30)
            assert reader.read(blob_name(digest_of(blob), instance="mesh/i")) == blob
        assert first.stop() == 0 and second.stop() == 0
    finally:
        for node in nodes:
            node.kill()


def test_with_public_tls_the_grpc_port_speaks_grpcs(tmp_path: Path) -> None:
    """The public TLS identity serves gRPC too (reloaded when its files change);
    a plaintext client gets nowhere."""
    ca = _authority("kura test CA")
    files = _files(str(tmp_path / "tls"), ca[0], _leaf(ca, "kura.example"))
    node = RealNode(
        str(tmp_path / "data"),
        KURA_PUBLIC_TLS_CERT_PATH=files.cert_path,
        KURA_PUBLIC_TLS_KEY_PATH=files.key_path,
        KURA_TLS_RELOAD_INTERVAL_MS="100",
    ).start()
    try:
        assert files.ca_path is not None
        credentials = grpc.ssl_channel_credentials(Path(files.ca_path).read_bytes())
        with grpc.secure_channel(node.grpc_target, credentials) as channel:
            client = Client(channel, None)
            assert client.put(b"over grpcs") == [0]
            assert client.read(blob_name(digest_of(b"over grpcs"))) == b"over grpcs"
        with grpc.insecure_channel(node.grpc_target) as channel:
            fails(Code.UNAVAILABLE, Client(channel, None).missing, digest_of(b"x"))
        # Rotated in place (as cert-manager does): new connections get the new identity.
        rotated_ca = _authority("rotated CA")
        staged = _files(str(tmp_path / "rotated"), rotated_ca[0], _leaf(rotated_ca, "kura.example"))
        for source, target in (
            (staged.key_path, files.key_path),
            (staged.cert_path, files.cert_path),
        ):
            os.replace(source, target)
        assert staged.ca_path is not None
        rotated = grpc.ssl_channel_credentials(Path(staged.ca_path).read_bytes())

        def serves_the_rotated_identity() -> bool:
            with grpc.secure_channel(node.grpc_target, rotated) as channel:
                try:
                    Client(channel, None).missing(digest_of(b"y"))
                except grpc.RpcError:
                    return False
                return True

        wait_for("the rotated certificate", serves_the_rotated_identity, 10)
    finally:
        assert node.stop() == 0, node.log_tail()
