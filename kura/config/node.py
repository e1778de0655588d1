"""Node configuration: one frozen object built from ``KURA_*`` variables.

The environment is the contract. Every variable kura reads is declared once
as a :class:`Variable` (name, default, meaning): here, or in
:mod:`kura.config.access` and :mod:`kura.config.extension` for their own
settings; :data:`VARIABLES` lists them all. Each default is written once, in
its declaration: the parser falls back on it, the configuration classes take
their attribute defaults from it, and ``docs/configuration.md``
(``python -m kura.config``) renders it. Defaults derived from other settings
or from the host are computed by the parser (:func:`default_node_url`,
:func:`default_tmp_dir`, :func:`derive_capacity`, the memory watermarks) and
described by the declaration. No other module reads ``os.environ``.

:meth:`KuraConfig.from_environ` gathers every missing or invalid variable and
raises one :class:`ConfigError` naming all of them, joined with ``"; "``.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from kura.config.access import ACCESS_VARIABLES, AccessConfig
from kura.config.environ import Declarations, Reader, Variable
from kura.config.extension import EXTENSION_VARIABLES, ExtensionConfig
from kura.config.objectstore import OBJECT_STORE_VARIABLES, ObjectStoreConfig
from kura.config.proxies import TrustedProxies, parse_trusted_proxies
from kura.domain.failpoints import KNOWN as KNOWN_FAILPOINTS
from kura.memory import derive_watermarks, memory_limit

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


_var = Declarations()

#: Where the internal plane of a node without peers listens, and its default URL's host.
LOOPBACK = "127.0.0.1"

#: A DNS name, or one with a leading ``*.`` that stands for exactly one label.
_DNS_PATTERN = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?")


# --- node identity and listeners -------------------------------------------------
_NODE = "Node and listeners"
PORT = _var(_NODE, "KURA_PORT", 4000, "Public HTTP port (accelerator and twisted.web share it).")
INTERNAL_PORT = _var(
    _NODE, "KURA_INTERNAL_PORT", 7443, "Peer (internal) plane port; must differ from KURA_PORT."
)
HTTPS_PORT = _var(
    _NODE,
    "KURA_HTTPS_PORT",
    4443,
    "Public HTTPS port, opened only when KURA_PUBLIC_TLS_CERT_PATH and _KEY_PATH are set.",
)
BIND_HOST = _var(_NODE, "KURA_BIND_HOST", "0.0.0.0", "Interface every listener binds to.")
TENANT_ID = _var(
    _NODE, "KURA_TENANT_ID", "default", "The one tenant this node (and its mesh) serves."
)
REGION = _var(_NODE, "KURA_REGION", "local", "Region label reported by probes and metrics.")
NODE_URL = _var(
    _NODE,
    "KURA_NODE_URL",
    None,
    "This node's own internal base URL; scheme and port are validated like peer URLs.",
    shown=f"http://{LOOPBACK}:<KURA_INTERNAL_PORT>",
)
PUBLIC_TLS_CERT_PATH = _var(
    _NODE, "KURA_PUBLIC_TLS_CERT_PATH", None, "PEM certificate chain for public HTTPS."
)
PUBLIC_TLS_KEY_PATH = _var(
    _NODE, "KURA_PUBLIC_TLS_KEY_PATH", None, "PEM private key for public HTTPS."
)
TLS_RELOAD_INTERVAL_MS = _var(
    _NODE,
    "KURA_TLS_RELOAD_INTERVAL_MS",
    10_000,
    "How often the public TLS and peer mTLS files are checked; changed files (cert-manager "
    "rotating them in place) are loaded for new connections. 0 never reloads.",
)
LOG_FORMAT = _var(
    _NODE, "KURA_LOG_FORMAT", "json", "`json` (one JSON event per line) or `text` on stdout."
)
ACCESS_LOG = _var(
    _NODE,
    "KURA_ACCESS_LOG",
    True,
    "`true` or `false`: log one event per public request (both serving paths).",
)

# --- storage ---------------------------------------------------------------------
_STORAGE = "Storage"
DATA_DIR = _var(
    _STORAGE, "KURA_DATA_DIR", "kura-data", "Metadata (SQLite) and artifact bodies live here."
)
TMP_DIR = _var(
    _STORAGE,
    "KURA_TMP_DIR",
    None,
    "Upload staging; `uploads/` is wiped at start-up. Keep it on the data filesystem.",
    shown="<KURA_DATA_DIR>/tmp",
)
TMP_DIR_MAX_BYTES = _var(
    _STORAGE,
    "KURA_TMP_DIR_MAX_BYTES",
    8 * GiB,
    "Staging budget, reserved as body bytes arrive; an upload whose declared length "
    "exceeds the free part, or that runs out of it midway, gets 503 with Retry-After.",
)
CAS_CAPACITY_BYTES = _var(
    _STORAGE,
    "KURA_CAS_CAPACITY_BYTES",
    None,
    "Artifact byte budget; least-recently-used artifacts are evicted beyond it.",
    shown="50% of the data filesystem, at most 80%",
)
MAX_KEYVALUE_BYTES = _var(
    _STORAGE,
    "KURA_MAX_KEYVALUE_BYTES",
    1 * MiB,
    "Largest key-value PUT body (and inline replication body).",
)
MANIFEST_CACHE_MAX_BYTES = _var(
    _STORAGE,
    "KURA_MANIFEST_CACHE_MAX_BYTES",
    32 * MiB,
    "Approximate memory for the in-process manifest cache in front of SQLite.",
)
MEMORY_BODY_MAX_BYTES = _var(
    _STORAGE,
    "KURA_MEMORY_BODY_MAX_BYTES",
    64 * KiB,
    "Artifact bodies whose declared Content-Length is at most this are received in memory "
    "and stored in the metadata database with their manifest, one WAL fsync per group "
    "commit (counted against the staging budget like staged bodies until then); larger "
    "bodies are files. 0 stages every body into a file. At most 256 KiB.",
)
BODY_CACHE_MAX_BYTES = _var(
    _STORAGE,
    "KURA_BODY_CACHE_MAX_BYTES",
    64 * MiB,
    "Memory for the bodies stored in the metadata database (small artifacts, key-value "
    "entries) that the serving paths answer from without a storage read; emptied under "
    "critical memory pressure. 0 turns it off.",
)
STORAGE_THREADS = _var(
    _STORAGE,
    "KURA_STORAGE_THREADS",
    8,
    "Threads for blocking disk work (staging writes, fsync, SQLite reads).",
)
MULTIPART_UPLOAD_TTL_MS = _var(
    _STORAGE,
    "KURA_MULTIPART_UPLOAD_TTL_MS",
    86_400_000,
    "Unfinished module multipart uploads expire after this long.",
)
MULTIPART_MAX_UNFINISHED = _var(
    _STORAGE,
    "KURA_MULTIPART_MAX_UNFINISHED",
    10_000,
    "Unfinished module multipart uploads the node keeps; beyond it `start` gets 429 "
    "with Retry-After until uploads complete or expire.",
)
MULTIPART_JANITOR_INTERVAL_MS = _var(
    _STORAGE,
    "KURA_MULTIPART_JANITOR_INTERVAL_MS",
    600_000,
    "How often expired multipart uploads are removed.",
)
SCRUB_BYTES_PER_SECOND = _var(
    _STORAGE,
    "KURA_SCRUB_BYTES_PER_SECOND",
    8 * MiB,
    "The background scrub re-reads stored bodies at this rate, checks each against its "
    "digest (fills the digests of bodies stored before metadata schema 2), forgets a "
    "damaged one and fetches it again from a peer; 0 turns the scrub off.",
)
SCRUB_INTERVAL_MS = _var(
    _STORAGE,
    "KURA_SCRUB_INTERVAL_MS",
    3_600_000,
    "Pause between the end of one scrub pass over the store and the start of the next.",
)
FAILPOINTS: Variable[tuple[tuple[str, str], ...]] = _var(
    _STORAGE,
    "KURA_FAILPOINTS",
    (),
    "Testing only: comma list of `name:action` (action `exit` or `error`) crash points.",
    shown="(unset)",
)

# --- memory ------------------------------------------------------------------------
_MEMORY = "Memory pressure"
MEMORY_SOFT_LIMIT_BYTES = _var(
    _MEMORY,
    "KURA_MEMORY_SOFT_LIMIT_BYTES",
    None,
    "Resident memory at which the node reports constrained pressure.",
    shown="70% of the cgroup limit (else host RAM)",
)
MEMORY_HARD_LIMIT_BYTES = _var(
    _MEMORY,
    "KURA_MEMORY_HARD_LIMIT_BYTES",
    None,
    "Resident memory at which writes are shed with 503 and caches are dropped.",
    shown="85% of the cgroup limit, at least soft + 64 MiB",
)

# --- HTTP connection limits ----------------------------------------------------
_HTTP = "Public HTTP connections"
HEADER_TIMEOUT_MS = _var(
    _HTTP, "KURA_HEADER_TIMEOUT_MS", 30_000, "Whole-request-head deadline, from its first byte."
)
KEEPALIVE_IDLE_TIMEOUT_MS = _var(
    _HTTP,
    "KURA_KEEPALIVE_IDLE_TIMEOUT_MS",
    60_000,
    "An idle connection (no request under way) is closed after this long.",
)
SEND_TIMEOUT_MS = _var(
    _HTTP,
    "KURA_SEND_TIMEOUT_MS",
    120_000,
    "A download that makes no write progress for this long is aborted.",
)
BODY_TIMEOUT_MS = _var(
    _HTTP,
    "KURA_BODY_TIMEOUT_MS",
    60_000,
    "An upload whose body makes no progress for this long is aborted.",
)
MAX_UPLOADS_PER_CLIENT = _var(
    _HTTP,
    "KURA_MAX_UPLOADS_PER_CLIENT",
    64,
    "Request bodies one client may be uploading at once (the client is the authenticated "
    "principal, else its address); more are refused from the head with 429 and Retry-After.",
)
TRUSTED_PROXIES: Variable[TrustedProxies] = _var(
    _HTTP,
    "KURA_TRUSTED_PROXIES",
    (),
    "Comma-separated IPs/CIDRs of proxies whose X-Forwarded-For is believed: the client is "
    "the right-most address in it that is not one of them.",
)
DRAIN_COMPLETION_TIMEOUT_MS = _var(
    _HTTP,
    "KURA_DRAIN_COMPLETION_TIMEOUT_MS",
    240_000,
    "On SIGTERM, how long in-flight public transfers may run before the node stops.",
)

# --- accelerator ---------------------------------------------------------------
_ACCEL = "Same-port accelerator"
ACCEL_ENABLED = _var(
    _ACCEL,
    "KURA_ACCELERATED_FILE_SERVING_ENABLED",
    True,
    "`true` or `false`; false serves every request through twisted.web on the same port.",
)
ACCEL_MODE = _var(
    _ACCEL,
    "KURA_ACCELERATED_FILE_SERVING_MODE",
    "splice",
    "Kernel primitive for accelerated bodies: `splice` or `sendfile`.",
)
ACCEL_MAX_CONCURRENT = _var(
    _ACCEL,
    "KURA_ACCELERATED_FILE_SERVING_MAX_CONCURRENT",
    32,
    "Concurrent accelerated transfers; beyond it requests fall back to twisted.web.",
)
ACCEL_CHUNK_BYTES = _var(
    _ACCEL,
    "KURA_ACCELERATED_FILE_SERVING_CHUNK_BYTES",
    1 * MiB,
    "Bytes moved per sendfile/splice call.",
)
ACCEL_INLINE_BYTES = _var(
    _ACCEL,
    "KURA_ACCELERATED_FILE_SERVING_INLINE_BYTES",
    1 * MiB,
    "Body bytes sent on the reactor thread before a transfer moves to a worker "
    "thread (also when the socket pushes back); 0 sends every body from a worker.",
)

# --- replication ---------------------------------------------------------------
_REPL = "Replication"
PEERS: Variable[tuple[str, ...]] = _var(
    _REPL, "KURA_PEERS", (), "Comma-separated internal base URLs of seed peers."
)
DISCOVERY_DNS_NAME = _var(
    _REPL,
    "KURA_DISCOVERY_DNS_NAME",
    None,
    "DNS name whose A/AAAA records are peers (e.g. a headless Service); polled every 2 s.",
)
OUTBOX_MAX_DEPTH = _var(
    _REPL,
    "KURA_OUTBOX_MAX_DEPTH",
    100_000,
    "Replication outbox cap; at the cap writes get 503 with Retry-After.",
)
REPLICATION_BANDWIDTH = _var(
    _REPL,
    "KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND",
    512 * MiB,
    "Ceiling for peer artifact body traffic; 0 disables the limiter.",
)
REPLICATION_LATENCY_TARGET_MS = _var(
    _REPL,
    "KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS",
    100,
    "Public time-to-first-byte target; above it replication backs off. 0 disables the term.",
)
REPLICATION_MIN_RATE = _var(
    _REPL,
    "KURA_REPLICATION_MIN_BYTES_PER_SECOND",
    8 * MiB,
    "Floor of the replication rate however busy the node is (capped at the ceiling), so "
    "backing off never starves the mesh.",
)
REPLICATION_BUSY_CPU_PERCENT = _var(
    _REPL,
    "KURA_REPLICATION_BUSY_CPU_PERCENT",
    85,
    "Reactor utilisation (% of wall time not waiting in its poll) at or above which "
    "replication halves its share every 0.1 s while public requests arrive; below it minus "
    "15 the share doubles again. 0 disables the term.",
)
REPLICATION_UPLOAD_STALL_MS = _var(
    _REPL,
    "KURA_REPLICATION_UPLOAD_STALL_MS",
    60_000,
    "A replication upload making no byte progress for this long is aborted and retried.",
)
BOOTSTRAP_TIMEOUT_MS = _var(
    _REPL,
    "KURA_BOOTSTRAP_TIMEOUT_MS",
    1_800_000,
    "Catch-up from one peer fails after this long without progress.",
)
TOMBSTONE_RETENTION_MS = _var(
    _REPL,
    "KURA_TOMBSTONE_RETENTION_MS",
    7 * 86_400_000,
    "How long the tombstone of a deleted artifact (ccache DELETE) is kept, from the delete; "
    "until then no peer or catch-up can bring the entry back. A node away longer must "
    "rejoin with an empty data directory (see docs/replication.md).",
)
BOOTSTRAP_MAX_CONCURRENT_PEERS = _var(
    _REPL, "KURA_BOOTSTRAP_MAX_CONCURRENT_PEERS", 8, "Peers caught up from at once."
)
INTERNAL_TLS_CA_CERT_PATH = _var(
    _REPL,
    "KURA_INTERNAL_TLS_CA_CERT_PATH",
    None,
    "Peer mTLS CA bundle; set all three INTERNAL_TLS paths or none.",
)
INTERNAL_TLS_CERT_PATH = _var(
    _REPL, "KURA_INTERNAL_TLS_CERT_PATH", None, "Peer mTLS certificate (PEM)."
)
INTERNAL_TLS_KEY_PATH = _var(
    _REPL, "KURA_INTERNAL_TLS_KEY_PATH", None, "Peer mTLS private key (PEM)."
)


# --- peer authentication ---------------------------------------------------------
_PEER_AUTH = "Peer authentication (internal plane)"
INTERNAL_BIND_HOST = _var(
    _PEER_AUTH,
    "KURA_INTERNAL_BIND_HOST",
    None,
    "Interface of the internal plane. A node without peers (no KURA_PEERS, no "
    "KURA_DISCOVERY_DNS_NAME) keeps it on loopback.",
    shown=f"{LOOPBACK} without peers, else KURA_BIND_HOST",
)
PEER_SECRET = _var(
    _PEER_AUTH,
    "KURA_PEER_SECRET",
    None,
    "Shared mesh secret (at least 32 bytes): every peer request and response is signed "
    "with it (HMAC-SHA256 over method, target, tenant, body digest, time and a nonce).",
)
PEER_SECRET_FILE = _var(
    _PEER_AUTH,
    "KURA_PEER_SECRET_FILE",
    None,
    "A file holding KURA_PEER_SECRET (surrounding whitespace ignored); set one of the two.",
)
PEER_SECRET_NEXT = _var(
    _PEER_AUTH,
    "KURA_PEER_SECRET_NEXT",
    None,
    "During a rotation, the other secret peers may sign with: accepted, never used to sign.",
)
PEER_SECRET_NEXT_FILE = _var(
    _PEER_AUTH,
    "KURA_PEER_SECRET_NEXT_FILE",
    None,
    "A file holding KURA_PEER_SECRET_NEXT; set one of the two.",
)
INTERNAL_TLS_PEER_NAMES: Variable[tuple[str, ...]] = _var(
    _PEER_AUTH,
    "KURA_INTERNAL_TLS_PEER_NAMES",
    (),
    "With peer mTLS: comma-separated DNS names a peer's client certificate must carry "
    "(subjectAltName); a leading `*.` matches exactly one label. Any other certificate "
    "fails the handshake, even when the CA signed it.",
    shown="(unset)",
)
INTERNAL_INSECURE = _var(
    _PEER_AUTH,
    "KURA_INTERNAL_INSECURE",
    False,
    "`true` lets a node with peers run without peer authentication (warned at every "
    "start). Without it such a node refuses to start.",
)
PEER_ACCEPT_UNSIGNED_UNTIL = _var(
    _PEER_AUTH,
    "KURA_PEER_ACCEPT_UNSIGNED_UNTIL",
    None,
    "Rolling upgrade to signed peers: until this RFC 3339 UTC time (e.g. "
    "`2026-12-31T00:00:00Z`) unsigned peer requests and responses are still accepted "
    "(counted and warned); signed ones must verify. Needs KURA_PEER_SECRET.",
)
MAX_CLOCK_SKEW_MS = _var(
    _PEER_AUTH,
    "KURA_MAX_CLOCK_SKEW_MS",
    300_000,
    "Largest accepted difference between a peer's clock and ours: signed requests outside "
    "it are replays, and replicated versions further ahead are refused.",
)

# --- gRPC: the Remote Execution API cache (Bazel, Buck2) ------------------------
_GRPC = "gRPC (REAPI v2)"
GRPC_ENABLED = _var(
    _GRPC,
    "KURA_GRPC_ENABLED",
    True,
    "Serve the REAPI v2 cache (ActionCache, CAS, ByteStream, Capabilities) over gRPC on "
    "KURA_GRPC_PORT; grpcs with the public TLS identity when KURA_PUBLIC_TLS_* are set.",
)
GRPC_PORT = _var(
    _GRPC,
    "KURA_GRPC_PORT",
    4002,
    "gRPC port (0 picks a free one); must differ from KURA_PORT and KURA_INTERNAL_PORT.",
)
GRPC_THREADS = _var(
    _GRPC,
    "KURA_GRPC_THREADS",
    32,
    "Threads of the gRPC server; each RPC in progress holds one (the reactor never blocks).",
)
GRPC_MAX_CONCURRENT_RPCS = _var(
    _GRPC,
    "KURA_GRPC_MAX_CONCURRENT_RPCS",
    512,
    "RPCs accepted at once (running or queued for a thread); more are refused at once with "
    "RESOURCE_EXHAUSTED.",
)
REAPI_MAX_BATCH_BYTES = _var(
    _GRPC,
    "KURA_REAPI_MAX_BATCH_BYTES",
    4 * MiB,
    "max_batch_total_size_bytes: the largest BatchUpdateBlobs/BatchReadBlobs total; larger "
    "batches are INVALID_ARGUMENT (clients use ByteStream for big blobs).",
)

#: Every variable, in documentation order: the node's, then the public access
#: rules', the extension's and the object-store tier's.
VARIABLES: tuple[Variable[Any], ...] = (
    *_var.variables,
    *ACCESS_VARIABLES,
    *EXTENSION_VARIABLES,
    *OBJECT_STORE_VARIABLES,
)


def default_node_url(scheme: str, internal_port: int) -> str:
    """``KURA_NODE_URL`` when unset: the internal plane on loopback."""
    return f"{scheme}://{LOOPBACK}:{internal_port}"


def default_tmp_dir(data_dir: str) -> str:
    """``KURA_TMP_DIR`` when unset: ``tmp`` inside the data directory."""
    return os.path.join(data_dir, "tmp")


def _plain_default_capacity(filesystem_bytes: int) -> int:
    """Upstream's capacity default: half the filesystem, never over 80 %."""
    return min(filesystem_bytes // 2, filesystem_bytes * 8 // 10)


def derive_capacity(requested: int | None, filesystem_bytes: int) -> int:
    """Return the artifact byte budget.

    Args:
        requested: ``KURA_CAS_CAPACITY_BYTES`` when set.
        filesystem_bytes: total size of the filesystem holding the data dir.

    Returns:
        The requested value capped at 80 % of the filesystem, or half the
        filesystem when nothing was requested.
    """
    ceiling = filesystem_bytes * 8 // 10
    if requested is None:
        return _plain_default_capacity(filesystem_bytes)
    return min(requested, ceiling)


def filesystem_size(path: str) -> int:
    """Total bytes of the filesystem that holds ``path`` (or its nearest parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return shutil.disk_usage(probe).total


@attrs.frozen
class AcceleratorConfig:
    """Same-port sendfile/splice accelerator settings."""

    enabled: bool = ACCEL_ENABLED.default
    mode: str = ACCEL_MODE.default
    max_concurrent: int = ACCEL_MAX_CONCURRENT.default
    chunk_bytes: int = ACCEL_CHUNK_BYTES.default
    inline_bytes: int = ACCEL_INLINE_BYTES.default


@attrs.frozen
class GrpcConfig:
    """The gRPC (REAPI v2) listener and its limits."""

    enabled: bool = GRPC_ENABLED.default
    port: int = GRPC_PORT.default
    threads: int = GRPC_THREADS.default
    max_concurrent_rpcs: int = GRPC_MAX_CONCURRENT_RPCS.default
    max_batch_bytes: int = REAPI_MAX_BATCH_BYTES.default


@attrs.frozen
class TlsFiles:
    """Paths of a PEM certificate, key and optional CA bundle."""

    cert_path: str
    key_path: str
    ca_path: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file of the identity (what a reload watches)."""
        return (self.cert_path, self.key_path, *((self.ca_path,) if self.ca_path else ()))


#: The shortest peer secret accepted (HMAC-SHA256 keys shorter than the hash
#: output weaken it).
MIN_PEER_SECRET_BYTES = 32


@attrs.frozen
class PeerAuthConfig:
    """How peers prove themselves on the internal plane (see ``docs/operations.md``).

    Attributes:
        secret: the mesh secret that signs requests and responses.
        next_secret: the other secret accepted during a rotation.
        tls_peer_names: DNS patterns a peer's mTLS client certificate must carry.
        insecure: a node with peers runs without peer authentication.
        accept_unsigned_until_ms: until then (epoch ms) unsigned peers are
            accepted (rolling upgrade).
        max_clock_skew_ms: the replay window of signatures and the furthest
            a replicated version may lie in the future.
    """

    secret: bytes | None = attrs.field(default=None, repr=False)
    next_secret: bytes | None = attrs.field(default=None, repr=False)
    tls_peer_names: tuple[str, ...] = INTERNAL_TLS_PEER_NAMES.default
    insecure: bool = INTERNAL_INSECURE.default
    accept_unsigned_until_ms: int | None = None
    max_clock_skew_ms: int = MAX_CLOCK_SKEW_MS.default

    @property
    def signs(self) -> bool:
        return self.secret is not None


@attrs.frozen
class ReplicationConfig:
    """Peer mesh settings."""

    peers: tuple[str, ...] = PEERS.default
    discovery_dns_name: str | None = DISCOVERY_DNS_NAME.default
    outbox_max_depth: int = OUTBOX_MAX_DEPTH.default
    bandwidth_limit_bytes_per_second: int = REPLICATION_BANDWIDTH.default
    public_latency_target_ms: int = REPLICATION_LATENCY_TARGET_MS.default
    min_bytes_per_second: int = REPLICATION_MIN_RATE.default
    busy_cpu_percent: int = REPLICATION_BUSY_CPU_PERCENT.default
    upload_stall_ms: int = REPLICATION_UPLOAD_STALL_MS.default
    bootstrap_timeout_ms: int = BOOTSTRAP_TIMEOUT_MS.default
    bootstrap_max_concurrent_peers: int = BOOTSTRAP_MAX_CONCURRENT_PEERS.default
    tombstone_retention_ms: int = TOMBSTONE_RETENTION_MS.default
    internal_tls: TlsFiles | None = None
    auth: PeerAuthConfig = attrs.field(factory=PeerAuthConfig)

    @property
    def has_peers(self) -> bool:
        """Whether this node is part of a mesh (seed peers or DNS discovery)."""
        return bool(self.peers or self.discovery_dns_name)

    @property
    def authenticates_peers(self) -> bool:
        """Whether peers must sign or present a certificate with a configured name."""
        return self.auth.signs or (self.internal_tls is not None and bool(self.auth.tls_peer_names))

    @property
    def peer_auth_mode(self) -> str:
        """How the internal plane admits peers, as probes and the start log report it.

        ``signed``, ``mtls`` or ``signed+mtls``; ``insecure`` for a mesh run
        with KURA_INTERNAL_INSECURE; ``loopback`` for a node without peers
        and without peer authentication (its plane listens on loopback).
        """
        ways = []
        if self.auth.signs:
            ways.append("signed")
        if self.internal_tls is not None and self.auth.tls_peer_names:
            ways.append("mtls")
        if ways:
            return "+".join(ways)
        return "insecure" if self.has_peers else "loopback"


@attrs.frozen
class KuraConfig:
    """Everything a node needs to start, validated.

    Build it with :meth:`from_environ`. The attribute defaults are the
    variables' (a node with no environment at all gets them), save three
    that :meth:`from_environ` derives from the host: ``cas_capacity_bytes``
    and the memory watermarks (0 here).
    """

    port: int = PORT.default
    internal_port: int = INTERNAL_PORT.default
    https_port: int = HTTPS_PORT.default
    bind_host: str = BIND_HOST.default
    internal_bind_host: str = LOOPBACK
    tenant_id: str = TENANT_ID.default
    region: str = REGION.default
    node_url: str = default_node_url("http", INTERNAL_PORT.default)
    public_tls: TlsFiles | None = None
    tls_reload_interval_ms: int = TLS_RELOAD_INTERVAL_MS.default
    log_format: str = LOG_FORMAT.default
    access_log: bool = ACCESS_LOG.default
    data_dir: str = DATA_DIR.default
    tmp_dir: str = default_tmp_dir(DATA_DIR.default)
    tmp_dir_max_bytes: int = TMP_DIR_MAX_BYTES.default
    cas_capacity_bytes: int = 0
    max_keyvalue_bytes: int = MAX_KEYVALUE_BYTES.default
    manifest_cache_max_bytes: int = MANIFEST_CACHE_MAX_BYTES.default
    memory_body_max_bytes: int = MEMORY_BODY_MAX_BYTES.default
    body_cache_max_bytes: int = BODY_CACHE_MAX_BYTES.default
    storage_threads: int = STORAGE_THREADS.default
    multipart_upload_ttl_ms: int = MULTIPART_UPLOAD_TTL_MS.default
    multipart_janitor_interval_ms: int = MULTIPART_JANITOR_INTERVAL_MS.default
    multipart_max_unfinished: int = MULTIPART_MAX_UNFINISHED.default
    scrub_bytes_per_second: int = SCRUB_BYTES_PER_SECOND.default
    scrub_interval_ms: int = SCRUB_INTERVAL_MS.default
    failpoints: tuple[tuple[str, str], ...] = FAILPOINTS.default
    header_timeout_ms: int = HEADER_TIMEOUT_MS.default
    keepalive_idle_timeout_ms: int = KEEPALIVE_IDLE_TIMEOUT_MS.default
    send_timeout_ms: int = SEND_TIMEOUT_MS.default
    body_timeout_ms: int = BODY_TIMEOUT_MS.default
    drain_completion_timeout_ms: int = DRAIN_COMPLETION_TIMEOUT_MS.default
    max_uploads_per_client: int = MAX_UPLOADS_PER_CLIENT.default
    trusted_proxies: TrustedProxies = TRUSTED_PROXIES.default
    memory_soft_limit_bytes: int = 0
    memory_hard_limit_bytes: int = 0
    accelerator: AcceleratorConfig = attrs.field(factory=AcceleratorConfig)
    replication: ReplicationConfig = attrs.field(factory=ReplicationConfig)
    extension: ExtensionConfig = attrs.field(factory=ExtensionConfig)
    access: AccessConfig = attrs.field(factory=AccessConfig)
    grpc: GrpcConfig = attrs.field(factory=GrpcConfig)
    object_store: ObjectStoreConfig = attrs.field(factory=ObjectStoreConfig)

    @property
    def open_access(self) -> bool:
        """Neither tokens, OIDC nor an extension guard the public port."""
        return not self.access.guarded and not self.extension.enabled

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        measure_filesystem: Callable[[str], int] = filesystem_size,
        measure_memory: Callable[[], int] = memory_limit,
    ) -> KuraConfig:
        """Parse and validate the ``KURA_*`` variables in ``environ``.

        Args:
            environ: the process environment (or a test mapping).
            measure_filesystem: returns the size of the filesystem holding a
                path; injected so tests can derive capacity from fake disks.
            measure_memory: returns the memory the process may use (cgroup
                limit or host RAM), the base of the default watermarks.

        Raises:
            ConfigError: naming every missing or invalid variable.
        """
        read = _NodeReader(environ)
        port = read.port(PORT)
        internal_port = read.port(INTERNAL_PORT)
        if port == internal_port and port != 0:
            read.fail(INTERNAL_PORT, "must differ from KURA_PORT")
        data_dir = read.text(DATA_DIR)
        public_tls = read.tls_group((PUBLIC_TLS_CERT_PATH, PUBLIC_TLS_KEY_PATH), None)
        internal_tls = read.tls_group(
            (INTERNAL_TLS_CERT_PATH, INTERNAL_TLS_KEY_PATH), INTERNAL_TLS_CA_CERT_PATH
        )
        scheme = "https" if internal_tls else "http"
        node_url = read.peer_url(
            NODE_URL,
            read.optional_text(NODE_URL) or default_node_url(scheme, internal_port),
            scheme,
            internal_port,
        )
        peers = tuple(
            read.peer_url(PEERS, peer, scheme, internal_port) for peer in read.items(PEERS)
        )
        requested_capacity = read.optional_integer(CAS_CAPACITY_BYTES, minimum=1)
        soft, hard = read.memory_watermarks(measure_memory)
        accelerator = AcceleratorConfig(
            enabled=read.boolean(ACCEL_ENABLED),
            mode=read.choice(ACCEL_MODE, ("splice", "sendfile")),
            max_concurrent=read.integer(ACCEL_MAX_CONCURRENT, minimum=1),
            chunk_bytes=read.integer(ACCEL_CHUNK_BYTES, minimum=1),
            inline_bytes=read.integer(ACCEL_INLINE_BYTES),
        )
        replication = ReplicationConfig(
            peers=peers,
            discovery_dns_name=read.optional_text(DISCOVERY_DNS_NAME),
            outbox_max_depth=read.integer(OUTBOX_MAX_DEPTH, minimum=1),
            bandwidth_limit_bytes_per_second=read.integer(REPLICATION_BANDWIDTH),
            public_latency_target_ms=read.integer(REPLICATION_LATENCY_TARGET_MS),
            min_bytes_per_second=read.integer(REPLICATION_MIN_RATE),
            busy_cpu_percent=read.integer(REPLICATION_BUSY_CPU_PERCENT, maximum=100),
            upload_stall_ms=read.integer(REPLICATION_UPLOAD_STALL_MS, minimum=1),
            bootstrap_timeout_ms=read.integer(BOOTSTRAP_TIMEOUT_MS, minimum=1),
            bootstrap_max_concurrent_peers=read.integer(BOOTSTRAP_MAX_CONCURRENT_PEERS, minimum=1),
            tombstone_retention_ms=read.integer(TOMBSTONE_RETENTION_MS, minimum=1),
            internal_tls=internal_tls,
            auth=read.peer_auth(internal_tls),
        )
        bind_host = read.text(BIND_HOST)
        config = cls(
            port=port,
            internal_port=internal_port,
            https_port=read.port(HTTPS_PORT),
            bind_host=bind_host,
            internal_bind_host=read.optional_text(INTERNAL_BIND_HOST)
            or (bind_host if replication.has_peers else LOOPBACK),
            tenant_id=read.tenant(TENANT_ID),
            region=read.text(REGION),
            node_url=node_url,
            public_tls=public_tls,
            tls_reload_interval_ms=read.integer(TLS_RELOAD_INTERVAL_MS),
            log_format=read.choice(LOG_FORMAT, ("json", "text")),
            access_log=read.boolean(ACCESS_LOG),
            data_dir=data_dir,
            tmp_dir=read.optional_text(TMP_DIR) or default_tmp_dir(data_dir),
            tmp_dir_max_bytes=read.integer(TMP_DIR_MAX_BYTES, minimum=1),
            cas_capacity_bytes=0,
            max_keyvalue_bytes=read.integer(MAX_KEYVALUE_BYTES, minimum=1),
            manifest_cache_max_bytes=read.integer(MANIFEST_CACHE_MAX_BYTES),
            memory_body_max_bytes=read.integer(MEMORY_BODY_MAX_BYTES, maximum=256 * KiB),
            body_cache_max_bytes=read.integer(BODY_CACHE_MAX_BYTES),
            storage_threads=read.integer(STORAGE_THREADS, minimum=1, maximum=256),
            multipart_upload_ttl_ms=read.integer(MULTIPART_UPLOAD_TTL_MS, minimum=1),
            multipart_janitor_interval_ms=read.integer(MULTIPART_JANITOR_INTERVAL_MS, minimum=1),
            multipart_max_unfinished=read.integer(MULTIPART_MAX_UNFINISHED, minimum=1),
            scrub_bytes_per_second=read.integer(SCRUB_BYTES_PER_SECOND),
            scrub_interval_ms=read.integer(SCRUB_INTERVAL_MS),
            failpoints=read.failpoints(FAILPOINTS),
            header_timeout_ms=read.integer(HEADER_TIMEOUT_MS, minimum=1),
            keepalive_idle_timeout_ms=read.integer(KEEPALIVE_IDLE_TIMEOUT_MS, minimum=1),
            send_timeout_ms=read.integer(SEND_TIMEOUT_MS, minimum=1),
            body_timeout_ms=read.integer(BODY_TIMEOUT_MS, minimum=1),
            drain_completion_timeout_ms=read.integer(DRAIN_COMPLETION_TIMEOUT_MS),
            max_uploads_per_client=read.integer(MAX_UPLOADS_PER_CLIENT, minimum=1),
            trusted_proxies=read.trusted_proxies(TRUSTED_PROXIES),
            memory_soft_limit_bytes=soft,
            memory_hard_limit_bytes=hard,
            accelerator=accelerator,
            replication=replication,
            extension=ExtensionConfig.read(read, environ),
            access=AccessConfig.read(read),
            grpc=read.grpc(port, internal_port),
            object_store=ObjectStoreConfig.read(read),
        )
        read.check_mesh_security(config)
        read.raise_if_failed()
        capacity = derive_capacity(requested_capacity, measure_filesystem(data_dir))
        return attrs.evolve(config, cas_capacity_bytes=capacity)


