"""Small-artifact (4 KiB) PUT and GET throughput of one kura node.

Starts a ``twistd kura`` node on 127.0.0.1 (a fresh data directory per
repetition, default settings plus any ``KURA_*`` variables in the
environment), and drives it with wrk:

* ``Xcode CAS POST`` — ``POST /api/cache/cas/{id}?tenant_id=default``, a new id
  per request (every request stores and fsyncs a new artifact);
* ``Gradle PUT`` — ``PUT /api/cache/gradle/{key}?tenant_id=default``, likewise;
* ``Xcode CAS GET`` and ``Gradle GET`` — round-robin over ``--keys``
  artifacts uploaded before the measurement.

Each cell is measured at every ``--concurrency`` for ``--duration`` seconds,
``--repeat`` times. Every response status is checked in wrk's Lua
``response`` hook (anything but 2xx is an error). Prints a markdown table
(median [min-max] over repetitions) and the command, and saves the report
and raw samples to ``benchmarks/results/``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/small_artifacts.py [--duration 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

import _common as common
import disk_rate

BODY_SIZE = 4 * common.KiB


@dataclass(frozen=True)
class Operation:
    """One measured request kind: its table label, HTTP method and route prefix."""

    label: str
    method: str
    prefix: str

    @property
    def is_write(self) -> bool:
        return self.method != "GET"


OPERATIONS = [
    Operation("Xcode CAS POST", "POST", "/api/cache/cas/"),
    Operation("Gradle PUT", "PUT", "/api/cache/gradle/"),
    Operation("Xcode CAS GET", "GET", "/api/cache/cas/"),
    Operation("Gradle GET", "GET", "/api/cache/gradle/"),
]
#: The samples of the disk reference (``disk_rate.reference``) carry this operation.
DISK_REFERENCE = "disk reference"
_WRITE_METHOD = {"/api/cache/cas/": "POST", "/api/cache/gradle/": "PUT"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per cell (10)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, fresh node each (3)")
    parser.add_argument(
        "--concurrency",
        type=common.parse_int_list,
        default=[1, 8, 20],
        help="comma list of wrk connection counts (1,8,20)",
    )
    parser.add_argument(
        "--keys", type=int, default=1000, help="pre-uploaded artifacts per GET route (1000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured seconds per operation per node (1)"
    )
    parser.add_argument(
        "--operations",
        choices=["all", "writes", "reads"],
        default="all",
        help="which rows to measure (all); 'writes' skips the GET pre-upload",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    return parser.parse_args(argv)


def selected(args: argparse.Namespace) -> list[Operation]:
    """The operations ``--operations`` asks for, in table order."""
    if args.operations == "all":
        return OPERATIONS
    writes = args.operations == "writes"
    return [op for op in OPERATIONS if op.is_write == writes]


def populate(port: int, body: bytes, keys: int, nonce: str) -> dict[str, list[str]]:
    """Upload ``keys`` artifacts per route; return the GET paths per route prefix."""
    paths: dict[str, list[str]] = {}
    for prefix, method in _WRITE_METHOD.items():
        paths[prefix] = [f"{prefix}get-{nonce}-{n}{common.TENANT_QUERY}" for n in range(keys)]
        common.upload_many(port, [(method, p, body) for p in paths[prefix]])
        common.check_download(port, paths[prefix][0], hashlib.sha256(body).hexdigest(), len(body))
    return paths


def script_for(
    op: Operation, work: str, tag: str, body_path: str, get_paths: dict[str, list[str]]
) -> str:
    """A wrk script for ``op``; write keys are unique per run (``tag``) and thread."""
    name = f"{op.label.replace(' ', '_')}-{tag}"
    if op.is_write:
        prefix = f"{op.prefix}put-{tag}-{secrets.token_hex(4)}-"
        return common.lua_put_script(work, name, op.method, prefix, body_path)
    return common.lua_get_script(work, name, get_paths[op.prefix])


def run(args: argparse.Namespace, machine: list[str]) -> tuple[str, list[dict[str, Any]]]:
    environ = common.kura_environment({})
    samples: list[dict[str, Any]] = []
    with common.work_directory(args.keep) as work:
        body = os.urandom(BODY_SIZE)
        body_path = os.path.join(work, "body-4KiB")
        with open(body_path, "wb") as handle:
            handle.write(body)
        for rep in range(args.repeat):
            if any(op.is_write for op in selected(args)):
                # The disk reference of this repetition, in the filesystem
                # the node's data directory is on, just before its PUT cells.
                disk = disk_rate.reference(work)
                samples.append(
                    {"operation": DISK_REFERENCE, "repetition": rep, "rps": disk.per_second}
                )
                print(f"  rep {rep} disk reference ({disk.label}) {disk.per_second:>9,.0f}/s")
            server = common.KuraServer(f"rep{rep}", work, environ)
            with common.running(server):
                url = f"http://127.0.0.1:{server.port}/"
                operations = selected(args)
                get_paths = (
                    populate(server.port, body, args.keys, secrets.token_hex(4))
                    if any(not op.is_write for op in operations)
                    else {}
                )
                if args.warmup > 0:
                    for op in operations:
                        script = script_for(op, work, f"warm{rep}", body_path, get_paths)
                        common.run_wrk(url, 8, args.warmup, script, server.pid)
                for concurrency in args.concurrency:
                    for op in operations:
                        tag = f"r{rep}c{concurrency}"
                        script = script_for(op, work, tag, body_path, get_paths)
                        before = common.serving_paths(server.port)
                        result = common.run_wrk(url, concurrency, args.duration, script, server.pid)
                        paths = common.paths_delta(before, common.serving_paths(server.port))
                        sample = {
                            "operation": op.label,
                            "concurrency": concurrency,
                            "repetition": rep,
                            **result.to_json(),
                            "serving_paths": paths,
                        }
                        samples.append(sample)
                        print(
                            f"  rep {rep} c={concurrency:<2} {op.label:<15} "
                            f"{result.rps:>9,.0f} req/s  p50 {result.p50_ms:.2f} ms  "
                            f"p99 {result.p99_ms:.2f} ms  errors {result.error_count}"
                            + (
                                f" (first bad status {result.first_bad_status})"
                                if result.bad_status
                                else ""
                            ),
                            flush=True,
                        )
    return report(args, environ, samples, machine), samples


def report(
    args: argparse.Namespace,
    environ: dict[str, str],
    samples: list[dict[str, Any]],
    machine: list[str],
) -> str:
    disk = {s["repetition"]: s["rps"] for s in samples if s["operation"] == DISK_REFERENCE}
    samples = [s for s in samples if s["operation"] != DISK_REFERENCE]
    rows = []
    for op in OPERATIONS:
        for concurrency in args.concurrency:
            cell = [
                s for s in samples if s["operation"] == op.label and s["concurrency"] == concurrency
            ]
            if not cell:
                continue
            cpu_us = [s["server_cpu_s"] * 1e6 / s["requests"] for s in cell if s["requests"]]
            ratios = [s["rps"] / disk[s["repetition"]] for s in cell if disk.get(s["repetition"])]
            rows.append(
                [
                    op.label,
                    str(concurrency),
                    common.fmt_spread([s["rps"] for s in cell]),
                    common.fmt_spread([s["p50_ms"] for s in cell]),
                    common.fmt_spread([s["p99_ms"] for s in cell]),
                    str(sum(s["error_count"] for s in cell)),
                    common.fmt_spread(cpu_us),
                    common.fmt_spread([s["other_cpu_percent"] for s in cell]),
                    common.fmt_paths(s["serving_paths"] for s in cell)
                    if not op.is_write
                    else "n/a",
                    common.fmt_spread(ratios, _fmt_ratio) if op.is_write and ratios else "n/a",
                ]
            )
    table = common.markdown_table(
        [
            "operation",
            "c",
            "requests/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "server CPU µs/request",
            "other CPU %",
            "GETs served by",
            f"{common.TIMES} disk reference",
        ],
        rows,
    )
    reference = (
        "disk reference = 4 KiB write + fsync + rename + directory fsync on 8 threads "
        "(benchmarks/disk_rate.py), measured before each repetition's node starts, in the "
        f"filesystem of its data directory: {common.fmt_spread(list(disk.values()))} writes/s; "
        f"{common.TIMES} disk reference = the row's requests/s over its repetition's reference."
        if disk
        else ""
    )
    lines = [
        "## Small artifacts (4 KiB), one kura node",
        "",
        f"{args.repeat} {common.TIMES} {args.duration} s per cell, fresh node per repetition; "
        f"median [min{common.DASH}max] over repetitions. errors = non-2xx statuses (checked per "
        "response) + wrk socket errors, summed over repetitions. other CPU % = machine "
        "CPU used by neither the node nor wrk during the run (100 % = one core): load "
        "from other processes, i.e. noise. GETs served by = kura's "
        "kura_artifact_serving_paths_total counters over the runs.",
        "",
        table,
        "",
        *([reference, ""] if reference else []),
        "Command:",
        "",
        "    " + common.command_line(sys.argv, environ),
        "",
        "Machine:",
        "",
        *machine,
        f"- load average (1/5/15 min) at end: {common.load_average()}",
        "",
    ]
    return "\n".join(lines)


def _fmt_ratio(value: float) -> str:
    return f"{value:.2f}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    common.require_tools("wrk")
    common.exit_cleanly_on_sigterm()
    machine = common.machine_summary()
    started = time.monotonic()
    text, samples = run(args, machine)
    elapsed = time.monotonic() - started
    text += f"\nTotal wall time: {elapsed:.0f} s\n"
    common.publish_results("small_artifacts", text, samples)
    errors = sum(s.get("error_count", 0) for s in samples)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
