"""Telemetry: every Prometheus metric (``metrics``) with its lock-free counters
(``metering``), public-traffic accounting (``traffic``) and log output (``logs``)."""