class _NodeReader(Reader):
    """:class:`Reader` plus the node-specific value kinds (URLs, TLS files)."""

    def grpc(self, port: int, internal_port: int) -> GrpcConfig:
        """The gRPC section; its port must not collide with the other listeners."""
        grpc_port = self.port(GRPC_PORT)
        enabled = self.boolean(GRPC_ENABLED)
        if enabled and grpc_port != 0 and grpc_port in (port, internal_port):
            self.fail(GRPC_PORT, "must differ from KURA_PORT and KURA_INTERNAL_PORT")
        return GrpcConfig(
            enabled=enabled,
            port=grpc_port,
            threads=self.integer(GRPC_THREADS, minimum=1, maximum=1024),
            max_concurrent_rpcs=self.integer(GRPC_MAX_CONCURRENT_RPCS, minimum=1),
            max_batch_bytes=self.integer(REAPI_MAX_BATCH_BYTES, minimum=64 * KiB, maximum=64 * MiB),
        )

    def memory_watermarks(self, measure_memory: Callable[[], int]) -> tuple[int, int]:
        """Soft and hard watermarks: as set, or derived from the memory limit."""
        soft, hard = derive_watermarks(
            self.optional_integer(MEMORY_SOFT_LIMIT_BYTES, minimum=1),
            self.optional_integer(MEMORY_HARD_LIMIT_BYTES, minimum=1),
            measure_memory,
        )
        if hard <= soft:
            self.fail(MEMORY_HARD_LIMIT_BYTES, "must be above KURA_MEMORY_SOFT_LIMIT_BYTES")
        return soft, hard

    def tenant(self, variable: Variable[str]) -> str:
        if self.set_but_blank(variable):
            # Unset means the default tenant; set-but-empty is a mistake
            # (a templating error), not a wish for "default".
            self.fail(variable, "is set but empty (unset it for the default tenant)")
            return variable.default
        value = self.text(variable)
        if not value.isascii() or not all(c.isalnum() or c in "-_." for c in value):
            self.fail(variable, "must be ASCII letters, digits, '-', '_' or '.'")
        return value

    def peer_url(self, variable: Variable[Any], value: str, scheme: str, port: int) -> str:
        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        try:
            url_port = parts.port
        except ValueError:
            url_port = None
        if parts.scheme != scheme or not parts.hostname:
            self.fail(variable, f"URL {url!r} must use {scheme}:// with a host")
        elif url_port != port:
            self.fail(variable, f"URL {url!r} must target port KURA_INTERNAL_PORT ({port})")
        elif parts.path or parts.query:
            self.fail(variable, f"URL {url!r} must be a bare base URL")
        return url

    def tls_group(
        self, pair: tuple[Variable[None], Variable[None]], ca: Variable[None] | None
    ) -> TlsFiles | None:
        members = [*pair, *([ca] if ca else [])]
        values = [self._raw(m) for m in members]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            names = ", ".join(m.name for m in members)
            for member, value in zip(members, values, strict=True):
                if value is None:
                    self.fail(member, f"must be set together with {names} (all or none)")
            return None
        for member, value in zip(members, values, strict=True):
            if value is not None and not os.path.isfile(value):
                self.fail(member, f"file {value!r} does not exist")
        cert, key = values[0], values[1]
        assert cert is not None and key is not None
        return TlsFiles(cert_path=cert, key_path=key, ca_path=values[2] if ca else None)

    def file_or_value(self, variable: Variable[None], file_variable: Variable[None]) -> str | None:
        """A secret given directly or as a file (one of the two, never both)."""
        value, path = self._raw(variable), self._raw(file_variable)
        if value is not None and path is not None:
            self.fail(file_variable, f"must not be set together with {variable.name}")
            return None
        if path is None:
            return value
        try:
            with open(path, encoding="utf-8") as handle:
                content = handle.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            self.fail(file_variable, f"cannot be read: {getattr(error, 'strerror', error)}")
            return None
        if not content:
            self.fail(file_variable, f"file {path!r} is empty")
            return None
        return content

    def peer_secret(self, variable: Variable[None], file_variable: Variable[None]) -> bytes | None:
        text = self.file_or_value(variable, file_variable)
        if text is None:
            return None
        secret = text.encode("utf-8")
        if len(secret) < MIN_PEER_SECRET_BYTES:
            # Never echo the secret: only its length.
            self.fail(
                variable,
                f"must be at least {MIN_PEER_SECRET_BYTES} bytes, got {len(secret)}",
            )
        return secret

    def timestamp_ms(self, variable: Variable[None]) -> int | None:
        value = self._raw(variable)
        if value is None:
            return None
        try:
            moment = datetime.datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            self.fail(variable, f"must be an RFC 3339 time with a zone, got {value!r}")
            return None
        return int(moment.timestamp() * 1000)

    def peer_auth(self, internal_tls: TlsFiles | None) -> PeerAuthConfig:
        secret = self.peer_secret(PEER_SECRET, PEER_SECRET_FILE)
        next_secret = self.peer_secret(PEER_SECRET_NEXT, PEER_SECRET_NEXT_FILE)
        if next_secret is not None and secret is None:
            self.fail(PEER_SECRET_NEXT, "needs KURA_PEER_SECRET (the secret nodes sign with)")
        names = tuple(name.lower() for name in self.items(INTERNAL_TLS_PEER_NAMES))
        for name in names:
            if not _DNS_PATTERN.fullmatch(name):
                self.fail(INTERNAL_TLS_PEER_NAMES, f"entry {name!r} is not a DNS name pattern")
        if names and internal_tls is None:
            self.fail(INTERNAL_TLS_PEER_NAMES, "needs peer mTLS (KURA_INTERNAL_TLS_*_PATH)")
        insecure = self.boolean(INTERNAL_INSECURE)
        until = self.timestamp_ms(PEER_ACCEPT_UNSIGNED_UNTIL)
        if until is not None and secret is None:
            self.fail(PEER_ACCEPT_UNSIGNED_UNTIL, "needs KURA_PEER_SECRET (what peers sign with)")
        if insecure and (secret is not None or names):
            self.fail(INTERNAL_INSECURE, "contradicts the configured peer authentication")
        return PeerAuthConfig(
            secret=secret,
            next_secret=next_secret,
            tls_peer_names=names,
            insecure=insecure,
            accept_unsigned_until_ms=until,
            max_clock_skew_ms=self.integer(MAX_CLOCK_SKEW_MS, minimum=1000),
        )

    def check_mesh_security(self, config: KuraConfig) -> None:
        """A node with peers authenticates them, unless insecurity is explicit."""
        replication = config.replication
        if (
            replication.has_peers
            and not replication.authenticates_peers
            and not replication.auth.insecure
        ):
            self.fail(
                PEER_SECRET,
                "(or peer mTLS with KURA_INTERNAL_TLS_PEER_NAMES) is required on a node with "
                "peers: anyone who reaches the internal port could otherwise write, pin or "
                "wipe the cache. Set KURA_INTERNAL_INSECURE=true to run a mesh without peer "
                "authentication anyway",
            )

    def trusted_proxies(self, variable: Variable[TrustedProxies]) -> TrustedProxies:
        try:
            return parse_trusted_proxies(self.optional_text(variable) or "")
        except ValueError as error:
            self.fail(variable, str(error))
            return variable.default

    def failpoints(
        self, variable: Variable[tuple[tuple[str, str], ...]]
    ) -> tuple[tuple[str, str], ...]:
        value = self._raw(variable)
        if value is None:
            return variable.default
        points: list[tuple[str, str]] = []
        for item in value.split(","):
            name, _, action = item.strip().partition(":")
            if not name or action not in ("exit", "error"):
                self.fail(variable, f"entry {item!r} must be name:exit or name:error")
                continue
            if name not in KNOWN_FAILPOINTS:
                known = ", ".join(sorted(KNOWN_FAILPOINTS))
                self.fail(variable, f"names unknown failpoint {name!r} (known: {known})")
                continue
            points.append((name, action))
        return tuple(points)


