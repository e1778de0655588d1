"""ccache 4.14 (HTTP remote storage) against kura's ``/ccache`` routes, every layout."""

from __future__ import annotations

import shutil
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

from tests.support.real import RealNode

CLIENT = "ccache 4.14.2 (HTTP storage)"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

SOURCE = '#include <stdio.h>\nint main(void) { puts("hello from kura conformance"); return 0; }\n'


def stats(ccache: Path, env: dict[str, str]) -> dict[str, int]:
    output = run([str(ccache), "--print-stats"], env=env).output
    return {name: int(value) for name, value in (line.split("\t") for line in output.splitlines())}


@pytest.mark.parametrize("layout", ["subdirs", "flat", "bazel"])
def test_ccache_second_compile_is_a_remote_storage_hit(
    kura: RealNode,
    toolchain: Toolchain,
    tmp_path: Path,
    evidence: list[str],
    layout: str,
) -> None:
    """With a fresh local cache dir, the second compile is a remote_storage_hit from kura."""
    ccache = toolchain.pypi().require() / "ccache"
    write_files(tmp_path, {"hello.c": SOURCE.replace("kura", f"kura {layout}")})
    env = base_env(
        CCACHE_DIR=str(tmp_path / "ccache-dir"),
        CCACHE_REMOTE_STORAGE=f"{kura.url}/ccache|layout={layout}|bearer-token={TOKEN}",
        CCACHE_REMOTE_ONLY="1",
        CCACHE_NOHASHDIR="1",
    )
    compile_ = [str(ccache), "gcc", "-c", "hello.c", "-o", "hello.o"]

    before = artifact_counts(kura.url, "ccache")
    run(compile_, cwd=tmp_path, env=env)
    first = stats(ccache, env)
    assert first["remote_storage_miss"] == 1 and first["remote_storage_write"] == 2, first
    built = (tmp_path / "hello.o").read_bytes()

    (tmp_path / "hello.o").unlink()
    shutil.rmtree(tmp_path / "ccache-dir")
    after_first = artifact_counts(kura.url, "ccache")
    run(compile_, cwd=tmp_path, env=env)
    second = stats(ccache, env)
    after_second = artifact_counts(kura.url, "ccache")

    assert second["remote_storage_hit"] == 1, second
    assert second["remote_storage_miss"] == 0 and second["remote_storage_write"] == 0
    assert (tmp_path / "hello.o").read_bytes() == built
    for counters in (first, second):
        assert counters["remote_storage_error"] == 0 and counters["remote_storage_timeout"] == 0
    assert delta(before, after_first, "writes:ok") == 2
    assert delta(after_first, after_second, "reads:ok") == 2
    evidence.append(f"layout={layout}: remote_storage_hit=1, errors=0")
