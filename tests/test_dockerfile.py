"""The Dockerfile and .dockerignore, checked without a Docker engine.

No Docker daemon runs here, so these tests read the Dockerfile's
instructions and check what the image would do: the base, tini as PID 1,
the README/Makefile install and start commands, ports, volumes, the
non-root user and the HEALTHCHECK (whose Python one-liner is actually run
against a local HTTP server). The build context left by .dockerignore is
rebuilt in a temporary directory and packaged with setuptools, as
``pip install '.[h2]'`` would, to prove it ships the whole node.
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from kura.config import node as kura_config
from tests.support import constraints

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "python:3.11-slim-bookworm"
START_COMMAND = ["twistd", "--nodaemon", "--pidfile=", "kura"]


@attrs.frozen
class Instruction:
    keyword: str
    arguments: str
    stage: int

    def exec_form(self) -> list[str]:
        """The JSON-array (exec) form of the arguments; fails on shell form."""
        parsed = json.loads(self.arguments)
        assert isinstance(parsed, list), f"{self.keyword} must use the exec form"
        return [str(item) for item in parsed]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comment lines dropped (as BuildKit does)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = pending + line
        pending = ""
        keyword, _, arguments = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(arguments.split()), stage))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = instructions[-1].stage
    return [i for i in instructions if i.stage == last]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """Variables set by ENV key=value instructions (later wins)."""
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.arguments):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def shell_commands(instructions: list[Instruction]) -> list[list[str]]:
    """Each ``&&``-separated command of every RUN, as argv."""
    commands = []
    for instruction in instructions:
        if instruction.keyword == "RUN":
            for part in instruction.arguments.split("&&"):
                commands.append(shlex.split(part))
    return commands


def makefile_recipe(target: str, marker: str) -> list[str]:
    """The argv of the Makefile recipe line of ``target`` that contains ``marker``."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line))
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        if marker in line:
            return shlex.split(line.strip())
    raise AssertionError(f"no recipe line with {marker!r} under {target}")


def extras_of(requirement: str) -> set[str]:
    match = re.fullmatch(r"\.\[([^\]]*)\]", requirement)
    assert match, f"not a local install with extras: {requirement!r}"
    return {extra.strip() for extra in match.group(1).split(",")}


def setup_extras() -> set[str]:
    """The keys of setup.py's extras_require, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            assert isinstance(node.value, ast.Dict)
            return {ast.literal_eval(key) for key in node.value.keys if key is not None}
    raise AssertionError("setup.py has no extras_require")


# -- base, entrypoint, command ----------------------------------------------------


def test_every_stage_uses_python_311_slim_bookworm(instructions: list[Instruction]) -> None:
    """All stages build FROM one ``PYTHON_IMAGE``: python:3.11-slim-bookworm pinned by
    digest, so the venv copied between them runs and every build starts alike."""
    bases = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    assert bases
    assert set(bases) == {"${PYTHON_IMAGE}"}
    (argument,) = [i for i in instructions if i.keyword == "ARG" and i.stage == -1]
    assert re.fullmatch(rf"PYTHON_IMAGE={BASE_IMAGE}@sha256:[0-9a-f]{{64}}", argument.arguments)


def test_tini_is_installed_and_is_pid_1(instructions: list[Instruction]) -> None:
    """The runtime stage apt-installs tini and runs everything under `tini --`."""
    runtime = final_stage(instructions)
    installs = [c for c in shell_commands(runtime) if c[:2] == ["apt-get", "install"]]
    assert any("tini" in command for command in installs)
    assert only(runtime, "ENTRYPOINT").exec_form() == ["tini", "--"]


def test_command_is_the_makefile_start_command(instructions: list[Instruction]) -> None:
    """CMD starts twistd exactly as `make run` does (minus the venv path and PYTHONPATH)."""
    command = only(final_stage(instructions), "CMD").exec_form()
    assert command == START_COMMAND
    recipe = makefile_recipe("run", "twistd")
    argv = [word for word in recipe if not word.startswith("PYTHONPATH=")]
    argv[0] = os.path.basename(argv[0])
    assert argv == command


def test_install_step_is_the_documented_install(instructions: list[Instruction]) -> None:
    """The image runs `pip install -c constraints.txt '.[h2]'`: the Makefile's install
    minus the test extra, both pinned by constraints.txt."""
    pip_installs = [c for c in shell_commands(instructions) if c[:2] == ["pip", "install"]]
    assert pip_installs == [["pip", "install", "-c", "constraints.txt", ".[h2]"]]
    makefile_install = makefile_recipe("$(STAMP)", "'.[")
    assert "-c constraints.txt" in " ".join(makefile_install)
    local = next(word for word in makefile_install if word.startswith(".["))
    assert extras_of(".[h2]") == extras_of(local) - {"test"}
    assert extras_of(".[h2]") <= setup_extras()


def test_build_stage_prepares_the_plugin_cache(instructions: list[Instruction]) -> None:
    """The build writes Twisted's plugin cache and checks `twistd` lists the kura plugin."""
    build = [i for i in instructions if i.stage == 0 and i.keyword == "RUN"]
    text = " ".join(i.arguments for i in build)
    assert "getPlugins(IPlugin)" in text
    assert "twistd --help | grep ' kura '" in text


