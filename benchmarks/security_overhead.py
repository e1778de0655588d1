"""What the trust boundaries cost: token checks on downloads, signatures on replication.

Two measurements, each comparing the guarded configuration with the open
one in the same invocation (``--repeat`` times, a fresh node each time):

* **Downloads with tokens.** One ``twistd kura`` node holding ``--keys``
  4 KiB Xcode CAS artifacts, driven by wrk (round-robin GETs, every status
  checked) at ``--concurrency`` connections for ``--duration`` seconds, in
  three modes: ``open`` (no tokens, no extension), ``token`` (a read token
  sent as ``Authorization: Bearer``, checked on the accelerated path) and
  ``anonymous-read`` (tokens configured, reads allowed without one). Reports
  requests per second and server CPU per request.
* **Replication with signatures.** Two nodes of a loopback mesh, ``signed``
  (``KURA_PEER_SECRET``: every request and response signed, every body
  hashed by the sender and checked by the receiver) or ``unsigned``
  (``KURA_INTERNAL_INSECURE=true``). ``--small`` 4 KiB and ``--large``
  ``--large-mib`` MiB artifacts are written into A; the time until A's
  outbox is empty (B has them all) and the CPU both processes spent are
  reported.

Access logs are off (``KURA_ACCESS_LOG=false``) so the figures show the
checks, not log formatting. It asserts nothing; it prints markdown.

Usage (from the repository root; needs ``wrk`` from Debian)::

    .venv/bin/python benchmarks/security_overhead.py [--duration 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time

import _common as common

from tests.support.mesh import (
    HOSTS,
    MESH_SECRET,
    MeshNode,
    get_json,
    request,
    shared_port,
    wait_for,
)

READ_TOKEN = "bench-read-token-0123456789abcdef"
WRITE_TOKEN = "bench-write-token-0123456789abcdef"
MODES = {
    "open": ({}, None),
    "token": (
        {"KURA_AUTH_READ_TOKENS": READ_TOKEN, "KURA_AUTH_WRITE_TOKENS": WRITE_TOKEN},
        READ_TOKEN,
    ),
    "anonymous-read": (
        {"KURA_AUTH_WRITE_TOKENS": WRITE_TOKEN, "KURA_AUTH_ANONYMOUS_READ": "true"},
        None,
    ),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run (8)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (3)")
    parser.add_argument("--concurrency", type=int, default=8, help="wrk connections (8)")
    parser.add_argument("--keys", type=int, default=256, help="4 KiB artifacts to GET (256)")
    parser.add_argument("--small", type=int, default=1000, help="4 KiB writes to replicate")
    parser.add_argument("--large", type=int, default=8, help="large writes to replicate (8)")
    parser.add_argument("--large-mib", type=int, default=32, help="size of a large write (32)")
    parser.add_argument("--skip-downloads", action="store_true")
    parser.add_argument("--skip-replication", action="store_true")
    return parser.parse_args(argv)


def get_script(directory: str, paths: list[str], token: str | None) -> str:
    """Round-robin GETs, with the bearer token on every request when given."""
    name = "get-token" if token else "get-anonymous"
    return common.lua_get_script(directory, name, paths, bearer=token)


def measure_downloads(args: argparse.Namespace, work: str) -> dict[str, list[common.WrkResult]]:
    results: dict[str, list[common.WrkResult]] = {mode: [] for mode in MODES}
    body = os.urandom(4 * common.KiB)
    paths = [f"/api/cache/cas/k{n}?tenant_id=default" for n in range(args.keys)]
    for rep in range(args.repeat):
        for mode, (environ, token) in MODES.items():
            server = common.KuraServer(
                f"{mode}-{rep}", work, {**environ, "KURA_ACCESS_LOG": "false"}
            )
            with common.running(server):
                uploads = [("POST", path, body) for path in paths]
                write = {"Authorization": f"Bearer {WRITE_TOKEN}"} if mode != "open" else {}
                for method, path, data in uploads:
                    status, _, answer = request(
                        method, f"http://127.0.0.1:{server.port}{path}", data, write
                    )
                    if status != 204:
                        raise common.BenchmarkError(f"upload answered {status}: {answer[:200]!r}")
                script = get_script(work, paths, token)
                url = f"http://127.0.0.1:{server.port}"
                common.run_wrk(url, args.concurrency, 1, script, server.pid)  # warm up
                result = common.run_wrk(url, args.concurrency, args.duration, script, server.pid)
                if result.error_count:
                    raise common.BenchmarkError(f"{mode}: {result.error_count} bad answers")
                results[mode].append(result)
                print(
                    f"downloads {mode} rep {rep}: {result.rps:,.0f} req/s, "
                    f"{1e6 * result.server_cpu_s / max(result.requests, 1):.1f} us CPU/request",
                    flush=True,
                )
    return results


def measure_replication(args: argparse.Namespace, work: str) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {"unsigned": [], "signed": []}
    small = os.urandom(4 * common.KiB)
    large_path = os.path.join(work, "large.bin")
    common.write_random_file(large_path, args.large_mib * common.MiB)
    with open(large_path, "rb") as handle:
        large = handle.read()
    for rep in range(args.repeat):
        for mode, runs in results.items():
            runs.append(
                replicate_once(args, os.path.join(work, f"mesh-{mode}-{rep}"), mode, small, large)
            )
            print(f"replication {mode} rep {rep}: {runs[-1]}", flush=True)
    return results


def replicate_once(
    args: argparse.Namespace, root: str, mode: str, small: bytes, large: bytes
) -> dict[str, float]:
    """Write the workload into A of a fresh two-node mesh; time until B has it all."""
    os.makedirs(root)
    hosts = list(HOSTS[:2])
    port = shared_port(hosts)
    urls = [f"http://{host}:{port}" for host in hosts]
    auth = (
        {"KURA_PEER_SECRET": MESH_SECRET}
        if mode == "signed"
        else {"KURA_PEER_SECRET": "", "KURA_INTERNAL_INSECURE": "true"}
    )
    settings = {**auth, "KURA_ACCESS_LOG": "false"}
    a = MeshNode(f"{root}/a", hosts[0], port, KURA_PEERS=urls[1], **settings)
    b = MeshNode(f"{root}/b", hosts[1], port, KURA_PEERS=urls[0], **settings)
    a.start()
    b.start()
    try:
        wait_for("peers", lambda: get_json(a.url + "/ready")["known_peers"] == 1, 30)
        pids = (a.process.pid, b.process.pid)
        cpu_before = sum(common.tree_cpu_seconds(pid) for pid in pids)
        started = time.monotonic()
        for n in range(args.small):
            request("POST", a.url + f"/api/cache/cas/s{n}?tenant_id=default", small)
        for n in range(args.large):
            request("PUT", a.url + f"/api/cache/gradle/l{n}?tenant_id=default", large)
        wait_for(
            "A's outbox drained",
            lambda: get_json(a.url + "/status/rollout")["outbox_messages"] == 0,
            600,
            interval=0.05,
        )
        seconds = time.monotonic() - started
        cpu = sum(common.tree_cpu_seconds(pid) for pid in pids) - cpu_before
        return {"seconds": seconds, "cpu": cpu}
    finally:
        a.stop()
        b.stop()


def report(
    args: argparse.Namespace,
    downloads: dict[str, list[common.WrkResult]],
    replication: dict[str, list[dict[str, float]]],
) -> str:
    lines = ["## Security overhead", "", *common.machine_summary(), ""]
    if downloads:
        rows = []
        for mode, runs in downloads.items():
            rps = [r.rps for r in runs]
            cpu = [1e6 * r.server_cpu_s / max(r.requests, 1) for r in runs]
            ratio = [r.rps / o.rps for r, o in zip(runs, downloads["open"], strict=True)]
            rows.append(
                [mode, common.fmt_spread(rps), common.fmt_spread(cpu), common.fmt_spread(ratio)]
            )
        lines += [
            f"Accelerated 4 KiB GETs, wrk c={args.concurrency}, {args.duration} s, "
            f"{args.repeat} repetitions (median [min-max]):",
            "",
            common.markdown_table(
                ["mode", "req/s", "server CPU us/request", "req/s vs open"], rows
            ),
            "",
        ]
    if replication:
        rows = []
        for mode, runs in replication.items():
            seconds = [r["seconds"] for r in runs]
            cpu = [r["cpu"] for r in runs]
            rows.append([mode, common.fmt_spread(seconds), common.fmt_spread(cpu)])
        volume = args.small * 4 / 1024 + args.large * args.large_mib
        lines += [
            f"Replicating {args.small} x 4 KiB + {args.large} x {args.large_mib} MiB "
            f"({volume:.0f} MiB) from A to B, {args.repeat} repetitions:",
            "",
            common.markdown_table(["mode", "seconds until B has all", "CPU s (A+B)"], rows),
            "",
        ]
    lines += ["Command:", "", "    " + " ".join([sys.executable, *sys.argv]), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    common.require_tools("wrk")
    common.exit_cleanly_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="kura-security-bench-") as work:
        downloads = {} if args.skip_downloads else measure_downloads(args, work)
        replication = {} if args.skip_replication else measure_replication(args, work)
    print(report(args, downloads, replication))
    return 0


if __name__ == "__main__":
    secrets.token_hex()  # fail early on a machine without an entropy source
    sys.exit(main(sys.argv[1:]))