def render_markdown() -> str:
    """Return ``docs/configuration.md`` as generated from :data:`VARIABLES`."""
    lines = [
        "# Configuration",
        "",
        "Every `KURA_*` variable kura reads. Generated by `python -m kura.config`;",
        "a test fails when this page and `kura/config/node.py` disagree.",
        "",
        "A node needs none of them: `twistd -n kura` starts on the defaults below.",
        "`twistd kura` options (`--port`, `--internal-port`, `--data-dir`, `--tmp-dir`,",
        "`--tenant-id`) override the environment. A bad value stops the node with one",
        "message naming every offending variable; a `KURA_*` variable kura does not read",
        "(a typo) is named in one warning at start, with the closest known name",
        "(Kubernetes service-link variables such as `KURA_SERVICE_HOST` are left out).",
        "`twistd kura --help` lists the most common variables; `--version` prints kura's.",
        "",
        "One grammar per kind of value:",
        "",
        "* **switches**: `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`, any case;",
        "* **durations** (`..._MS`): milliseconds, or a number with a unit: `250ms`, `30s`,",
        "  `5m`, `1h`, `1.5s`;",
        "* **sizes** (`..._BYTES...`): bytes, or a number with a unit: `KiB`, `MiB`, `GiB`,",
        "  `TiB` (or `Ki`, `Mi`, `Gi`, `Ti`, as Kubernetes writes them) are powers of 1024;",
        "  `KB`, `MB`, `GB`, `TB` (or `K`, `M`, `G`, `T`) powers of 1000; `B` bytes;",
        "* **empty values** count as unset (the default), except `KURA_TENANT_ID`: set but",
        "  empty is an error (unset it for the default tenant);",
        "* a port set to `tcp://...` is the Kubernetes service link of a Service named like",
        "  the variable; it is refused with a message saying so (set `enableServiceLinks:",
        "  false`, as the chart does).",
    ]
    section = None
    for variable in VARIABLES:
        if variable.section != section:
            section = variable.section
            lines += ["", f"## {section}", "", "| Variable | Default | Meaning |", "|---|---|---|"]
        lines.append(
            f"| `{variable.name}` | `{variable.documented_default}` | {variable.meaning} |"
        )
    return "\n".join(lines) + "\n"