# -- runtime settings -------------------------------------------------------------


def test_exposes_the_default_public_grpc_internal_ports(instructions: list[Instruction]) -> None:
    """EXPOSE lists exactly KURA_PORT's, KURA_GRPC_PORT's and KURA_INTERNAL_PORT's defaults."""
    exposed = only(final_stage(instructions), "EXPOSE").arguments.split()
    assert exposed == [
        str(kura_config.PORT.default),
        str(kura_config.GRPC_PORT.default),
        str(kura_config.INTERNAL_PORT.default),
    ]


def test_data_and_tmp_dirs_are_on_the_volume(instructions: list[Instruction]) -> None:
    """KURA_DATA_DIR and KURA_TMP_DIR lie in VOLUME /var/cache/kura, owned by the kura user."""
    runtime = final_stage(instructions)
    env = env_of(runtime)
    assert env["KURA_DATA_DIR"] == "/var/cache/kura/data"
    assert env["KURA_TMP_DIR"] == "/var/cache/kura/tmp"
    assert only(runtime, "VOLUME").arguments == "/var/cache/kura"
    commands = shell_commands(runtime)
    assert ["mkdir", "-p", "/var/cache/kura/data", "/var/cache/kura/tmp"] in commands
    assert ["chown", "-R", "10001:10001", "/var/cache/kura"] in commands


def test_runs_as_the_chart_non_root_user(instructions: list[Instruction]) -> None:
    """USER is the numeric uid 10001 the Helm chart's securityContext expects."""
    runtime = final_stage(instructions)
    user = only(runtime, "USER").arguments
    assert user == "10001:10001"
    values = (ROOT / "helm" / "kura" / "values.yaml").read_text()
    assert re.search(r"^\s+runAsUser: 10001$", values, re.MULTILINE)
    assert re.search(r"^\s+fsGroup: 10001$", values, re.MULTILINE)
    assert any(
        c[:1] == ["useradd"] and "--uid" in c and c[c.index("--uid") + 1] == "10001"
        for c in shell_commands(runtime)
    )


def test_logs_are_unbuffered(instructions: list[Instruction]) -> None:
    """PYTHONUNBUFFERED is set so JSON log lines reach `kubectl logs` as they happen."""
    assert env_of(final_stage(instructions))["PYTHONUNBUFFERED"] == "1"


