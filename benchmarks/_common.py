"""Shared machinery for kura's benchmark scripts.

The scripts print figures; they assert nothing about speed. This module owns
everything two of them would otherwise repeat:

* checking that the Debian tools (``wrk``, ``nginx``) are installed;
* starting and stopping the servers under test on 127.0.0.1 — a ``twistd
  kura`` subprocess through :class:`kura.testing.RealNode`, or an nginx with
  a generated configuration — and never leaving one behind;
* uploading fixtures over kura's HTTP API and byte-checking downloads;
* generating wrk Lua scripts (unique PUT keys, round-robin GETs, a status
  check in the ``response`` hook, a machine-readable ``done`` summary) and
  running wrk;
* reading a server's CPU time (utime+stime of the process, its threads and
  its children) from ``/proc``;
* medians, ratios and markdown tables.

Import it from a script in ``benchmarks/`` (the scripts put this directory
on ``sys.path`` by being run as files). Importing it also puts the checkout
first on ``sys.path``, so the node under test is the working tree and not a
copy installed into the venv.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, Protocol

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")

# The venv holds an installed copy of kura; the benchmark must measure the
# working tree (RealNode derives the node's PYTHONPATH from where kura.testing
# was imported from).
if sys.path[0:1] != [REPO_ROOT]:
    sys.path.insert(0, REPO_ROOT)

KiB = 1024
MiB = 1024 * KiB
TENANT_QUERY = "?tenant_id=default"
#: Typography of the printed tables (escaped: the source stays ASCII).
DASH = "\u2013"
TIMES = "\u00d7"

#: KURA_* variables the harness sets itself; the caller's values are ignored.
_HARNESS_OWNED = frozenset(
    {
        "KURA_DATA_DIR",
        "KURA_PORT",
        "KURA_INTERNAL_PORT",
        "KURA_GRPC_PORT",
        "KURA_NODE_URL",
        "KURA_BIND_HOST",
    }
)


class BenchmarkError(RuntimeError):
    """A benchmark could not produce a valid figure (bad status, byte mismatch, ...)."""


# -- tools and process hygiene ---------------------------------------------------------


def require_tools(*names: str) -> None:
    """Exit with the Debian install command when a required tool is missing.

    Never installs anything itself.
    """
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        sys.stderr.write(
            f"missing tool(s): {', '.join(missing)}\n"
            f"install them with:  apt-get install -y {' '.join(missing)}\n"
        )
        raise SystemExit(2)


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks stop the servers."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _wait_for_http(url_host: str, port: int, path: str, timeout: float) -> None:
    """Poll until ``GET path`` answers 200 (raise ``TimeoutError`` otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _ = http_call(url_host, port, "GET", path)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"http://{url_host}:{port}{path} did not answer 200")
        time.sleep(0.05)  # a start-up poll, not test synchronization


