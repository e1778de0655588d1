"""REAPI v2 over gRPC against the same node's Bazel HTTP cache (issue 16).

Each repetition starts a fresh ``twistd kura`` node on 127.0.0.1 (default
settings plus any ``KURA_*`` variables in the environment) and measures, in
one run:

* ``FindMissingBlobs`` of 10,000 digests (one call), all absent and then all
  present (uploaded first with ``BatchUpdateBlobs``): median call time of
  ``--calls`` calls. The Bazel HTTP protocol has no existence check to
  compare with (Bazel's HTTP client uploads without asking).
* 4 KiB blobs stored per second: ``BatchUpdateBlobs`` of ``--batch`` new
  blobs per call from ``--clients`` threads on one channel, against single
  HTTP ``PUT /bazel/ac/{key}`` (wrk, ``--clients`` connections, a new key per
  request; the action-cache route, because wrk cannot compute each body's
  SHA-256 for the verified CAS route; both are durable writes to the same
  store).
* one 64 MiB blob read: ``ByteStream.Read`` (grpcio client, one stream at a
  time) against the accelerated ``GET /bazel/cas/{sha256}`` (wrk, one
  connection) of the same bytes, for ``--duration`` seconds each.

Prints a markdown table (median [min-max] over ``--repeat`` repetitions), the
two ratios issue 16 sets targets for (Read >= 0.5x HTTP GET; BatchUpdate >=
1x single PUTs), and the command; saves report and samples to
``benchmarks/results/``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/reapi.py [--duration 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time
import uuid
from typing import Any

import _common as common
import grpc

from kura.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from kura.reapi.gen.google.bytestream import bytestream_pb2_grpc as bs_grpc
from kura.reapi.proto import bs_pb2, re_pb2

BLOB = 4 * common.KiB
BIG = 64 * common.MiB
DIGESTS = 10_000
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def digest_of(data: bytes) -> Any:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def unique_blobs(count: int, tag: str) -> list[bytes]:
    """``count`` distinct 4 KiB blobs."""
    seed = os.urandom(BLOB - 48)
    return [
        f"{tag}-{i:020d}-{uuid.uuid4().hex[:8]}".encode().ljust(48, b"-") + seed
        for i in range(count)
    ]


def batch_update(cas: Any, blobs: list[bytes]) -> None:
    response = cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b) for b in blobs
            ]
        ),
        timeout=120,
    )
    bad = [r.status for r in response.responses if r.status.code != 0]
    if bad:
        raise common.BenchmarkError(f"BatchUpdateBlobs failed: {bad[0]}")


def find_missing(cas: Any, blobs: list[bytes], calls: int) -> tuple[float, int]:
    """Median seconds of one FindMissingBlobs of every blob, and how many were missing."""
    request = re_pb2.FindMissingBlobsRequest(blob_digests=[digest_of(b) for b in blobs])
    times = []
    missing = 0
    for _ in range(calls):
        started = time.perf_counter()
        response = cas.FindMissingBlobs(request, timeout=120)
        times.append(time.perf_counter() - started)
        missing = len(response.missing_blob_digests)
    return common.median(times), missing


def call_latency(channel: grpc.Channel, stored: bytes, calls: int) -> tuple[float, float]:
    """Median seconds of GetCapabilities (no reactor hop in open mode) and of
    FindMissingBlobs of one stored, cached digest (one hop into the reactor)."""
    capabilities = re_grpc.CapabilitiesStub(channel)
    cas = re_grpc.ContentAddressableStorageStub(channel)
    caps_request = re_pb2.GetCapabilitiesRequest()
    find_request = re_pb2.FindMissingBlobsRequest(blob_digests=[digest_of(stored)])
    caps_times, find_times = [], []
    for _ in range(calls):
        started = time.perf_counter()
        capabilities.GetCapabilities(caps_request, timeout=30)
        caps_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        cas.FindMissingBlobs(find_request, timeout=30)
        find_times.append(time.perf_counter() - started)
    return common.median(caps_times), common.median(find_times)


def batch_rate(channel: grpc.Channel, clients: int, batch: int, duration: float) -> float:
    """4 KiB blobs stored per second by ``clients`` threads of BatchUpdateBlobs."""
    cas = re_grpc.ContentAddressableStorageStub(channel)
    batches = [unique_blobs(batch, f"warm{i}") for i in range(2)]
    for blobs in batches:
        batch_update(cas, blobs)
    stored = [0] * clients
    errors: list[BaseException] = []
    deadline = time.monotonic() + duration

    def worker(index: int) -> None:
        try:
            n = 0
            while time.monotonic() < deadline:
                blobs = unique_blobs(batch, f"c{index}-{n}")
                batch_update(cas, blobs)
                stored[index] += len(blobs)
                n += 1
        except BaseException as error:
            errors.append(error)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if errors:
        raise common.BenchmarkError(f"BatchUpdateBlobs worker failed: {errors[0]}")
    return sum(stored) / elapsed


def bytestream_read_rate(target: str, digest: Any, duration: float, streams: int) -> float:
    """Bytes per second of whole-blob ByteStream.Reads by ``streams`` threads, one channel each."""
    name = f"blobs/{digest.hash}/{digest.size_bytes}"
    totals = [0] * streams
    errors: list[BaseException] = []
    deadline = time.monotonic() + duration

    def reader(index: int) -> None:
        try:
            with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
                bs = bs_grpc.ByteStreamStub(channel)
                while time.monotonic() < deadline:
                    got = 0
                    for response in bs.Read(bs_pb2.ReadRequest(resource_name=name), timeout=120):
                        got += len(response.data)
                    if got != digest.size_bytes:
                        raise common.BenchmarkError(f"ByteStream.Read returned {got} bytes")
                    totals[index] += got
        except BaseException as error:
            errors.append(error)

    started = time.monotonic()
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise common.BenchmarkError(f"ByteStream.Read failed: {errors[0]}")
    return sum(totals) / (time.monotonic() - started)


def write_big(channel: grpc.Channel, data: bytes) -> Any:
    bs = bs_grpc.ByteStreamStub(channel)
    digest = digest_of(data)
    name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
    step = common.MiB

    def requests() -> Any:
        for offset in range(0, len(data), step):
            yield bs_pb2.WriteRequest(
                resource_name=name if offset == 0 else "",
                write_offset=offset,
                data=data[offset : offset + step],
                finish_write=offset + step >= len(data),
            )

    bs.Write(requests(), timeout=300)
    return digest


def ac_put_script(directory: str, name: str, body_path: str) -> str:
    """wrk: each request PUTs the body to ``/bazel/ac/{64 digits}``, a new key each time."""
    body = f"""