# -- HEALTHCHECK ------------------------------------------------------------------


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/up" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def up_server() -> Iterator[tuple[http.server.HTTPServer, type[_Answer]]]:
    handler = type("Handler", (_Answer,), {"status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()
    thread.join()


def healthcheck_argv(instructions: list[Instruction]) -> list[str]:
    arguments = only(final_stage(instructions), "HEALTHCHECK").arguments
    _, _, command = arguments.partition("CMD ")
    argv = json.loads(command)
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def run_healthcheck(argv: list[str], port: int) -> int:
    assert argv[:2] == ["python", "-c"]
    environ = {**os.environ, "KURA_PORT": str(port)}
    result = subprocess.run(
        [sys.executable, "-c", argv[2]], env=environ, capture_output=True, timeout=30, check=False
    )
    return result.returncode


def test_healthcheck_uses_python_not_curl(instructions: list[Instruction]) -> None:
    """HEALTHCHECK runs the interpreter (curl is not in the slim image) against /up."""
    argv = healthcheck_argv(instructions)
    assert argv[:2] == ["python", "-c"]
    assert "urllib" in argv[2]
    assert "/up" in argv[2]
    assert "KURA_PORT" in argv[2]


def test_healthcheck_passes_when_up_answers_200(
    instructions: list[Instruction], up_server: tuple[http.server.HTTPServer, type[_Answer]]
) -> None:
    """The HEALTHCHECK command exits 0 against a server answering /up with 200."""
    server, _ = up_server
    assert run_healthcheck(healthcheck_argv(instructions), server.server_address[1]) == 0


def test_healthcheck_fails_when_up_is_an_error(
    instructions: list[Instruction], up_server: tuple[http.server.HTTPServer, type[_Answer]]
) -> None:
    """The HEALTHCHECK command exits non-zero when /up answers 503."""
    server, handler = up_server
    handler.status = 503
    assert run_healthcheck(healthcheck_argv(instructions), server.server_address[1]) != 0


def test_healthcheck_fails_when_nothing_listens(
    instructions: list[Instruction], up_server: tuple[http.server.HTTPServer, type[_Answer]]
) -> None:
    """The HEALTHCHECK command exits non-zero when the port is closed."""
    server, _ = up_server
    port = server.server_address[1]
    server.server_close()
    assert run_healthcheck(healthcheck_argv(instructions), port) != 0


# -- build context ----------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on /-paths."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, is_exception) pairs in file order."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((_pattern_regex(pattern), exception))
    return rules


def in_context(path: str, rules: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Whether ``path`` reaches the build context: the last matching rule decides.

    As in Docker, a pattern matching a parent directory matches the path too.
    """
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for regex, exception in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not exception
    return not excluded


def kura_modules() -> list[str]:
    """Every Python source file of the kura package in the checkout."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "kura").rglob("*.py")
        if "__pycache__" not in p.parts
    )


def context_files() -> list[str]:
    rules = dockerignore_rules()
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        relative = os.path.relpath(directory, ROOT)
        # Large trees the rules exclude anyway (checked separately below).
        subdirs[:] = [d for d in subdirs if not (relative == "." and d in (".git", ".venv"))]
        for name in names:
            path = os.path.normpath(os.path.join(relative, name))
            if in_context(path, rules):
                files.append(path)
    return sorted(files)


def test_dockerignore_keeps_packaging_inputs_and_drops_local_state() -> None:
    """The context holds the packaging inputs, kura/ and the plugin; no venvs or caches."""
    rules = dockerignore_rules()
    files = set(context_files())
    assert {"setup.py", "pyproject.toml", "README.md", "twisted/plugins/kura_plugin.py"} <= files
    assert set(kura_modules()) <= files
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "kura-data/metadata.sqlite",
        "tests/test_dockerfile.py",
        "kura/__pycache__/config.cpython-311.pyc",
        "twisted/plugins/dropin.cache",
        "helm/kura/values.yaml",
        "build/lib/kura/__init__.py",
    ):
        assert not in_context(path, rules), path


def test_build_context_packages_every_kura_module(tmp_path: Path) -> None:
    """setuptools, on just the files .dockerignore lets in, ships all of kura/ and the plugin."""
    pytest.importorskip("setuptools")
    context = tmp_path / "context"
    for path in context_files():
        destination = context / path
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, destination)
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shipped = {str(p.relative_to(tmp_path / "lib")) for p in (tmp_path / "lib").rglob("*.py")}
    assert "twisted/plugins/kura_plugin.py" in shipped
    assert sorted(set(kura_modules()) - shipped) == [], (
        "modules missing from the installed package (a directory without __init__.py?)"
    )


def test_constraints_pin_the_runtime_closure_installed_here() -> None:
    """constraints.txt is what `make constraints` writes for this virtualenv (the CI one
    is installed with it, so a stale file fails here after a dependency change)."""
    pinned = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert pinned == constraints.render(), "regenerate it: make constraints"
    assert "twisted==" in pinned and "h2==" in pinned


def test_the_image_carries_oci_labels(instructions: list[Instruction]) -> None:
    labels = " ".join(i.arguments for i in instructions if i.stage == 1 and i.keyword == "LABEL")
    for key in ("title", "description", "version", "documentation"):
        assert f"org.opencontainers.image.{key}=" in labels