# -- CPU accounting from /proc -----------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (``None`` when gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            raw = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain spaces or ")".
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of ``root``, its threads and its children, in seconds.

    ``/proc/PID/stat`` of a process already sums all its threads; live
    children (nginx's worker) are added from their own entries, and children
    that exited and were reaped are included through cutime/cstime.
    """
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # After the name: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14.
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy since boot (``/proc/stat``), in seconds."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(v) for v in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- servers -------------------------------------------------------------------------------


class Server(Protocol):
    """A server under test, listening on 127.0.0.1."""

    name: str

    @property
    def port(self) -> int: ...

    @property
    def pid(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def log_tail(self) -> str: ...


def kura_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """The caller's ``KURA_*`` variables (minus the ones the harness owns) plus ``overrides``.

    ``RealNode`` drops the parent's ``KURA_*`` variables, so they are passed
    on explicitly: a benchmark runs with the configuration it was started in.
    """
    inherited = {
        name: value
        for name, value in os.environ.items()
        if name.startswith("KURA_") and name not in _HARNESS_OWNED
    }
    return {**inherited, **overrides}


def kura_knows(variable: str) -> bool:
    """Whether the working tree's ``kura/config/node.py`` declares ``variable``."""
    from kura.config import VARIABLES

    return any(v.name == variable for v in VARIABLES)


class KuraServer:
    """A ``twistd kura`` node with a fresh data directory under ``work_dir``
    (running the kura of ``source``, a checkout, when given)."""

    def __init__(
        self, name: str, work_dir: str, environ: Mapping[str, str], source: str | None = None
    ) -> None:
        from tests.support.real import REPO_ROOT, RealNode

        self.name = name
        self.environ = dict(environ)
        data_dir = os.path.join(work_dir, f"kura-{name}", "data")
        os.makedirs(os.path.dirname(data_dir), exist_ok=True)
        # ``source``: another checkout's kura (a baseline), else this one's.
        self.node = RealNode(data_dir, source=os.path.abspath(source or REPO_ROOT), **self.environ)

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def pid(self) -> int:
        return int(self.node.process.pid)

    def start(self) -> None:
        self.node.start(timeout=30.0)

    def stop(self) -> None:
        if self.node.process is not None:
            self.node.stop(timeout=20.0)

    def log_tail(self) -> str:
        return self.node.log()


NGINX_CONF = """\
# generated by benchmarks/_common.py
daemon off;
master_process on;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    # kura never closes a keep-alive connection after N requests; nginx's
    # default (1000) would make wrk reconnect 100+ times a second at 4 KiB.
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def nginx_config(work: str, root: str, port: int) -> str:
    """The nginx configuration used for the comparison (paths and port filled in)."""
    return NGINX_CONF.format(work=work, root=root, port=port)


class ChildServer:
    """A reference server in a child process serving the files in ``root``.

    Subclasses start :attr:`process` in :meth:`start` and name the file
    :meth:`log_tail` reads; the work directory, port and pid are shared.
    """

    #: The file in the work directory that tells why the server failed.
    log_name = "output.log"

    def __init__(
        self, name: str, work_dir: str, root: str, probe_path: str, work_name: str
    ) -> None:
        self.name = name
        self.root = root
        self.probe_path = probe_path
        self.work = os.path.join(work_dir, work_name)
        os.makedirs(self.work, exist_ok=True)
        from tests.support.real import free_port

        self._port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _wait_until_up(self, what: str) -> None:
        try:
            _wait_for_http("127.0.0.1", self._port, self.probe_path, timeout=15.0)
        except TimeoutError:
            raise BenchmarkError(f"{what} did not come up: {self.log_tail()}") from None

    def _terminate(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.work, self.log_name), encoding="utf-8") as handle:
                return handle.read()[-4000:]
        except FileNotFoundError:
            return ""


class NginxServer(ChildServer):
    """nginx serving the files in ``root`` (one worker, sendfile on, no access log)."""

    log_name = "error.log"

    def __init__(self, name: str, work_dir: str, root: str, probe_path: str) -> None:
        super().__init__(name, work_dir, root, probe_path, f"nginx-{name}")
        self._known_pids: set[int] = set()

    @property
    def config_text(self) -> str:
        return nginx_config(self.work, self.root, self._port)

    def start(self) -> None:
        conf = os.path.join(self.work, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as handle:
            handle.write(self.config_text)
        # Run as root, nginx's worker drops to "nobody": it must be able to
        # reach and read the served files.
        _make_world_readable(self.root)
        with open(os.path.join(self.work, "stdout.log"), "ab") as log:
            self.process = subprocess.Popen(
                ["nginx", "-p", self.work, "-e", os.path.join(self.work, "error.log"), "-c", conf],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_up("nginx")
        self._known_pids = set(process_tree(self.process.pid))

    def stop(self) -> None:
        if self.process is None:
            return
        self._known_pids |= set(process_tree(self.process.pid))
        self._terminate(signal.SIGTERM)  # nginx: fast shutdown
        # A killed master can orphan its worker; end exactly the pids we saw.
        for pid in self._known_pids - {self.process.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


#: The ``static`` server: twisted.web's own file resource, nothing of kura's.
STATIC_SERVER = """\
import sys
from twisted.internet import reactor
from twisted.web import server, static
site = server.Site(static.File(sys.argv[1]))
site.log = lambda request: None  # access log off, as for nginx and kura
reactor.listenTCP(int(sys.argv[2]), site, interface="127.0.0.1")
reactor.run()
"""


class PythonFileServer(ChildServer):
    """A Python reference server serving ``root`` in a child process.

    Args:
        program: the interpreter's arguments before ``ROOT PORT``: ``-c``
            and :data:`STATIC_SERVER` (the ``static`` server) or the path of
            ``benchmarks/accel_prototype.py`` (the ``proto`` server).
        what: how a failure to come up names it.
    """

    def __init__(
        self, name: str, work_dir: str, root: str, probe_path: str, program: list[str], what: str
    ) -> None:
        super().__init__(name, work_dir, root, probe_path, name)
        self._program = program
        self._what = what

    def start(self) -> None:
        with open(os.path.join(self.work, self.log_name), "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, *self._program, self.root, str(self._port)],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_up(self._what)

    def stop(self) -> None:
        if self.process is not None:
            self._terminate()


def static_file_server(name: str, work_dir: str, root: str, probe_path: str) -> PythonFileServer:
    """A plain ``twisted.web.static.File`` serving ``root``."""
    return PythonFileServer(name, work_dir, root, probe_path, ["-c", STATIC_SERVER], "static.File")


def prototype_server(name: str, work_dir: str, root: str, probe_path: str) -> PythonFileServer:
    """The accelerator's minimal prototype (``benchmarks/accel_prototype.py``) serving ``root``."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accel_prototype.py")
    return PythonFileServer(name, work_dir, root, probe_path, [script], "the prototype")


def _make_world_readable(root: str) -> None:
    path = os.path.abspath(root)
    while path != "/":
        os.chmod(path, os.stat(path).st_mode | 0o005)
        path = os.path.dirname(path)
    for directory, _, files in os.walk(root):
        for name in files:
            full = os.path.join(directory, name)
            os.chmod(full, os.stat(full).st_mode | 0o004)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Start ``server``; stop it on the way out whatever happens."""
    try:
        server.start()
        yield server
    except BaseException:
        tail = server.log_tail()
        if tail:
            sys.stderr.write(f"--- last log lines of {server.name} ---\n{tail}\n")
        raise
    finally:
        server.stop()


# -- HTTP helpers ------------------------------------------------------------------------


def http_call(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    body_file: str | None = None,
    connection: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    """One request; returns ``(status, body)``. ``body_file`` is streamed."""
    conn = connection or http.client.HTTPConnection(host, port, timeout=120)
    try:
        headers = {"Content-Type": "application/octet-stream"}
        if body_file is not None:
            headers["Content-Length"] = str(os.path.getsize(body_file))
            with open(body_file, "rb") as handle:
                conn.request(method, path, body=handle, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
        conn.request(method, path, body=body, headers=headers if body is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if connection is None:
            conn.close()


def upload_many(port: int, requests: Sequence[tuple[str, str, bytes]], *, workers: int = 8) -> None:
    """Send ``(method, path, body)`` requests over ``workers`` keep-alive connections.

    Raises:
        BenchmarkError: any answer was not 2xx.
    """
    local = threading.local()

    def send(item: tuple[str, str, bytes]) -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        method, path, body = item
        status, answer = http_call("127.0.0.1", port, method, path, body, connection=local.conn)
        if not 200 <= status < 300:
            raise BenchmarkError(f"{method} {path} answered {status}: {answer[:200]!r}")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(send, requests))


SERVING_PATHS_METRIC = "kura_artifact_serving_paths_total"


def serving_paths(port: int) -> dict[str, float]:
    """kura's ``kura_artifact_serving_paths_total`` counters by ``path`` label.

    Empty when the node does not export the metric (or /metrics fails): the
    figure is a cross-check that the intended path served the requests.
    """
    try:
        status, text = http_call("127.0.0.1", port, "GET", "/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    found: dict[str, float] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith(SERVING_PATHS_METRIC + "{"):
            labels, _, value = line.rpartition(" ")
            path = labels.partition('path="')[2].partition('"')[0]
            found[path] = found.get(path, 0.0) + float(value)
    return found


def paths_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}


def fmt_paths(deltas: Iterable[Mapping[str, int]]) -> str:
    """``splice 100 %`` style shares of the serving paths, summed over samples."""
    total: dict[str, int] = {}
    for delta in deltas:
        for path, count in delta.items():
            total[path] = total.get(path, 0) + count
    grand = sum(total.values())
    if not grand:
        return DASH
    shares = sorted(total.items(), key=lambda item: -item[1])
    return ", ".join(f"{path} {100 * count / grand:.3g} %" for path, count in shares)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 * MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def check_download(port: int, path: str, expected_sha256: str, expected_size: int) -> None:
    """GET ``path`` and compare it byte for byte (by SHA-256) with the source.

    Raises:
        BenchmarkError: non-200 status, wrong length or wrong bytes.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        digest, size = hashlib.sha256(), 0
        while block := response.read(1 * MiB):
            digest.update(block)
            size += len(block)
    finally:
        conn.close()
    if response.status != 200 or size != expected_size or digest.hexdigest() != expected_sha256:
        raise BenchmarkError(
            f"GET {path} on port {port}: status {response.status}, {size} bytes; "
            f"expected 200 with {expected_size} bytes of sha256 {expected_sha256[:16]}..."
        )


def write_random_file(path: str, size: int) -> None:
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 4 * MiB))
            handle.write(chunk)
            remaining -= len(chunk)


