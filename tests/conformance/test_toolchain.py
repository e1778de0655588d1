"""The client installs: runs that share the cache directory install one at a time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from conformance_support import Install, Toolchain


def _someone_waits_for(lock_file: Path) -> bool:
    """Whether the kernel lists a process blocked on *lock_file*'s flock (``/proc/locks``)."""
    inode = lock_file.stat().st_ino
    with open("/proc/locks", encoding="ascii") as locks:
        return any("->" in line and f":{inode} " in line for line in locks)


def test_toolchains_sharing_a_cache_install_a_group_one_at_a_time(tmp_path: Path) -> None:
    """Two toolchains on one cache directory (as two concurrent runs would be):
    the second install waits for the first, and finds the group installed."""
    installed = tmp_path / "npm-done"
    order: list[str] = []

    def install_first() -> Install:
        order.append("first starts")
        deadline = time.monotonic() + 30
        while not _someone_waits_for(tmp_path / ".npm.lock"):
            assert time.monotonic() < deadline, "the second install never waited for the lock"
            time.sleep(0.01)
        installed.touch()
        order.append("first ends")
        return Install("npm", tmp_path)

    def install_second() -> Install:
        order.append("second starts")
        return Install("npm", tmp_path, cached=installed.exists())

    first_started = threading.Event()
    runner = threading.Thread(
        target=lambda: Toolchain(tmp_path)._once(
            "npm", lambda: (first_started.set(), install_first())[1]
        )
    )
    runner.start()
    assert first_started.wait(30)
    outcome = Toolchain(tmp_path)._once("npm", install_second)
    runner.join(30)
    assert order == ["first starts", "first ends", "second starts"]
    assert outcome.cached
