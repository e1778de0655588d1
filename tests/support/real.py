"""Real processes and real sockets for kura's tests and benchmarks.

:class:`RealNode` runs ``twistd kura`` as a subprocess on loopback ports;
:class:`RawClient` speaks HTTP/1.1 over a blocking socket, byte for byte. Use
them where the real process or the real socket is the point; everything else
uses the deterministic helpers in :mod:`kura.testing`.
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
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kura.testing import Response, parse_responses


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    return free_ports(1)[0]


def free_ports(count: int, host: str = "127.0.0.1", avoid: Sequence[int] = ()) -> list[int]:
    """*count* distinct TCP ports that were free a moment ago on *host*, none in *avoid*.

    The probes stay bound until all are chosen: asked one after the other, the
    kernel may hand the same just-released port out twice (a node then refuses
    to start with two of its ports equal).
    """
    probes: list[socket.socket] = []
    try:
        while len(probes) < count:
            probe = socket.socket()
            probe.bind((host, 0))
            probes.append(probe)
        ports = [int(probe.getsockname()[1]) for probe in probes]
        if set(ports) & set(avoid):
            return free_ports(count, host, avoid)
        return ports
    finally:
        for probe in probes:
            probe.close()


#: The checkout the real nodes run (the node imports the working tree).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RealNode:
    """A ``twistd kura`` subprocess on loopback ports, for real-socket tests.

    Args:
        data_dir: the node's data directory (kept across restarts).
        launcher: a command prefix that ends by exec-ing its arguments (to
            start the node inside a cgroup, say).
        source: the tree whose ``kura`` the node imports (the working tree;
            :func:`tests.support.release.previous_release` gives the last
            release's).
        environ: extra ``KURA_*`` variables.

    The node's stdout/stderr go to ``<data_dir>.log``.
    """

    def __init__(
        self,
        data_dir: str,
        launcher: Sequence[str] = (),
        source: str = REPO_ROOT,
        **environ: str,
    ) -> None:
        self.data_dir = data_dir
        self.source = source
        self.launcher = list(launcher)
        self.port, self.internal_port, self.grpc_port, self.https_port = free_ports(4)
        self.environ = {
            "KURA_DATA_DIR": data_dir,
            "KURA_PORT": str(self.port),
            "KURA_INTERNAL_PORT": str(self.internal_port),
            # REAPI over gRPC is on by default (4002): every node gets its own port.
            "KURA_GRPC_PORT": str(self.grpc_port),
            # Opened only when a TLS certificate is configured.
            "KURA_HTTPS_PORT": str(self.https_port),
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
    def grpc_target(self) -> str:
        """The gRPC channel target of the REAPI port."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    def start(self, timeout: float = 20.0) -> RealNode:
        """Start the process and wait until ``/up`` answers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KURA_")}
        env.update(self.environ)
        env["PYTHONPATH"] = self.source + os.pathsep + env.get("PYTHONPATH", "")
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
                raise RuntimeError(f"node exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/up", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"node did not come up: {self.log_tail()}")

    def wait_until_swept(self, timeout: float = 30.0) -> None:
        """Wait until the start-up sweep (orphans, stale staging) has ended.

        ``/up`` answers before it runs; ``/ready`` names it among its reasons
        (``store scan in progress``) until it ends.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=5) as response:
                    reasons = json.loads(response.read())["reasons"]
            except urllib.error.HTTPError as error:
                reasons = json.loads(error.read())["reasons"]
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                reasons = ["unreachable"]
            if "store scan in progress" not in reasons and "unreachable" not in reasons:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the start-up sweep did not end: {self.log_tail()}")

    def log(self) -> str:
        """The node's whole log so far (assertions about what it said must see all of it)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, characters: int = 4000) -> str:
        """The end of the log, for failure messages."""
        return self.log()[-characters:]

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


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, on the real reactor, until ``condition`` holds (polled every 10 ms)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    waited = 0.0
    while not condition():
        assert waited < timeout, "condition not reached"
        await deferLater(reactor, 0.01)
        waited += 0.01


T = TypeVar("T")


async def in_thread(work: Callable[[], T]) -> T:
    """Run blocking client ``work`` on a worker thread while the reactor serves."""
    from twisted.internet.threads import deferToThread

    result: T = await deferToThread(work)
    return result


def call(port: int, method: str, target: str, body: bytes) -> Response:
    """One request with a body on a fresh connection (blocking)."""
    client = RawClient(port)
    head = f"{method} {target} HTTP/1.1\r\nHost: k\r\nContent-Length: {len(body)}\r\n\r\n"
    client.send(head.encode() + body, heads=[False])
    [response] = client.read_responses(1)
    client.close()
    return response
