"""``twistd kura`` as an operator meets it: --help, --version, warnings at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kura
from kura.tap import COMMON_VARIABLES, Options
from tests.support.real import REPO_ROOT, RealNode

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def twistd(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, "kura", *arguments],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_says_where_the_variables_are_documented_and_lists_common_ones() -> None:
    usage = Options().getUsage(width=100)
    assert "docs/configuration.md" in usage
    for name in COMMON_VARIABLES:
        assert f"\n  {name}\n" in usage


def test_twistd_kura_version_prints_kuras_version() -> None:
    done = twistd("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"kura {kura.__version__}"


def test_twistd_kura_help_runs() -> None:
    done = twistd("--help")
    assert done.returncode == 0, done.stderr
    assert "KURA_TENANT_ID" in done.stdout


@pytest.mark.realnode
def test_a_typo_is_warned_about_once_at_start_naming_the_variable_meant(tmp_path: Path) -> None:
    node = RealNode(str(tmp_path / "data"), KURA_TENNANT_ID="acme", KURA_SERVICE_HOST="10.0.0.7")
    node.start()
    try:
        log = node.log()
    finally:
        node.stop()
    line = "KURA_TENNANT_ID is not a kura variable and is ignored; did you mean KURA_TENANT_ID?"
    assert sum(line in entry for entry in log.splitlines()) == 1
    assert "KURA_SERVICE_HOST" not in log
