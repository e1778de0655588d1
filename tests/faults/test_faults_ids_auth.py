"""Hostile ids on every route, and thousands of bad credentials, against real nodes.

Traversal and odd ids get 400 or 404, never 500, the same on both serving
paths, and ``strace`` shows no file touched outside the data directory;
5,000 wrong bearer tokens and malformed Authorization headers get 401, never
500, at bounded CPU.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import string
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kura.testing import parse_responses
from tests.api.route_table import public_api
from tests.faults.support import CAS, GRADLE, Strace, call, cpu_seconds, metrics
from tests.support.real import REPO_ROOT, RealNode

pytestmark = pytest.mark.faults

#: Ids meant to escape or confuse: dot segments raw and encoded, separators,
#: NUL, overlong and fullwidth dots.
TRAVERSAL = [
    "..",
    "../x",
    "..%2fx",
    "%2e%2e",
    "%2E%2E%2Fx",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%5cx",
    "..\\x",
    "%c0%ae%c0%ae",
    "%c0%ae%c0%ae%c0%af",
    "%ef%bc%8e%ef%bc%8e",
    "\uff0e\uff0e".encode().decode("latin-1"),
]
#: Odd but not necessarily invalid: anything below 500 will do, identically.
ODD = [
    "%2fabs",
    "a%2fb",
    "a/b",
    "a%00b",
    "a\x00b",
    ".",
    "",
    *("a" * n for n in (255, 256, 4096, 65536)),
]
PROBES = {"up", "ready", "rollout", "metrics"}
FIXED = {"tenant": "default", "namespace": "ns", "kind": "cas", "instance_name": "inst"}
_VARIABLE = re.compile(r"<(?:[^<>:]+:)?([^<>:]+)>")


def targets(odd: str) -> list[tuple[str, str]]:
    """``(method, target)`` for every route and method, with ``odd`` in each id position.

    The id goes into the rule's last variable (the artifact key), into a
    namespace segment where the rule has one, and into the query parameters
    that name artifacts (module ``hash``/``name``, ``namespace_id``, ``cas_id``).
    """
    found = []
    for rule in public_api().app.url_map.iter_rules():
        if rule.endpoint in PROBES:
            continue
        names = _VARIABLE.findall(rule.rule)
        tenant = "tenant_id=default"
        # (path variables to set, query string) pairs, each carrying ``odd`` once.
        variants: list[tuple[dict[str, str], str]] = []
        if names:
            variants.append(({names[-1]: odd}, tenant))
        if "namespace" in names:
            variants.append(({"namespace": odd}, tenant))
        if rule.rule.startswith("/api/cache/module"):
            variants += [({}, f"{tenant}&hash={odd}&name=n"), ({}, f"{tenant}&hash=h&name={odd}")]
        elif rule.rule == "/api/cache/keyvalue":
            variants.append(({}, f"{tenant}&cas_id={odd}"))
        elif rule.rule == "/api/cache/cas/<id>":
            variants.append(({}, f"{tenant}&namespace_id={odd}"))
        for placed, query in variants:
            path = _VARIABLE.sub(lambda m, p=placed: p.get(m[1], FIXED.get(m[1], "v")), rule.rule)
            found += [(method, f"{path}?{query}") for method in sorted(rule.methods)]
    return sorted(set(found))


def exchange(port: int, method: str, target: str) -> int | None:
    """Send one request (a 1-byte body on writes); the status, or None if none came."""
    body = b"x" if method in ("PUT", "POST") else b""
    raw = (f"{method} {target} HTTP/1.1\r\nHost: k\r\nContent-Length: {len(body)}\r\n\r\n").encode(
        "latin-1"
    ) + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                responses, _ = parse_responses(received, [method == "HEAD"])
                if responses:
                    return responses[0].status
        except ConnectionResetError:
            pass
    responses, _ = parse_responses(received, [method == "HEAD"])
    return responses[0].status if responses else None


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, RealNode]]:
    """Two nodes: the same-port accelerator on, and off."""
    started: dict[str, RealNode] = {}
    try:
        for name, enabled in (("on", "true"), ("off", "false")):
            started[name] = RealNode(
                str(tmp_path / name), KURA_ACCELERATED_FILE_SERVING_ENABLED=enabled
            ).start()
        yield started
    finally:
        for node in started.values():
            node.kill()


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_LAYOUT = re.compile(
    r"(kura\.sqlite3(-wal|-shm|-journal)?|\.kura\.writer\.lock|blobs|blobs/[0-9a-f]{2}"
    r"|blobs/[0-9a-f]{2}/[0-9a-f]{64}-[0-9a-f]{12}|tmp|tmp/uploads|tmp/uploads/[0-9a-f]{32}"
    r"|tmp/uploads\.stale-[0-9a-f]{32}(/[0-9a-f]{32})?"
    r"|tmp/parts(/[0-9a-f]{32}(/\d+\.part)?)?)"
)
#: Where the node legitimately looks outside its data directory: the system,
#: the interpreter and the checkout (source lines for a logged traceback).
SYSTEM = (
    "/usr/",
    "/lib",
    "/etc/localtime",
    "/proc/",
    "/sys/",
    "/dev/",
    sys.prefix,
    sys.base_prefix,
    REPO_ROOT,
)


def test_odd_ids_are_400_or_404_identically_and_touch_no_outside_path(
    tmp_path: Path, pair: dict[str, RealNode]
) -> None:
    """Traversal and odd ids on every route: never 500, same on both paths, no file outside data."""
    requests = [(odd, method, target) for odd in TRAVERSAL + ODD for method, target in targets(odd)]
    answers: dict[str, list[int | None]] = {}
    traces = {}
    for name, node in pair.items():
        trace = str(tmp_path / f"{name}.strace")
        # Sequential: a write and a read of one odd id must meet in the same order.
        with Strace(node.process.pid, trace, "%file") as strace:
            answers[name] = [exchange(node.port, method, target) for _, method, target in requests]
        traces[name] = strace.lines()
    print(f"{len(requests)} hostile requests per node")

    problems = []
    for (odd, method, target), on, off in zip(requests, answers["on"], answers["off"], strict=True):
        where = f"{method} {target[:90]!r}"
        if on is None or on >= 500:
            problems.append(f"{where}: {on}")
        if on != off:
            problems.append(f"{where}: accelerated {on} but twisted.web {off}")
        # 403: the dot segment landed in a tenant position ("tenant '..'").
        if odd in TRAVERSAL and on not in (400, 403, 404, 405):
            problems.append(f"{where}: a traversal id answered {on}")
    assert not problems, "\n".join(problems[:30])

    for name, node in pair.items():
        data_dir = node.data_dir.rstrip("/") + "/"
        for line in traces[name]:
            for path in _QUOTED.findall(line):
                if path == "":
                    continue  # fstat through AT_EMPTY_PATH: an fd, not a name
                if not path.startswith("/"):
                    # Relative names are opened against the data directory's fd.
                    assert _LAYOUT.fullmatch(path), line
                elif path.startswith(data_dir):
                    assert _LAYOUT.fullmatch(path[len(data_dir) :]), line
                elif data_dir.startswith(path.rstrip("/") + "/"):
                    continue  # SQLite resolves the database path one component at a time
                else:
                    assert path.startswith(SYSTEM) and "passwd" not in path, line
        assert not any(
            status.startswith("5")
            for (sample, labels), _ in metrics(node).items()
            if sample == "kura_http_requests_total"
            for key, status in labels
            if key == "status"
        )


EXTENSION = """
from kura.auth import Allow, Deny, Principal, constant_time_equals

