"""Helpers for real multi-process meshes on loopback (tests and benchmarks).

Peer URLs must target ``KURA_INTERNAL_PORT`` (as in production, where every
pod listens on the same internal port), so a loopback mesh gives each node
its own loopback address (``127.0.0.2``, ``127.0.0.3``, ...) and one shared
internal port. Everything here is synchronous (``urllib``) because it drives
separate processes from a test or a benchmark script.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from kura.replication.peer_auth import (
    DIGEST_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    PeerKeys,
    request_message,
    sha256_hex,
)
from tests.support.real import REPO_ROOT, RealNode, free_ports

T = TypeVar("T")

#: Loopback addresses for mesh nodes (Linux routes all of 127/8 to lo).
HOSTS = tuple(f"127.0.0.{n}" for n in range(2, 12))
#: The peer secret test meshes sign with (as production meshes do); a node
#: given ``KURA_PEER_SECRET=""`` runs without one.
MESH_SECRET = "kura-test-mesh-secret-0123456789abcdef"


def shared_port(hosts: Sequence[str]) -> int:
    """A TCP port that was free a moment ago on every one of ``hosts``."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every mesh host")


class MeshNode(RealNode):
    """A :class:`RealNode` on its own loopback address and the mesh's internal port.

    Args:
        data_dir: the node's data directory.
        host: its loopback address.
        internal_port: the internal port every mesh node shares.
        source: the tree the node runs (see :class:`RealNode`).
        environ: extra ``KURA_*`` variables (e.g. ``KURA_PEERS``); the
            mesh's peer secret is :data:`MESH_SECRET` unless given.
    """

    def __init__(
        self,
        data_dir: str,
        host: str,
        internal_port: int,
        source: str = REPO_ROOT,
        **environ: str,
    ) -> None:
        super().__init__(
            data_dir,
            source=source,
            **{
                "KURA_BIND_HOST": host,
                "KURA_INTERNAL_PORT": str(internal_port),
                "KURA_NODE_URL": f"http://{host}:{internal_port}",
                "KURA_PEER_SECRET": MESH_SECRET,
                # Mesh tests clean namespaces anonymously; who may is tested elsewhere.
                "KURA_ALLOW_ANONYMOUS_DELETE": "true",
                **environ,
            },
        )
        self.host = host
        self.internal_port = internal_port
        # This node's own ports, on its address and apart from the shared one.
        self.port, self.grpc_port, self.https_port = free_ports(3, host, avoid=[internal_port])
        self.environ["KURA_PORT"] = str(self.port)
        self.environ["KURA_GRPC_PORT"] = str(self.grpc_port)
        self.environ["KURA_HTTPS_PORT"] = str(self.https_port)
        self.environ.update(environ)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def internal_url(self) -> str:
        return f"http://{self.host}:{self.internal_port}"


def mesh(
    root: str,
    count: int,
    *,
    peers_of: Callable[[int, list[str]], list[str]] | None = None,
    **environ: str,
) -> list[MeshNode]:
    """``count`` unstarted nodes whose ``KURA_PEERS`` name each other.

    Args:
        root: a directory; node ``i`` keeps its data in ``root/node{i}``.
        count: how many nodes.
        peers_of: ``(index, all internal URLs) -> seeds`` (default: all others).
        environ: variables for every node.
    """
    hosts = list(HOSTS[:count])
    port = shared_port(hosts)
    urls = [f"http://{host}:{port}" for host in hosts]
    nodes = []
    for index, host in enumerate(hosts):
        seeds = peers_of(index, urls) if peers_of else [u for u in urls if u != urls[index]]
        nodes.append(
            MeshNode(f"{root}/node{index}", host, port, KURA_PEERS=",".join(seeds), **environ)
        )
    return nodes


def signed_headers(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    secret: str = MESH_SECRET,
    tenant: str = "default",
    time_ms: int | None = None,
) -> dict[str, str]:
    """Headers of a peer request to ``url`` signed as a mesh node would sign it."""
    parts = urllib.parse.urlsplit(url)
    nonce = os.urandom(16).hex()
    sent = int(time.time() * 1000) if time_ms is None else time_ms
    digest = sha256_hex(body)
    message = request_message(
        method=method,
        path=parts.path.encode("ascii"),
        query=parts.query.encode("ascii"),
        tenant=tenant,
        time_ms=sent,
        nonce=nonce,
        digest=digest,
    )
    signature = PeerKeys(secret.encode("utf-8")).sign(message)
    return {
        "X-Kura-Tenant-Id": tenant,
        TIME_HEADER.decode("ascii"): str(sent),
        NONCE_HEADER.decode("ascii"): nonce,
        DIGEST_HEADER.decode("ascii"): digest,
        SIGNATURE_HEADER.decode("ascii"): signature.decode("ascii"),
    }


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; returns ``(status, lower-cased headers, body)`` for any status."""
    data = body if body is not None else (b"" if method in ("PUT", "POST") else None)
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def get_json(url: str) -> Any:
    _, _, body = request("GET", url)
    return json.loads(body)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(node: RealNode, token: str | None = None) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}`` (labels exactly as exported).

    ``token``: the bearer token of a node with ``KURA_METRICS_TOKEN``.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    _, _, body = request("GET", node.url + "/metrics", headers=headers)
    samples = {}
    for line in body.decode("utf-8").splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        try:
            last = probe()
        except (OSError, ValueError):
            last = None
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def is_ready(node: RealNode, known_peers: int | None = None) -> bool:
    """Whether ``/ready`` is 200 (and, if given, reports ``known_peers`` peers)."""
    status, _, body = request("GET", node.url + "/ready", timeout=5)
    if status != 200:
        return False
    return known_peers is None or json.loads(body)["known_peers"] == known_peers


def start_all(nodes: Sequence[RealNode], timeout: float = 30.0) -> None:
    """Start every node, then wait until all of them are ready with all peers known."""
    for node in nodes:
        node.start()
    for node in nodes:
        wait_for(f"{node.url} ready", _ready_probe(node, len(nodes) - 1), timeout)


def _ready_probe(node: RealNode, peers: int) -> Callable[[], bool]:
    return lambda: is_ready(node, peers)
