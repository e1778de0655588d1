"""Memory pressure: how close the process is to its memory limit, and what that sheds.

The node compares its resident memory with two watermarks and reports one of
three levels (``/status/rollout`` ``memory_pressure_state``, the
``kura_memory_pressure_state`` gauge):

* **normal** (0) below the soft watermark;
* **constrained** (1) at or above it: reported, nothing is refused;
* **critical** (2) at or above the hard watermark: writes are shed with 503
  and ``Retry-After`` (reads keep flowing, they need almost no memory), and
  the in-process caches are dropped once on entering the level.

The watermarks default to 70 % and 85 % of the memory the process may use:
its cgroup limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) when one
is set, else the host's RAM. Resident memory, not the cgroup's usage, is
compared: the cgroup also counts page cache, which the kernel reclaims
before it kills anyone, and which artifact downloads fill on purpose.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

if TYPE_CHECKING:  # the configuration imports this module; keep it light
    from twisted.internet.interfaces import IReactorTime

    from kura.telemetry.metrics import KuraMetrics

log = Logger(namespace="kura.memory")

MiB = 1024 * 1024
#: The hard watermark stays at least this far above the soft one.
MIN_WATERMARK_GAP = 64 * MiB
#: cgroup v1 reports "no limit" as a huge page-aligned number.
_UNLIMITED_FLOOR = 1 << 60
CHECK_INTERVAL_SECONDS = 1.0


class Pressure(enum.IntEnum):
    NORMAL = 0
    CONSTRAINED = 1
    CRITICAL = 2


def derive_watermarks(
    soft: int | None, hard: int | None, limit: Callable[[], int]
) -> tuple[int, int]:
    """The soft and hard watermarks: as configured, else derived from ``limit()``.

    Defaults are 70 % and 85 % of the memory the process may use, with the
    hard watermark at least :data:`MIN_WATERMARK_GAP` above the soft one.
    ``limit`` is only called when a watermark is not configured.
    """
    if soft is None or hard is None:
        total = limit()
        soft = total * 70 // 100 if soft is None else soft
        hard = max(total * 85 // 100, soft + MIN_WATERMARK_GAP) if hard is None else hard
    return soft, hard


def memory_limit(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The memory this process may use: its cgroup limit, else the host's RAM.

    Args:
        proc: where ``/proc`` is (tests point it at a fake tree).
        cgroup_root: where the cgroup filesystems are mounted.
    """
    host = _host_memory(proc)
    limits = [limit for limit in _cgroup_limits(proc, cgroup_root) if limit < _UNLIMITED_FLOOR]
    return min([host, *limits])


def _host_memory(proc: str) -> int:
    with open(os.path.join(proc, "meminfo")) as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in meminfo")


def _cgroup_limits(proc: str, cgroup_root: str) -> Iterable[int]:
    """Every memory limit that applies to this process's own cgroup (v1 and v2)."""
    try:
        with open(os.path.join(proc, "self", "cgroup")) as lines:
            memberships = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return
    for fields in memberships:
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        relative = path.lstrip("/")
        # Without a cgroup namespace a container sees the host's path for its
        # group but has its own group mounted at the root: try both.
        if controllers == "":
            candidates = [
                os.path.join(cgroup_root, relative, "memory.max"),
                os.path.join(cgroup_root, "unified", relative, "memory.max"),
                os.path.join(cgroup_root, "memory.max"),
            ]
        elif "memory" in controllers.split(","):
            candidates = [
                os.path.join(cgroup_root, "memory", relative, "memory.limit_in_bytes"),
                os.path.join(cgroup_root, "memory", "memory.limit_in_bytes"),
            ]
        else:
            continue
        for candidate in candidates:
            value = _read_limit(candidate)
            if value is not None:
                yield value
                break


def _read_limit(path: str) -> int | None:
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def resident_bytes(statm: str = "/proc/self/statm") -> int:
    """Resident memory of this process (one small read of ``/proc``)."""
    with open(statm, "rb") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryMonitor:
    """Samples resident memory every second and maintains the pressure level.

    Args:
        soft_bytes: the constrained watermark.
        hard_bytes: the critical watermark.
        clock: drives the sampling.
        metrics: the gauges and transition counters to keep.
        on_critical: called once each time the level becomes critical;
            each returns how many cache entries it dropped.
        measure: returns resident bytes (injected by tests).
    """

    def __init__(
        self,
        *,
        soft_bytes: int,
        hard_bytes: int,
        clock: IReactorTime,
        metrics: KuraMetrics,
        on_critical: Iterable[tuple[str, Callable[[], int]]] = (),
        measure: Callable[[], int] = resident_bytes,
    ) -> None:
        self.soft_bytes = soft_bytes
        self.hard_bytes = hard_bytes
        self.level = Pressure.NORMAL
        self._metrics = metrics
        self._on_critical = list(on_critical)
        self._measure = measure
        self._sampler = LoopingCall(self.check)
        self._sampler.clock = clock
        metrics.memory_soft_limit_bytes.set(soft_bytes)
        metrics.memory_hard_limit_bytes.set(hard_bytes)
        metrics.memory_pressure_state.set_function(lambda: float(self.level))

    def start(self) -> None:
        if not self._sampler.running:
            self._sampler.start(CHECK_INTERVAL_SECONDS, now=True)

    def stop(self) -> None:
        if self._sampler.running:
            self._sampler.stop()

    def check(self) -> Pressure:
        """Sample once and act on a change of level."""
        resident = self._measure()
        self._metrics.process_resident_memory_bytes.set(resident)
        if resident >= self.hard_bytes:
            level = Pressure.CRITICAL
        elif resident >= self.soft_bytes:
            level = Pressure.CONSTRAINED
        else:
            level = Pressure.NORMAL
        if level is not self.level:
            self._transition(level, resident)
        return level

    def _transition(self, level: Pressure, resident: int) -> None:
        previous, self.level = self.level, level
        self._metrics.memory_pressure_transitions.labels(
            previous.name.lower(), level.name.lower()
        ).inc()
        log.warn(
            "memory pressure {previous} -> {current}: resident {resident} bytes "
            "(soft {soft}, hard {hard})",
            previous=previous.name.lower(),
            current=level.name.lower(),
            resident=resident,
            soft=self.soft_bytes,
            hard=self.hard_bytes,
        )
        if level is Pressure.CRITICAL:
            for action, drop in self._on_critical:
                dropped = drop()
                self._metrics.memory_actions.labels(action).inc()
                log.info("memory pressure: {action} dropped {count}", action=action, count=dropped)
