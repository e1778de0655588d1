"""Every Prometheus metric kura exports, on an injected registry.

Names follow the Python client's conventions: counters are declared without
``_total`` and exported with one ``_total`` suffix. Upstream Kura's Rust
encoder doubles the suffix (``kura_http_requests_total_total``); see
``docs/operations.md`` for the mapping when reusing upstream dashboards.

Nothing here uses the global default registry: tests pass a fresh
:class:`~prometheus_client.CollectorRegistry` and read values back from it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: 1 ms doubling, 16 buckets (upstream's request-duration buckets).
DURATION_BUCKETS = tuple(0.001 * 2**i for i in range(16))
#: 1 KiB times 4, 12 buckets.
THROUGHPUT_BUCKETS = tuple(1024.0 * 4**i for i in range(12))


class KuraMetrics:
    """The node's metrics. One instance per node, shared by every subsystem."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry

        # HTTP -----------------------------------------------------------------
        self.http_requests = Counter(
            "kura_http_requests",
            "HTTP requests by route template and status.",
            ["route", "status"],
            registry=r,
        )
        self.http_request_duration = Histogram(
            "kura_http_request_duration_seconds",
            "Public non-probe request duration (to the last body byte).",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.http_exceptions = Counter(
            "kura_http_exceptions",
            "Unexpected server errors by route and exception type.",
            ["route", "kind"],
            registry=r,
        )
        self.public_request_latency = Histogram(
            "kura_public_request_latency_seconds",
            "Public time to first byte (response head written).",
            ["transport", "route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.http_inflight = Gauge(
            "kura_http_inflight_requests", "HTTP requests in flight (all planes).", registry=r
        )
        self.public_http_inflight = Gauge(
            "kura_public_http_inflight_requests",
            "Public requests in flight, including bodies still streaming.",
            registry=r,
        )
        self.public_latency_ewma_ms = Gauge(
            "kura_public_request_latency_ewma_ms",
            "EWMA (weight 1/8) of public time to first byte, in ms.",
            registry=r,
        )

        # Artifacts ----------------------------------------------------------
        labels = ["producer", "result"]
        self.artifact_reads = Counter(
            "kura_artifact_reads", "Artifact reads by producer and result.", labels, registry=r
        )
        self.artifact_writes = Counter(
            "kura_artifact_writes", "Artifact writes by producer and result.", labels, registry=r
        )
        self.artifact_read_bytes = Counter(
            "kura_artifact_read_bytes", "Artifact bytes read.", labels, registry=r
        )
        self.artifact_write_bytes = Counter(
            "kura_artifact_write_bytes", "Artifact bytes written.", labels, registry=r
        )
        self.egress_completions = Counter(
            "kura_artifact_egress_completions",
            "Artifact response bodies by how they ended.",
            labels,
            registry=r,
        )
        self.egress_bytes = Counter(
            "kura_artifact_egress_bytes", "Artifact body bytes sent.", labels, registry=r
        )
        self.egress_duration = Histogram(
            "kura_artifact_egress_duration_seconds",
            "Artifact response body duration.",
            ["producer"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.egress_throughput = Histogram(
            "kura_artifact_egress_throughput_bytes_per_second",
            "Per-response artifact egress throughput.",
            ["producer"],
            buckets=THROUGHPUT_BUCKETS,
            registry=r,
        )
        self.serving_paths = Counter(
            "kura_artifact_serving_paths",
            "Artifact GETs by serving path (splice, sendfile, fallback).",
            ["path"],
            registry=r,
        )
        self.accelerator_fallbacks = Counter(
            "kura_accelerator_fallbacks",
            "Connections or requests the accelerator handed to twisted.web, by reason.",
            ["reason"],
            registry=r,
        )
        self.accelerator_permits_in_use = Gauge(
            "kura_accelerator_permits_in_use",
            "Accelerated transfers holding a permit.",
            registry=r,
        )

        # Storage --------------------------------------------------------------
        self.cas_capacity_bytes = Gauge(
            "kura_cas_capacity_bytes", "Configured artifact byte budget.", registry=r
        )
        self.cas_used_bytes = Gauge(
            "kura_cas_used_bytes", "Bytes of file-backed artifacts stored.", registry=r
        )
        self.evicted_artifacts = Counter(
            "kura_evicted_artifacts", "Artifacts evicted for capacity.", ["producer"], registry=r
        )
        self.evicted_bytes = Counter(
            "kura_evicted_bytes", "Bytes evicted for capacity.", registry=r
        )
        self.damaged_artifacts = Counter(
            "kura_damaged_artifacts",
            "Artifacts forgotten because their body was missing or short.",
            registry=r,
        )
        self.tmp_dir_bytes = Gauge(
            "kura_tmp_dir_bytes", "Bytes reserved in the staging directory.", registry=r
        )
        self.tmp_dir_max_bytes = Gauge(
            "kura_tmp_dir_max_bytes", "Configured staging budget.", registry=r
        )
        self.multipart_uploads = Gauge(
            "kura_multipart_uploads",
            "Module multipart uploads started and not finished.",
            registry=r,
        )
        self.multipart_parts = Counter(
            "kura_multipart_parts", "Multipart parts by result.", ["result"], registry=r
        )
        self.outbox_messages = Gauge(
            "kura_outbox_messages", "Replication messages waiting in the outbox.", registry=r
        )

        # Node and lifecycle ----------------------------------------------------------
        self.node_info = Gauge(
            "kura_node_info",
            "Constant 1, labelled with the node's identity.",
            ["region", "tenant_id"],
            registry=r,
        )
        self.process_start_time = Gauge(
            "kura_process_start_time_seconds", "Unix time the node started.", registry=r
        )
        self.writer_lock_owned = Gauge(
            "kura_writer_lock_owned", "1 while this process holds the data dir lock.", registry=r
        )
        self.ready_state = Gauge("kura_ready_state", "1 when /ready answers 200.", registry=r)
        self.drain_state = Gauge("kura_drain_state", "1 while draining.", registry=r)
        self.traffic_state = Gauge(
            "kura_traffic_state", "0 joining, 1 serving, 2 draining.", registry=r
        )
