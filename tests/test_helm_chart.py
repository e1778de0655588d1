"""The Helm chart (helm/kura) and its Grafana dashboard, rendered by Helm's own engine.

Each test renders the chart with ``helm-python-sdk`` (Helm's Go SDK; see
``tests/helm/engine.py``), parses the manifests and checks what a cluster
would run: ports, env wiring, probes, drain timing, volumes and the optional
features. The env the chart renders is also fed to ``KuraConfig.from_environ``
so the chart and the node cannot drift apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from kura import config as kura_config
from kura import metering
from kura.config import KuraConfig
from kura.metrics import KuraMetrics
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
EVERYTHING: dict[str, Any] = {
    "config": {
        "casCapacityBytes": 100 * GiB,
        "memorySoftLimitBytes": 700 * MiB,
        "memoryHardLimitBytes": 850 * MiB,
        "replication": {"peers": ["https://seed:7443"]},
    },
    "extension": {"enabled": True, "script": EXTENSION},
    "peerTls": {"enabled": True, "secretName": "kura-peer-tls"},
    "publicTls": {"enabled": True, "secretName": "kura-public-tls"},
}
#: Declared by kura/config.py but deliberately not set by the chart.
NOT_EXPOSED = {
    "KURA_FAILPOINTS": "crash-injection for tests only",
    # Upload limits (docs/operations.md, "Upload limits").
    "KURA_MAX_UPLOADS_PER_CLIENT": "wired by the chart in a parallel change",
    "KURA_TRUSTED_PROXIES": "wired by the chart in a parallel change",
    "KURA_MULTIPART_MAX_UNFINISHED": "wired by the chart in a parallel change",
}
#: Set by the chart ahead of its declaration in kura/config.py.
PENDING_DECLARATION = {"KURA_EXTENSION_SCRIPT_PATH"}
#: Replication limiter gauges another change adds to kura/metrics.py.
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


def node_environ(rendered: Rendered, pod_name: str = "kura-0") -> dict[str, str]:
    """The container env as the kubelet would hand it to kura in pod ``pod_name``."""
    return {
        name: value.replace("$(POD_NAME)", pod_name)
        for name, value in rendered.env.items()
        if name.startswith("KURA_")
    }


def parse(environ: dict[str, str]) -> KuraConfig:
    return KuraConfig.from_environ(environ, measure_filesystem=lambda path: 200 * GiB)


# -- objects ----------------------------------------------------------------------


def test_default_render_has_the_expected_objects(default: Rendered) -> None:
    """By default: a StatefulSet, two Services, a PDB and a ServiceAccount, nothing else."""
    kinds = sorted(o["kind"] for o in default.objects)
    assert kinds == ["PodDisruptionBudget", "Service", "Service", "ServiceAccount", "StatefulSet"]


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
    """Both Services and the PDB select exactly the StatefulSet's pod labels."""
    pod_labels = default.pod["metadata"]["labels"]
    selectors = [s["spec"]["selector"] for s in default.of_kind("Service")]
    selectors.append(default.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    selectors.append(default.statefulset["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert selector
        assert selector.items() <= pod_labels.items()


# -- ports ------------------------------------------------------------------------


def ports(entries: list[dict[str, Any]], key: str) -> dict[str, int]:
    return {p["name"]: p[key] for p in entries}


def test_default_ports_are_public_http_and_internal_only(default: Rendered) -> None:
    """Container and Service expose only 4000 and 7443 (the accelerator shares the public port)."""
    assert ports(default.container["ports"], "containerPort") == {"http": 4000, "internal": 7443}
    service = default.one("Service", "kura")["spec"]
    assert ports(service["ports"], "port") == {"http": 4000, "internal": 7443}
    assert {p["targetPort"] for p in service["ports"]} == {"http", "internal"}
    assert default.env["KURA_PORT"] == "4000"
    assert default.env["KURA_INTERNAL_PORT"] == "7443"
    assert "KURA_HTTPS_PORT" not in default.env


def test_public_tls_adds_the_https_port_and_certificate(chart: ChartRenderer) -> None:
    """publicTls mounts the Secret, sets the TLS env and adds 4443 to container and Service."""
    rendered = chart.render({"publicTls": {"enabled": True, "secretName": "kura-public-tls"}})
    assert ports(rendered.container["ports"], "containerPort") == {
        "http": 4000,
        "internal": 7443,
        "https": 4443,
    }
    service = rendered.one("Service", "kura")["spec"]
    assert ports(service["ports"], "port") == {"http": 4000, "internal": 7443, "https": 4443}
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


def test_accelerator_variables_are_always_set(chart: ChartRenderer, default: Rendered) -> None:
    """All four accelerator variables render, with defaults and with every value overridden."""
    assert {name: default.env[name] for name in ACCEL_VARS} == dict(
        zip(ACCEL_VARS, ("true", "splice", "32", "1048576"), strict=True)
    )
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
    config = parse(node_environ(rendered))
    assert config.accelerator == kura_config.AcceleratorConfig(
        enabled=False, mode="sendfile", max_concurrent=8, chunk_bytes=65536
    )


def test_schema_rejects_an_unknown_accelerator_mode(chart: ChartRenderer) -> None:
    """values.schema.json refuses a mode the node would refuse at start-up."""
    with pytest.raises(chart.helm.HelmValuesError, match="acceleratedFileServing/mode"):
        chart.render({"config": {"acceleratedFileServing": {"mode": "uring"}}})


def test_replication_and_storage_values_reach_the_env(chart: ChartRenderer) -> None:
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
    config = parse(node_environ(rendered))
    assert config.replication.bandwidth_limit_bytes_per_second == 0
    assert config.replication.public_latency_target_ms == 250
    assert config.cas_capacity_bytes == 150 * GiB


def test_default_replication_values_match_upstream(default: Rendered) -> None:
    """The limiter defaults to 512 MiB/s and 100 ms; capacity is left to the node."""
    assert default.env["KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND"] == "536870912"
    assert default.env["KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS"] == "100"
    assert default.env["KURA_DRAIN_COMPLETION_TIMEOUT_MS"] == "240000"
    assert default.env["KURA_TMP_DIR_MAX_BYTES"] == str(8 * GiB)
    assert "KURA_CAS_CAPACITY_BYTES" not in default.env
    assert "KURA_PEERS" not in default.env


def test_chart_defaults_equal_the_node_defaults(default: Rendered) -> None:
    """Parsed by kura, the default env equals the node's defaults bar what the chart places."""
    environ = node_environ(default)
    placed = (
        "KURA_NODE_URL",
        "KURA_DATA_DIR",
        "KURA_TMP_DIR",
        "KURA_DISCOVERY_DNS_NAME",
    )
    assert parse(environ) == parse({name: environ[name] for name in placed})
    assert parse(environ).node_url == "http://kura-0.kura-headless.cache.svc.cluster.local:7443"


def test_every_variable_the_chart_sets_is_one_kura_reads(chart: ChartRenderer) -> None:
    """No KURA_* name in the chart is misspelt: each is declared in kura/config.py."""
    declared = {v.name for v in kura_config.VARIABLES}
    rendered = set(chart.render(EVERYTHING).env) | set(chart.render().env)
    unknown = {n for n in rendered if n.startswith("KURA_")} - declared - PENDING_DECLARATION
    assert unknown == set()


def test_every_variable_kura_reads_is_mapped_by_the_chart(chart: ChartRenderer) -> None:
    """Each kura/config.py variable is set by the chart, unless listed or extension tuning."""
    rendered = set(chart.render(EVERYTHING).env)
    missing = sorted(
        v.name
        for v in kura_config.VARIABLES
        if v.name not in rendered
        and v.name not in NOT_EXPOSED
        # The chart owns the extension's script mount; its tuning knobs go in extraEnv.
        and not v.name.startswith("KURA_EXTENSION_")
    )
    assert missing == [], (
        "declared in kura/config.py but not mapped by helm/kura: add a value in values.yaml "
        "and an env entry in templates/statefulset.yaml (or list it in NOT_EXPOSED)"
    )


def test_extra_env_is_appended(chart: ChartRenderer) -> None:
    """extraEnv entries come after the chart's own variables."""
    rendered = chart.render({"extraEnv": [{"name": "KURA_EXTENSION_TIMEOUT_MS", "value": "50"}]})
    assert rendered.container["env"][-1] == {"name": "KURA_EXTENSION_TIMEOUT_MS", "value": "50"}


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


def test_pod_disruption_budget_keeps_one_node(chart: ChartRenderer, default: Rendered) -> None:
    """The PDB keeps at least one node up and can be turned off."""
    assert default.one("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    disabled = chart.render({"podDisruptionBudget": {"enabled": False}})
    assert disabled.of_kind("PodDisruptionBudget") == []


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
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (tmp_path / name).write_text("PEM")
    environ = {
        name: value.replace("/etc/kura/peer-tls", str(tmp_path))
        for name, value in node_environ(rendered).items()
    }
    config = parse(environ)
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
    """Series name → label names, for every metric kura/metrics.py registers.

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
    """Every metric in a dashboard query is a series kura/metrics.py exports (or a pending one)."""
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
    } <= used
