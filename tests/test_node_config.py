"""Configuration: the environment contract, its validation, its docs and twistd options."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from kura.config import (
    VARIABLES,
    ConfigError,
    KuraConfig,
    TlsFiles,
    derive_capacity,
    render_markdown,
)
from kura.config.environ import unknown_variables
from kura.config.extension import EXTENSION_VARIABLES
from kura.config.node import DATA_DIR, INTERNAL_PORT, LOOPBACK, PORT, TENANT_ID
from kura.memory import derive_watermarks
from kura.tap import OVERRIDES, Options, environment_with
from tests.support.real import REPO_ROOT

MiB = 1 << 20
TiB = 1 << 40
#: A peer secret: a node with peers needs peer authentication.
SECRET = {"KURA_PEER_SECRET": "a-mesh-secret-of-thirty-two-bytes!"}


def parse(environ: dict[str, str], filesystem: int = TiB) -> KuraConfig:
    return KuraConfig.from_environ(environ, measure_filesystem=lambda path: filesystem)


def problems(environ: dict[str, str]) -> list[str]:
    """The ``"; "``-separated problems of the ConfigError ``environ`` raises."""
    with pytest.raises(ConfigError) as raised:
        parse(environ)
    return str(raised.value).split("; ")


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    """Three existing (dummy) PEM paths (cert, key and CA), a secret and a token file."""
    paths = {}
    for name in ("cert", "key", "ca"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN DUMMY-----\n")
        paths[name] = str(path)
    (tmp_path / "secret").write_text("f" * 48 + "\n")
    paths["secret"] = str(tmp_path / "secret")
    (tmp_path / "tokens").write_text("# CI\nwrite cccccccccccccccccccc ci\n")
    paths["tokens"] = str(tmp_path / "tokens")
    return paths


def test_empty_environment_gives_the_declared_defaults() -> None:
    """With no variable at all every setting is its declaration's default (KuraConfig's own).

    Only what the node derives from the host differs: capacity (half the
    filesystem) and the memory watermarks (from the memory limit).
    """
    config = KuraConfig.from_environ(
        {}, measure_filesystem=lambda path: 1000, measure_memory=lambda: 1000 * MiB
    )
    soft, hard = derive_watermarks(None, None, lambda: 1000 * MiB)
    assert config == attrs.evolve(
        KuraConfig(),
        cas_capacity_bytes=500,
        memory_soft_limit_bytes=soft,
        memory_hard_limit_bytes=hard,
    )
    assert config.node_url == f"http://{LOOPBACK}:{INTERNAL_PORT.default}"
    assert config.tmp_dir == os.path.join(DATA_DIR.default, "tmp")
    assert config.internal_bind_host == LOOPBACK


def test_declared_defaults_are_documented_as_parsed() -> None:
    """Each plain default, as documented, parses back to itself: the docs show real values."""
    plain = [
        v
        for v in VARIABLES
        if v.shown is None and isinstance(v.default, int | str) and "<ID>" not in v.name
    ]
    assert len(plain) > 30
    explicit = {v.name: v.documented_default for v in plain}
    assert parse(explicit) == parse({})


def _every_variable(pem: dict[str, str]) -> dict[str, tuple[str, Callable[[KuraConfig], Any], Any]]:
    """Variable → (a non-default value, how to read it back, what it must parse to)."""
    return {
        "KURA_PORT": ("5001", lambda c: c.port, 5001),
        "KURA_INTERNAL_PORT": ("9443", lambda c: c.internal_port, 9443),
        "KURA_HTTPS_PORT": ("5443", lambda c: c.https_port, 5443),
        "KURA_BIND_HOST": ("127.0.0.1", lambda c: c.bind_host, "127.0.0.1"),
        "KURA_TENANT_ID": ("acme-1", lambda c: c.tenant_id, "acme-1"),
        "KURA_REGION": ("eu-west", lambda c: c.region, "eu-west"),
        "KURA_NODE_URL": (
            "https://node-a.internal:9443/",
            lambda c: c.node_url,
            "https://node-a.internal:9443",
        ),
        "KURA_PUBLIC_TLS_CERT_PATH": (pem["cert"], lambda c: c.public_tls.cert_path, pem["cert"]),
        "KURA_PUBLIC_TLS_KEY_PATH": (pem["key"], lambda c: c.public_tls.key_path, pem["key"]),
        "KURA_LOG_FORMAT": ("text", lambda c: c.log_format, "text"),
        "KURA_TLS_RELOAD_INTERVAL_MS": ("30s", lambda c: c.tls_reload_interval_ms, 30_000),
        "KURA_ACCESS_LOG": ("false", lambda c: c.access_log, False),
        "KURA_DATA_DIR": ("/srv/kura", lambda c: c.data_dir, "/srv/kura"),
        "KURA_TMP_DIR": ("/srv/tmp", lambda c: c.tmp_dir, "/srv/tmp"),
        "KURA_TMP_DIR_MAX_BYTES": ("4096", lambda c: c.tmp_dir_max_bytes, 4096),
        "KURA_CAS_CAPACITY_BYTES": ("12345", lambda c: c.cas_capacity_bytes, 12345),
        "KURA_MAX_KEYVALUE_BYTES": ("2048", lambda c: c.max_keyvalue_bytes, 2048),
        "KURA_MANIFEST_CACHE_MAX_BYTES": ("777", lambda c: c.manifest_cache_max_bytes, 777),
        "KURA_MEMORY_BODY_MAX_BYTES": ("4096", lambda c: c.memory_body_max_bytes, 4096),
        "KURA_BODY_CACHE_MAX_BYTES": ("8192", lambda c: c.body_cache_max_bytes, 8192),
        "KURA_STORAGE_THREADS": ("3", lambda c: c.storage_threads, 3),
        "KURA_MULTIPART_UPLOAD_TTL_MS": ("1000", lambda c: c.multipart_upload_ttl_ms, 1000),
        "KURA_MULTIPART_JANITOR_INTERVAL_MS": (
            "2000",
            lambda c: c.multipart_janitor_interval_ms,
            2000,
        ),
        "KURA_MULTIPART_MAX_UNFINISHED": ("50", lambda c: c.multipart_max_unfinished, 50),
        "KURA_SCRUB_BYTES_PER_SECOND": ("0", lambda c: c.scrub_bytes_per_second, 0),
        "KURA_SCRUB_INTERVAL_MS": ("60000", lambda c: c.scrub_interval_ms, 60000),
        "KURA_FAILPOINTS": (
            "before_fsync:exit, after_metadata_commit_before_ack:error",
            lambda c: c.failpoints,
            (("before_fsync", "exit"), ("after_metadata_commit_before_ack", "error")),
        ),
        "KURA_HEADER_TIMEOUT_MS": ("1500", lambda c: c.header_timeout_ms, 1500),
        "KURA_KEEPALIVE_IDLE_TIMEOUT_MS": ("2500", lambda c: c.keepalive_idle_timeout_ms, 2500),
        "KURA_SEND_TIMEOUT_MS": ("3500", lambda c: c.send_timeout_ms, 3500),
        "KURA_BODY_TIMEOUT_MS": ("4500", lambda c: c.body_timeout_ms, 4500),
        "KURA_DRAIN_COMPLETION_TIMEOUT_MS": ("5500", lambda c: c.drain_completion_timeout_ms, 5500),
        "KURA_MAX_UPLOADS_PER_CLIENT": ("8", lambda c: c.max_uploads_per_client, 8),
        "KURA_GRPC_ENABLED": ("false", lambda c: c.grpc.enabled, False),
        "KURA_GRPC_PORT": ("5002", lambda c: c.grpc.port, 5002),
        "KURA_GRPC_THREADS": ("7", lambda c: c.grpc.threads, 7),
        "KURA_GRPC_MAX_CONCURRENT_RPCS": ("9", lambda c: c.grpc.max_concurrent_rpcs, 9),
        "KURA_REAPI_MAX_BATCH_BYTES": ("131072", lambda c: c.grpc.max_batch_bytes, 131072),
        "KURA_TRUSTED_PROXIES": (
            "10.0.0.0/8, 192.168.1.7",
            lambda c: [str(n) for n in c.trusted_proxies],
            ["10.0.0.0/8", "192.168.1.7/32"],
        ),
        "KURA_MEMORY_SOFT_LIMIT_BYTES": (
            "300000000",
            lambda c: c.memory_soft_limit_bytes,
            3 * 10**8,
        ),
        "KURA_MEMORY_HARD_LIMIT_BYTES": (
            "400000000",
            lambda c: c.memory_hard_limit_bytes,
            4 * 10**8,
        ),
        "KURA_ACCELERATED_FILE_SERVING_ENABLED": (
            "false",
            lambda c: c.accelerator.enabled,
            False,
        ),
        "KURA_ACCELERATED_FILE_SERVING_MODE": (
            "sendfile",
            lambda c: c.accelerator.mode,
            "sendfile",
        ),
        "KURA_ACCELERATED_FILE_SERVING_MAX_CONCURRENT": (
            "4",
            lambda c: c.accelerator.max_concurrent,
            4,
        ),
        "KURA_ACCELERATED_FILE_SERVING_CHUNK_BYTES": (
            "65536",
            lambda c: c.accelerator.chunk_bytes,
            65536,
        ),
        "KURA_ACCELERATED_FILE_SERVING_INLINE_BYTES": (
            "0",
            lambda c: c.accelerator.inline_bytes,
            0,
        ),
        "KURA_PEERS": (
            "https://b.internal:9443, https://c.internal:9443/",
            lambda c: c.replication.peers,
            ("https://b.internal:9443", "https://c.internal:9443"),
        ),
        "KURA_DISCOVERY_DNS_NAME": (
            "kura-headless.ns.svc",
            lambda c: c.replication.discovery_dns_name,
            "kura-headless.ns.svc",
        ),
        "KURA_OUTBOX_MAX_DEPTH": ("10", lambda c: c.replication.outbox_max_depth, 10),
        "KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND": (
            "0",
            lambda c: c.replication.bandwidth_limit_bytes_per_second,
            0,
        ),
        "KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS": (
            "250",
            lambda c: c.replication.public_latency_target_ms,
            250,
        ),
        "KURA_REPLICATION_MIN_BYTES_PER_SECOND": (
            "1048576",
            lambda c: c.replication.min_bytes_per_second,
            1048576,
        ),
        "KURA_REPLICATION_BUSY_CPU_PERCENT": (
            "70",
            lambda c: c.replication.busy_cpu_percent,
            70,
        ),
        "KURA_REPLICATION_UPLOAD_STALL_MS": (
            "7000",
            lambda c: c.replication.upload_stall_ms,
            7000,
        ),
        "KURA_BOOTSTRAP_TIMEOUT_MS": ("8000", lambda c: c.replication.bootstrap_timeout_ms, 8000),
        "KURA_BOOTSTRAP_MAX_CONCURRENT_PEERS": (
            "2",
            lambda c: c.replication.bootstrap_max_concurrent_peers,
            2,
        ),
        "KURA_TOMBSTONE_RETENTION_MS": (
            "86400000",
            lambda c: c.replication.tombstone_retention_ms,
            86_400_000,
        ),
        "KURA_INTERNAL_TLS_CA_CERT_PATH": (
            pem["ca"],
            lambda c: c.replication.internal_tls.ca_path,
            pem["ca"],
        ),
        "KURA_INTERNAL_TLS_CERT_PATH": (
            pem["cert"],
            lambda c: c.replication.internal_tls.cert_path,
            pem["cert"],
        ),
        "KURA_INTERNAL_TLS_KEY_PATH": (
            pem["key"],
            lambda c: c.replication.internal_tls.key_path,
            pem["key"],
        ),
        "KURA_INTERNAL_BIND_HOST": ("10.0.0.7", lambda c: c.internal_bind_host, "10.0.0.7"),
        "KURA_PEER_SECRET": ("s" * 32, lambda c: c.replication.auth.secret, b"s" * 32),
        "KURA_PEER_SECRET_NEXT": ("n" * 40, lambda c: c.replication.auth.next_secret, b"n" * 40),
        "KURA_INTERNAL_TLS_PEER_NAMES": (
            "*.kura-headless.ns.svc, Seed.Example",
            lambda c: c.replication.auth.tls_peer_names,
            ("*.kura-headless.ns.svc", "seed.example"),
        ),
        "KURA_PEER_ACCEPT_UNSIGNED_UNTIL": (
            "2026-12-31T00:00:00Z",
            lambda c: c.replication.auth.accept_unsigned_until_ms,
            1_798_675_200_000,
        ),
        "KURA_MAX_CLOCK_SKEW_MS": ("60000", lambda c: c.replication.auth.max_clock_skew_ms, 60000),
        "KURA_AUTH_READ_TOKENS": (
            "r" * 20,
            lambda c: [t.scope.value for t in c.access.tokens if t.scope.value == "read"],
            ["read"],
        ),
        "KURA_AUTH_WRITE_TOKENS": (
            "w" * 20,
            lambda c: [t.name for t in c.access.tokens if t.scope.value == "write"][:1],
            [f"token-{hashlib.sha256(b'w' * 20).hexdigest()[:8]}"],
        ),
        "KURA_AUTH_TOKENS_FILE": (
            pem["tokens"],
            lambda c: [t.name for t in c.access.tokens][-1],
            "ci",
        ),
        "KURA_AUTH_ANONYMOUS_READ": ("true", lambda c: c.access.anonymous_read, True),
        "KURA_ALLOW_ANONYMOUS_DELETE": ("true", lambda c: c.access.allow_anonymous_delete, True),
        "KURA_AUTH_OIDC_ISSUER": (
            "https://token.actions.githubusercontent.com",
            lambda c: c.access.oidc.issuer,
            "https://token.actions.githubusercontent.com",
        ),
        "KURA_AUTH_OIDC_AUDIENCE": (
            "kura, cache",
            lambda c: c.access.oidc.audiences,
            ("kura", "cache"),
        ),
        "KURA_AUTH_OIDC_JWKS_URL": (
            "https://idp.example/jwks",
            lambda c: c.access.oidc.jwks_url,
            "https://idp.example/jwks",
        ),
        "KURA_AUTH_OIDC_ALGORITHMS": (
            "rs256,eddsa",
            lambda c: c.access.oidc.algorithms,
            ("RS256", "EdDSA"),
        ),
        "KURA_AUTH_OIDC_READ_CLAIMS": (
            "repository_owner=acme",
            lambda c: c.access.oidc.read_claims,
            (("repository_owner", "acme"),),
        ),
        "KURA_AUTH_OIDC_WRITE_CLAIMS": (
            "repository_owner=acme, ref=refs/heads/main",
            lambda c: c.access.oidc.write_claims,
            (("repository_owner", "acme"), ("ref", "refs/heads/main")),
        ),
        "KURA_METRICS_TOKEN": (
            "m" * 16,
            lambda c: c.access.metrics_token,
            hashlib.sha256(b"m" * 16).digest(),
        ),
        "KURA_STATUS_TOKEN": (
            "t" * 16,
            lambda c: c.access.status_token,
            hashlib.sha256(b"t" * 16).digest(),
        ),
        "KURA_OBJECT_STORE_URL": (
            "s3://kura-cache/ci/",
            lambda c: (c.object_store.bucket, c.object_store.prefix),
            ("kura-cache", "ci"),
        ),
        "KURA_OBJECT_STORE_ENDPOINT": (
            "https://minio.internal:9000",
            lambda c: c.object_store.endpoint,
            "https://minio.internal:9000",
        ),
        "KURA_OBJECT_STORE_TOMBSTONE_POLL_MS": (
            "2s",
            lambda c: c.object_store.tombstone_poll_ms,
            2000,
        ),
        "KURA_OBJECT_STORE_READ_DEADLINE_MS": (
            "750ms",
            lambda c: c.object_store.read_deadline_ms,
            750,
        ),
        "KURA_OBJECT_STORE_UPLOAD_QUEUE_MAX": (
            "5000",
            lambda c: c.object_store.upload_queue_max,
            5000,
        ),
        "KURA_OBJECT_STORE_MULTIPART_THRESHOLD_BYTES": (
            "8MiB",
            lambda c: c.object_store.multipart_threshold_bytes,
            8 * 1024 * 1024,
        ),
        "KURA_OBJECT_STORE_THREADS": ("6", lambda c: c.object_store.threads, 6),
    }


def _exclusive_variables(pem: dict[str, str]) -> dict[str, tuple[dict[str, str], Any, Any]]:
    """Variables that exclude others in the table: each parsed with its own environment."""
    mesh = {"KURA_PEERS": "http://b.internal:7443"}
    return {
        "KURA_PEER_SECRET_FILE": (
            {**mesh, "KURA_PEER_SECRET_FILE": pem["secret"]},
            lambda c: c.replication.auth.secret,
            b"f" * 48,
        ),
        "KURA_PEER_SECRET_NEXT_FILE": (
            {
                **mesh,
                "KURA_PEER_SECRET": "s" * 32,
                "KURA_PEER_SECRET_NEXT_FILE": pem["secret"],
            },
            lambda c: c.replication.auth.next_secret,
            b"f" * 48,
        ),
        "KURA_INTERNAL_INSECURE": (
            {**mesh, "KURA_INTERNAL_INSECURE": "true"},
            lambda c: c.replication.auth.insecure,
            True,
        ),
    }


def test_every_documented_variable_is_parsed(pem_files: dict[str, str]) -> None:
    """Each variable in the registry reaches its field (and this test names them all)."""
    table = _every_variable(pem_files)
    exclusive = _exclusive_variables(pem_files)
    # The extension's variables are parsed and tested in tests/auth.
    node_variables = {v.name for v in VARIABLES if v not in EXTENSION_VARIABLES}
    assert set(table) | set(exclusive) == node_variables, (
        "a KURA_* variable was added or removed: extend this table"
    )
    config = parse({name: value for name, (value, _, _) in table.items()})
    for name, (_, read, expected) in table.items():
        assert read(config) == expected, name
    for name, (environ, read, expected) in exclusive.items():
        assert read(parse(environ)) == expected, name


def test_config_error_names_every_bad_variable_at_once() -> None:
    """Several bad variables produce one ConfigError listing each of them, "; "-joined."""
    found = problems(
        {
            "KURA_PORT": "http",
            "KURA_STORAGE_THREADS": "0",
            "KURA_LOG_FORMAT": "xml",
            "KURA_ACCELERATED_FILE_SERVING_ENABLED": "maybe",
            "KURA_TENANT_ID": "acme corp",
            "KURA_FAILPOINTS": "before_fsync:explode",
        }
    )
    assert len(found) == 6
    for name in (
        "KURA_PORT",
        "KURA_STORAGE_THREADS",
        "KURA_LOG_FORMAT",
        "KURA_ACCELERATED_FILE_SERVING_ENABLED",
        "KURA_TENANT_ID",
        "KURA_FAILPOINTS",
    ):
        assert sum(problem.startswith(name + " ") for problem in found) == 1, (name, found)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"KURA_PORT": "70000"}, "KURA_PORT"),
        ({"KURA_PORT": "-1"}, "KURA_PORT"),
        ({"KURA_PORT": "7443"}, "KURA_INTERNAL_PORT"),
        ({"KURA_TMP_DIR_MAX_BYTES": "0"}, "KURA_TMP_DIR_MAX_BYTES"),
        ({"KURA_MEMORY_BODY_MAX_BYTES": str(256 * 1024 + 1)}, "KURA_MEMORY_BODY_MAX_BYTES"),
        ({"KURA_MEMORY_SOFT_LIMIT_BYTES": "0"}, "KURA_MEMORY_SOFT_LIMIT_BYTES"),
        ({"KURA_CAS_CAPACITY_BYTES": "lots"}, "KURA_CAS_CAPACITY_BYTES"),
        ({"KURA_STORAGE_THREADS": "1000"}, "KURA_STORAGE_THREADS"),
        ({"KURA_ACCELERATED_FILE_SERVING_MODE": "mmap"}, "KURA_ACCELERATED_FILE_SERVING_MODE"),
        (
            {"KURA_ACCELERATED_FILE_SERVING_ENABLED": "sure"},
            "KURA_ACCELERATED_FILE_SERVING_ENABLED",
        ),
        ({"KURA_TENANT_ID": ""}, "KURA_TENANT_ID"),
        ({"KURA_PORT": "tcp://10.0.0.7:4000"}, "KURA_PORT"),
        ({"KURA_HEADER_TIMEOUT_MS": "30 parsecs"}, "KURA_HEADER_TIMEOUT_MS"),
        ({"KURA_HEADER_TIMEOUT_MS": "1.0005s"}, "KURA_HEADER_TIMEOUT_MS"),
        ({"KURA_TMP_DIR_MAX_BYTES": "12 MiBs"}, "KURA_TMP_DIR_MAX_BYTES"),
        ({"KURA_OUTBOX_MAX_DEPTH": "10k"}, "KURA_OUTBOX_MAX_DEPTH"),
        ({"KURA_FAILPOINTS": "before_fsync"}, "KURA_FAILPOINTS"),
        ({"KURA_FAILPOINTS": "no_such_point:exit"}, "KURA_FAILPOINTS"),
        ({"KURA_TENANT_ID": "tenant/with/slashes"}, "KURA_TENANT_ID"),
        ({"KURA_MAX_UPLOADS_PER_CLIENT": "0"}, "KURA_MAX_UPLOADS_PER_CLIENT"),
        ({"KURA_GRPC_PORT": "4000"}, "KURA_GRPC_PORT"),
        ({"KURA_GRPC_THREADS": "0"}, "KURA_GRPC_THREADS"),
        ({"KURA_REAPI_MAX_BATCH_BYTES": "1024"}, "KURA_REAPI_MAX_BATCH_BYTES"),
        ({"KURA_MULTIPART_MAX_UNFINISHED": "0"}, "KURA_MULTIPART_MAX_UNFINISHED"),
        ({"KURA_TRUSTED_PROXIES": "10.0.0.0/8, proxy.local"}, "KURA_TRUSTED_PROXIES"),
        ({"KURA_TRUSTED_PROXIES": "10.0.0.1/8"}, "KURA_TRUSTED_PROXIES"),
    ],
)
def test_invalid_value_is_named(environ: dict[str, str], variable: str) -> None:
    """An out-of-range, unparsable or unknown value is a ConfigError naming its variable."""
    found = problems(environ)
    assert len(found) == 1
    assert found[0].startswith(variable + " ")


def test_blank_values_count_as_unset() -> None:
    """A variable set to whitespace takes its default, as if it were absent
    (except the tenant: an empty one is an error, see test_invalid_value_is_named)."""
    config = parse({"KURA_PORT": "  ", "KURA_DATA_DIR": ""})
    assert config.port == PORT.default
    assert config.tenant_id == TENANT_ID.default


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[("1", True), ("TRUE", True), ("yes", True), ("On", True)],
        *[("0", False), ("false", False), ("NO", False), ("off", False)],
    ],
)
def test_one_boolean_grammar_for_every_switch(value: str, expected: bool) -> None:
    """Every boolean takes 1/true/yes/on and 0/false/no/off, in any case."""
    config = parse(
        {
            "KURA_ACCESS_LOG": value,
            "KURA_ACCELERATED_FILE_SERVING_ENABLED": value,
            "KURA_ANONYMOUS_READ": value,
        }
    )
    assert config.access_log is expected
    assert config.accelerator.enabled is expected


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("KURA_HEADER_TIMEOUT_MS", "30s", 30_000),
        ("KURA_HEADER_TIMEOUT_MS", "1.5s", 1_500),
        ("KURA_HEADER_TIMEOUT_MS", "250ms", 250),
        ("KURA_HEADER_TIMEOUT_MS", "2m", 120_000),
        ("KURA_HEADER_TIMEOUT_MS", "1h", 3_600_000),
        ("KURA_HEADER_TIMEOUT_MS", "7000", 7_000),
        ("KURA_TMP_DIR_MAX_BYTES", "512MiB", 512 * 1024**2),
        ("KURA_TMP_DIR_MAX_BYTES", "512Mi", 512 * 1024**2),
        ("KURA_TMP_DIR_MAX_BYTES", "2 GiB", 2 * 1024**3),
        ("KURA_TMP_DIR_MAX_BYTES", "10MB", 10 * 1000**2),
        ("KURA_TMP_DIR_MAX_BYTES", "3G", 3 * 1000**3),
        ("KURA_TMP_DIR_MAX_BYTES", "4096", 4096),
    ],
)
def test_durations_and_sizes_take_units(variable: str, value: str, expected: int) -> None:
    config = parse({variable: value})
    attribute = {
        "KURA_HEADER_TIMEOUT_MS": lambda c: c.header_timeout_ms,
        "KURA_TMP_DIR_MAX_BYTES": lambda c: c.tmp_dir_max_bytes,
    }[variable]
    assert attribute(config) == expected


def test_unknown_variables_are_named_with_the_closest_known_one() -> None:
    environ = {
        "KURA_TENNANT_ID": "acme",
        "KURA_SOMETHING_ELSE": "1",
        "KURA_PORT": "4000",
        "HOME": "/root",
        # What Kubernetes injects for Services named kura and kura-internal:
        "KURA_SERVICE_HOST": "10.0.0.7",
        "KURA_SERVICE_PORT": "4000",
        "KURA_SERVICE_PORT_HTTP": "4000",
        "KURA_PORT_4000_TCP": "tcp://10.0.0.7:4000",
        "KURA_PORT_4000_TCP_ADDR": "10.0.0.7",
        "KURA_INTERNAL_SERVICE_HOST": "10.0.0.8",
        "KURA_INTERNAL_PORT_7443_TCP_PROTO": "tcp",
    }
    assert unknown_variables(environ, (v.name for v in VARIABLES)) == [
        "KURA_SOMETHING_ELSE is not a kura variable and is ignored",
        "KURA_TENNANT_ID is not a kura variable and is ignored; did you mean KURA_TENANT_ID?",
    ]


def test_tmp_dir_follows_the_data_dir() -> None:
    """Without KURA_TMP_DIR, staging lives in ``<KURA_DATA_DIR>/tmp``."""
    config = parse({"KURA_DATA_DIR": "/srv/data"})
    assert config.tmp_dir == "/srv/data/tmp"


def test_public_tls_is_all_or_none(pem_files: dict[str, str]) -> None:
    """A public TLS certificate without its key names the missing key variable."""
    found = problems({"KURA_PUBLIC_TLS_CERT_PATH": pem_files["cert"]})
    assert len(found) == 1
    assert found[0].startswith("KURA_PUBLIC_TLS_KEY_PATH ")
    assert "all or none" in found[0]
    both = parse(
        {
            "KURA_PUBLIC_TLS_CERT_PATH": pem_files["cert"],
            "KURA_PUBLIC_TLS_KEY_PATH": pem_files["key"],
        }
    )
    assert both.public_tls == TlsFiles(pem_files["cert"], pem_files["key"])


def test_internal_tls_needs_all_three_paths(pem_files: dict[str, str]) -> None:
    """Peer mTLS with a certificate only names both missing variables (key and CA)."""
    found = problems({"KURA_INTERNAL_TLS_CERT_PATH": pem_files["cert"]})
    assert sorted(problem.split(" ", 1)[0] for problem in found) == [
        "KURA_INTERNAL_TLS_CA_CERT_PATH",
        "KURA_INTERNAL_TLS_KEY_PATH",
    ]


def test_tls_paths_must_exist(tmp_path: Path, pem_files: dict[str, str]) -> None:
    """A TLS path that is not an existing file is named."""
    missing = str(tmp_path / "absent.pem")
    found = problems(
        {"KURA_PUBLIC_TLS_CERT_PATH": missing, "KURA_PUBLIC_TLS_KEY_PATH": pem_files["key"]}
    )
    assert len(found) == 1
    assert found[0].startswith("KURA_PUBLIC_TLS_CERT_PATH ")
    assert "does not exist" in found[0]


@pytest.mark.parametrize(
    "peer",
    [
        "https://b.internal:7443",  # TLS scheme without internal TLS
        "http://b.internal:7000",  # not the internal port
        "http://b.internal",  # no port at all
        "http://b.internal:7443/api",  # not a bare base URL
        "b.internal:7443",  # no scheme
        "http://:7443",  # no host
    ],
)
def test_peer_urls_must_use_the_internal_scheme_and_port(peer: str) -> None:
    """Peer URLs must be bare ``http://host:KURA_INTERNAL_PORT`` without internal TLS."""
    found = problems({"KURA_PEERS": f"http://a.internal:7443,{peer}", **SECRET})
    assert len(found) == 1
    assert found[0].startswith("KURA_PEERS ")


