"""Two configurations of one kura side by side: the ratio of B to A, pair by pair.

``serving.py`` restarts its servers for every repetition and measures each for
several seconds, so a ratio between two kura configurations (issue 14's
``accel-log/accel``) rests on three pairs that this shared VM's drift (±20 %
between minutes) can swamp. Here both nodes run at once (one idles while the
other is measured), ``wrk`` alternates between them in short runs (A then B,
then B then A, ...) and the ratio is taken within each pair, so drift slower
than a pair cancels out. It prints every pair and the median with its
quartiles, of requests/s and of server CPU µs per request.

The default compares the JSON access log (B: the node's default, on) with no
access log (A: ``KURA_ACCESS_LOG=false``), 4 KiB accelerated GETs at c=8.

Usage (from the repository root)::

    .venv/bin/python benchmarks/paired.py [--a KURA_ACCESS_LOG=false] [--b ""]
        [--pairs 16] [--duration 3] [--size 4096] [--concurrency 8] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import _common as common

PATH = "/api/cache/cas/paired?tenant_id=default"


def settings(text: str) -> dict[str, str]:
    """``"KURA_X=1,KURA_Y=2"`` as a mapping (empty text: nothing)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].startswith("KURA_") for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected KURA_NAME=value,...: {text!r}")
    return {name.strip(): value for name, value in pairs}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=settings, default=settings("KURA_ACCESS_LOG=false"))
    parser.add_argument("--b", type=settings, default=settings(""))
    parser.add_argument("--pairs", type=int, default=16, help="A/B pairs (16)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run (3)")
    parser.add_argument("--size", type=int, default=4096, help="artifact bytes (4096)")
    parser.add_argument("--concurrency", type=int, default=8, help="wrk connections (8)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """The 25th, 50th and 75th percentiles."""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def run(args: argparse.Namespace, work: str) -> tuple[list[str], list[dict[str, Any]]]:
    body = os.urandom(args.size)
    script = common.lua_get_script(work, "get", [PATH])
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                common.running(common.KuraServer(name, work, common.kura_environment(env)))
            )
            for name, env in (("a", args.a), ("b", args.b))
        ]
        for server in servers:
            common.upload_many(server.port, [("POST", PATH, body)])
            common.run_wrk(
                f"http://127.0.0.1:{server.port}", args.concurrency, 2, script, server.pid
            )
        samples: list[dict[str, Any]] = []
        rows = []
        for pair in range(args.pairs):
            order = (0, 1) if pair % 2 == 0 else (1, 0)
            results: dict[int, common.WrkResult] = {}
            for index in order:
                server = servers[index]
                url = f"http://127.0.0.1:{server.port}"
                results[index] = common.run_wrk(
                    url, args.concurrency, args.duration, script, server.pid
                )
            a, b = results[0], results[1]
            if a.error_count or b.error_count:
                raise common.BenchmarkError(f"pair {pair + 1}: errors {a.errors} / {b.errors}")
            cpu_a = 1e6 * a.server_cpu_s / a.requests
            cpu_b = 1e6 * b.server_cpu_s / b.requests
            samples.append(
                {"pair": pair + 1, "a": a.to_json(), "b": b.to_json(), "ratio": b.rps / a.rps}
            )
            rows.append(
                [
                    str(pair + 1),
                    "A, B" if order == (0, 1) else "B, A",
                    common.fmt_number(a.rps),
                    common.fmt_number(b.rps),
                    f"{b.rps / a.rps:.3f}",
                    f"{cpu_a:.1f}",
                    f"{cpu_b:.1f}",
                    f"{cpu_a / cpu_b:.3f}",
                    f"{max(a.other_cpu_percent, b.other_cpu_percent):.1f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    ratios = [s["ratio"] for s in samples]
    cpu_ratios = [float(row[7]) for row in rows]
    lines = [
        "## Paired A/B of two kura configurations",
        "",
        f"A: {args.a or '(defaults)'}; B: {args.b or '(defaults)'}. {args.size} B artifact, "
        f"accelerated GETs, wrk c={args.concurrency}, {args.pairs} pairs of "
        f"{args.duration} s runs, both nodes up throughout, the order alternating.",
        "",
        common.markdown_table(
            [
                "pair",
                "order",
                "A req/s",
                "B req/s",
                "B/A req/s",
                "A CPU µs/req",
                "B CPU µs/req",
                "A/B CPU",
                "other CPU %",
            ],
            rows,
        ),
        "",
    ]
    for name, values in (("B/A requests/s", ratios), ("A/B CPU per request", cpu_ratios)):
        q1, q2, q3 = quartiles(values)
        lines.append(
            f"- {name}: median **{q2:.3f}**, quartiles {q1:.3f} to {q3:.3f}, "
            f"range {min(values):.3f} to {max(values):.3f}"
        )
    return lines, samples


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    common.require_tools("wrk")
    common.exit_cleanly_on_sigterm()
    machine = common.machine_summary()
    started = time.monotonic()
    with common.work_directory(args.keep) as work:
        lines, samples = run(args, work)
    lines += [
        "",
        "Command:",
        "",
        "    " + common.command_line(sys.argv, {}),
        "",
        "Machine:",
        "",
        *machine,
        f"- load average (1/5/15 min) at end: {common.load_average()}",
        "",
        f"Total wall time: {time.monotonic() - started:.0f} s",
        "",
    ]
    text = "\n".join(lines)
    common.publish_results("paired", text, samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
