"""Turborepo 2.11 (Vercel remote cache API v8) against kura."""

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

CLIENT = "Turborepo 2.11.11 (remote cache v8)"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(900)]

LOCKFILE = """
    {
      "name": "conformance-turbo",
      "lockfileVersion": 3,
      "requires": true,
      "packages": {
        "": {"name": "conformance-turbo", "workspaces": ["packages/*"]},
        "node_modules/app": {"resolved": "packages/app", "link": true},
        "packages/app": {"name": "app", "version": "0.0.0"}
      }
    }
"""


def test_turbo_second_run_is_full_turbo_from_kura(
    kura: RealNode, toolchain: Toolchain, tmp_path: Path, evidence: list[str]
) -> None:
    """With no local cache, the second run replays from kura: "FULL TURBO"."""
    node_modules = toolchain.npm().require()
    root = tmp_path / "turbo"
    write_files(
        root,
        {
            "package.json": """
                {"name": "conformance-turbo", "private": true,
                 "packageManager": "npm@11.0.0", "workspaces": ["packages/*"]}
            """,
            # A lockfile, so Turborepo can resolve the workspace without warnings.
            "package-lock.json": LOCKFILE,
            "turbo.json": '{"tasks": {"build": {"outputs": ["dist/**"]}}}\n',
            ".gitignore": "node_modules\ndist\n.turbo\n",
            "packages/app/package.json": """
                {"name": "app", "version": "0.0.0", "private": true,
                 "scripts": {"build": "node build.js"}}
            """,
            "packages/app/build.js": """
                const fs = require("fs");
                fs.mkdirSync("dist", {recursive: true});
                fs.writeFileSync("dist/out.txt", "built by turbo\\n");
                console.log("building app for real");
            """,
        },
    )
    os.symlink(node_modules, root / "node_modules")
    # Turborepo hashes files through git.
    git = ["git", "-c", "user.email=ci@kura", "-c", "user.name=ci"]
    run([*git, "init", "-q"], cwd=root)
    run([*git, "add", "-A"], cwd=root)
    run([*git, "commit", "-q", "-m", "conformance"], cwd=root)
    env = base_env(
        TURBO_API=kura.url,
        TURBO_TOKEN=TOKEN,
        TURBO_TEAM="conformance",
        TURBO_TELEMETRY_DISABLED="1",
        DO_NOT_TRACK="1",
        TURBO_NO_UPDATE_NOTIFIER="1",
        CI="true",
    )
    build = [str(node_modules / ".bin" / "turbo"), "run", "build", "--cache=local:,remote:rw"]

    before = artifact_counts(kura.url, "turbo")
    first = run(build, cwd=root, env=env)
    after_first = artifact_counts(kura.url, "turbo")
    assert "cache miss" in first.output, first.output
    assert delta(before, after_first, "writes:ok") == 1, first.output

    shutil.rmtree(root / "packages/app/dist")
    shutil.rmtree(root / ".turbo", ignore_errors=True)
    second = run(build, cwd=root, env=env)
    after_second = artifact_counts(kura.url, "turbo")

    assert "FULL TURBO" in second.output, second.output
    assert "cache hit" in second.output
    assert (root / "packages/app/dist/out.txt").read_text() == "built by turbo\n"
    assert delta(after_first, after_second, "reads:ok") == 1
    assert delta(after_first, after_second, "writes:ok") == 0
    for output in (first.output, second.output):
        assert "Remote caching enabled" in output, output
        assert problem_lines(output, "error", "warn", "failed") == [], output
    evidence.append(f"FULL TURBO; builds {first.seconds:.1f}s + {second.seconds:.1f}s")