def test_peer_urls_use_https_with_internal_tls(pem_files: dict[str, str]) -> None:
    """With peer mTLS configured, plain-http peers and node URL are refused."""
    tls = {
        "KURA_INTERNAL_TLS_CA_CERT_PATH": pem_files["ca"],
        "KURA_INTERNAL_TLS_CERT_PATH": pem_files["cert"],
        "KURA_INTERNAL_TLS_KEY_PATH": pem_files["key"],
    }
    assert parse(tls).node_url == "https://127.0.0.1:7443"
    found = problems(
        {
            **tls,
            **SECRET,
            "KURA_PEERS": "http://b.internal:7443",
            "KURA_NODE_URL": "http://a:7443",
        }
    )
    assert sorted(problem.split(" ", 1)[0] for problem in found) == [
        "KURA_NODE_URL",
        "KURA_PEERS",
    ]


def test_node_url_must_target_the_internal_port() -> None:
    """KURA_NODE_URL is validated like a peer URL, against KURA_INTERNAL_PORT."""
    found = problems({"KURA_INTERNAL_PORT": "9000", "KURA_NODE_URL": "http://a:7443"})
    assert len(found) == 1
    assert found[0].startswith("KURA_NODE_URL ")
    assert parse({"KURA_INTERNAL_PORT": "9000"}).node_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("requested", "filesystem", "expected"),
    [
        (None, 1000, 500),  # default: half the filesystem
        (None, 1001, 500),
        (100, 1000, 100),  # requested and under the ceiling
        (800, 1000, 800),
        (900, 1000, 800),  # never more than 80 %
        (10**15, 1000, 800),
    ],
)
def test_capacity_derivation(requested: int | None, filesystem: int, expected: int) -> None:
    """The budget is the requested value capped at 80 %, or half the filesystem."""
    assert derive_capacity(requested, filesystem) == expected


