"""Nx 24 (self-hosted remote cache, ``/v1/cache/{hash}``) against kura."""

from __future__ import annotations

import os
import shutil
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

CLIENT = "Nx 24.0.6 (self-hosted remote cache)"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

BUILD_JS = """
    const fs = require("fs");
    fs.mkdirSync("dist", {recursive: true});
    fs.writeFileSync("dist/out.txt", "built by nx\\n");
    console.log("building for real");
"""


def test_nx_second_run_is_a_remote_cache_hit(
    kura: RealNode, toolchain: Toolchain, tmp_path: Path, evidence: list[str]
) -> None:
    """After removing dist/ and .nx/, Nx replays the task from kura ("[remote cache]")."""
    node_modules = toolchain.npm().require()
    root = tmp_path / "nx"
    write_files(
        root,
        {
            "package.json": """
                {
                  "name": "conformance",
                  "version": "0.0.0",
                  "private": true,
                  "scripts": {"build": "node build.js"},
                  "nx": {"targets": {"build": {"cache": true, "outputs": ["{projectRoot}/dist"]}}}
                }
            """,
            "nx.json": "{}\n",
            # Without it the outputs become inputs and the hash changes every run.
            ".gitignore": "dist\n.nx\nnode_modules\n",
            "build.js": BUILD_JS,
        },
    )
    os.symlink(node_modules, root / "node_modules")
    env = base_env(
        NX_SELF_HOSTED_REMOTE_CACHE_SERVER=kura.url,
        NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN=TOKEN,
        NX_DAEMON="false",
        NX_NO_CLOUD="true",
        NX_TUI="false",
        NX_SKIP_NX_CACHE="false",
        CI="true",
    )
    build = [str(node_modules / ".bin" / "nx"), "run", "conformance:build"]

    before = artifact_counts(kura.url, "nx")
    first = run(build, cwd=root, env=env)
    after_first = artifact_counts(kura.url, "nx")
    assert "[remote cache]" not in first.output
    assert delta(before, after_first, "writes:ok") == 1, first.output

    shutil.rmtree(root / "dist")
    shutil.rmtree(root / ".nx")
    second = run(build, cwd=root, env=env)
    after_second = artifact_counts(kura.url, "nx")

    assert "[remote cache]" in second.output, second.output
    assert "1/1 hit" in second.output or "1 out of 1" in second.output, second.output
    assert (root / "dist/out.txt").read_text() == "built by nx\n"
    assert delta(after_first, after_second, "reads:ok") == 1
    assert delta(after_first, after_second, "writes:ok") == 0
    for output in (first.output, second.output):
        assert problem_lines(output, "error", "warn", "unexpected", "misconfigured") == [], output
    evidence.append(
        f"'[remote cache]' and 1/1 hit; builds {first.seconds:.1f}s + {second.seconds:.1f}s"
    )
