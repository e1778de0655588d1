"""The Helm chart (helm/kura) and its Grafana dashboard, rendered by Helm's own engine.

Each test renders the chart with ``helm-python-sdk`` (Helm's Go SDK; see
``tests/helm/engine.py``), parses the manifests and checks what a cluster
would run: ports, env wiring, probes, drain timing, volumes, the security
defaults (Services, NetworkPolicy, generated Secrets) and the optional
features. The env the chart renders is also fed to ``KuraConfig.from_environ``
so the chart and the node cannot drift apart. Upgrades are rendered against
a stand-in API server (``tests/helm/cluster.py``) so that ``lookup`` sees
the Secrets an install left behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from kura.config import KuraConfig
from kura.config import node as kura_config
from kura.telemetry import metering
from kura.telemetry.metrics import KuraMetrics
from tests.helm.cluster import FakeCluster
from tests.helm.engine import CHART_DIR, ChartRenderer, Rendered, load_helm

GiB = 1024**3
MiB = 1024**2
NODE_URL = "http://$(POD_NAME).kura-headless.cache.svc.cluster.local:7443"
DISCOVERY = "kura-headless.cache.svc.cluster.local"
ACCEL_VARS = (
    "KURA_ACCELERATED_FILE_SERVING_ENABLED",
    "KURA_ACCELERATED_FILE_SERVING_MODE",
    "KURA_ACCELERATED_FILE_SERVING_MAX_CONCURRENT",
    "KURA_ACCELERATED_FILE_SERVING_CHUNK_BYTES",
)
EXTENSION = "def authorize(request):\n    return True\n"
#: Every optional feature on, to see every variable the chart can set.
OIDC = {
    "issuer": "https://token.actions.githubusercontent.com",
    "audience": "kura",
    "writeClaims": "repository_owner=acme,ref=refs/heads/main",
    "readClaims": "repository_owner=acme",
}
EVERYTHING: dict[str, Any] = {
    "config": {
        "casCapacityBytes": 100 * GiB,
        "memorySoftLimitBytes": 700 * MiB,
        "memoryHardLimitBytes": 850 * MiB,
        "trustedProxies": ["10.0.0.0/8"],
        "replication": {"peers": ["https://seed:7443"]},
    },
    "extension": {"enabled": True, "script": EXTENSION},
    "auth": {"oidc": OIDC},
    "peerTls": {"enabled": True, "secretName": "kura-peer-tls"},
    "publicTls": {"enabled": True, "secretName": "kura-public-tls"},
    "peerAuth": {"acceptUnsignedUntil": "2026-12-31T00:00:00Z"},
    "metrics": {"token": {"existingSecret": "kura-scrape"}},
    "status": {"token": {"existingSecret": "kura-status"}},
    "objectStore": {
        "url": "s3://kura-cache/ci",
        "endpoint": "https://minio.internal:9000",
        "region": "eu-west-1",
        "credentials": {"existingSecret": "kura-s3"},
    },
}
#: Declared by kura/config/node.py but deliberately not set by the chart.
NOT_EXPOSED = {
    "KURA_FAILPOINTS": "crash-injection for tests only",
    "KURA_AUTH_READ_TOKENS": "the chart mounts a tokens file (KURA_AUTH_TOKENS_FILE)",
    "KURA_AUTH_WRITE_TOKENS": "the chart mounts a tokens file (KURA_AUTH_TOKENS_FILE)",
    "KURA_PEER_SECRET_FILE": "the chart sets KURA_PEER_SECRET from a secretKeyRef",
    "KURA_PEER_SECRET_NEXT_FILE": "the chart sets KURA_PEER_SECRET_NEXT from a secretKeyRef",
    "KURA_INTERNAL_BIND_HOST": "a chart's pods have peers: the node binds it like the public port",
    "KURA_MEMORY_BODY_MAX_BYTES": "a performance knob with a measured default; extraEnv sets it",
}
#: Set by the chart ahead of its declaration in kura/config/node.py.
PENDING_DECLARATION = {"KURA_EXTENSION_SCRIPT_PATH"}
#: Stands for a value in a Secret the user provides (the chart renders none):
#: as long as a peer secret must be (at least 32 bytes).
USER_SECRET_VALUE = "u" * 64
#: Stands for a file projected from a user's Secret volume, by volume name.
USER_SECRET_FILES = {"auth-tokens": f"write {USER_SECRET_VALUE}\n"}
#: Replication limiter gauges another change adds to kura/telemetry/metrics.py.
PENDING_METRICS = {
    "kura_replication_bandwidth_configured_limit_bytes_per_second",
    "kura_replication_bandwidth_effective_limit_bytes_per_second",
}
DASHBOARD = CHART_DIR / "dashboards" / "kura.json"


@pytest.fixture(scope="module")
def chart() -> Iterator[ChartRenderer]:
    renderer = ChartRenderer(load_helm())
    yield renderer
    renderer.close()


@pytest.fixture(scope="module")
def default(chart: ChartRenderer) -> Rendered:
    return chart.render()


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge value overlays (later wins), as repeated ``-f`` files do."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def node_environ(rendered: Rendered, files: Path, pod_name: str = "kura-0") -> dict[str, str]:
    """The container env as the kubelet would hand it to kura in pod ``pod_name``.

    ``$(POD_NAME)`` is expanded. A ``secretKeyRef`` takes its value from the
    Secret the chart renders, or :data:`USER_SECRET_VALUE` for a user's
    Secret; an optional key the Secret lacks leaves the variable unset, as
    the kubelet does. Files a variable points at inside a Secret volume are
    written under ``files`` (with the rendered Secret's content, or a stand-in
    for a user's) and the variable is pointed there.
    """
    rendered_secrets = {s["metadata"]["name"] for s in rendered.of_kind("Secret")}
    environ: dict[str, str] = {}
    for entry in rendered.container["env"]:
        name = entry["name"]
        if not name.startswith("KURA_"):
            continue
        if "value" in entry:
            environ[name] = entry["value"].replace("$(POD_NAME)", pod_name)
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        if ref["name"] not in rendered_secrets:
            if not ref.get("optional"):
                environ[name] = USER_SECRET_VALUE
            continue
        data = rendered.secret_data(ref["name"])
        if ref["key"] in data:
            environ[name] = data[ref["key"]]
        else:
            assert ref.get("optional"), f"{name}: the kubelet would refuse to start the pod"
    secret_volumes = {
        v["name"]: v["secret"] for v in rendered.pod["spec"]["volumes"] if "secret" in v
    }
    for mount in rendered.container["volumeMounts"]:
        source = secret_volumes.get(mount["name"])
        if source is None:
            continue
        prefix = mount["mountPath"] + "/"
        projected = {item["path"]: item["key"] for item in source.get("items", [])}
        for name, value in list(environ.items()):
            if not value.startswith(prefix):
                continue
            path = value.removeprefix(prefix)
            if source["secretName"] in rendered_secrets:
                key = projected[path] if projected else path
                content = rendered.secret_data(source["secretName"])[key]
            else:
                content = USER_SECRET_FILES.get(mount["name"], "PEM\n")
            target = files / mount["name"] / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            environ[name] = str(target)
    return environ


def parse(environ: dict[str, str]) -> KuraConfig:
    return KuraConfig.from_environ(environ, measure_filesystem=lambda path: 200 * GiB)


# -- objects ----------------------------------------------------------------------


def test_default_render_has_the_expected_objects(default: Rendered) -> None:
    """By default: StatefulSet, two Services, NetworkPolicy, two Secrets, PDB, ServiceAccount."""
    kinds = sorted(o["kind"] for o in default.objects)
    assert kinds == [
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]


def test_chart_lints_clean_in_strict_mode(chart: ChartRenderer) -> None:
    """`helm lint --strict` reports no warning or error for the chart."""
    report = chart.helm.lint(str(CHART_DIR), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_statefulset_rolls_in_parallel_with_optional_partition(chart: ChartRenderer) -> None:
    """Pods are managed in parallel with RollingUpdate, and a partition is set only when given."""
    spec = chart.render().statefulset["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    assert spec["serviceName"] == "kura-headless"
    partitioned = chart.render({"updateStrategy": {"partition": 2}}).statefulset["spec"]
    assert partitioned["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"partition": 2},
    }


def test_services_and_pdb_select_the_pods(default: Rendered) -> None:
    """Both Services, the PDB and the NetworkPolicy select exactly the StatefulSet's pod labels."""
    pod_labels = default.pod["metadata"]["labels"]
    selectors = [s["spec"]["selector"] for s in default.of_kind("Service")]
    selectors.append(default.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    selectors.append(default.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    selectors.append(default.statefulset["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert selector
        assert selector.items() <= pod_labels.items()


# -- ports ------------------------------------------------------------------------


def ports(entries: list[dict[str, Any]], key: str) -> dict[str, int]:
    return {p["name"]: p[key] for p in entries}


def test_default_ports_are_public_http_grpc_and_internal_only(default: Rendered) -> None:
    """The container opens only the node's default ports; the client Service only public ones."""
    public, internal = kura_config.PORT.default, kura_config.INTERNAL_PORT.default
    grpc = kura_config.GRPC_PORT.default
    assert ports(default.container["ports"], "containerPort") == {
        "http": public,
        "internal": internal,
        "grpc": grpc,
    }
    service = default.one("Service", "kura")["spec"]
    assert ports(service["ports"], "port") == {"http": public, "grpc": grpc}
    assert {p["targetPort"] for p in service["ports"]} == {"http", "grpc"}
    assert [p.get("appProtocol") for p in service["ports"]] == [None, "kubernetes.io/h2c"]
    assert default.env["KURA_PORT"] == str(public)
    assert default.env["KURA_INTERNAL_PORT"] == str(internal)
    assert default.env["KURA_GRPC_PORT"] == str(grpc)
    assert default.env["KURA_GRPC_ENABLED"] == "true"
    assert "KURA_HTTPS_PORT" not in default.env


def test_grpc_can_be_turned_off(chart: ChartRenderer) -> None:
    """config.grpc.enabled=false closes the port everywhere and tells the node."""
    rendered = chart.render({"config": {"grpc": {"enabled": False}}})
    assert "grpc" not in ports(rendered.container["ports"], "containerPort")
    service = rendered.one("Service", "kura")["spec"]
    assert "grpc" not in ports(service["ports"], "port")
    assert rendered.env["KURA_GRPC_ENABLED"] == "false"
    assert "KURA_GRPC_PORT" not in rendered.env


def test_public_tls_adds_the_https_port_and_certificate(chart: ChartRenderer) -> None:
    """publicTls mounts the Secret, sets the TLS env and adds 4443 to container and Service."""
    rendered = chart.render({"publicTls": {"enabled": True, "secretName": "kura-public-tls"}})
    assert ports(rendered.container["ports"], "containerPort") == {
        "http": 4000,
        "internal": 7443,
        "https": 4443,
        "grpc": 4002,
    }
    service = rendered.one("Service", "kura")["spec"]
    assert ports(service["ports"], "port") == {"http": 4000, "https": 4443, "grpc": 4002}
    env = rendered.env
    assert env["KURA_HTTPS_PORT"] == "4443"
    assert env["KURA_PUBLIC_TLS_CERT_PATH"] == "/etc/kura/public-tls/tls.crt"
    assert env["KURA_PUBLIC_TLS_KEY_PATH"] == "/etc/kura/public-tls/tls.key"
    assert rendered.mount("public-tls") == {
        "name": "public-tls",
        "mountPath": "/etc/kura/public-tls",
        "readOnly": True,
    }
    assert rendered.volume("public-tls")["secret"]["secretName"] == "kura-public-tls"
    # Probes stay on plain HTTP.
    assert rendered.container["readinessProbe"]["httpGet"]["port"] == "http"


def test_headless_service_publishes_not_ready_pods(default: Rendered) -> None:
    """The headless Service has no cluster IP and publishes not-ready pods for peer discovery."""
    spec = default.one("Service", "kura-headless")["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert ports(spec["ports"], "port")["internal"] == 7443


def test_only_the_headless_service_carries_the_internal_port(chart: ChartRenderer) -> None:
    """With every feature on, 7443 is on the headless Service alone, which peers' URLs name."""
    rendered = chart.render(EVERYTHING)
    carriers = [
        s["metadata"]["name"]
        for s in rendered.of_kind("Service")
        if any(p["port"] == 7443 or p["targetPort"] == "internal" for p in s["spec"]["ports"])
    ]
    assert carriers == ["kura-headless"]
    headless = "kura-headless.cache.svc.cluster.local"
    assert rendered.env["KURA_DISCOVERY_DNS_NAME"] == headless
    assert rendered.env["KURA_NODE_URL"] == f"https://$(POD_NAME).{headless}:7443"
    seeded = rendered.env["KURA_PEERS"].split(",")[1:]
    assert seeded == [f"https://kura-{n}.{headless}:7443" for n in range(3)]


# -- env --------------------------------------------------------------------------


def test_node_url_and_discovery_come_from_the_pod_and_headless_service(
    default: Rendered,
) -> None:
    """KURA_NODE_URL is built from the downward-API pod name; discovery is the headless FQDN."""
    env_list = default.container["env"]
    names = [e["name"] for e in env_list]
    assert env_list[0] == {
        "name": "POD_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    # $(VAR) only expands variables declared earlier in the list.
    assert names.index("POD_NAME") < names.index("KURA_NODE_URL")
    assert default.env["KURA_NODE_URL"] == NODE_URL
    assert default.env["KURA_DISCOVERY_DNS_NAME"] == DISCOVERY
    assert default.env["KURA_BIND_HOST"] == "0.0.0.0"


def test_data_and_tmp_dirs_live_on_the_pod_volume(default: Rendered) -> None:
    """Data and staging dirs are under /var/cache/kura, the per-pod PVC's mount."""
    assert default.env["KURA_DATA_DIR"] == "/var/cache/kura/data"
    assert default.env["KURA_TMP_DIR"] == "/var/cache/kura/tmp"
    assert default.mount("cache")["mountPath"] == "/var/cache/kura"
    claims = default.statefulset["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["cache"]


def test_accelerator_variables_are_always_set(
    chart: ChartRenderer, default: Rendered, tmp_path: Path
) -> None:
    """All four accelerator variables render, with the node's defaults and with every value set."""
    assert {name: default.env[name] for name in ACCEL_VARS} == {
        v.name: v.documented_default for v in kura_config.VARIABLES if v.name in ACCEL_VARS
    }
    rendered = chart.render(
        {
            "config": {
                "acceleratedFileServing": {
                    "enabled": False,
                    "mode": "sendfile",
                    "maxConcurrent": 8,
                    "chunkBytes": 65536,
                }
            }
        }
    )
    assert {name: rendered.env[name] for name in ACCEL_VARS} == dict(
        zip(ACCEL_VARS, ("false", "sendfile", "8", "65536"), strict=True)
    )
    config = parse(node_environ(rendered, tmp_path))
    assert config.accelerator == kura_config.AcceleratorConfig(
        enabled=False, mode="sendfile", max_concurrent=8, chunk_bytes=65536
    )


def test_schema_rejects_an_unknown_accelerator_mode(chart: ChartRenderer) -> None:
    """values.schema.json refuses a mode the node would refuse at start-up."""
    with pytest.raises(chart.helm.HelmValuesError, match="acceleratedFileServing/mode"):
        chart.render({"config": {"acceleratedFileServing": {"mode": "uring"}}})


def test_replication_and_storage_values_reach_the_env(chart: ChartRenderer, tmp_path: Path) -> None:
    """Replication, drain, tmp budget, capacity, tenant and region values reach the env."""
    rendered = chart.render(
        {
            "config": {
                "tenantId": "acme",
                "region": "eu-west",
                "drainCompletionTimeoutMs": 60000,
                "tmpDirMaxBytes": 16 * GiB,
                "casCapacityBytes": 150 * GiB,
                "replication": {
                    "bandwidthLimitBytesPerSecond": 0,
                    "publicLatencyTargetMs": 250,
                    "peers": ["http://a:7443", "http://b:7443"],
                },
            }
        }
    )
    env = rendered.env
    assert env["KURA_TENANT_ID"] == "acme"
    assert env["KURA_REGION"] == "eu-west"
    assert env["KURA_DRAIN_COMPLETION_TIMEOUT_MS"] == "60000"
    assert env["KURA_TMP_DIR_MAX_BYTES"] == str(16 * GiB)
    assert env["KURA_CAS_CAPACITY_BYTES"] == str(150 * GiB)
    assert env["KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND"] == "0"
    assert env["KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS"] == "250"
    assert env["KURA_PEERS"] == "http://a:7443,http://b:7443"
    config = parse(node_environ(rendered, tmp_path))
    assert config.replication.bandwidth_limit_bytes_per_second == 0
    assert config.replication.public_latency_target_ms == 250
    assert config.cas_capacity_bytes == 150 * GiB


def test_default_replication_values_are_the_node_defaults(default: Rendered) -> None:
    """The chart sets the limiter, drain and staging values to the node's defaults."""
    for variable in (
        kura_config.REPLICATION_BANDWIDTH,
        kura_config.REPLICATION_LATENCY_TARGET_MS,
        kura_config.DRAIN_COMPLETION_TIMEOUT_MS,
        kura_config.TMP_DIR_MAX_BYTES,
    ):
        assert default.env[variable.name] == variable.documented_default
    assert "KURA_CAS_CAPACITY_BYTES" not in default.env
    assert "KURA_PEERS" not in default.env


def test_chart_defaults_equal_the_node_defaults(default: Rendered, tmp_path: Path) -> None:
    """Parsed by kura, the default env equals the node's defaults bar placement and credentials."""
    environ = node_environ(default, tmp_path)
    placed = (
        "KURA_NODE_URL",
        "KURA_DATA_DIR",
        "KURA_TMP_DIR",
        "KURA_DISCOVERY_DNS_NAME",
        # Authenticated by default, where a bare node runs open.
        "KURA_PEER_SECRET",
        "KURA_AUTH_TOKENS_FILE",
    )
    assert parse(environ) == parse({name: environ[name] for name in placed})
    assert parse(environ).node_url == "http://kura-0.kura-headless.cache.svc.cluster.local:7443"


def test_every_variable_the_chart_sets_is_one_kura_reads(chart: ChartRenderer) -> None:
    """No KURA_* name in the chart is misspelt: each is declared in kura/config/node.py."""
    declared = {v.name for v in kura_config.VARIABLES}
    rendered = chart.render(EVERYTHING).env_names | chart.render().env_names
    unknown = {n for n in rendered if n.startswith("KURA_")} - declared - PENDING_DECLARATION
    assert unknown == set()


def test_every_variable_kura_reads_is_mapped_by_the_chart(chart: ChartRenderer) -> None:
    """Each kura/config/node.py variable is set by the chart, unless listed or extension tuning."""
    rendered = chart.render(EVERYTHING).env_names
    missing = sorted(
        v.name
        for v in kura_config.VARIABLES
        if v.name not in rendered
        and v.name not in NOT_EXPOSED
        # The chart owns the extension's script mount; its tuning knobs go in extraEnv.
        and not v.name.startswith("KURA_EXTENSION_")
    )
    assert missing == [], (
        "declared in kura/config/node.py but not mapped by helm/kura: add a value in values.yaml "
        "and an env entry in templates/statefulset.yaml (or list it in NOT_EXPOSED)"
    )


def test_extra_env_is_appended(chart: ChartRenderer) -> None:
    """extraEnv entries come after the chart's own variables."""
    rendered = chart.render({"extraEnv": [{"name": "KURA_EXTENSION_TIMEOUT_MS", "value": "50"}]})
    assert rendered.container["env"][-1] == {"name": "KURA_EXTENSION_TIMEOUT_MS", "value": "50"}


# -- network fencing --------------------------------------------------------------

SAME_RELEASE = {"app.kubernetes.io/name": "kura", "app.kubernetes.io/instance": "kura"}


def ingress_rules(rendered: Rendered) -> list[dict[str, Any]]:
    policy = rendered.one("NetworkPolicy", "kura")["spec"]
    assert policy["podSelector"] == {"matchLabels": SAME_RELEASE}
    assert policy["policyTypes"] == ["Ingress"]
    rules: list[dict[str, Any]] = policy["ingress"]
    return rules


def rule_ports(rule: dict[str, Any]) -> set[int]:
    assert {p["protocol"] for p in rule["ports"]} == {"TCP"}
    return {p["port"] for p in rule["ports"]}


def test_network_policy_admits_the_internal_port_only_from_this_release(
    default: Rendered,
) -> None:
    """The internal port's only rule admits this release's pods; the public port is open to all."""
    peers, public = ingress_rules(default)
    assert rule_ports(peers) == {7443}
    # A podSelector without a namespaceSelector means: this namespace only.
    assert peers["from"] == [{"podSelector": {"matchLabels": SAME_RELEASE}}]
    assert rule_ports(public) == {4000, 4002}
    assert "from" not in public  # from anywhere
    assert all(7443 not in rule_ports(r) for r in ingress_rules(default) if r is not peers)


def test_network_policy_follows_ports_and_release(chart: ChartRenderer) -> None:
    """Moved ports, public TLS and another release name reach the policy's rules and selectors."""
    rendered = chart.render(
        {
            "ports": {"http": 8080, "internal": 9443, "grpc": 9002},
            "publicTls": {"enabled": True, "secretName": "kura-public-tls"},
        },
        release="cache-eu",
    )
    policy = rendered.one("NetworkPolicy", "cache-eu-kura")["spec"]
    release = {"app.kubernetes.io/name": "kura", "app.kubernetes.io/instance": "cache-eu"}
    assert policy["podSelector"] == {"matchLabels": release}
    peers, public = policy["ingress"]
    assert rule_ports(peers) == {9443}
    assert peers["from"] == [{"podSelector": {"matchLabels": release}}]
    assert rule_ports(public) == {8080, 4443, 9002}


def test_public_ports_can_be_narrowed_with_a_metrics_exception(chart: ChartRenderer) -> None:
    """publicFrom restricts the public ports; metricsFrom then admits a scraper to the http port."""
    ci = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}}
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    rendered = chart.render({"networkPolicy": {"publicFrom": [ci], "metricsFrom": [prometheus]}})
    peers, public, metrics = ingress_rules(rendered)
    assert rule_ports(peers) == {7443}
    assert public["from"] == [ci]
    assert rule_ports(public) == {4000, 4002}
    assert metrics["from"] == [prometheus]
    assert rule_ports(metrics) == {4000}
    # metricsFrom alone adds nothing: the http port is already open to everyone.
    only_metrics = chart.render({"networkPolicy": {"metricsFrom": [prometheus]}})
    assert len(ingress_rules(only_metrics)) == 2


def test_network_policy_can_be_turned_off(chart: ChartRenderer) -> None:
    """networkPolicy.enabled false renders no NetworkPolicy."""
    assert chart.render({"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy") == []


# -- authentication ---------------------------------------------------------------


def test_default_install_signs_peer_traffic_with_a_generated_secret(default: Rendered) -> None:
    """KURA_PEER_SECRET comes from a generated, kept Secret of 64 random characters."""
    assert default.secret_env["KURA_PEER_SECRET"] == {
        "name": "kura-peer-auth",
        "key": "peer-secret",
    }
    assert default.secret_env["KURA_PEER_SECRET_NEXT"] == {
        "name": "kura-peer-auth",
        "key": "peer-secret-next",
        "optional": True,
    }
    secret = default.one("Secret", "kura-peer-auth")
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert secret["type"] == "Opaque"
    data = default.secret_data("kura-peer-auth")
    assert list(data) == ["peer-secret"]
    assert re.fullmatch(r"[A-Za-z0-9]{64}", data["peer-secret"])
    assert default.env["KURA_INTERNAL_INSECURE"] == "false"
    assert "KURA_PEER_ACCEPT_UNSIGNED_UNTIL" not in default.env
    assert "KURA_INTERNAL_TLS_PEER_NAMES" not in default.env


def test_default_install_requires_tokens_from_a_generated_secret(
    default: Rendered, tmp_path: Path
) -> None:
    """The pod reads a mounted tokens file holding digests of a random write and read token."""
    assert default.env["KURA_AUTH_TOKENS_FILE"] == "/etc/kura/auth/tokens"
    assert default.env["KURA_AUTH_ANONYMOUS_READ"] == "false"
    assert default.env["KURA_ALLOW_ANONYMOUS_DELETE"] == "false"
    assert default.mount("auth-tokens") == {
        "name": "auth-tokens",
        "mountPath": "/etc/kura/auth",
        "readOnly": True,
    }
    # Only the tokens file is projected: the plain tokens never reach the pod.
    assert default.volume("auth-tokens")["secret"] == {
        "secretName": "kura-auth",
        "defaultMode": 0o440,
        "items": [{"key": "tokens", "path": "tokens"}],
    }
    secret = default.one("Secret", "kura-auth")
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    data = default.secret_data("kura-auth")
    write, read = data["write-token"], data["read-token"]
    assert re.fullmatch(r"[A-Za-z0-9]{48}", write)
    assert re.fullmatch(r"[A-Za-z0-9]{48}", read)
    assert write != read
    entries = [line.split() for line in data["tokens"].splitlines() if not line.startswith("#")]
    assert entries == [
        ["write", "sha256:" + hashlib.sha256(write.encode()).hexdigest()],
        ["read", "sha256:" + hashlib.sha256(read.encode()).hexdigest()],
    ]
    # What the node is handed: the generated file, at the path the variable names.
    environ = node_environ(default, tmp_path)
    assert Path(environ["KURA_AUTH_TOKENS_FILE"]).read_text() == data["tokens"]
    assert environ["KURA_PEER_SECRET"] == default.secret_data("kura-peer-auth")["peer-secret"]
    assert "KURA_PEER_SECRET_NEXT" not in environ


def test_open_mode_renders_no_tokens(chart: ChartRenderer) -> None:
    """auth.mode open is an explicit opt-out: no tokens Secret, file, mount or token variable."""
    rendered = chart.render({"auth": {"mode": "open", "allowAnonymousDelete": True}})
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] == ["kura-peer-auth"]
    assert not {n for n in rendered.env_names if n.startswith("KURA_AUTH_") and "TOKEN" in n}
    assert all(ref["name"] == "kura-peer-auth" for ref in rendered.secret_env.values())
    assert all(v["name"] != "auth-tokens" for v in rendered.pod["spec"]["volumes"])
    assert all(m["name"] != "auth-tokens" for m in rendered.container["volumeMounts"])
    assert rendered.env["KURA_ALLOW_ANONYMOUS_DELETE"] == "true"
    assert "WARNING: open mode" in rendered.files["kura/templates/NOTES.txt"]


def test_extension_mode_needs_the_extension(chart: ChartRenderer) -> None:
    """auth.mode extension without extension.enabled fails the render with a message."""
    with pytest.raises(
        chart.helm.HelmError, match=r"auth\.mode extension needs extension\.enabled"
    ):
        chart.render({"auth": {"mode": "extension"}})


def test_extension_mode_authenticates_with_the_extension_alone(chart: ChartRenderer) -> None:
    """auth.mode extension mounts the script and renders no tokens."""
    rendered = chart.render(
        {"auth": {"mode": "extension"}, "extension": {"enabled": True, "script": EXTENSION}}
    )
    assert rendered.env["KURA_EXTENSION_SCRIPT_PATH"] == "/etc/kura/extension.py"
    assert "KURA_AUTH_TOKENS_FILE" not in rendered.env
    assert rendered.of_kind("Secret") == [rendered.one("Secret", "kura-peer-auth")]


def test_schema_rejects_an_unknown_auth_mode(chart: ChartRenderer) -> None:
    """values.schema.json accepts only tokens, open and extension as auth.mode."""
    with pytest.raises(chart.helm.HelmValuesError, match="auth/mode"):
        chart.render({"auth": {"mode": "none"}})


def test_existing_tokens_secret_is_mounted_and_nothing_generated(chart: ChartRenderer) -> None:
    """auth.existingSecret mounts the named key of the user's Secret; the chart makes none."""
    rendered = chart.render(
        {"auth": {"existingSecret": "ci-tokens", "tokensKey": "kura", "anonymousRead": True}}
    )
    assert rendered.of_kind("Secret") == [rendered.one("Secret", "kura-peer-auth")]
    assert rendered.volume("auth-tokens")["secret"]["secretName"] == "ci-tokens"
    assert rendered.volume("auth-tokens")["secret"]["items"] == [{"key": "kura", "path": "tokens"}]
    assert rendered.env["KURA_AUTH_TOKENS_FILE"] == "/etc/kura/auth/tokens"
    assert rendered.env["KURA_AUTH_ANONYMOUS_READ"] == "true"
    assert "Secret ci-tokens, key kura" in rendered.files["kura/templates/NOTES.txt"]


def test_existing_peer_secret_is_wired_and_nothing_generated(chart: ChartRenderer) -> None:
    """peerAuth.existingSecret feeds KURA_PEER_SECRET and _NEXT from the user's Secret and keys."""
    rendered = chart.render(
        {
            "peerAuth": {
                "existingSecret": "mesh",
                "secretKey": "current",
                "nextSecretKey": "next",
            }
        }
    )
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] == ["kura-auth"]
    assert rendered.secret_env["KURA_PEER_SECRET"] == {"name": "mesh", "key": "current"}
    assert rendered.secret_env["KURA_PEER_SECRET_NEXT"] == {
        "name": "mesh",
        "key": "next",
        "optional": True,
    }


def test_insecure_peers_get_no_secret(chart: ChartRenderer) -> None:
    """peerAuth.insecure sets KURA_INTERNAL_INSECURE and neither generates nor wires a secret."""
    rendered = chart.render({"peerAuth": {"insecure": True}})
    assert rendered.env["KURA_INTERNAL_INSECURE"] == "true"
    assert not {"KURA_PEER_SECRET", "KURA_PEER_SECRET_NEXT"} & rendered.env_names
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] == ["kura-auth"]
    # A Secret of the user's is still used: insecure is then only the node's fallback.
    mesh = chart.render({"peerAuth": {"insecure": True, "existingSecret": "mesh"}})
    assert mesh.secret_env["KURA_PEER_SECRET"] == {"name": "mesh", "key": "peer-secret"}


def test_unsigned_peer_traffic_can_be_accepted_for_a_while(chart: ChartRenderer) -> None:
    """peerAuth.acceptUnsignedUntil reaches the env; the schema wants an RFC 3339 UTC time."""
    rendered = chart.render({"peerAuth": {"acceptUnsignedUntil": "2026-12-31T00:00:00Z"}})
    assert rendered.env["KURA_PEER_ACCEPT_UNSIGNED_UNTIL"] == "2026-12-31T00:00:00Z"
    with pytest.raises(chart.helm.HelmValuesError, match="acceptUnsignedUntil"):
        chart.render({"peerAuth": {"acceptUnsignedUntil": "2026-12-31"}})


def test_peer_mtls_requires_the_pods_names_by_default(chart: ChartRenderer) -> None:
    """Under peerTls, KURA_INTERNAL_TLS_PEER_NAMES is the pods' wildcard unless peerNames is set."""
    tls = {"enabled": True, "secretName": "kura-peer-tls"}
    rendered = chart.render({"peerTls": tls}, release="cache-eu", namespace="builds")
    assert rendered.env["KURA_INTERNAL_TLS_PEER_NAMES"] == (
        "*.cache-eu-kura-headless.builds.svc.cluster.local"
    )
    # The pattern covers every pod's URL host ("*." matches exactly one label).
    for url in rendered.env["KURA_PEERS"].split(","):
        host = url.split("://")[1].split(":")[0]
        assert host.split(".", 1)[1] == "cache-eu-kura-headless.builds.svc.cluster.local"
    listed = chart.render({"peerTls": {**tls, "peerNames": ["*.mesh.example", "kura.example"]}})
    assert listed.env["KURA_INTERNAL_TLS_PEER_NAMES"] == "*.mesh.example,kura.example"
    # The peer secret stays on under mTLS: both checks apply.
    assert "KURA_PEER_SECRET" in listed.secret_env


def test_notes_tell_how_to_read_the_generated_tokens(default: Rendered) -> None:
    """NOTES.txt names the generated Secret and gives a kubectl command for each token."""
    notes = default.files["kura/templates/NOTES.txt"]
    for key in ("write-token", "read-token"):
        command = (
            "kubectl -n cache get secret kura-auth -o go-template="
            f"'{{{{index .data \"{key}\" | base64decode}}}}'"
        )
        assert command in notes
    assert "Secret kura-peer-auth" in notes
    assert "WARNING" not in notes


# -- generated secrets across upgrades --------------------------------------------

GENERATED = ("kura-peer-auth", "kura-auth")


def test_an_upgrade_render_keeps_the_generated_secrets(chart: ChartRenderer) -> None:
    """Rendered against a cluster holding an install's Secrets, an upgrade reuses their data."""
    with FakeCluster() as cluster:
        install = chart.render_in(cluster)
        # The install looked each Secret up, found none and generated it.
        for name in GENERATED:
            assert f"/api/v1/namespaces/cache/secrets/{name}" in cluster.requests
        for name in GENERATED:
            cluster.apply(install.one("Secret", name), namespace="cache")
        upgrade = chart.render_in(cluster, {"replicaCount": 5}, upgrade=True)
    assert upgrade.statefulset["spec"]["replicas"] == 5
    for name in GENERATED:
        assert upgrade.one("Secret", name) == install.one("Secret", name)
    # And the pods of both revisions read the same Secret keys.
    assert upgrade.secret_env == install.secret_env
    assert upgrade.volume("auth-tokens") == install.volume("auth-tokens")


def test_without_a_cluster_every_render_generates_new_secrets(chart: ChartRenderer) -> None:
    """Two fresh installs (or lookup-less renders) get different random secrets and tokens."""
    with FakeCluster() as first, FakeCluster() as second:
        installs = [chart.render_in(first), chart.render_in(second)]
    installs.append(chart.render())
    for name in GENERATED:
        values = [rendered.secret_data(name) for rendered in installs]
        for key in values[0]:
            assert len({v[key] for v in values}) == 3, (name, key)


def test_an_upgrade_keeps_a_next_peer_secret_added_by_hand(chart: ChartRenderer) -> None:
    """A peer-secret-next added to the generated Secret (a rotation) survives an upgrade."""
    current, upcoming = "c" * 64, "n" * 64
    with FakeCluster() as cluster:
        secret = chart.render_in(cluster).one("Secret", "kura-peer-auth")
        secret["data"] = {
            "peer-secret": base64.b64encode(current.encode()).decode(),
            "peer-secret-next": base64.b64encode(upcoming.encode()).decode(),
        }
        cluster.apply(secret, namespace="cache")
        upgrade = chart.render_in(cluster, upgrade=True)
    assert upgrade.secret_data("kura-peer-auth") == {
        "peer-secret": current,
        "peer-secret-next": upcoming,
    }


def test_an_upgrade_fills_in_a_key_missing_from_the_kept_secret(chart: ChartRenderer) -> None:
    """A kept tokens Secret that lost a key gets it regenerated; the keys it has are reused."""
    with FakeCluster() as cluster:
        secret = chart.render_in(cluster).one("Secret", "kura-auth")
        kept_write = secret["data"]["write-token"]
        secret["data"] = {"write-token": kept_write}
        cluster.apply(secret, namespace="cache")
        upgrade = chart.render_in(cluster, upgrade=True)
    data = upgrade.secret_data("kura-auth")
    write = base64.b64decode(kept_write).decode()
    assert data["write-token"] == write
    assert re.fullmatch(r"[A-Za-z0-9]{48}", data["read-token"])
    digests = [line.split()[1] for line in data["tokens"].splitlines()[1:]]
    assert digests == [
        "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        for token in (write, data["read-token"])
    ]


# -- metrics and status tokens ----------------------------------------------------


def test_metrics_and_status_tokens_come_from_the_users_secrets(chart: ChartRenderer) -> None:
    """metrics.token and status.token feed KURA_METRICS_TOKEN and KURA_STATUS_TOKEN by reference."""
    rendered = chart.render(
        {
            "metrics": {"token": {"existingSecret": "scrape", "key": "bearer"}},
            "status": {"token": {"existingSecret": "ops"}},
        }
    )
    assert rendered.secret_env["KURA_METRICS_TOKEN"] == {"name": "scrape", "key": "bearer"}
    assert rendered.secret_env["KURA_STATUS_TOKEN"] == {"name": "ops", "key": "token"}
    notes = rendered.files["kura/templates/NOTES.txt"]
    assert "Authorization: Bearer $STATUS_TOKEN" in notes


def test_metrics_and_status_are_open_by_default(default: Rendered) -> None:
    """Without a token Secret, neither KURA_METRICS_TOKEN nor KURA_STATUS_TOKEN is set."""
    assert not {"KURA_METRICS_TOKEN", "KURA_STATUS_TOKEN"} & default.env_names
    assert default.of_kind("ServiceMonitor") == []


def test_service_monitor_scrapes_the_client_service_with_the_token(chart: ChartRenderer) -> None:
    """The ServiceMonitor scrapes /metrics on http through the client Service, sending the token."""
    rendered = chart.render(
        {
            "metrics": {"token": {"existingSecret": "scrape", "key": "bearer"}},
            "serviceMonitor": {
                "enabled": True,
                "labels": {"release": "prometheus"},
                "interval": "30s",
            },
        }
    )
    monitor = rendered.one("ServiceMonitor", "kura")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "http",
        "path": "/metrics",
        "scheme": "http",
        "interval": "30s",
        "bearerTokenSecret": {"name": "scrape", "key": "bearer"},
    }
    assert rendered.secret_env["KURA_METRICS_TOKEN"] == endpoint["bearerTokenSecret"]
    # Exactly one Service matches, so each pod is scraped once.
    selector = monitor["spec"]["selector"]["matchLabels"]
    matching = [
        s["metadata"]["name"]
        for s in rendered.of_kind("Service")
        if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert matching == ["kura"]
    tokenless = chart.render({"serviceMonitor": {"enabled": True}}).one("ServiceMonitor")
    assert "bearerTokenSecret" not in tokenless["spec"]["endpoints"][0]


# -- ingest limits ----------------------------------------------------------------


def test_ingest_limits_reach_the_env(chart: ChartRenderer, default: Rendered) -> None:
    """Upload and multipart limits are always set; trusted proxies only when listed."""
    assert default.env["KURA_MAX_UPLOADS_PER_CLIENT"] == "64"
    assert default.env["KURA_MULTIPART_MAX_UNFINISHED"] == "10000"
    assert "KURA_TRUSTED_PROXIES" not in default.env
    rendered = chart.render(
        {
            "config": {
                "maxUploadsPerClient": 8,
                "multipartMaxUnfinished": 500,
                "trustedProxies": ["10.0.0.0/8", "192.168.1.10"],
            }
        }
    )
    assert rendered.env["KURA_MAX_UPLOADS_PER_CLIENT"] == "8"
    assert rendered.env["KURA_MULTIPART_MAX_UNFINISHED"] == "500"
    assert rendered.env["KURA_TRUSTED_PROXIES"] == "10.0.0.0/8,192.168.1.10"


# -- probes and shutdown ----------------------------------------------------------


def test_probes(default: Rendered) -> None:
    """Readiness /ready (5/10/5 s), liveness /up (20/20/5 s), startup /up every 10 s, 30 tries."""
    container = default.container
    assert container["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": "http"},
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    assert container["livenessProbe"] == {
        "httpGet": {"path": "/up", "port": "http"},
        "initialDelaySeconds": 20,
        "periodSeconds": 20,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    assert container["startupProbe"] == {
        "httpGet": {"path": "/up", "port": "http"},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 30,
    }


def test_prestop_signals_drain_to_tini_then_waits(chart: ChartRenderer) -> None:
    """preStop sends SIGUSR1 to PID 1 (tini, which forwards it) and sleeps preStopDelaySeconds."""
    command = chart.render().container["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["/bin/sh", "-c", "kill -USR1 1; sleep 20"]
    command = chart.render({"preStopDelaySeconds": 7}).container["lifecycle"]["preStop"]
    assert command["exec"]["command"][-1] == "kill -USR1 1; sleep 7"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, 275),
        ({"config": {"drainCompletionTimeoutMs": 240001}}, 276),
        ({"config": {"drainCompletionTimeoutMs": 30000}, "preStopDelaySeconds": 5}, 50),
        (
            {
                "config": {"drainCompletionTimeoutMs": 1},
                "preStopDelaySeconds": 0,
                "terminationGraceExtraSeconds": 0,
            },
            1,
        ),
        ({"terminationGraceExtraSeconds": 45}, 305),
    ],
)
def test_grace_period_is_drain_plus_prestop_plus_slack(
    chart: ChartRenderer, values: dict[str, Any], expected: int
) -> None:
    """terminationGracePeriodSeconds = ceil(drain ms / 1000) + preStop delay + extra slack."""
    spec = chart.render(values).pod["spec"]
    assert spec["terminationGracePeriodSeconds"] == expected


# -- volumes, security, disruption ------------------------------------------------


def test_one_read_write_once_pod_claim_per_pod(chart: ChartRenderer, default: Rendered) -> None:
    """The claim template is ReadWriteOncePod, 200Gi, with the storage class only when set."""
    claim = default.statefulset["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["accessModes"] == ["ReadWriteOncePod"]
    assert claim["resources"] == {"requests": {"storage": "200Gi"}}
    assert "storageClassName" not in claim

    def claim_of(values: dict[str, Any]) -> dict[str, Any]:
        claims = chart.render(values).statefulset["spec"]["volumeClaimTemplates"]
        spec: dict[str, Any] = claims[0]["spec"]
        return spec

    assert claim_of({"persistence": {"storageClass": "fast-ssd"}})["storageClassName"] == (
        "fast-ssd"
    )
    assert claim_of({"persistence": {"storageClass": "-"}})["storageClassName"] == ""
    assert claim_of({"persistence": {"size": "1Ti", "accessModes": ["ReadWriteOnce"]}}) == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Ti"}},
    }


def test_pod_runs_as_non_root_with_a_writable_volume(default: Rendered) -> None:
    """uid 10001, fsGroup 10001 for the PVC, read-only root with an emptyDir /tmp."""
    pod_security = default.pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 10001
    assert pod_security["fsGroup"] == 10001
    container_security = default.container["securityContext"]
    assert container_security["readOnlyRootFilesystem"] is True
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"] == {"drop": ["ALL"]}
    assert default.mount("tmp")["mountPath"] == "/tmp"
    assert "emptyDir" in default.volume("tmp")


def test_resources_default_to_one_gibibyte_request_and_limit(default: Rendered) -> None:
    """Memory request equals the limit (1Gi), so the pod is never overcommitted on memory."""
    resources = default.container["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "1Gi"


def test_pod_disruption_budget_lets_one_node_go_at_a_time(
    chart: ChartRenderer, default: Rendered
) -> None:
    """maxUnavailable: 1 (minAvailable: 1 would let two of three go); minAvailable on
    request; can be turned off."""
    spec = default.one("PodDisruptionBudget")["spec"]
    assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec
    kept = chart.render({"podDisruptionBudget": {"minAvailable": 2}})
    spec = kept.one("PodDisruptionBudget")["spec"]
    assert spec["minAvailable"] == 2 and "maxUnavailable" not in spec
    disabled = chart.render({"podDisruptionBudget": {"enabled": False}})
    assert disabled.of_kind("PodDisruptionBudget") == []


def test_service_links_are_off(default: Rendered) -> None:
    """Kubernetes would otherwise inject KURA_PORT=tcp://... for a Service named kura."""
    assert default.pod["spec"]["enableServiceLinks"] is False


def test_pods_spread_across_zones_and_hosts_by_default(
    chart: ChartRenderer, default: Rendered
) -> None:
    constraints = default.pod["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    selector = default.one("StatefulSet")["spec"]["selector"]["matchLabels"]
    for constraint in constraints:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"]["matchLabels"] == selector
    own = [{"maxSkew": 2, "topologyKey": "rack", "whenUnsatisfiable": "DoNotSchedule"}]
    mine = chart.render({"topologySpreadConstraints": own})
    assert mine.pod["spec"]["topologySpreadConstraints"] == own
    off = chart.render({"defaultTopologySpread": False})
    assert "topologySpreadConstraints" not in off.pod["spec"]


def test_an_image_digest_pins_the_image(chart: ChartRenderer, default: Rendered) -> None:
    assert default.container["image"] == "kura:0.1.0"
    digest = "sha256:" + "a" * 64
    pinned = chart.render({"image": {"repository": "r.example/kura", "digest": digest}})
    assert pinned.container["image"] == f"r.example/kura@{digest}"


def test_the_chart_states_the_kubernetes_versions_it_supports() -> None:
    lines = (CHART_DIR / "Chart.yaml").read_text(encoding="utf-8").splitlines()
    assert 'kubeVersion: ">=1.25.0-0"' in lines


def test_service_account_is_created_without_api_token(default: Rendered) -> None:
    """The pod uses the chart's ServiceAccount and mounts no API token."""
    account = default.one("ServiceAccount")
    assert default.pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert default.pod["spec"]["automountServiceAccountToken"] is False


def test_prometheus_scrape_annotations(chart: ChartRenderer, default: Rendered) -> None:
    """The pod template carries scrape, port and path annotations for the public port."""
    annotations = default.pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "4000"
    assert annotations["prometheus.io/path"] == "/metrics"
    moved = chart.render({"ports": {"http": 8080}}).pod["metadata"]["annotations"]
    assert moved["prometheus.io/port"] == "8080"


# -- optional features ------------------------------------------------------------


def test_extension_script_is_mounted_from_a_config_map(chart: ChartRenderer) -> None:
    """extension.enabled renders the script into a ConfigMap mounted at /etc/kura/extension.py."""
    rendered = chart.render({"extension": {"enabled": True, "script": EXTENSION}})
    config_map = rendered.one("ConfigMap", "kura-extension")
    assert config_map["data"] == {"extension.py": EXTENSION}
    assert rendered.env["KURA_EXTENSION_SCRIPT_PATH"] == "/etc/kura/extension.py"
    assert rendered.mount("extension") == {
        "name": "extension",
        "mountPath": "/etc/kura/extension.py",
        "subPath": "extension.py",
        "readOnly": True,
    }
    assert rendered.volume("extension")["configMap"]["name"] == "kura-extension"


def test_editing_the_extension_rolls_the_pods(chart: ChartRenderer) -> None:
    """A different script changes the pod template's checksum annotation."""

    def checksum(script: str) -> str:
        rendered = chart.render({"extension": {"enabled": True, "script": script}})
        value: str = rendered.pod["metadata"]["annotations"]["checksum/extension"]
        return value

    assert checksum(EXTENSION) != checksum(EXTENSION + "# v2\n")


def test_extension_can_use_an_existing_config_map(chart: ChartRenderer) -> None:
    """With existingConfigMap no ConfigMap is rendered and the pod mounts the named one."""
    rendered = chart.render({"extension": {"enabled": True, "existingConfigMap": "my-hooks"}})
    assert rendered.of_kind("ConfigMap") == []
    assert rendered.volume("extension")["configMap"]["name"] == "my-hooks"


def test_extension_without_a_script_is_refused(chart: ChartRenderer) -> None:
    """Enabling the extension without a script or ConfigMap fails the render with a message."""
    with pytest.raises(chart.helm.HelmError, match=r"extension\.script"):
        chart.render({"extension": {"enabled": True}})


def test_extension_is_off_by_default(default: Rendered) -> None:
    """Without extension.enabled there is no script path, mount or ConfigMap."""
    assert "KURA_EXTENSION_SCRIPT_PATH" not in default.env
    assert default.of_kind("ConfigMap") == []
    assert all(m["name"] != "extension" for m in default.container["volumeMounts"])


def test_peer_mtls_mounts_the_secret_and_switches_to_https(
    chart: ChartRenderer, tmp_path: Path
) -> None:
    """peerTls mounts the Secret, sets the INTERNAL_TLS paths and an https node URL kura accepts."""
    rendered = chart.render({"peerTls": {"enabled": True, "secretName": "kura-peer-tls"}})
    env = rendered.env
    assert env["KURA_NODE_URL"] == NODE_URL.replace("http://", "https://")
    assert env["KURA_INTERNAL_TLS_CA_CERT_PATH"] == "/etc/kura/peer-tls/ca.crt"
    assert env["KURA_INTERNAL_TLS_CERT_PATH"] == "/etc/kura/peer-tls/tls.crt"
    assert env["KURA_INTERNAL_TLS_KEY_PATH"] == "/etc/kura/peer-tls/tls.key"
    assert rendered.mount("peer-tls") == {
        "name": "peer-tls",
        "mountPath": "/etc/kura/peer-tls",
        "readOnly": True,
    }
    secret = rendered.volume("peer-tls")["secret"]
    assert secret == {"secretName": "kura-peer-tls", "defaultMode": 0o440}

    # kura checks the files exist and that the node URL's scheme matches mTLS.
    config = parse(node_environ(rendered, tmp_path))
    assert config.node_url == "https://kura-0.kura-headless.cache.svc.cluster.local:7443"
    assert config.replication.internal_tls is not None
    # DNS discovery over https offers only the headless name, so every pod is seeded.
    assert config.replication.peers == tuple(
        f"https://kura-{n}.kura-headless.cache.svc.cluster.local:7443" for n in range(3)
    )


def test_peer_mtls_seeding_can_be_turned_off(chart: ChartRenderer) -> None:
    """With peerTls.seedPods false only the configured peers reach KURA_PEERS."""
    rendered = chart.render(
        {
            "peerTls": {"enabled": True, "secretName": "kura-peer-tls", "seedPods": False},
            "config": {"replication": {"peers": ["https://seed:7443"]}},
        }
    )
    assert rendered.env["KURA_PEERS"] == "https://seed:7443"


def test_tls_without_a_secret_is_refused(chart: ChartRenderer) -> None:
    """Enabling peer or public TLS without a Secret name fails the render."""
    with pytest.raises(chart.helm.HelmError, match=r"peerTls\.secretName"):
        chart.render({"peerTls": {"enabled": True}})
    with pytest.raises(chart.helm.HelmError, match=r"publicTls\.secretName"):
        chart.render({"publicTls": {"enabled": True}})


def test_ingress_routes_to_the_public_port(chart: ChartRenderer, default: Rendered) -> None:
    """The optional Ingress sends its paths to the Service's http port."""
    assert default.of_kind("Ingress") == []
    rendered = chart.render(
        {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [{"host": "cache.example.org", "paths": [{"path": "/"}]}],
            }
        }
    )
    spec = rendered.one("Ingress")["spec"]
    assert spec["ingressClassName"] == "nginx"
    (rule,) = spec["rules"]
    assert rule["host"] == "cache.example.org"
    assert rule["http"]["paths"] == [
        {
            "path": "/",
            "pathType": "Prefix",
            "backend": {"service": {"name": "kura", "port": {"name": "http"}}},
        }
    ]


def test_dashboard_config_map_carries_the_dashboard(chart: ChartRenderer) -> None:
    """dashboards.enabled ships kura.json in a ConfigMap labelled for Grafana's sidecar."""
    rendered = chart.render({"dashboards": {"enabled": True, "namespace": "monitoring"}})
    config_map = rendered.one("ConfigMap", "kura-dashboards")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kura.json"]) == json.loads(DASHBOARD.read_text())


def test_release_name_drives_every_name(chart: ChartRenderer) -> None:
    """Another release and namespace get their own headless Service, node URL and discovery name."""
    rendered = chart.render(release="cache-eu", namespace="builds")
    assert rendered.statefulset["metadata"]["name"] == "cache-eu-kura"
    assert rendered.statefulset["spec"]["serviceName"] == "cache-eu-kura-headless"
    assert rendered.env["KURA_DISCOVERY_DNS_NAME"] == (
        "cache-eu-kura-headless.builds.svc.cluster.local"
    )
    assert rendered.env["KURA_NODE_URL"] == (
        "http://$(POD_NAME).cache-eu-kura-headless.builds.svc.cluster.local:7443"
    )


# -- Grafana dashboard ------------------------------------------------------------

#: Labels every scraped series carries (added by Prometheus, not by kura).
TARGET_LABELS = {"instance", "job"}
_METRIC = re.compile(r"\b(kura_[a-z0-9_]+)\b(\{[^}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported_series() -> dict[str, set[str]]:
    """Series name → label names, for every metric kura/telemetry/metrics.py registers.

    Counters export ``<name>_total`` (prometheus_client's single suffix),
    histograms ``_bucket`` (plus ``le``), ``_sum`` and ``_count``.
    """
    metrics = KuraMetrics(CollectorRegistry())
    series: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase | metering.Counter | metering.Histogram):
            continue
        # Both kinds keep the declared labels; describe() names the family.
        (family,) = metric.describe()
        name, labels, kind = family.name, set(metric._labelnames), family.type
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    for name in PENDING_METRICS:
        series.setdefault(name, set())
    return series


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def test_dashboard_is_a_grafana_dashboard() -> None:
    """kura.json has a uid, title, unique panel ids, positions and Prometheus targets."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "kura-node"
    assert dashboard["title"]
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "instance"]


def test_dashboard_queries_use_only_metrics_kura_exports() -> None:
    """Every metric in a dashboard query is a series kura exports (or a pending one)."""
    series = exported_series()
    used = {m.group(1) for q in dashboard_queries() for m in _METRIC.finditer(q)}
    assert used
    assert used - series.keys() == set()


def test_dashboard_queries_use_only_labels_the_metrics_carry() -> None:
    """Label matchers and by() clauses name labels the queried metrics actually have."""
    series = exported_series()
    for query in dashboard_queries():
        metrics = list(_METRIC.finditer(query))
        available = set(TARGET_LABELS)
        for match in metrics:
            labels = series[match.group(1)] | TARGET_LABELS
            available |= labels
            for label in _MATCHER.findall(match.group(2) or ""):
                assert label in labels, f"{match.group(1)} has no label {label!r}: {query}"
        for clause in _BY.findall(query):
            for label in (part.strip() for part in clause.split(",") if part.strip()):
                assert label in available, f"no queried metric has {label!r}: {query}"


def test_dashboard_covers_the_operational_signals() -> None:
    """Requests, latency, serving paths, egress, limiter, outbox, ready and drain are charted."""
    used = {m.group(1) for q in dashboard_queries() for m in _METRIC.finditer(q)}
    assert {
        "kura_http_requests_total",
        "kura_http_request_duration_seconds_bucket",
        "kura_public_request_latency_seconds_bucket",
        "kura_artifact_serving_paths_total",
        "kura_artifact_egress_bytes_total",
        "kura_replication_bandwidth_configured_limit_bytes_per_second",
        "kura_replication_bandwidth_effective_limit_bytes_per_second",
        "kura_outbox_messages",
        "kura_ready_state",
        "kura_drain_state",
        "kura_artifact_reads_total",
        "kura_cas_retention_age_seconds",
    } <= used


# -- alerts and offline schema validation ---------------------------------------------------


def test_alerts_are_off_by_default_and_read_only_series_kura_exports(
    chart: ChartRenderer, default: Rendered
) -> None:
    """The PrometheusRule renders only when enabled; every kura_* series its alerts read
    is one kura exports (kubelet_* come from the kubelet), with labels it carries."""
    assert default.of_kind("PrometheusRule") == []
    rendered = chart.render({"prometheusRule": {"enabled": True, "labels": {"team": "ci"}}})
    rule = rendered.one("PrometheusRule")
    assert rule["metadata"]["labels"]["team"] == "ci"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "KuraNodeNotReady",
        "KuraOutboxGrowing",
        "KuraReplicationLagging",
        "KuraServerErrors",
        "KuraMemoryPressure",
        "KuraDiskNearlyFull",
    }
    series = exported_series()
    for alert in alerts.values():
        for name, matchers in _METRIC.findall(alert["expr"]):
            assert name in series, (alert["alert"], name)
            labels = set(_MATCHER.findall(matchers)) - {"job"}
            assert labels <= series[name], (alert["alert"], labels)
    assert 'persistentvolumeclaim=~"cache-kura-[0-9]+"' in alerts["KuraDiskNearlyFull"]["expr"]


#: Custom resources whose schemas are not in kubernetes-validate's bundle (the
#: Prometheus Operator's CRDs are not shipped here): validated by the tests above.
CUSTOM_RESOURCES = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("kubernetes", ["1.25.0", "1.34.0"])
@pytest.mark.parametrize(
    "values",
    [
        {},
        merged(
            EVERYTHING,
            {
                "serviceMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True},
                "ingress": {"enabled": True},
                "networkPolicy": {"enabled": True},
                "dashboards": {"enabled": True},
            },
        ),
    ],
    ids=["defaults", "mesh-with-tls-and-everything"],
)
def test_rendered_objects_pass_the_kubernetes_schemas(
    chart: ChartRenderer, values: dict[str, Any], kubernetes: str
) -> None:
    """Every rendered object validates (strict: no unknown fields) against the
    Kubernetes OpenAPI schemas of the oldest supported and a recent release, offline."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    rendered = chart.render(values)
    checked = 0
    for resource in rendered.objects:
        if resource["kind"] in CUSTOM_RESOURCES:
            continue
        kubernetes_validate.validate(resource, kubernetes, strict=True)
        checked += 1
    assert checked >= 6


def test_oidc_values_reach_the_node(chart: ChartRenderer, tmp_path: Path) -> None:
    """auth.oidc.* set the KURA_AUTH_OIDC_* variables the node parses; off while the
    issuer is empty."""
    assert not any(n.startswith("KURA_AUTH_OIDC_") for n in chart.render().env_names)
    rendered = chart.render({"auth": {"oidc": OIDC}})
    env = rendered.env
    assert env["KURA_AUTH_OIDC_ISSUER"] == OIDC["issuer"]
    assert env["KURA_AUTH_OIDC_WRITE_CLAIMS"] == OIDC["writeClaims"]
    config = parse(node_environ(rendered, tmp_path))
    assert config.access.oidc is not None
    assert config.access.oidc.issuer == OIDC["issuer"]


def test_the_object_store_tier_is_off_unless_a_bucket_is_given(
    default: Rendered, chart: ChartRenderer
) -> None:
    """No objectStore.url, no KURA_OBJECT_STORE_* and no AWS credentials in the pod."""
    assert not any(name.startswith(("KURA_OBJECT_STORE_", "AWS_")) for name in default.env_names)
    rendered = chart.render({"objectStore": {"url": "s3://kura-cache/ci"}})
    assert rendered.env["KURA_OBJECT_STORE_URL"] == "s3://kura-cache/ci"
    assert rendered.env["KURA_OBJECT_STORE_READ_DEADLINE_MS"] == "5000"
    assert "KURA_OBJECT_STORE_ENDPOINT" not in rendered.env_names


def test_object_store_keys_come_from_a_secret_or_from_the_pod_identity(
    chart: ChartRenderer,
) -> None:
    """credentials.existingSecret wires the AWS keys; without it (IRSA) the service
    account carries the role annotation and the pod gets no static keys."""
    keyed = chart.render(
        {"objectStore": {"url": "s3://kura-cache", "credentials": {"existingSecret": "s3"}}}
    )
    assert keyed.secret_env["AWS_ACCESS_KEY_ID"] == {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}
    assert keyed.secret_env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kura"}
    irsa = chart.render(
        {"objectStore": {"url": "s3://kura-cache"}, "serviceAccount": {"annotations": role}}
    )
    assert not any(name.startswith("AWS_") for name in irsa.env_names)
    assert irsa.one("ServiceAccount")["metadata"]["annotations"] == role


def test_a_bad_object_store_url_is_refused_by_the_schema(chart: ChartRenderer) -> None:
    """The values schema refuses a URL that is not s3://BUCKET/PREFIX."""
    with pytest.raises(Exception, match="objectStore"):
        chart.render({"objectStore": {"url": "https://bucket.example"}})