def test_capacity_is_measured_on_the_data_dir_filesystem() -> None:
    """The node measures the filesystem of KURA_DATA_DIR and derives capacity from it."""
    measured: list[str] = []

    def fake_filesystem(path: str) -> int:
        measured.append(path)
        return 10_000

    default = KuraConfig.from_environ(
        {"KURA_DATA_DIR": "/srv/data"}, measure_filesystem=fake_filesystem
    )
    capped = KuraConfig.from_environ(
        {"KURA_DATA_DIR": "/srv/data", "KURA_CAS_CAPACITY_BYTES": "9000"},
        measure_filesystem=fake_filesystem,
    )
    assert measured == ["/srv/data", "/srv/data"]
    assert default.cas_capacity_bytes == 5000
    assert capped.cas_capacity_bytes == 8000


def test_docs_configuration_matches_the_registry() -> None:
    """docs/configuration.md is exactly what ``python -m kura.config`` prints."""
    generated = subprocess.run(
        [sys.executable, "-m", "kura.config"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert generated == render_markdown()
    documented = Path(REPO_ROOT, "docs", "configuration.md").read_text(encoding="utf-8")
    assert documented == generated, "regenerate: python -m kura.config > docs/configuration.md"


def test_docs_list_every_variable() -> None:
    """Every registered variable has a row in the generated page."""
    page = render_markdown()
    for variable in VARIABLES:
        assert f"| `{variable.name}` | `{variable.documented_default}` |" in page


def test_twistd_options_override_the_environment() -> None:
    """``twistd kura --port ... --data-dir ...`` wins over the matching variables."""
    options = Options()
    options.parseOptions(
        [
            "--port",
            "5005",
            "--internal-port",
            "5006",
            "--data-dir",
            "/from/options",
            "--tmp-dir",
            "/from/options/tmp",
            "--tenant-id",
            "acme",
        ]
    )
    environ = {
        "KURA_PORT": "4000",
        "KURA_DATA_DIR": "/from/env",
        "KURA_TENANT_ID": "default",
        "KURA_REGION": "eu",
    }
    merged = environment_with(options, environ)
    config = parse(merged)
    assert config.port == 5005
    assert config.internal_port == 5006
    assert config.data_dir == "/from/options"
    assert config.tmp_dir == "/from/options/tmp"
    assert config.tenant_id == "acme"
    assert config.region == "eu"  # untouched by options
    assert environ["KURA_PORT"] == "4000"  # the environment itself is not modified


def test_absent_options_leave_the_environment_alone() -> None:
    """Options not given on the command line do not override anything."""
    options = Options()
    options.parseOptions([])
    environ = dict.fromkeys(OVERRIDES.values(), "x")
    assert environment_with(options, environ) == environ