local body_path = {common.lua_string(body_path)}
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
  local key = string.format("%048d%08d%08d", os.time(), tid, counter)
  return wrk.format("PUT", "/bazel/ac/" .. key, headers, body)
end
"""
    return common.write_lua(directory, name, body, check_status=True)


def one_repetition(args: argparse.Namespace, work: str, index: int) -> dict[str, Any]:
    server = common.KuraServer(f"reapi-{index}", work, common.kura_environment({}))
    sample: dict[str, Any] = {"repetition": index}
    with common.running(server):
        target = server.node.grpc_target
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            # FindMissingBlobs: 10,000 absent, then the same 10,000 present.
            blobs = unique_blobs(DIGESTS, f"fm{index}")
            sample["find_missing_absent_s"], missing = find_missing(cas, blobs, args.calls)
            if missing != DIGESTS:
                raise common.BenchmarkError(f"{missing} of {DIGESTS} reported missing")
            for start in range(0, DIGESTS, 256):
                batch_update(cas, blobs[start : start + 256])
            sample["find_missing_present_s"], missing = find_missing(cas, blobs, args.calls)
            if missing != 0:
                raise common.BenchmarkError(f"{missing} stored blobs reported missing")
            # The cost of one hop into the reactor, per call.
            sample["capabilities_s"], sample["find_one_s"] = call_latency(
                channel, blobs[0], args.latency_calls
            )
            # 4 KiB writes: BatchUpdateBlobs vs single HTTP PUTs.
            sample["batch_update_blobs_per_s"] = batch_rate(
                channel, args.clients, args.batch, args.duration
            )
            body = os.path.join(work, "body-4k")
            with open(body, "wb") as handle:
                handle.write(os.urandom(BLOB))
            put = ac_put_script(work, f"put-{index}", body)
            put_result = common.run_wrk(
                f"http://127.0.0.1:{server.port}", args.clients, int(args.duration), put, server.pid
            )
            if put_result.bad_status or any(put_result.errors.values()):
                raise common.BenchmarkError(f"HTTP PUT errors: {put_result}")
            sample["http_put_per_s"] = put_result.requests / put_result.duration_s
            # 64 MiB: ByteStream.Read vs the accelerated HTTP GET of the same bytes.
            big = os.urandom(BIG)
            digest = write_big(channel, big)
            status, _ = common.http_call(
                "127.0.0.1", server.port, "PUT", f"/bazel/cas/{digest.hash}", big
            )
            if status != 200:
                raise common.BenchmarkError(f"HTTP PUT of the 64 MiB blob answered {status}")
            common.check_download(server.port, f"/bazel/cas/{digest.hash}", digest.hash, BIG)
            for streams in args.read_concurrency:
                sample[f"bytestream_read_mb_s_{streams}"] = (
                    bytestream_read_rate(target, digest, args.duration, streams) / 1e6
                )
                get = common.lua_get_script(work, f"get-{index}", [f"/bazel/cas/{digest.hash}"])
                get_result = common.run_wrk(
                    f"http://127.0.0.1:{server.port}",
                    streams,
                    int(args.duration),
                    get,
                    server.pid,
                )
                if get_result.bad_status or any(get_result.errors.values()):
                    raise common.BenchmarkError(f"HTTP GET errors: {get_result}")
                sample[f"http_get_mb_s_{streams}"] = (
                    get_result.bytes_read / get_result.duration_s / 1e6
                )
    print(f"repetition {index}: {sample}", file=sys.stderr)
    return sample


def report(samples: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def cell(key: str, fmt: Any = common.fmt_number) -> str:
        return common.fmt_spread([s[key] for s in samples], fmt)

    ms = lambda seconds: f"{seconds * 1000:.1f}"  # noqa: E731
    us = lambda seconds: f"{seconds * 1e6:.0f}"  # noqa: E731
    read_ratios = {
        streams: common.median(
            s[f"bytestream_read_mb_s_{streams}"] / s[f"http_get_mb_s_{streams}"] for s in samples
        )
        for streams in args.read_concurrency
    }
    write_ratio = common.median(
        s["batch_update_blobs_per_s"] / s["http_put_per_s"] for s in samples
    )
    rows = [
        [
            "FindMissingBlobs, 10,000 absent digests",
            "ms per call",
            cell("find_missing_absent_s", ms),
            "-",
        ],
        [
            "FindMissingBlobs, 10,000 present digests",
            "ms per call",
            cell("find_missing_present_s", ms),
            "-",
        ],
        [
            "GetCapabilities, sequential (no reactor hop)",
            "µs per call",
            cell("capabilities_s", us),
            "-",
        ],
        [
            "FindMissingBlobs of 1 stored digest, sequential (one reactor hop)",
            "µs per call",
            cell("find_one_s", us),
            "-",
        ],
        [
            f"4 KiB blobs stored: BatchUpdateBlobs ({args.batch}/call) vs single PUT /bazel/ac",
            "blobs/s",
            cell("batch_update_blobs_per_s"),
            cell("http_put_per_s"),
        ],
    ]
    rows += [
        [
            f"64 MiB read, {n} at a time: ByteStream.Read vs accelerated GET /bazel/cas",
            "MB/s",
            cell(f"bytestream_read_mb_s_{n}"),
            cell(f"http_get_mb_s_{n}"),
        ]
        for n in args.read_concurrency
    ]
    lines = [
        "# REAPI v2 over gRPC vs the Bazel HTTP cache (issue 16)",
        "",
        *common.machine_summary(),
        "",
        common.markdown_table(["measurement", "unit", "gRPC", "HTTP"], rows),
        "",
        *(
            f"- ByteStream.Read / accelerated GET, {n} at a time: {r:.2f}{common.TIMES} "
            "(target >= 0.5)"
            for n, r in read_ratios.items()
        ),
        f"- BatchUpdateBlobs / single PUTs: {write_ratio:.2f}{common.TIMES} (target >= 1)",
        f"- {args.repeat} repetitions, median [min{common.DASH}max]; {args.clients} clients "
        f"for writes, {args.duration:.0f} s per throughput cell",
        "",
        "Command:",
        "",
        "    " + common.command_line(sys.argv, common.kura_environment({})),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5, help="FindMissingBlobs calls per case")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--latency-calls", type=int, default=2000)
    parser.add_argument(
        "--read-concurrency",
        type=common.parse_int_list,
        default=[1, 4],
        help="64 MiB readers at once (comma-separated)",
    )
    parser.add_argument("--batch", type=int, default=256, help="blobs per BatchUpdateBlobs")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    common.require_tools("wrk")
    common.exit_cleanly_on_sigterm()
    samples = []
    with common.work_directory(args.keep) as work:
        for index in range(args.repeat):
            samples.append(one_repetition(args, work, index))
    text = report(samples, args)
    print(text)
    md, raw = common.save_results("reapi", text, samples)
    print(f"saved {md} and {raw}", file=sys.stderr)


if __name__ == "__main__":
    main()
