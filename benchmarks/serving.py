"""Artifact download throughput: kura's accelerator vs its fallback vs nginx.

Serves random-byte artifacts of 4 KiB, 17,941,067 B and 64 MiB at
concurrency 1, 8 and 20 with wrk (``-t1 -c1`` for one connection, ``-t2 -cN``
otherwise, ``--latency --timeout 60s``), against, in one run:

* ``accel`` — kura, ``KURA_ACCELERATED_FILE_SERVING_ENABLED=true``, mode ``splice``;
* ``accel-sendfile`` — the same in mode ``sendfile``;
* ``accel-log`` — ``accel`` with the JSON access log on (the node's default), to
  compare with ``accel`` in the same run;
* ``fallback`` — kura with the accelerator off (every request through twisted.web);
* ``nginx`` — one worker, ``sendfile on; tcp_nopush on; tcp_nodelay on;
  access_log off``, serving the same bytes from files;
* ``static`` — a plain ``twisted.web.static.File`` (default reactor, access
  log off) serving the same files in a child process: the reference for the
  fallback path, which also goes through twisted.web;
* ``fallback-base`` — ``fallback``, but running the kura of another checkout
  (``--baseline DIR``, e.g. a ``git archive`` of the commit before a change),
  so that before and after are measured in the same run;
* ``proto`` — the accelerator's minimal prototype (``benchmarks/accel_prototype.py``:
  head end, path, cached descriptor, ``send`` + ``sendfile``, nothing else) on
  the same reactor: the floor of the accelerator's design in Python/Twisted.

kura runs other than ``accel-log`` get ``KURA_ACCESS_LOG=false`` when the working tree's
``kura/config/node.py`` declares that variable. The artifacts are uploaded into
each kura node over its API (``POST /api/cache/cas/{id}?tenant_id=default``)
and fetched with ``GET`` on the same route. Before measuring, one GET per
server and size is compared byte for byte with the source file.

Every server is restarted for each repetition, and the server order is
rotated between repetitions. Prints per cell requests/s, MB/s (10^6 B),
p50/p99 latency, server CPU s/GB (utime+stime of the server process and all
its threads and children over the run), the ratios accelerator/nginx and
accelerator/fallback (taken within one repetition, then the median), and a
check against issue 3's targets. Saves the report and raw samples to
``benchmarks/results/``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/serving.py [--duration 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _common as common

SIZES = {"4KiB": 4 * common.KiB, "17.9MB": 17_941_067, "64MiB": 64 * common.MiB}
SERVERS = (
    "accel",
    "accel-sendfile",
    "accel-log",
    "fallback",
    "fallback-base",
    "nginx",
    "static",
    "proto",
)
ACCEL_ON = "KURA_ACCELERATED_FILE_SERVING_ENABLED"
ACCEL_MODE = "KURA_ACCELERATED_FILE_SERVING_MODE"
KURA_SETTINGS = {
    "accel": {ACCEL_ON: "true", ACCEL_MODE: "splice"},
    "accel-sendfile": {ACCEL_ON: "true", ACCEL_MODE: "sendfile"},
    "accel-log": {ACCEL_ON: "true", ACCEL_MODE: "splice"},
    "fallback": {ACCEL_ON: "false"},
    "fallback-base": {ACCEL_ON: "false"},
}


@dataclass(frozen=True)
class Fixture:
    """One artifact: its label, size, source file and digest."""

    label: str
    size: int
    path: str
    sha256: str

    @property
    def kura_path(self) -> str:
        return f"/api/cache/cas/bench-{self.label}{common.TENANT_QUERY}"

    @property
    def nginx_path(self) -> str:
        return f"/{os.path.basename(self.path)}"


@dataclass(frozen=True)
class Target:
    """An issue-3 target: ``numerator/denominator`` at least ``minimum`` for a size."""

    sizes: tuple[str, ...]
    numerator: str
    denominator: str
    minimum: float


TARGETS = (
    Target(("17.9MB", "64MiB"), "accel", "nginx", 0.9),
    Target(("17.9MB", "64MiB"), "accel", "fallback", 1.8),
    Target(("4KiB",), "accel", "fallback", 2.0),
    Target(("4KiB",), "accel", "nginx", 0.25),
    # "Never slower than the fallback in any cell" (all sizes).
    Target(tuple(SIZES), "accel", "fallback", 1.0),
    # Issue 14: the fallback no slower than twisted.web's own static.File.
    Target(("4KiB",), "fallback", "static", 0.8),
)


def parse_sizes(text: str) -> list[str]:
    """Size labels from ``4KiB,17.9MB,64MiB`` or plain byte counts (labelled ``<n>B``)."""
    labels = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in SIZES:
            labels.append(part)
        elif part.isdigit():
            SIZES[f"{part}B"] = int(part)
            labels.append(f"{part}B")
        else:
            raise argparse.ArgumentTypeError(f"unknown size {part!r}; use {', '.join(SIZES)}")
    return labels


def parse_servers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown server(s) {unknown}; use {', '.join(SERVERS)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per cell (10)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (3)")
    parser.add_argument(
        "--sizes", type=parse_sizes, default=list(SIZES), help="comma list (4KiB,17.9MB,64MiB)"
    )
    parser.add_argument(
        "--concurrency",
        type=common.parse_int_list,
        default=[1, 8, 20],
        help="comma list of wrk connection counts (1,8,20)",
    )
    parser.add_argument(
        "--servers",
        type=parse_servers,
        default=list(SERVERS),
        help=f"comma list of {', '.join(SERVERS)} (all)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured seconds per size per server start (1)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="the checkout whose kura the fallback-base server runs (required for it)",
    )
    args = parser.parse_args(argv)
    if "fallback-base" in args.servers and not args.baseline:
        parser.error("the fallback-base server needs --baseline DIR")
    return args


def kura_overrides(name: str) -> dict[str, str]:
    """The environment of kura server ``name`` (access log off when kura supports it,
    except for ``accel-log``, which keeps the default: on)."""
    settings = dict(KURA_SETTINGS[name])
    if name != "accel-log" and common.kura_knows("KURA_ACCESS_LOG"):
        settings["KURA_ACCESS_LOG"] = "false"
    return settings


def make_fixtures(work: str, labels: list[str]) -> list[Fixture]:
    directory = os.path.join(work, "files")
    os.makedirs(directory, exist_ok=True)
    fixtures = []
    for label in labels:
        path = os.path.join(directory, f"{label}.bin")
        common.write_random_file(path, SIZES[label])
        fixtures.append(Fixture(label, SIZES[label], path, common.sha256_file(path)))
    return fixtures


def make_server(
    name: str,
    work: str,
    rep: int,
    fixtures: list[Fixture],
    environ: dict[str, str],
    baseline: str | None = None,
) -> tuple[common.Server, Callable[[Fixture], str]]:
    """The server ``name`` (not started) and how to address a fixture on it."""
    if name == "nginx":
        root = os.path.dirname(fixtures[0].path)
        server = common.NginxServer(f"rep{rep}", work, root, fixtures[0].nginx_path)
        return server, lambda fixture: fixture.nginx_path
    if name in ("static", "proto"):
        root = os.path.dirname(fixtures[0].path)
        build = common.static_file_server if name == "static" else common.prototype_server
        child = build(f"{name}-rep{rep}", work, root, fixtures[0].nginx_path)
        return child, lambda fixture: fixture.nginx_path
    env = {**environ, **kura_overrides(name)}
    source = baseline if name == "fallback-base" else None
    return common.KuraServer(f"{name}-rep{rep}", work, env, source), lambda f: f.kura_path


def prepare(
    server: common.Server, fixtures: list[Fixture], path_of: Callable[[Fixture], str]
) -> None:
    """Upload the fixtures (kura) and byte-check one GET of each."""
    for fixture in fixtures:
        if isinstance(server, common.KuraServer):
            status, answer = common.http_call(
                "127.0.0.1", server.port, "POST", fixture.kura_path, body_file=fixture.path
            )
            if not 200 <= status < 300:
                raise common.BenchmarkError(f"upload of {fixture.label}: {status} {answer[:200]!r}")
        common.check_download(server.port, path_of(fixture), fixture.sha256, fixture.size)


def run(args: argparse.Namespace, machine: list[str]) -> tuple[str, list[dict[str, Any]]]:
    environ = common.kura_environment({})
    samples: list[dict[str, Any]] = []
    with common.work_directory(args.keep) as work:
        fixtures = make_fixtures(work, args.sizes)
        script = common.write_lua(work, "get", check_status=False)
        for rep in range(args.repeat):
            shift = rep % len(args.servers)
            order = args.servers[shift:] + args.servers[:shift]
            print(f"repetition {rep + 1}/{args.repeat}: {', '.join(order)}", flush=True)
            for name in order:
                server, path_of = make_server(name, work, rep, fixtures, environ, args.baseline)
                with common.running(server):
                    prepare(server, fixtures, path_of)
                    samples += measure(args, name, server, rep, fixtures, path_of, script)
    return report(args, environ, samples, machine), samples


def measure(
    args: argparse.Namespace,
    name: str,
    server: common.Server,
    rep: int,
    fixtures: list[Fixture],
    path_of: Callable[[Fixture], str],
    script: str,
) -> list[dict[str, Any]]:
    """Every size and concurrency against one started server."""
    samples = []
    for fixture in fixtures:
        url = f"http://127.0.0.1:{server.port}{path_of(fixture)}"
        if args.warmup > 0:
            common.run_wrk(url, max(args.concurrency), args.warmup, script, server.pid)
        for concurrency in args.concurrency:
            before = common.serving_paths(server.port)
            result = common.run_wrk(url, concurrency, args.duration, script, server.pid)
            paths = common.paths_delta(before, common.serving_paths(server.port))
            samples.append(sample_of(name, fixture, concurrency, rep, result, paths))
            print_sample(samples[-1])
    return samples


def sample_of(
    server: str,
    fixture: Fixture,
    concurrency: int,
    rep: int,
    result: common.WrkResult,
    paths: dict[str, int],
) -> dict[str, Any]:
    body_bytes = result.requests * fixture.size
    short = result.bytes_read < body_bytes
    return {
        "server": server,
        "size": fixture.label,
        "size_bytes": fixture.size,
        "concurrency": concurrency,
        "repetition": rep,
        **result.to_json(),
        "serving_paths": paths,
        # wrk's byte count includes headers; fewer bytes than bodies means
        # something other than the artifact was served.
        "short_bytes": short,
        "error_count": result.error_count + int(short),
        "mb_per_s": body_bytes / result.duration_s / 1e6 if result.duration_s else 0.0,
        "cpu_s_per_gb": result.server_cpu_s / (body_bytes / 1e9) if body_bytes else float("nan"),
        "cpu_us_per_request": result.server_cpu_s * 1e6 / result.requests
        if result.requests
        else float("nan"),
        "wrk_cpu_percent": 100 * result.wrk_cpu_s / result.duration_s if result.duration_s else 0.0,
    }


def print_sample(s: dict[str, Any]) -> None:
    print(
        f"  {s['server']:<15} {s['size']:>6} c={s['concurrency']:<2} "
        f"{s['rps']:>9,.0f} req/s {s['mb_per_s']:>7,.0f} MB/s  p50 {s['p50_ms']:.2f} ms  "
        f"p99 {s['p99_ms']:.2f} ms  cpu {s['cpu_s_per_gb']:.2f} s/GB "
        f"{s['cpu_us_per_request']:.0f} µs/req  errors {s['error_count']}",
        flush=True,
    )


def _cell(samples: list[dict[str, Any]], server: str, size: str, c: int) -> list[dict[str, Any]]:
    return [
        s for s in samples if s["server"] == server and s["size"] == size and s["concurrency"] == c
    ]


def ratios(
    samples: list[dict[str, Any]], numerator: str, denominator: str, size: str, c: int
) -> list[float]:
    """Per-repetition throughput ratios (same repetition, so the same few minutes)."""
    tops = {s["repetition"]: s["rps"] for s in _cell(samples, numerator, size, c)}
    bottoms = {s["repetition"]: s["rps"] for s in _cell(samples, denominator, size, c)}
    return [tops[r] / bottoms[r] for r in sorted(tops) if bottoms.get(r)]


def report(
    args: argparse.Namespace,
    environ: dict[str, str],
    samples: list[dict[str, Any]],
    machine: list[str],
) -> str:
    spread = common.fmt_spread
    lines = [
        "## Artifact serving: kura accelerator vs fallback vs nginx",
        "",
        f"{args.repeat} {common.TIMES} {args.duration} s per cell; servers restarted per "
        f"repetition, order rotated; median [min{common.DASH}max] over repetitions. "
        "MB/s counts body bytes (10^6 B). Server CPU = utime+stime of the server process "
        "tree over the run (100 % = one core for the CPU % columns). other CPU % = machine "
        "CPU used by neither the server nor wrk (other load: noise). errors = wrk socket "
        "errors + statuses >= 400 + short bodies, summed over repetitions. served by = "
        "kura's kura_artifact_serving_paths_total counters over the runs (nginx: none).",
        "",
    ]
    for size in args.sizes:
        rows = []
        for c in args.concurrency:
            for server in args.servers:
                cell = _cell(samples, server, size, c)
                if not cell:
                    continue
                rows.append(
                    [
                        str(c),
                        server,
                        spread([s["rps"] for s in cell]),
                        spread([s["mb_per_s"] for s in cell]),
                        spread([s["p50_ms"] for s in cell]),
                        spread([s["p99_ms"] for s in cell]),
                        spread([s["cpu_s_per_gb"] for s in cell]),
                        spread([s["cpu_us_per_request"] for s in cell]),
                        spread([s["wrk_cpu_percent"] for s in cell]),
                        spread([s["other_cpu_percent"] for s in cell]),
                        str(sum(s["error_count"] for s in cell)),
                        common.fmt_paths(s["serving_paths"] for s in cell),
                    ]
                )
        lines += [
            f"### {size} ({SIZES[size]:,} B)",
            "",
            common.markdown_table(
                [
                    "c",
                    "server",
                    "requests/s",
                    "MB/s",
                    "p50 ms",
                    "p99 ms",
                    "server CPU s/GB",
                    "server CPU µs/req",
                    "wrk CPU %",
                    "other CPU %",
                    "errors",
                    "served by",
                ],
                rows,
            ),
            "",
        ]
    lines += ratio_section(args, samples)
    lines += target_section(args, samples)
    lines += [
        "Command:",
        "",
        "    " + common.command_line(sys.argv, environ),
        "",
        "kura logging: "
        + (
            "KURA_ACCESS_LOG=false (no access log)"
            if common.kura_knows("KURA_ACCESS_LOG")
            else "JSON access log on (KURA_ACCESS_LOG does not exist yet), "
            "one line per request to a file"
        )
        + "; nginx: access_log off.",
        "",
        "nginx configuration:",
        "",
        *("    " + line for line in common.nginx_config("WORK", "FILES", 0).splitlines()),
        "",
        "Machine:",
        "",
        *machine,
        f"- load average (1/5/15 min) at end: {common.load_average()}",
        "",
    ]
    return "\n".join(lines)


def ratio_section(args: argparse.Namespace, samples: list[dict[str, Any]]) -> list[str]:
    pairs = [
        (top, bottom)
        for top, bottom in (
            ("accel", "nginx"),
            ("accel", "fallback"),
            ("accel-sendfile", "nginx"),
            ("accel-sendfile", "fallback"),
            ("fallback", "static"),
            ("fallback-base", "static"),
            ("fallback", "fallback-base"),
            ("accel-log", "accel"),
            ("accel", "proto"),
        )
        if top in args.servers and bottom in args.servers
    ]
    if not pairs:
        return []
    rows = []
    for size in args.sizes:
        for c in args.concurrency:
            row = [size, str(c)]
            row += [common.fmt_spread(ratios(samples, t, b, size, c)) for t, b in pairs]
            rows.append(row)
    headers = ["size", "c", *(f"{t}/{b}" for t, b in pairs)]
    return [
        "### Throughput ratios (same repetition, median [min-max])",
        "",
        common.markdown_table(headers, rows),
        "",
    ]


def target_section(args: argparse.Namespace, samples: list[dict[str, Any]]) -> list[str]:
    rows, met, total = [], 0, 0
    for target in TARGETS:
        if target.numerator not in args.servers or target.denominator not in args.servers:
            continue
        for size in (s for s in args.sizes if s in target.sizes):
            for c in args.concurrency:
                values = ratios(samples, target.numerator, target.denominator, size, c)
                if not values:
                    continue
                value = common.median(values)
                ok = value >= target.minimum
                met += ok
                total += 1
                rows.append(
                    [
                        size,
                        str(c),
                        f"{target.numerator}/{target.denominator} >= {target.minimum:g}",
                        f"{value:.2f}",
                        f"{min(values):.2f}",
                        "yes" if ok else "**no**",
                    ]
                )
    if not rows:
        return ["(targets need the accel, fallback and nginx (or static) servers)", ""]
    return [
        f"### Targets (issues 3 and 14): {met} of {total} met (judged on the median ratio)",
        "",
        common.markdown_table(["size", "c", "target", "median", "worst rep", "met"], rows),
        "",
    ]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    common.require_tools("wrk", "nginx")
    common.exit_cleanly_on_sigterm()
    machine = common.machine_summary()
    cells = len(args.servers) * len(args.sizes) * len(args.concurrency) * args.repeat
    print(
        f"{cells} cells of {args.duration} s (about {cells * args.duration / 60:.0f} min "
        "of measurement plus start-up, upload and warm-up)",
        flush=True,
    )
    started = time.monotonic()
    text, samples = run(args, machine)
    text += f"\nTotal wall time: {time.monotonic() - started:.0f} s\n"
    common.publish_results("serving", text, samples)
    return 1 if any(s["error_count"] for s in samples) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
