"""Helpers for kura's tests: deterministic nodes and raw HTTP exchanges.

:func:`memory_node` builds a complete node on an in-memory reactor with
storage work run inline, so a request fed to :class:`Exchange` is answered
synchronously and every test is deterministic. The node still uses real
SQLite, real files and the real twisted.web channel, request and Klein app.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import attrs
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from kura.config import KuraConfig
from kura.service import KuraNode
from kura.storage.runner import BlockingRunner, ImmediateRunner

T = TypeVar("T")


def succeeded(d: Deferred[T]) -> T:
    """The result of an already-fired Deferred (fails the test otherwise)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def failed(d: Deferred[Any]) -> BaseException:
    """The exception of an already-failed Deferred."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    assert isinstance(results[0], Failure), f"Deferred succeeded with {results[0]!r}"
    error = results[0].value
    assert isinstance(error, BaseException)
    return error


def test_config(data_dir: str, **environ: str) -> KuraConfig:
    """A configuration rooted at ``data_dir`` with ``environ`` overrides."""
    base = {
        "KURA_DATA_DIR": data_dir,
        "KURA_PORT": "0",
        "KURA_INTERNAL_PORT": "0",
        "KURA_NODE_URL": "http://127.0.0.1:0",
        "KURA_CAS_CAPACITY_BYTES": str(1 << 30),
        "KURA_LOG_FORMAT": "text",
    }
    base.update(environ)
    return KuraConfig.from_environ(base, measure_filesystem=lambda path: 1 << 40)


def memory_node(data_dir: str, *, runner: BlockingRunner | None = None, **environ: str) -> KuraNode:
    """A started node on a :class:`MemoryReactorClock`, storage run inline.

    ``runner`` replaces the default :class:`ImmediateRunner` (e.g. a
    :class:`ControlledRunner` that holds chosen calls back).
    """
    os.makedirs(data_dir, exist_ok=True)
    reactor = MemoryReactorClock()
    node = KuraNode(
        test_config(data_dir, **environ),
        reactor,
        registry=CollectorRegistry(),
        runner=runner or ImmediateRunner(),
    )
    node.startService()
    succeeded(node.started)
    return node


@attrs.frozen
class Response:
    """A parsed HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes, head_methods: list[bool]) -> tuple[list[Response], bytes]:
    """Parse complete HTTP/1.1 responses from ``data``; return them and the rest.

    ``head_methods`` says, per expected response in order, whether it answers
    a HEAD (which carries no body); it is consumed as responses are parsed.
    Interim (1xx) responses are skipped.
    """
    found: list[Response] = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return found, data
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = data[end + 4 :]
        if 100 <= status < 200:
            data = rest
            continue
        is_head = head_methods[0] if head_methods else False
        if is_head or status in (204, 304):
            body, after = b"", rest
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if len(rest) < length:
                return found, data
            body, after = rest[:length], rest[length:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, after_or_none = _dechunk(rest)
            if after_or_none is None:
                return found, data
            after = after_or_none
        else:
            body, after = rest, b""
        if head_methods:
            head_methods.pop(0)
        found.append(Response(status, headers, body))
        data = after


def _dechunk(data: bytes) -> tuple[bytes, bytes | None]:
    body = b""
    while True:
        end = data.find(b"\r\n")
        if end < 0:
            return body, None
        size = int(data[:end].split(b";")[0], 16)
        if len(data) < end + 2 + size + 2:
            return body, None
        body += data[end + 2 : end + 2 + size]
        data = data[end + 2 + size + 2 :]
        if size == 0:
            return body, data


def files_under(path: str) -> list[str]:
    """Every regular file below ``path``, relative to it and sorted."""
    found = []
    for directory, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(directory, name), path) for name in names]
    return sorted(found)


