"""Every Prometheus metric kura exports, on an injected registry.

Names follow the Python client's conventions: counters are declared without
``_total`` and exported with one ``_total`` suffix. Upstream Kura's Rust
encoder doubles the suffix (``kura_http_requests_total_total``); see
``docs/operations.md`` for the mapping when reusing upstream dashboards.

Nothing here uses the global default registry: tests pass a fresh
:class:`~prometheus_client.CollectorRegistry` and read values back from it.
Counters and histograms are :mod:`kura.telemetry.metering`'s lock-free versions
(updated on the reactor thread only); gauges are prometheus_client's.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from kura.telemetry.metering import Counter, Histogram

#: 1 ms doubling, 16 buckets (upstream's request-duration buckets).
DURATION_BUCKETS = tuple(0.001 * 2**i for i in range(16))
#: 1 KiB times 4, 12 buckets.
THROUGHPUT_BUCKETS = tuple(1024.0 * 4**i for i in range(12))


class Children:
    """Memoized labelled children of one metric.

    ``metric.labels(...)`` validates and looks up its arguments on every
    call; hot paths (the accelerator serves tens of thousands of small
    responses a second) keep the child instead.
    """

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


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
        self.http2_connections_closed = Counter(
            "kura_http2_connections_closed",
            "HTTP/2 connections kura closed to protect itself, by reason (rapid_reset).",
            ["reason"],
            registry=r,
        )
        self.http2_refused_streams = Counter(
            "kura_http2_refused_streams",
            "HTTP/2 streams refused (REFUSED_STREAM) over the concurrent stream limit.",
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
            "Artifact GETs by serving path (splice, sendfile, memory, fallback).",
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
        self.accelerator_cached_descriptors = Gauge(
            "kura_accelerator_cached_descriptors",
            "Small artifact files the accelerator keeps open between downloads.",
            registry=r,
        )

        # Storage --------------------------------------------------------------
        self.cas_retention_age = Gauge(
            "kura_cas_retention_age_seconds",
            "How long ago the least recently used stored artifact (the next to be evicted) "
            "was last used: what the cache currently retains (0 when empty).",
            registry=r,
        )
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
        self.database_space_returned_bytes = Counter(
            "kura_database_space_returned_bytes",
            "Bytes of free pages the metadata database gave back to the filesystem "
            "(space freed by deletes and evictions of bodies kept in the database).",
            registry=r,
        )
        self.damaged_artifacts = Counter(
            "kura_damaged_artifacts",
            "Artifacts forgotten because their body was missing, of another size than its "
            "manifest, or did not match its digest.",
            registry=r,
        )
        self.artifact_tombstones = Gauge(
            "kura_artifact_tombstones",
            "Tombstones of deleted artifacts kept (counted at each retention sweep).",
            registry=r,
        )
        self.artifact_tombstones_purged = Counter(
            "kura_artifact_tombstones_purged",
            "Tombstones of deleted artifacts forgotten after KURA_TOMBSTONE_RETENTION_MS.",
            registry=r,
        )
        self.corrupt_artifacts = Counter(
            "kura_corrupt_artifacts",
            "Artifacts forgotten because their body did not match its digest (found when "
            "it was read to be served or sent, or by the scrub); also in "
            "kura_damaged_artifacts_total.",
            registry=r,
        )
        self.verified_files = Gauge(
            "kura_verified_files",
            "Blob files whose bytes were checked against their digest in their current "
            "state (serving them hashes nothing until the file changes).",
            registry=r,
        )
        self.artifact_repairs = Counter(
            "kura_artifact_repairs",
            "Damaged artifacts (corrupt or of the wrong size) asked of peers again, by "
            "result (fetched; unavailable: no peer had the version; dropped: too many "
            "waiting).",
            ["result"],
            registry=r,
        )
        self.scrub_checked_artifacts = Counter(
            "kura_scrub_checked_artifacts",
            "Stored artifact bodies the scrub read and checked.",
            registry=r,
        )
        self.scrub_checked_bytes = Counter(
            "kura_scrub_checked_bytes", "Body bytes the scrub read and hashed.", registry=r
        )
        self.scrub_damaged_artifacts = Counter(
            "kura_scrub_damaged_artifacts",
            "Damaged artifacts the scrub found (and forgot), by reason (corrupt: bytes not "
            "matching the digest; missing; wrong_size).",
            ["reason"],
            registry=r,
        )
        self.scrub_filled_digests = Counter(
            "kura_scrub_filled_digests",
            "Digests the scrub computed for artifacts stored without one (written before "
            "metadata schema 2).",
            registry=r,
        )
        self.scrub_passes = Counter(
            "kura_scrub_passes", "Complete scrub passes over the store.", registry=r
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
        self.upload_rejections = Counter(
            "kura_upload_rejections",
            "Uploads refused by an upload limit, by reason (tmp_budget, client_uploads, "
            "multipart_unfinished).",
            ["reason"],
            registry=r,
        )
        self.outbox_messages = Gauge(
            "kura_outbox_messages", "Replication messages waiting in the outbox.", registry=r
        )

        # Memory pressure (kura.memory) ------------------------------------------------
        self.memory_pressure_state = Gauge(
            "kura_memory_pressure_state",
            "0 normal, 1 constrained, 2 critical (writes shed).",
            registry=r,
        )
        self.memory_soft_limit_bytes = Gauge(
            "kura_memory_soft_limit_bytes",
            "Resident memory that makes the node constrained.",
            registry=r,
        )
        self.memory_hard_limit_bytes = Gauge(
            "kura_memory_hard_limit_bytes",
            "Resident memory that makes the node critical.",
            registry=r,
        )
        self.memory_pressure_transitions = Counter(
            "kura_memory_pressure_transitions",
            "Changes of memory pressure level.",
            ["from", "to"],
            registry=r,
        )
        self.memory_actions = Counter(
            "kura_memory_actions",
            "Relief actions taken on entering critical memory pressure.",
            ["action"],
            registry=r,
        )
        self.process_resident_memory_bytes = Gauge(
            "kura_process_resident_memory_bytes",
            "Resident memory of the node process at the last sample.",
            registry=r,
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

        # Extension hooks ----------------------------------------------------------
        # (kura.auth) Results: ok, deny, error, timeout, invalid (wrong return type).
        self.extension_hook_calls = Counter(
            "kura_extension_hook_calls",
            "Extension hook calls by hook and result.",
            ["hook", "result"],
            registry=r,
        )
        self.extension_hook_duration = Histogram(
            "kura_extension_hook_duration_seconds",
            "Extension hook call duration, by hook.",
            ["hook"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.extension_cache_lookups = Counter(
            "kura_extension_cache_lookups",
            "Hook-result cache outcomes (hit, miss, coalesced, rejected) by cache.",
            ["cache", "result"],
            registry=r,
        )
        self.extension_http_client_requests = Counter(
            "kura_extension_http_client_requests",
            "Extension host HTTP client attempts by client id and result "
            "(status class, or timeout/connect/network).",
            ["client", "result"],
            registry=r,
        )
        self.jwks_fetches = Counter(
            "kura_jwks_fetches",
            "JWKS key set fetches by verifier (oidc, extension:<ID>) and result (ok, error).",
            ["verifier", "result"],
            registry=r,
        )

        # Replication --- (outbox, receiver, catch-up, membership, limiter)
        self.replication_requests = Counter(
            "kura_replication_requests",
            "Outbox deliveries by target host, operation and result "
            "(ok, error, dropped_stale_target, dropped_unsupported).",
            ["target", "operation", "result"],
            registry=r,
        )
        self.replication_request_duration = Histogram(
            "kura_replication_request_duration_seconds",
            "Outbox delivery duration by operation.",
            ["operation"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.replication_apply_results = Counter(
            "kura_replication_apply_results",
            "Replicated items applied or ignored, by source (replication, bootstrap), "
            "item type (artifact, namespace_delete, artifact_delete) and outcome.",
            ["source", "item_type", "outcome"],
            registry=r,
        )
        self.replication_rejected = Counter(
            "kura_replication_rejected",
            "Replicated items refused before applying, by reason (clock_skew: a version "
            "further ahead than KURA_MAX_CLOCK_SKEW_MS; digest_mismatch: a body that does "
            "not match the digest its sender declared, signed or not).",
            ["reason"],
            registry=r,
        )
        self.peer_auth = Counter(
            "kura_peer_auth",
            "Peer authentication checks by side (server: requests received; client: "
            "responses received) and result (ok, unsigned_accepted, unsigned, invalid, "
            "expired, replayed, unknown_key).",
            ["side", "result"],
            registry=r,
        )
        self.replication_body_bytes = Counter(
            "kura_replication_body_bytes",
            "Peer artifact body bytes by direction (sent, received, served, fetched).",
            ["direction"],
            registry=r,
        )
        self.replication_bandwidth_configured = Gauge(
            "kura_replication_bandwidth_configured_limit_bytes_per_second",
            "Configured replication bandwidth ceiling (0: unlimited).",
            registry=r,
        )
        self.replication_bandwidth_effective = Gauge(
            "kura_replication_bandwidth_effective_limit_bytes_per_second",
            "Replication bandwidth after dividing by public load (0: unlimited).",
            registry=r,
        )
        self.replication_bandwidth_floor = Gauge(
            "kura_replication_bandwidth_floor_bytes_per_second",
            "Rate replication keeps however busy the node is (0: limiter disabled).",
            registry=r,
        )
        self.replication_bandwidth_share = Gauge(
            "kura_replication_bandwidth_cpu_share",
            "Share of the replication ceiling the CPU leaves (1: all; halves while public "
            "requests arrive on a busy CPU).",
            registry=r,
        )
        self.reactor_utilisation = Gauge(
            "kura_reactor_utilisation",
            "Share of the last 0.1 s the reactor was busy (not waiting in its poll), 0-1 "
            "(1: it could not take more work).",
            registry=r,
        )
        self.replication_latency_target_ms = Gauge(
            "kura_replication_bandwidth_public_latency_target_ms",
            "Public time-to-first-byte target the limiter backs off against.",
            registry=r,
        )
        self.bootstrap_runs = Counter(
            "kura_bootstrap_runs", "Catch-up runs from one peer by result.", ["result"], registry=r
        )
        self.bootstrap_duration = Histogram(
            "kura_bootstrap_duration_seconds",
            "Duration of successful catch-up runs.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.bootstrap_applied_items = Counter(
            "kura_bootstrap_applied_items",
            "Items catch-up applied, by type (artifact, namespace_delete, artifact_delete).",
            ["item_type"],
            registry=r,
        )
        self.bootstrap_known_peers = Gauge(
            "kura_bootstrap_known_peers", "Peers in the current membership view.", registry=r
        )
        self.bootstrap_completed_peers = Gauge(
            "kura_bootstrap_completed_peers", "Known peers this node caught up with.", registry=r
        )
        self.bootstrap_inflight_peers = Gauge(
            "kura_bootstrap_inflight_peers", "Peers a catch-up is running against.", registry=r
        )
        self.bootstrap_peer_items = Gauge(
            "kura_bootstrap_peer_items",
            "Manifests of one peer's catch-up pass walked (state=done) and still to walk "
            "(state=remaining: an estimate from the peer's announced totals; absent when the "
            "peer cannot say).",
            ["peer", "state"],
            registry=r,
        )
        self.bootstrap_peer_bytes = Gauge(
            "kura_bootstrap_peer_bytes",
            "Bytes of the manifests of one peer's catch-up pass walked and still to walk.",
            ["peer", "state"],
            registry=r,
        )
        self.bootstrap_walked_items = Counter(
            "kura_bootstrap_walked_items",
            "Manifests catch-up walked (resolved here), by page order (recent, id).",
            ["order"],
            registry=r,
        )
        self.bootstrap_completions_discarded = Counter(
            "kura_bootstrap_completions_discarded",
            "Catch-ups that finished after their peer left or rejoined (not counted).",
            registry=r,
        )
        self.discovered_peer_nodes = Gauge(
            "kura_discovered_peer_nodes",
            "Candidate peer URLs from KURA_PEERS and DNS discovery.",
            registry=r,
        )
        self.initial_discovery_completed = Gauge(
            "kura_initial_discovery_completed", "1 once the first discovery round ran.", registry=r
        )
        self.membership_generation = Gauge(
            "kura_membership_generation", "Bumped on every peer-view change.", registry=r
        )
        self.membership_peer_changes = Counter(
            "kura_membership_peer_changes",
            "Peers joining or leaving the view.",
            ["change"],
            registry=r,
        )

        # gRPC (REAPI v2; kura.reapi) -------------------------------------------
        self.grpc_requests = Counter(
            "kura_grpc_requests",
            "gRPC calls by full RPC method and gRPC status code name.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_request_duration = Histogram(
            "kura_grpc_request_duration_seconds",
            "gRPC call duration (to the status), by full RPC method.",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.grpc_blob_bytes = Counter(
            "kura_grpc_blob_bytes",
            "Blob bytes served (read) and stored (write) over gRPC, uncompressed.",
            ["direction"],
            registry=r,
        )
        self.grpc_inflight_requests = Gauge(
            "kura_grpc_inflight_requests", "gRPC calls in progress.", registry=r
        )

        # Object store (kura.objectstore) ---------------------------------------
        self.object_store_requests = Counter(
            "kura_object_store_requests",
            "Object-store requests by operation (put, get, head, delete, list) and result "
            "(ok, missing, error).",
            ["operation", "result"],
            registry=r,
        )
        self.object_store_request_duration = Histogram(
            "kura_object_store_request_duration_seconds",
            "Object-store request duration (queueing for a client thread included), by operation.",
            ["operation"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.object_store_uploads = Gauge(
            "kura_object_store_uploads",
            "Writes and deletes waiting in the durable queue to be put in the object store.",
            registry=r,
        )
        self.object_store_read_through = Counter(
            "kura_object_store_read_through",
            "Local misses asked of the object store, by result (hit, miss, corrupt, "
            "deadline, error, stale, future).",
            ["result"],
            registry=r,
        )
        self.object_store_tombstones_applied = Counter(
            "kura_object_store_tombstones_applied",
            "Tombstones learned from the object store that changed this node.",
            registry=r,
        )
