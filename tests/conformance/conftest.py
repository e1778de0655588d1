"""The conformance session: one real kura node, the installed clients, a summary.

Every client builds twice against the node started here (``RealNode``, with
kura's built-in write tokens and no anonymous access, so a hit also proves
that the client authenticated: Gradle with Basic credentials whose password
is a token, the others with ``Authorization: Bearer``). The session ends
with one line per client and a pass/fail count.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from conformance_support import BASIC_PASSWORD, TOKEN, Toolchain

from tests.support.real import RealNode

#: Client name -> (outcome, detail), filled as the tests finish.
_RESULTS: dict[str, tuple[str, str]] = {}
_EVIDENCE: dict[str, str] = {}
_TOOLCHAIN = Toolchain()
_CLOCK: list[float] = []


@pytest.fixture(scope="session", autouse=True)
def _session_clock() -> None:
    """Start the suite's wall clock at its first test (installs included)."""
    _CLOCK.append(time.monotonic())


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    """Installs the clients on first use (see conformance_support)."""
    return _TOOLCHAIN


@pytest.fixture(scope="session")
def kura(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A real ``twistd kura`` node on loopback that requires a write token."""
    base = tmp_path_factory.mktemp("kura-node")
    node = RealNode(
        str(base / "data"),
        KURA_AUTH_WRITE_TOKENS=f"{TOKEN},{BASIC_PASSWORD}",
        KURA_LOG_FORMAT="json",
    )
    node.start(timeout=60)
    yield node
    status = node.stop()
    assert status == 0, f"node exited {status}: {node.log_tail()}"


@pytest.fixture
def evidence(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Lines a test records as proof of its client's remote hit (for the summary)."""
    lines: list[str] = []
    yield lines
    client = _client_of(request.node)
    _EVIDENCE[client] = "; ".join(filter(None, [_EVIDENCE.get(client, ""), *lines]))


def _client_of(item: Any) -> str:
    return str(getattr(item.module, "CLIENT", item.name))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("conformance") is None:
        return
    client = _client_of(item)
    if _RESULTS.get(client, ("", ""))[0] == "fail":
        return  # a parametrized client fails as a whole when any of its runs fails
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
        _RESULTS[client] = ("skip", str(reason).removeprefix("Skipped: "))
    elif report.failed:
        message = getattr(report.longrepr, "reprcrash", None)
        detail = message.message.splitlines()[0] if message is not None else report.when
        _RESULTS[client] = ("fail", f"{report.when}: {detail}"[:300])
    elif report.when == "call":
        _RESULTS[client] = ("pass", "")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("conformance clients")
    for client, (outcome, detail) in sorted(_RESULTS.items()):
        shown = _EVIDENCE.get(client, "") if outcome == "pass" else detail
        write(f"{outcome.upper():4}  {client}: {shown}")
    for install in _TOOLCHAIN.installs.values():
        write(f"install {install.group}: {install.describe()}")
    counts = {key: sum(1 for o, _ in _RESULTS.values() if o == key) for key in ("pass", "fail")}
    skipped = sum(1 for o, _ in _RESULTS.values() if o == "skip")
    elapsed = time.monotonic() - _CLOCK[0] if _CLOCK else 0.0
    write(
        f"conformance clients: {counts['pass']} pass, {counts['fail']} fail, {skipped} skip "
        f"({elapsed:.0f}s including installs)"
    )
