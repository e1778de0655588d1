"""Bazel 2.1.0 (npm binary) against kura: the HTTP cache (``/bazel``) and REAPI over gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conformance_support import (
    TOKEN,
    Toolchain,
    artifact_counts,
    base_env,
    delta,
    problem_lines,
    run,
    write_files,
)

from tests.support.real import RealNode

CLIENT = "Bazel 2.1.0 (HTTP cache)"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]


def genrule_workspace(toolchain: Toolchain, tmp_path: Path, message: str) -> tuple[Path, list[str]]:
    """A workspace whose one genrule writes ``message``, and Bazel's startup arguments."""
    node_modules = toolchain.npm().require()
    root = tmp_path / "workspace"
    write_files(
        root,
        {
            "WORKSPACE": "",
            "BUILD": f"""
                genrule(
                    name = "hello",
                    outs = ["hello.txt"],
                    cmd = "echo '{message}' > $@",
                )
            """,
        },
    )
    startup = [
        str(node_modules / ".bin" / "bazel"),
        f"--output_user_root={tmp_path / 'bazel-root'}",
        "--nohome_rc",
        "--nosystem_rc",
    ]
    return root, startup


def test_bazel_second_build_is_a_remote_cache_hit(
    kura: RealNode, toolchain: Toolchain, tmp_path: Path, evidence: list[str]
) -> None:
    """After ``bazel clean`` the genrule's action comes from kura: "1 remote cache hit"."""
    root, startup = genrule_workspace(toolchain, tmp_path, "hello from kura conformance")
    build = [
        *startup,
        "build",
        "//:hello",
        f"--remote_cache={kura.url}/bazel",
        f"--remote_header=Authorization=Bearer {TOKEN}",
        "--color=no",
        "--curses=no",
    ]
    env = base_env()
    try:
        before = artifact_counts(kura.url, "bazel")
        first = run(build, cwd=root, env=env)
        after_first = artifact_counts(kura.url, "bazel")
        assert "remote cache hit" not in first.output
        assert delta(before, after_first, "writes:ok") >= 2, first.output

        run([*startup, "clean"], cwd=root, env=env)
        second = run(build, cwd=root, env=env)
        after_second = artifact_counts(kura.url, "bazel")
    finally:
        run([*startup, "shutdown"], cwd=root, env=env, check=False)

    assert "1 remote cache hit" in second.output, second.output
    assert (root / "bazel-bin/hello.txt").read_text() == "hello from kura conformance\n"
    assert delta(after_first, after_second, "reads:ok") >= 2
    assert delta(after_first, after_second, "writes:ok") == 0
    for output in (first.output, second.output):
        assert problem_lines(output, "remote cache:", "ERROR:") == [], output
    evidence.append(
        f"'1 remote cache hit'; kura served {delta(after_first, after_second, 'reads:ok'):.0f} "
        f"reads; builds {first.seconds:.1f}s + {second.seconds:.1f}s"
    )


@pytest.fixture
def open_kura(tmp_path: Path) -> Iterator[RealNode]:
    """A node without tokens: Bazel 2.1.0 sends ``--remote_header`` over HTTP only.

    (Its gRPC client sends no headers at all; later Bazels send them as call
    metadata, which kura authorizes like HTTP headers: tests/reapi.)
    """
    node = RealNode(str(tmp_path / "open-node"), KURA_LOG_FORMAT="json").start(timeout=60)
    yield node
    status = node.stop()
    assert status == 0, f"node exited {status}: {node.log_tail()}"


def test_bazel_over_grpc_second_build_is_a_remote_cache_hit(
    open_kura: RealNode, toolchain: Toolchain, tmp_path: Path, evidence: list[str]
) -> None:
    """The same, with ``--remote_cache=grpc://``: REAPI v2 on ``KURA_GRPC_PORT``.

    Bazel 2.1.0 has no ``--remote_cache_compression`` (it came in Bazel 5):
    ByteStream ``compressed-blobs/zstd`` is tested with a gRPC client in
    tests/reapi/test_reapi_real.py.
    """
    kura = open_kura
    root, startup = genrule_workspace(toolchain, tmp_path, "hello from kura over gRPC")
    build = [
        *startup,
        "build",
        "//:hello",
        f"--remote_cache=grpc://{kura.grpc_target}",
        "--remote_instance_name=conformance/grpc",
        "--color=no",
        "--curses=no",
    ]
    env = base_env()
    try:
        before = artifact_counts(kura.url, "reapi")
        first = run(build, cwd=root, env=env)
        after_first = artifact_counts(kura.url, "reapi")
        assert "remote cache hit" not in first.output
        assert delta(before, after_first, "writes:ok") >= 2, first.output

        run([*startup, "clean"], cwd=root, env=env)
        second = run(build, cwd=root, env=env)
        after_second = artifact_counts(kura.url, "reapi")
    finally:
        run([*startup, "shutdown"], cwd=root, env=env, check=False)

    assert "1 remote cache hit" in second.output, second.output
    assert (root / "bazel-bin/hello.txt").read_text() == "hello from kura over gRPC\n"
    assert delta(after_first, after_second, "reads:ok") >= 2
    assert delta(after_first, after_second, "writes:ok") == 0
    for output in (first.output, second.output):
        assert problem_lines(output, "remote cache:", "ERROR:", "WARNING: Remote") == [], output
    evidence.append(
        f"gRPC: '1 remote cache hit'; kura served "
        f"{delta(after_first, after_second, 'reads:ok'):.0f} REAPI reads"
    )
