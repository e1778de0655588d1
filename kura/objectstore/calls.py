"""Store requests on the tier's thread pool, each counted and timed by operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from twisted.internet.interfaces import IReactorTime

from kura.objectstore.client import ObjectMissing, S3Store
from kura.storage.interfaces import IBlockingRunner
from kura.telemetry.metrics import KuraMetrics

P = ParamSpec("P")
T = TypeVar("T")


class StoreCalls:
    """Runs :class:`S3Store` methods on the tier's pool (never the reactor's
    nor the storage threads) and meters them.

    Every call lands in ``kura_object_store_requests_total{operation,result}``
    (``ok``, ``missing`` for :class:`ObjectMissing`, ``error`` otherwise) and
    ``kura_object_store_request_duration_seconds{operation}``.

    Args:
        client: the blocking client.
        runner: the tier's own thread pool.
        clock: the reactor's time (durations).
        metrics: the node's metrics.
    """

    def __init__(
        self, client: S3Store, runner: IBlockingRunner, clock: IReactorTime, metrics: KuraMetrics
    ) -> None:
        self.client = client
        self._runner = runner
        self._clock = clock
        self._metrics = metrics

    async def __call__(
        self, operation: str, f: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``f(*args, **kwargs)`` on the pool, as store operation ``operation``.

        Raises:
            ObjectMissing, StoreError, OSError: as ``f`` raised them
                (see :mod:`kura.objectstore.client`).
        """
        started = self._clock.seconds()
        result = "error"
        try:
            value = await self._runner.run(f, *args, **kwargs)
            result = "ok"
            return value
        except ObjectMissing:
            result = "missing"
            raise
        finally:
            self._metrics.object_store_requests.labels(operation, result).inc()
            self._metrics.object_store_request_duration.labels(operation).observe(
                self._clock.seconds() - started
            )