SECRET = "s3cret-token-0123456789"


def authenticate(ctx):
    token = ctx.bearer_token()
    if token is None or not constant_time_equals(token, SECRET):
        return Deny(401, "Invalid token", ttl_seconds=0)
    return Principal("ci", kind="user", ttl_seconds=0)


def authorize(ctx, principal):
    return Allow(ttl_seconds=0)
"""
SECRET = "s3cret-token-0123456789"
WRONG_TOKENS = 5000


def _authorized_request(
    method: str, target: str, authorization: list[bytes], version: str
) -> bytes:
    body = b"x" if method in ("PUT", "POST") else b""
    head = f"{method} {target} {version}\r\nHost: k\r\n".encode()
    for value in authorization:
        head += b"Authorization: " + value + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _status(port: int, raw: bytes) -> int | None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                responses, _ = parse_responses(received, [])
                if responses:
                    return responses[0].status
        except ConnectionResetError:
            pass
    return None


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[RealNode]:
    """A node whose extension accepts only ``Bearer <SECRET>`` (compared in constant time)."""
    script = tmp_path / "policy.py"
    script.write_text(textwrap.dedent(EXTENSION))
    node = RealNode(str(tmp_path / "data"), KURA_EXTENSION_SCRIPT_PATH=str(script)).start()
    try:
        good = {"Authorization": f"Bearer {SECRET}"}
        assert call(node, "POST", CAS.format("guarded"), b"secret bytes", good)[0] == 204
        assert call(node, "GET", CAS.format("guarded"), headers=good)[2] == b"secret bytes"
        yield node
    finally:
        node.kill()


#: The three ways a request reaches the hooks: accelerated GET, twisted.web GET, upload.
PATHS = [
    ("GET", CAS.format("guarded"), "HTTP/1.1"),
    ("GET", CAS.format("guarded"), "HTTP/1.0"),
    ("PUT", GRADLE.format("guarded-write"), "HTTP/1.1"),
]


def test_five_thousand_wrong_tokens_are_401_at_bounded_cost(guarded: RealNode) -> None:
    """5,000 wrong bearer tokens over every serving path: all 401, no 5xx, little CPU each."""
    seed = 5000
    print(f"wrong tokens: seed={seed}")
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "-._~"
    tokens = [
        # Some share the secret's length or its first bytes (timing-shaped guesses).
        (SECRET[: rng.randint(0, len(SECRET) - 1)] if i % 3 == 0 else "")
        + "".join(rng.choices(alphabet, k=rng.randint(1, 64)))
        for i in range(WRONG_TOKENS)
    ]
    before = cpu_seconds(guarded)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(
                lambda pair: _status(
                    guarded.port,
                    _authorized_request(
                        *PATHS[pair[0] % 3][:2],
                        [b"Bearer " + pair[1].encode()],
                        PATHS[pair[0] % 3][2],
                    ),
                ),
                enumerate(tokens),
            )
        )
    used = cpu_seconds(guarded) - before
    print(
        f"{WRONG_TOKENS} wrong tokens: server CPU {used:.2f}s "
        f"({used / WRONG_TOKENS * 1000:.2f} ms each)"
    )
    assert statuses == [401] * WRONG_TOKENS
    assert used / WRONG_TOKENS < 0.003
    assert call(guarded, "GET", CAS.format("guarded"))[0] == 401
    _assert_no_5xx(guarded)


@pytest.mark.parametrize(
    "authorization",
    [
        [b"Bearer \xe9"],
        [b"Bearer \xc3\xa9t\xc3\xa9"],
        [b"Bearer "],
        [b"Bearer"],
        [b""],
        [b"bearer wrong-token"],
        [b"BEARER wrong-token"],
        [b"Basic dXNlcjpzM2NyZXQtdG9rZW4tMDEyMzQ1Njc4OQ=="],
        [b"Bearer " + SECRET.encode() + b" extra"],
        [b"Bearer " + SECRET.encode() + b"\x00"],
        [b"Bearer wrong-token", b"Bearer " + SECRET.encode()],
        [b"Bearer " + SECRET.encode(), b"Bearer " + SECRET.encode()],
    ],
    ids=lambda value: repr(b" | ".join(value))[2:40],
)
def test_malformed_authorization_is_refused_never_an_error(
    guarded: RealNode, authorization: list[bytes]
) -> None:
    """Non-ASCII, empty, other-scheme, repeated Authorization headers: 401 (or 400), never 5xx."""
    statuses = [
        _status(guarded.port, _authorized_request(method, target, authorization, version))
        for method, target, version in PATHS
    ]
    allowed = {400, 401} if len(authorization) > 1 or b"\x00" in authorization[0] else {401}
    assert set(statuses) <= allowed, statuses
    assert statuses[0] == statuses[1], "accelerated and twisted.web GETs differ"
    _assert_no_5xx(guarded)


def _assert_no_5xx(node: RealNode) -> None:
    errors = {
        labels: value
        for (sample, labels), value in metrics(node).items()
        if sample == "kura_http_requests_total" and dict(labels)["status"].startswith("5")
    }
    assert not errors, errors