# -- wrk ---------------------------------------------------------------------------------

_LUA_PRELUDE = """\
-- generated by benchmarks/_common.py
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
  thread:set("bad", 0)
  thread:set("first_bad", 0)
end

function done(summary, latency, requests)
  local bad, first_bad = 0, 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("bad")
    if first_bad == 0 then first_bad = t:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    'KURA_BENCH {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, ' ..
    '"connect": %.0f, "read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f, ' ..
    '"bad_status": %.0f, "first_bad_status": %.0f, ' ..
    '"p50_us": %.1f, "p99_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout, bad, first_bad,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""

# Counting in the response hook makes wrk buffer every body for Lua; fine for
# 4 KiB, but for large files the copy would cost wrk CPU on a shared 2-core
# machine. Large-file scripts rely on wrk's own status count and a byte check.
_LUA_STATUS_HOOK = """
function response(status, headers, body)
  if status < 200 or status > 299 then
    bad = bad + 1
    if first_bad == 0 then first_bad = status end
  end
end
"""


def lua_string(text: str) -> str:
    """A Lua long-bracket literal holding ``text`` verbatim."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def write_lua(directory: str, name: str, body: str = "", *, check_status: bool) -> str:
    """Write a wrk script (prelude + ``body`` [+ status hook]) and return its path."""
    path = os.path.join(directory, f"{name}.lua")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(_LUA_PRELUDE + body + (_LUA_STATUS_HOOK if check_status else ""))
    return path


