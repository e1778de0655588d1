"""Instructions per accelerated request, counted by callgrind: a figure this VM's noise cannot move.

CPU time per request varies by ±20 % between minutes here, and the VM gives
no hardware counters (``perf stat -e instructions`` reads nothing), so a
change worth a few percent cannot be told from noise by timing it. This
runs ``accel_inprocess.py`` (one ``SamePortProtocol`` of an in-memory node
on a Unix socket pair) under ``valgrind --tool=callgrind`` for two request
counts and divides the difference in instructions by the difference in
requests: start-up, imports and the first request cancel out. User-space
instructions only (the kernel's side of a syscall is not counted), and an
instruction is not a nanosecond (cache misses are not seen), so it ranks
changes to kura's Python; the throughput benchmarks say what they are worth.

With ``--compare`` it counts a second configuration too and prints, per C
function of the interpreter and libc, where the difference goes (for
example ``_PyBytes_FormatEx`` for ``%`` formatting, ``bytes_translate_impl``
for ``bytes.translate``): the default compares the JSON access log on
against off.

Usage (from the repository root; needs Debian's ``valgrind``)::

    .venv/bin/python benchmarks/instructions.py [--args "--paths one-step"]
        [--compare "--paths one-step --access-log"] [--low 1000] [--high 3000] [--top 25]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

import _common as common

INPROCESS = os.path.join(common.BENCH_DIR, "accel_inprocess.py")
# A function line of callgrind_annotate: "1,234 (0.5%)  file.c:function [object]".
_FUNCTION_LINE = re.compile(r"\s*([\d,]+)\s+\([^)]*\)\s+(.*)")


def count(args: list[str], number: int, work: str) -> tuple[int, dict[str, int]]:
    """Total instructions of one run of ``accel_inprocess.py`` with *number*
    requests, and the instructions of each function (inlined copies summed)."""
    out = os.path.join(work, f"callgrind.{number}")
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        INPROCESS,
        "--number",
        str(number),
        "--repeat",
        "1",
        *args,
    ]
    # A fixed hash seed: dict and set layouts, so their probe counts, repeat.
    environment = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        raise common.BenchmarkError(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    annotated = subprocess.run(
        ["callgrind_annotate", "--threshold=100", out],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions: dict[str, int] = {}
    total = 0
    for line in annotated.splitlines():
        match = _FUNCTION_LINE.match(line)
        if match is None:
            continue
        value = int(match.group(1).replace(",", ""))
        name = match.group(2).split(" [")[0].split(":")[-1].rstrip("'0123456789")
        if name == "PROGRAM TOTALS":
            total = value
        else:
            functions[name] = functions.get(name, 0) + value
    return total, functions


def per_request(args: list[str], low: int, high: int, work: str) -> tuple[float, dict[str, float]]:
    """Instructions per request, in all and per function."""
    total_low, functions_low = count(args, low, work)
    total_high, functions_high = count(args, high, work)
    span = high - low
    return (total_high - total_low) / span, {
        name: (functions_high.get(name, 0) - functions_low.get(name, 0)) / span
        for name in functions_low.keys() | functions_high.keys()
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--args", default="--paths one-step", help="accel_inprocess.py's options")
    parser.add_argument(
        "--compare",
        default="--paths one-step --access-log",
        help='a second configuration ("" for none)',
    )
    parser.add_argument("--low", type=int, default=1000, help="requests of the short run (1000)")
    parser.add_argument("--high", type=int, default=3000, help="requests of the long run (3000)")
    parser.add_argument("--top", type=int, default=25, help="functions listed (25)")
    args = parser.parse_args(argv)
    common.require_tools("valgrind")  # callgrind_annotate comes with it
    with tempfile.TemporaryDirectory() as work:
        base, base_functions = per_request(shlex.split(args.args), args.low, args.high, work)
        print(f"{args.args or '(defaults)'}: {base:,.0f} instructions per request")
        if not args.compare:
            return 0
        other, other_functions = per_request(shlex.split(args.compare), args.low, args.high, work)
    print(
        f"{args.compare}: {other:,.0f} instructions per request "
        f"({other - base:+,.0f}, {other / base:.3f}x)"
    )
    print(f"\nwhere the difference goes (top {args.top} functions by difference):\n")
    rows = sorted(
        (
            (other_functions.get(name, 0.0) - base_functions.get(name, 0.0), name)
            for name in base_functions.keys() | other_functions.keys()
        ),
        reverse=True,
    )
    print(
        common.markdown_table(
            ["difference", "function"], [[f"{diff:+,.0f}", name] for diff, name in rows[: args.top]]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
