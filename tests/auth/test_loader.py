"""Loading extensions from a file or a module path."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kura.auth import (
    ExtensionAuthorizer,
    ExtensionConfig,
    ExtensionLoadError,
    OpenAccess,
    Principal,
    build_authorizer,
    load_extension,
)
from kura.config import ConfigError
from kura.telemetry.metrics import KuraMetrics
from kura.testing import succeeded
from tests.auth.support import context, run

HOST = object()


def script(tmp_path: Path, source: str, name: str = "policy.py") -> ExtensionConfig:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return ExtensionConfig.from_environ({"KURA_EXTENSION_SCRIPT_PATH": str(path)})


def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """A uniquely named importable module holding ``source``; returns its name."""
    name = f"kura_test_ext_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_a_script_with_module_level_hooks(tmp_path: Path) -> None:
    """Top-level functions of a script are its hooks; the file hash is its fingerprint."""
    config = script(
        tmp_path,
        """
        from kura.auth import Principal

        def authenticate(ctx):
            return Principal(ctx.tenant_id)
        """,
    )
    loaded = load_extension(config, HOST)
    assert loaded.hooks.authenticate is not None
    assert loaded.hooks.authorize is None and loaded.hooks.response_headers is None
    assert len(loaded.fingerprint) == 64
    assert "policy.py" in loaded.source


def test_setup_receives_the_host_and_returns_the_extension(tmp_path: Path) -> None:
    """setup(host) is called once and what it returns is the extension."""
    config = script(
        tmp_path,
        """
        from dataclasses import dataclass

        @dataclass
        class Policy:
            host: object

            def authorize(self, ctx, principal):
                from kura.auth import Allow
                return Allow()

        def setup(host):
            return Policy(host)
        """,
    )
    loaded = load_extension(config, HOST)
    assert loaded.hooks.authorize is not None
    assert loaded.hooks.authorize.__self__.host is HOST  # type: ignore[attr-defined]


def test_setup_returning_none_keeps_the_module(tmp_path: Path) -> None:
    """A setup that returns None leaves the module's functions as the hooks."""
    config = script(
        tmp_path,
        """
        HOST = None

        def setup(host):
            global HOST
            HOST = host

        def response_headers(ctx, principal):
            return None
        """,
    )
    assert load_extension(config, HOST).hooks.response_headers is not None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def authenticate(ctx)\n    pass\n", "SyntaxError"),
        ("import kura_no_such_module\n", "ModuleNotFoundError"),
        ("raise SystemExit(2)\n", "SystemExit"),
        ("def setup(host):\n    raise RuntimeError('no secret')\n", "RuntimeError: no secret"),
        ("authenticate = 'not a function'\n", "authenticate must be callable"),
        ("async def setup(host):\n    return None\n", "not an awaitable"),
    ],
)
def test_broken_scripts_stop_start_up_naming_the_file(
    tmp_path: Path, source: str, expected: str
) -> None:
    """A script failing to import or set up raises a ConfigError naming file and exception."""
    config = script(tmp_path, source, name="broken.py")
    with pytest.raises(ExtensionLoadError) as caught:
        load_extension(config, HOST)
    assert isinstance(caught.value, ConfigError)
    assert "broken.py" in str(caught.value)
    assert "KURA_EXTENSION_SCRIPT_PATH" in str(caught.value)
    assert expected in str(caught.value)


def test_a_module_attribute_class_is_built_with_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KURA_EXTENSION_MODULE=pkg.mod:Class instantiates the class with the host."""
    name = package(
        tmp_path,
        monkeypatch,
        """
        class Policy:
            def __init__(self, host):
                self.host = host

            def authenticate(self, ctx):
                return None
        """,
    )
    config = ExtensionConfig.from_environ({"KURA_EXTENSION_MODULE": f"{name}:Policy"})
    loaded = load_extension(config, HOST)
    assert loaded.hooks.authenticate.__self__.host is HOST  # type: ignore[union-attr]
    assert loaded.source == f"KURA_EXTENSION_MODULE={name}:Policy"


def test_a_module_attribute_instance_is_used_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attribute that is neither a class nor a function is the extension itself."""
    name = package(
        tmp_path,
        monkeypatch,
        """
        class _Policy:
            def authorize(self, ctx, principal):
                return None

        POLICY = _Policy()
        """,
    )
    config = ExtensionConfig.from_environ({"KURA_EXTENSION_MODULE": f"{name}:POLICY"})
    assert load_extension(config, HOST).hooks.authorize is not None


@pytest.mark.parametrize("spec", ["kura_no_such_module", "kura.auth:no_such_attribute"])
def test_unresolvable_module_paths_stop_start_up(spec: str) -> None:
    """A module path that does not resolve raises a ConfigError naming it."""
    config = ExtensionConfig.from_environ({"KURA_EXTENSION_MODULE": spec})
    with pytest.raises(ExtensionLoadError, match=f"KURA_EXTENSION_MODULE: cannot load '{spec}'"):
        load_extension(config, HOST)


def test_build_authorizer_loads_or_returns_no_extension(tmp_path: Path) -> None:
    """build_authorizer runs the configured extension, or NoExtension when none is configured."""
    metrics = KuraMetrics(CollectorRegistry())
    clock: Any = Clock()
    assert isinstance(
        build_authorizer(ExtensionConfig.from_environ({}), reactor=clock, metrics=metrics),
        OpenAccess,
    )
    config = script(
        tmp_path,
        """
        from kura.auth import Principal

        def setup(host):
            assert host.env("KURA_EXTENSION_SCRIPT_PATH")
        def authenticate(ctx):
            return Principal("from-script")
        """,
    )
    auth = build_authorizer(config, reactor=clock, metrics=metrics)
    assert isinstance(auth, ExtensionAuthorizer)
    assert succeeded(run(auth.check, context())) == Principal("from-script")
    assert succeeded(auth.close()) is None
