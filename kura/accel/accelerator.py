"""What every accelerated connection on ``KURA_PORT`` shares.

An :class:`Accelerator` is built from three things, so a test can swap any
of them: :class:`AcceleratorSettings` (what the operator set),
:class:`Collaborators` (what it uses of the node) and an
:class:`~.interfaces.ITransferEngine` (what moves the bytes). It owns the
per-listener state the connections (:mod:`.protocol`) share: the transfer
permits, the handle cache, the live connections and the sweeper that
enforces their deadlines, the metric children and the ``Date`` cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kura.api.authorization import RequestAuthorization
from kura.config import AcceleratorConfig, KuraConfig
from kura.lifecycle import NodeState
from kura.storage.store import ArtifactStore
from kura.telemetry.metrics import KuraMetrics
from kura.telemetry.traffic import PublicTraffic
from kura.web.site import KuraSite

from .classify import Classifier
from .handles import HandleCache
from .interfaces import ITransferEngine
from .meters import AcceleratorMeters
from .sweep import Sweeper, sweep_interval

if TYPE_CHECKING:
    from .protocol import SamePortProtocol

log = Logger(namespace="kura.accel")

ACCELERATOR_READY = (
    "accelerated file serving {state}: mode={mode} max_concurrent={max_concurrent} "
    "chunk_bytes={chunk_bytes}"
)


@attrs.frozen
class AcceleratorSettings:
    """What the operator set for the accelerator.

    Attributes:
        config: the ``KURA_ACCELERATED_FILE_SERVING_*`` section.
        header_timeout: seconds a request head may take, from its first byte.
        idle_timeout: seconds a connection may wait between requests.
        send_timeout: seconds a transfer may go without progress.

    The three deadlines are the node's, the same as twisted.web's.
    """

    config: AcceleratorConfig
    header_timeout: float
    idle_timeout: float
    send_timeout: float

    @classmethod
    def from_config(cls, config: KuraConfig) -> AcceleratorSettings:
        return cls(
            config=config.accelerator,
            header_timeout=config.header_timeout_ms / 1000,
            idle_timeout=config.keepalive_idle_timeout_ms / 1000,
            send_timeout=config.send_timeout_ms / 1000,
        )


@attrs.frozen
class Collaborators:
    """What the accelerator uses of the node.

    Attributes:
        site: the twisted.web site it hands connections to (and whose
            request ids, egress accounting and access log it shares).
        authorization: checks a request once its artifact is servable.
        classifier: turns parsed heads into candidates.
        store: manifests, bodies and the access order.
        state: whether the node is draining.
        traffic: public in-flight slots and time to first byte.
        metrics: the node's metrics.
        reactor: the clock (and the reactor of HTTP/2 hand-offs).
    """

    site: KuraSite
    authorization: RequestAuthorization
    classifier: Classifier
    store: ArtifactStore
    state: NodeState
    traffic: PublicTraffic
    metrics: KuraMetrics
    reactor: IReactorTime


class Permits:
    """At most ``limit`` accelerated requests at once (reactor thread only).

    A request holds a permit from its look-up until its response is over;
    with none free, a request falls back to twisted.web instead of waiting.
    """

    __slots__ = ("in_use", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    @property
    def available(self) -> int:
        return self.limit - self.in_use

    def take(self) -> None:
        assert self.in_use < self.limit, "no permit is free"
        self.in_use += 1

    def give_back(self) -> None:
        assert self.in_use > 0, "no permit is taken"
        self.in_use -= 1


class Accelerator:
    """The shared state of one same-port listener (see the module docstring).

    Attributes:
        permits: transfer permits (``max_concurrent``).
        handles: open descriptors of small artifacts.
        connections: live connections the accelerator still owns (not
            handed to twisted.web).
        sweeper: enforces their deadlines.
        meters: the metrics they update.
    """

    def __init__(
        self,
        settings: AcceleratorSettings,
        collaborators: Collaborators,
        engine: ITransferEngine,
    ) -> None:
        if not ITransferEngine.providedBy(engine):
            raise TypeError(f"{engine!r} does not provide ITransferEngine")
        self.settings = settings
        # The settings the request loop reads, one attribute away.
        self.enabled = settings.config.enabled
        self.header_timeout = settings.header_timeout
        self.idle_timeout = settings.idle_timeout
        self.collaborators = collaborators
        self.engine = engine
        # The collaborators, one attribute away on the hot path.
        self.site = collaborators.site
        self.authorization = collaborators.authorization
        self.classifier = collaborators.classifier
        self.store = collaborators.store
        self.state = collaborators.state
        self.traffic = collaborators.traffic
        self.reactor = collaborators.reactor
        self.request_ids = collaborators.site.request_ids
        self.egress = collaborators.site.egress
        self.permits = Permits(settings.config.max_concurrent)
        self.handles = HandleCache(collaborators.store)
        self.connections: set[SamePortProtocol] = set()
        self.sweeper = Sweeper(
            collaborators.reactor,
            sweep_interval(settings.header_timeout, settings.idle_timeout),
            self.connections,
            self.handles,
        )
        self.meters = AcceleratorMeters(
            collaborators.metrics,
            mode=engine.mode,
            permits=self.permits,
            handles=self.handles,
            egress=self.egress,
            traffic=self.traffic,
        )
        self.dates = collaborators.site.dates

    def log_settings(self) -> None:
        config = self.settings.config
        log.info(
            ACCELERATOR_READY,
            state="enabled" if config.enabled else "disabled",
            mode=config.mode,
            max_concurrent=config.max_concurrent,
            chunk_bytes=config.chunk_bytes,
        )

    def start(self) -> None:
        """Start enforcing deadlines (the listener started)."""
        self.sweeper.start()

    def stop(self) -> None:
        """Stop enforcing deadlines and let go of cached descriptors and pipes."""
        self.sweeper.stop()
        self.handles.clear()
        self.engine.close()

    def close_idle(self) -> None:
        """Close every accelerator-owned connection that is between requests (drain)."""
        for connection in list(self.connections):
            connection.close_if_idle()

    def cut_off(self) -> None:
        """Abort every accelerator-owned connection, transfers included."""
        for connection in list(self.connections):
            connection.abort()
