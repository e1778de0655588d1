"""Memory limits, watermarks and the pressure monitor (kura.memory)."""

from __future__ import annotations

import pathlib

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kura.config import ConfigError, KuraConfig
from kura.memory import (
    MIN_WATERMARK_GAP,
    MemoryMonitor,
    Pressure,
    derive_watermarks,
    memory_limit,
    resident_bytes,
)
from kura.telemetry.metrics import KuraMetrics

GiB = 1 << 30
MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"


def fake_system(
    root: pathlib.Path, cgroup: str, files: dict[str, str], host_kib: int = 16 * 1024 * 1024
) -> tuple[str, str]:
    """A ``/proc`` and cgroup tree under ``root``; returns their paths."""
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {host_kib} kB\nMemFree: 1 kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    for relative, content in files.items():
        path = root / "cgroup" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")
    return str(proc), str(root / "cgroup")


@pytest.mark.parametrize(
    ("cgroup", "files", "expected"),
    [
        pytest.param(
            "0::/kubepods/pod1\n",
            {"kubepods/pod1/memory.max": str(GiB)},
            GiB,
            id="v2 limit",
        ),
        pytest.param(
            "0::/kubepods/pod1\n",
            {"kubepods/pod1/memory.max": "max"},
            16 * GiB,
            id="v2 unlimited: host RAM",
        ),
        pytest.param(
            "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n0::/\n",
            {"memory/docker/abc/memory.limit_in_bytes": str(512 * MiB)},
            512 * MiB,
            id="v1 limit",
        ),
        pytest.param(
            "12:memory:/\n",
            {"memory/memory.limit_in_bytes": V1_UNLIMITED},
            16 * GiB,
            id="v1 unlimited: host RAM",
        ),
        pytest.param(
            "12:memory:/big\n",
            {"memory/big/memory.limit_in_bytes": str(64 * GiB)},
            16 * GiB,
            id="a limit above the host's RAM: host RAM",
        ),
        pytest.param(
            "12:memory:/docker/abc\n",
            {"memory/memory.limit_in_bytes": str(768 * MiB)},
            768 * MiB,
            id="v1 in a container without a cgroup namespace",
        ),
        pytest.param(
            "0::/system.slice/docker-abc.scope\n",
            {"memory.max": str(768 * MiB)},
            768 * MiB,
            id="v2 in a container without a cgroup namespace",
        ),
        pytest.param("", {}, 16 * GiB, id="no cgroup at all"),
    ],
)
def test_memory_limit(
    tmp_path: pathlib.Path, cgroup: str, files: dict[str, str], expected: int
) -> None:
    proc, cgroup_root = fake_system(tmp_path, cgroup, files)
    assert memory_limit(proc, cgroup_root) == expected


def test_memory_limit_of_this_machine_is_positive() -> None:
    assert memory_limit() > 0
    assert 0 < resident_bytes() < memory_limit()


def test_default_watermarks_are_70_and_85_percent() -> None:
    assert derive_watermarks(None, None, lambda: 10 * GiB) == (7 * GiB, int(8.5 * GiB))


def test_hard_watermark_keeps_its_gap_on_small_limits() -> None:
    soft, hard = derive_watermarks(None, None, lambda: 256 * MiB)
    assert hard - soft == MIN_WATERMARK_GAP


def test_configured_watermarks_win_and_skip_measuring() -> None:
    def unreachable() -> int:
        raise AssertionError("measured although both watermarks are set")

    assert derive_watermarks(100 * MiB, 200 * MiB, unreachable) == (100 * MiB, 200 * MiB)


def test_config_derives_watermarks_from_the_memory_limit() -> None:
    config = KuraConfig.from_environ({}, measure_memory=lambda: GiB)
    assert config.memory_soft_limit_bytes == GiB * 70 // 100
    assert config.memory_hard_limit_bytes == GiB * 85 // 100


def test_config_refuses_a_hard_watermark_at_or_below_the_soft_one() -> None:
    with pytest.raises(ConfigError, match="KURA_MEMORY_HARD_LIMIT_BYTES"):
        KuraConfig.from_environ(
            {"KURA_MEMORY_SOFT_LIMIT_BYTES": "200", "KURA_MEMORY_HARD_LIMIT_BYTES": "200"}
        )


class Monitored:
    """A monitor on a Clock whose resident memory the test sets."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.resident = 0
        self.drops: list[str] = []
        self.registry = CollectorRegistry()
        self.monitor = MemoryMonitor(
            soft_bytes=100,
            hard_bytes=200,
            clock=self.clock,
            metrics=KuraMetrics(self.registry),
            on_critical=[("cache_drop", self.drop)],
            measure=lambda: self.resident,
        )

    def drop(self) -> int:
        self.drops.append("cache")
        return 3

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def test_levels_follow_resident_memory_each_second() -> None:
    m = Monitored()
    m.monitor.start()
    assert m.monitor.level is Pressure.NORMAL
    m.resident = 150
    m.clock.advance(0.5)
    assert m.monitor.level is Pressure.NORMAL  # not sampled yet
    m.clock.advance(0.5)
    assert m.monitor.level is Pressure.CONSTRAINED
    m.resident = 200
    m.clock.advance(1)
    assert m.monitor.level is Pressure.CRITICAL
    assert m.sample("kura_memory_pressure_state") == 2
    assert m.sample("kura_process_resident_memory_bytes") == 200
    m.resident = 10
    m.clock.advance(1)
    assert m.monitor.level is Pressure.NORMAL
    assert (
        m.sample("kura_memory_pressure_transitions_total", **{"from": "critical", "to": "normal"})
        == 1
    )
    m.monitor.stop()
    assert not m.clock.getDelayedCalls()


def test_relief_actions_run_once_per_entry_into_critical() -> None:
    m = Monitored()
    m.resident = 500
    for _ in range(3):
        m.monitor.check()
    assert m.drops == ["cache"]
    assert m.sample("kura_memory_actions_total", action="cache_drop") == 1
    m.resident = 150
    m.monitor.check()
    m.resident = 500
    m.monitor.check()
    assert m.drops == ["cache", "cache"]
    assert m.sample("kura_memory_soft_limit_bytes") == 100
    assert m.sample("kura_memory_hard_limit_bytes") == 200
