"""Stock Gradle (Debian's 4.4.1, HttpBuildCache) against kura's path-form Gradle route."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conformance_support import (
    BASIC_PASSWORD,
    BASIC_USER,
    CACHE_DIR,
    Toolchain,
    artifact_counts,
    base_env,
    delta,
    problem_lines,
    run,
    write_files,
)

from tests.support.real import RealNode

CLIENT = "Gradle 4.4.1 (HttpBuildCache)"

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(1200)]

#: What Gradle prints when the remote cache misbehaves (it then disables it).
CACHE_TROUBLE = ("Could not load entry", "Could not store entry", "was disabled")


def project(root: Path, url: str) -> None:
    write_files(
        root,
        {
            "settings.gradle": f"""
                rootProject.name = 'conformance'
                buildCache {{
                    local {{ enabled = false }}
                    remote(HttpBuildCache) {{
                        url = '{url}'
                        push = true
                        credentials {{
                            username = '{BASIC_USER}'
                            password = '{BASIC_PASSWORD}'
                        }}
                    }}
                }}
            """,
            "build.gradle": "apply plugin: 'java'\n",
            "src/main/java/demo/Hello.java": """
                package demo;

                public class Hello {
                    public static void main(String[] args) {
                        System.out.println("hello from kura conformance");
                    }
                }
            """,
        },
    )


def test_gradle_second_build_is_from_kura(
    kura: RealNode, toolchain: Toolchain, tmp_path: Path, evidence: list[str]
) -> None:
    """A clean rebuild takes compileJava FROM-CACHE from kura (tenant/namespace in the path)."""
    gradle = toolchain.apt().require() / "gradle"
    root = tmp_path / "gradle"
    # Stock Gradle drops the URL's query string, so tenant and namespace ride in the path.
    project(root, f"{kura.url}/api/cache/gradle/default/conformance/")
    env = base_env(GRADLE_USER_HOME=str(CACHE_DIR / "gradle-home"))
    # Never --offline: it disables the remote cache.
    build = [str(gradle), "--build-cache", "--no-daemon", "--console=plain", "compileJava"]

    before = artifact_counts(kura.url, "gradle")
    first = run(build, cwd=root, env=env)
    assert ":compileJava FROM-CACHE" not in first.output
    after_first = artifact_counts(kura.url, "gradle")
    assert delta(before, after_first, "writes:ok") >= 1, first.output

    shutil.rmtree(root / "build")
    shutil.rmtree(root / ".gradle", ignore_errors=True)
    second = run(build, cwd=root, env=env)
    after_second = artifact_counts(kura.url, "gradle")

    assert ":compileJava FROM-CACHE" in second.output, second.output
    assert (root / "build/classes/java/main/demo/Hello.class").is_file()
    assert delta(after_first, after_second, "reads:ok") >= 1
    assert delta(after_first, after_second, "writes:ok") == 0
    for output in (first.output, second.output):
        assert problem_lines(output, *CACHE_TROUBLE) == [], output
    evidence.append(
        ":compileJava FROM-CACHE; kura served "
        f"{delta(after_first, after_second, 'reads:ok'):.0f} read(s), "
        f"builds {first.seconds:.0f}s + {second.seconds:.0f}s"
    )
