"""A real Helm template engine for the chart tests.

The engine is ``helm-python-sdk``: Helm's own Go SDK (v4) compiled into a
shared library and bound with ctypes, shipped as a PyPI wheel, so rendering
here is exactly what ``helm template`` does (Sprig functions, ``fail``,
``values.schema.json`` validation, ``.Files``) without a ``helm`` binary.

:func:`load_helm` imports it from the environment (``setup.py``'s ``test``
extra installs it) or, failing that, installs the pinned wheel once into a
cache directory outside the repository (``~/.cache/kura-test-tools`` or
``$KURA_TEST_TOOLS_DIR``). It skips, naming the reason, only when the
registry cannot be reached; any other install failure is a test error.

:meth:`ChartRenderer.render` is ``helm template``: ``lookup`` finds nothing.
:meth:`ChartRenderer.render_in` renders as an install or upgrade does, with
``lookup`` answered by a stand-in API server (``tests/helm/cluster.py``).
"""

from __future__ import annotations

import base64
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.helm.cluster import FakeCluster

REQUIREMENT = "helm-python-sdk==0.2.2"

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "kura"

#: pip output that means "the registry is unreachable", not "the install is broken".
_OFFLINE_SIGNS = (
    "Could not fetch URL",
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
    "timed out",
)


def _tools_dir() -> Path:
    root = os.environ.get("KURA_TEST_TOOLS_DIR") or Path.home() / ".cache" / "kura-test-tools"
    return Path(root) / REQUIREMENT.replace("==", "-")


def _install(target: Path) -> None:
    """``pip install --target`` into a scratch dir, then move it into place.

    The move makes a concurrent or interrupted install harmless: ``target``
    either holds a complete install or does not exist.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".installing-", dir=target.parent))
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(scratch),
                REQUIREMENT,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            output = result.stdout + result.stderr
            if any(sign in output for sign in _OFFLINE_SIGNS):
                pytest.skip(
                    f"HELM ENGINE UNAVAILABLE: could not install {REQUIREMENT} "
                    f"(package registry unreachable):\n{output[-2000:]}"
                )
            pytest.fail(f"installing {REQUIREMENT} failed:\n{output[-4000:]}")
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "helm_python").is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_helm() -> ModuleType:
    """The ``helm_python`` module, installing the pinned wheel if needed."""
    try:
        return importlib.import_module("helm_python")
    except ImportError:
        pass
    target = _tools_dir()
    if not (target / "helm_python").is_dir():
        _install(target)
    sys.path.insert(0, str(target))
    return importlib.import_module("helm_python")


_DOCUMENT_SEPARATOR = re.compile(r"^---[ \t]*$", re.MULTILINE)


class Rendered:
    """The Kubernetes objects of one chart render, parsed.

    Documents are parsed with Helm's own YAML reader (the one Kubernetes
    uses), so numbers, octal modes and booleans read as the API server would.
    """

    def __init__(self, helm: ModuleType, files: dict[str, str]) -> None:
        self.files = files
        self.objects: list[dict[str, Any]] = []
        for name, text in sorted(files.items()):
            if not name.endswith((".yaml", ".yml")):
                continue
            for document in _DOCUMENT_SEPARATOR.split(text):
                parsed: dict[str, Any] = helm.values_from_yaml(document)
                if parsed:
                    self.objects.append(parsed)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        """The single object of ``kind`` (and ``name``); fails otherwise."""
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def statefulset(self) -> dict[str, Any]:
        return self.one("StatefulSet")

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.statefulset["spec"]["template"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["spec"]["containers"]
        assert [c["name"] for c in containers] == ["kura"]
        container: dict[str, Any] = containers[0]
        return container

    @property
    def env(self) -> dict[str, str]:
        """Literal ``value`` env entries by name (later entries win, as in the kubelet)."""
        return {e["name"]: e["value"] for e in self.container["env"] if "value" in e}

    @property
    def env_names(self) -> set[str]:
        """Every env entry's name, literal or ``valueFrom``."""
        return {e["name"] for e in self.container["env"]}

    @property
    def secret_env(self) -> dict[str, dict[str, Any]]:
        """``valueFrom.secretKeyRef`` env entries by name: the reference, not a value."""
        return {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in self.container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }

    def secret_data(self, name: str) -> dict[str, str]:
        """The rendered Secret ``name``'s data, base64-decoded as the kubelet hands it over."""
        data: dict[str, str] = self.one("Secret", name).get("data") or {}
        return {key: base64.b64decode(value).decode() for key, value in data.items()}

    def volume(self, name: str) -> dict[str, Any]:
        found = [v for v in self.pod["spec"]["volumes"] if v["name"] == name]
        assert len(found) == 1, f"expected one volume {name}, found {len(found)}"
        volume: dict[str, Any] = found[0]
        return volume

    def mount(self, name: str) -> dict[str, Any]:
        found = [m for m in self.container["volumeMounts"] if m["name"] == name]
        assert len(found) == 1, f"expected one mount of {name}, found {len(found)}"
        mount: dict[str, Any] = found[0]
        return mount


class ChartRenderer:
    """Renders ``helm/kura`` with given values, like ``helm template``."""

    def __init__(self, helm: ModuleType, chart_dir: Path = CHART_DIR) -> None:
        self.helm = helm
        self.chart_dir = chart_dir
        self._chart = helm.Chart.load(str(chart_dir))

    def render(
        self,
        values: dict[str, Any] | None = None,
        *,
        release: str = "kura",
        namespace: str = "cache",
    ) -> Rendered:
        files = self._chart.render(values or {}, name=release, namespace=namespace)
        return Rendered(self.helm, files)

    def render_in(
        self,
        cluster: FakeCluster,
        values: dict[str, Any] | None = None,
        *,
        upgrade: bool = False,
        release: str = "kura",
        namespace: str = "cache",
    ) -> Rendered:
        """Render as ``helm install`` (or ``helm upgrade``) would against ``cluster``.

        Helm's own engine renders with ``lookup`` answered by ``cluster``
        (``helm_python.Config.render``); nothing is created there. An upgrade
        renders as revision 2 with ``.Release.IsUpgrade``.
        """
        kubeconfig = cluster.kubeconfig(namespace)
        with self.helm.Config(kubeconfig_content=kubeconfig, namespace=namespace) as config:
            files = config.render(
                self._chart,
                values or {},
                name=release,
                namespace=namespace,
                revision=2 if upgrade else 1,
                is_install=not upgrade,
                is_upgrade=upgrade,
            )
        return Rendered(self.helm, files)

    def close(self) -> None:
        self._chart.close()