def lua_put_script(directory: str, name: str, method: str, prefix: str, body_path: str) -> str:
    """Each request ``method``s ``body_path`` to ``prefix<thread>-<n>?tenant_id=default``."""
    body = f"""
local body_path = {lua_string(body_path)}
local prefix = {lua_string(prefix)}
local suffix = {lua_string(TENANT_QUERY)}
local body, counter, headers

function init(args)
  local f = assert(io.open(body_path, "rb"))
  body = f:read("*a")
  f:close()
  counter = 0
  headers = {{["Content-Type"] = "application/octet-stream"}}
end

function request()
  counter = counter + 1
  return wrk.format({lua_string(method)}, prefix .. tid .. "-" .. counter .. suffix, headers, body)
end
"""
    return write_lua(directory, name, body, check_status=True)


def lua_get_script(
    directory: str, name: str, paths: Sequence[str], *, bearer: str | None = None
) -> str:
    """GETs cycling round-robin over ``paths`` (each thread from its own offset).

    With ``bearer``, every request carries it as an ``Authorization`` token.
    """
    listed = ",\n  ".join(lua_string(p) for p in paths)
    header = f'wrk.headers["Authorization"] = {lua_string("Bearer " + bearer)}' if bearer else ""
    body = f"""
local paths = {{
  {listed}
}}
local i
{header}

function init(args)
  i = (tid * 7919) % #paths
end

function request()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""
    return write_lua(directory, name, body, check_status=True)


@dataclass
class WrkResult:
    """One wrk run plus the server CPU it cost."""

    requests: int
    duration_s: float
    bytes_read: int
    errors: dict[str, int]
    bad_status: int
    first_bad_status: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    server_cpu_s: float
    wrk_cpu_s: float
    #: Busy CPU time of the whole machine over the run: what neither the
    #: server nor wrk used is other load (other people's tests), i.e. noise.
    machine_busy_s: float
    command: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def other_cpu_percent(self) -> float:
        """Machine CPU not used by the server or wrk, in % of one core (noise indicator)."""
        other = self.machine_busy_s - self.server_cpu_s - self.wrk_cpu_s
        return max(0.0, 100 * other / self.duration_s) if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + self.bad_status

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "rps": self.rps,
            "error_count": self.error_count,
            "other_cpu_percent": self.other_cpu_percent,
        }


def wrk_command(url: str, connections: int, duration: int, script: str) -> list[str]:
    """The wrk invocation: ``-t1 -c1`` for one connection, ``-t2 -cN`` otherwise."""
    threads = 1 if connections == 1 else 2
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "60s",
        "-s",
        script,
        url,
    ]


def run_wrk(url: str, connections: int, duration: int, script: str, server_pid: int) -> WrkResult:
    """Run wrk against ``url`` and measure the server tree's CPU over the run.

    Raises:
        BenchmarkError: wrk failed or printed no summary.
    """
    command = wrk_command(url, connections, duration, script)
    cpu_before = tree_cpu_seconds(server_pid)
    wrk_before = _children_cpu_seconds()
    busy_before = machine_busy_seconds()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 120, check=False
    )
    busy = machine_busy_seconds() - busy_before
    wrk_cpu = _children_cpu_seconds() - wrk_before
    cpu = tree_cpu_seconds(server_pid) - cpu_before
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("KURA_BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise BenchmarkError(
            f"wrk failed ({done.returncode}): {shlex.join(command)}\n{done.stdout}{done.stderr}"
        )
    data = json.loads(line.removeprefix("KURA_BENCH "))
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        bytes_read=int(data["bytes"]),
        errors={k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout")},
        bad_status=int(data["bad_status"]),
        first_bad_status=int(data["first_bad_status"]),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        server_cpu_s=cpu,
        wrk_cpu_s=wrk_cpu,
        machine_busy_s=busy,
        command=command,
    )


# -- reporting -----------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def fmt_number(value: float) -> str:
    """Thousands separators for big values, 2-3 significant decimals for small ones."""
    if math.isnan(value):
        return DASH
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_spread(values: Sequence[float], fmt: Callable[[float], str] = fmt_number) -> str:
    """``median [min-max]`` (just the value when there is one sample)."""
    if not values:
        return DASH
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(median(values))} [{fmt(min(values))}{DASH}{fmt(max(values))}]"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _run_quiet(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else "?"


def load_average() -> str:
    with open("/proc/loadavg", encoding="ascii") as handle:
        return " ".join(handle.read().split()[:3])


def machine_summary() -> list[str]:
    """Lines describing the machine, the tools and the checkout under test."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    distro = "?"
    with contextlib.suppress(OSError), open("/etc/os-release", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    import twisted

    commit = _run_quiet(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"])
    dirty = _run_quiet(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"])
    return [
        f"- CPU: {os.cpu_count()} {TIMES} {model}; RAM {memory_gib:.0f} GiB",
        f"- OS: {distro}, kernel {platform.release()}",
        f"- Python {platform.python_version()}, Twisted {twisted.__version__}",
        f"- {_run_quiet(['wrk', '--version'])}",
        f"- {_run_quiet(['nginx', '-v'])}",
        f"- kura checkout: {commit}{' (uncommitted changes)' if dirty not in ('', '?') else ''}",
        f"- load average (1/5/15 min) at start: {load_average()}",
    ]


def command_line(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The shell command that reproduces this run (KURA_* from the caller included)."""
    script = os.path.relpath(os.path.abspath(argv[0]), REPO_ROOT)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(environ.items()))
    return (env + " " if env else "") + shlex.join([".venv/bin/python", script, *argv[1:]])


def save_results(prefix: str, report: str, samples: list[dict[str, Any]]) -> tuple[str, str]:
    """Write the report (markdown) and raw samples (JSON) to ``benchmarks/results/``."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = os.path.join(RESULTS_DIR, f"{prefix}-{stamp}.md")
    raw = os.path.join(RESULTS_DIR, f"{prefix}-{stamp}.json")
    with open(md, "w", encoding="utf-8") as handle:
        handle.write(report)
    with open(raw, "w", encoding="utf-8") as handle:
        json.dump(samples, handle, indent=1)
    return md, raw


def publish_results(prefix: str, report: str, samples: list[dict[str, Any]]) -> None:
    """Save the report and samples (:func:`save_results`), print the report and where it went."""
    md, raw = save_results(prefix, report, samples)
    print()
    print(report)
    print(f"saved {os.path.relpath(md)} and {os.path.relpath(raw)}")


@contextlib.contextmanager
def work_directory(keep: bool) -> Iterator[str]:
    """A temporary directory for data, fixtures and scripts (removed unless ``keep``)."""
    path = tempfile.mkdtemp(prefix="kura-bench-")
    try:
        yield path
    finally:
        if keep:
            sys.stderr.write(f"kept work directory {path}\n")
        else:
            shutil.rmtree(path, ignore_errors=True)
