"""Helpers shared by the authorization-extension tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from kura.auth import ExtensionAuthorizer, ExtensionConfig, HookContext, LoadedExtension
from kura.telemetry.metrics import KuraMetrics


def sample(metrics: KuraMetrics, name: str, **labels: str) -> float:
    """The current value of one sample (0 when absent)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def context(**fields: Any) -> HookContext:
    """A CAS read context for tenant ``acme`` with ``fields`` overridden."""
    base: dict[str, Any] = {
        "route": "/api/cache/cas/{id}",
        "method": "GET",
        "operation": "artifact.read",
        "server_tenant_id": "acme",
        "tenant_id": "acme",
        "namespace_id": "ios",
        "producer": "xcode",
        "artifact_key": "blob/abc",
        "headers": {"authorization": "Bearer token-1"},
    }
    base.update(fields)
    return HookContext(**base)


def authorizer(
    extension: object,
    clock: Clock,
    metrics: KuraMetrics,
    **environ: str,
) -> ExtensionAuthorizer:
    """An authorizer running ``extension`` with ``environ`` as its configuration."""
    config = ExtensionConfig.from_environ(environ)
    return ExtensionAuthorizer(LoadedExtension.of(extension), config, clock=clock, metrics=metrics)


def run(coroutine_function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Start a coroutine as a Deferred (fires at once unless it waits)."""
    return Deferred.fromCoroutine(coroutine_function(*args))