def sample(node: KuraNode, name: str, **labels: str) -> float:
    """The value of one metric sample of ``node`` (0.0 when it was never set)."""
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class ControlledRunner:
    """An inline runner that records every call and can hold chosen calls back.

    A call runs at once on the calling thread (as :class:`ImmediateRunner`),
    with :attr:`inside` above zero while it runs, unless :attr:`hold` says
    otherwise for its function: then it waits in :attr:`held` until
    :meth:`release` runs it.

    Attributes:
        calls: the qualified name of every function run, in order.
        hold: ``hold(f)`` is true for functions to hold back.
        inside: how many runner calls are executing right now.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.hold: Any = lambda f: False
        self.held: list[tuple[Any, tuple[Any, ...], dict[str, Any], Deferred[Any]]] = []
        self.inside = 0

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.hold(f):
            waiting: Deferred[Any] = Deferred()
            self.held.append((f, args, kwargs, waiting))
            return waiting
        return self._call(f, args, kwargs)

    def _call(self, f: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Deferred[Any]:
        self.calls.append(getattr(f, "__qualname__", repr(f)))
        self.inside += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            return fail(Failure())
        finally:
            self.inside -= 1
        return succeed(result)

    def release(self) -> None:
        """Run the oldest held call and fire its Deferred."""
        f, args, kwargs, waiting = self.held.pop(0)
        self._call(f, args, kwargs).chainDeferred(waiting)


class ClientTransport(StringTransport):
    """A :class:`StringTransport` that can be half-closed, as a TCP socket can."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Exchange:
    """One client connection to a node's public channel, bytes in, responses out.

    Args:
        node: the node to talk to.
        peer: the TCP peer address the node sees (IPv4 or IPv6).
    """

    def __init__(self, node: KuraNode, *, peer: str = "127.0.0.1") -> None:
        self.node = node
        address = (
            IPv6Address("TCP", peer, 50000) if ":" in peer else IPv4Address("TCP", peer, 50000)
        )
        self.transport = ClientTransport(peerAddress=address)
        self.channel = node.site.make_channel()
        self.channel.makeConnection(self.transport)
        self._pending = b""
        self._heads: list[bool] = []

    def send(self, data: bytes, *, heads: list[bool] | None = None) -> None:
        """Feed raw bytes; ``heads`` flags which expected responses answer HEADs."""
        self._heads.extend(heads or [])
        self.channel.dataReceived(data)

    def responses(self) -> list[Response]:
        """Everything the server completed so far (interim responses skipped)."""
        self._pending += self.transport.value()
        self.transport.clear()
        found, self._pending = parse_responses(self._pending, self._heads)
        return found

    @property
    def closed(self) -> bool:
        """Whether the server closed (or is closing, or half-closed) the connection."""
        return bool(
            self.transport.disconnecting
            or self.transport.disconnected
            or self.transport.write_closed
        )

    def disconnect(self) -> None:
        """The client goes away, in the order a TCP transport reports it.

        As ``FileDescriptor.connectionLost`` does, the transport's producer
        (the channel, which forwards to a response body producer) is stopped
        first, then the protocol loses its connection.
        """
        producer = self.transport.producer
        if producer is not None:
            producer.stopProducing()
        self.transport.disconnected = True
        self.channel.connectionLost(Failure(ConnectionDone("client went away")))

    def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request with a Content-Length body and return its response."""
        lines = [f"{method} {target} HTTP/1.1", "Host: kura"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.send(raw, heads=[method == "HEAD"])
        responses = self.responses()
        assert len(responses) == 1, f"expected one response, got {responses!r}"
        return responses[0]


def request(
    node: KuraNode,
    method: str,
    target: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """One request on a fresh connection to ``node`` (see :meth:`Exchange.request`)."""
    return Exchange(node).request(method, target, body, headers)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RealNode:
    """A ``twistd kura`` subprocess on loopback ports, for real-socket tests.

    Args:
        data_dir: the node's data directory (kept across restarts).
        launcher: a command prefix that ends by exec-ing its arguments (to
            start the node inside a cgroup, say).
        environ: extra ``KURA_*`` variables.

    The node's stdout/stderr go to ``<data_dir>.log``.
    """

    def __init__(self, data_dir: str, launcher: Sequence[str] = (), **environ: str) -> None:
        self.data_dir = data_dir
        self.launcher = list(launcher)
        self.port = free_port()
        self.internal_port = free_port()
        self.environ = {
            "KURA_DATA_DIR": data_dir,
            "KURA_PORT": str(self.port),
            "KURA_INTERNAL_PORT": str(self.internal_port),
            "KURA_NODE_URL": f"http://127.0.0.1:{self.internal_port}",
            "KURA_BIND_HOST": "127.0.0.1",
            "KURA_CAS_CAPACITY_BYTES": str(1 << 32),
            **environ,
        }
        self.log_path = data_dir.rstrip("/") + ".log"
        self.process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    def start(self, timeout: float = 20.0) -> RealNode:
        """Start the process and wait until ``/up`` answers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KURA_")}
        env.update(self.environ)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            [*self.launcher, twistd, "--nodaemon", "--pidfile=", "kura"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=os.path.dirname(self.data_dir.rstrip("/")) or ".",
        )
        log.close()
        self.wait_until_up(timeout)
        return self

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/up", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"node did not come up: {self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()[-4000:]
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the status."""
        if self.process is None or self.process.poll() is not None:
            return int(self.process.returncode) if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return int(self.process.wait(timeout))
        except subprocess.TimeoutExpired:
            self.process.kill()
            return int(self.process.wait())

    def kill(self) -> None:
        """SIGKILL (a crash, from the application's point of view)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class RawClient:
    """A blocking HTTP/1.1 client on a raw socket (run it off the reactor thread).

    It sends exactly the bytes it is given and parses responses with
    :func:`parse_responses`, so tests control framing and pipelining.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        receive_buffer: int | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Set before connecting so the advertised window stays small: a
            # slow reader that really pushes back on the server.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self._pending = b""
        self._heads: list[bool] = []
        self.eof = False

    def send(self, data: bytes, *, heads: list[bool] | None = None) -> None:
        self._heads.extend(heads or [])
        self.sock.sendall(data)

    def get(self, target: str, **headers: str) -> None:
        """Send one GET (header names use ``_`` for ``-``)."""
        lines = [f"GET {target} HTTP/1.1", "Host: kura"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), heads=[False])

    def read_responses(self, count: int) -> list[Response]:
        """Read until ``count`` complete responses arrived (or the server closed)."""
        found: list[Response] = []
        while len(found) < count:
            parsed, self._pending = parse_responses(self._pending, self._heads)
            found += parsed
            if len(found) >= count or self.eof:
                break
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                self.eof = True
                parsed, self._pending = parse_responses(self._pending, self._heads)
                found += parsed
                break
            self._pending += chunk
        return found

    def wait_for(self, size: int) -> None:
        """Block until at least ``size`` bytes arrived, keeping them for parsing."""
        while len(self._pending) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                self.eof = True
                return
            self._pending += chunk

    def read_raw(self, size: int) -> bytes:
        """Read up to ``size`` raw bytes (whatever arrives first)."""
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return self.sock.recv(size)

    def server_closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self._pending += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def reset(self) -> None:
        """Close abruptly (RST), as a client that gives up mid-download."""
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
