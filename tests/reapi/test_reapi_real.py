"""REAPI v2 over gRPC against a real ``twistd kura``, with a real ``grpcio`` channel.

Every RPC, its error statuses, resumable and compressed ByteStream writes,
digest mismatches, oversized batches and authorization with the built-in
tokens (a write token, a read token, none).
"""

from __future__ import annotations

import hashlib
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard
from prometheus_client.parser import text_string_to_metric_families

from kura.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from kura.reapi.gen.google.bytestream import bytestream_pb2_grpc as bs_grpc
from kura.reapi.proto import bs_pb2, error_details_pb2, re_pb2, status_pb2
from tests.support.real import RealNode

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(120)]

WRITER = "reapi-writer-token"
READER = "reapi-reader-token"
MAX_BATCH = 256 * 1024
INSTANCE = "ci/linux x86"
Code = grpc.StatusCode


def digest_of(data: bytes) -> Any:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def blob_name(digest: Any, instance: str = INSTANCE, compressed: bool = False) -> str:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}{kind}/{digest.hash}/{digest.size_bytes}"


def upload_name(digest: Any, upload: str, compressed: bool = False) -> str:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    return f"{INSTANCE}/uploads/{upload}/{kind}/{digest.hash}/{digest.size_bytes}"


class Client:
    """Stubs for every service on one channel, with a token (or none)."""

    def __init__(self, channel: grpc.Channel, token: str | None) -> None:
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.capabilities = re_grpc.CapabilitiesStub(channel)
        self.ac = re_grpc.ActionCacheStub(channel)
        self.cas = re_grpc.ContentAddressableStorageStub(channel)
        self.bs = bs_grpc.ByteStreamStub(channel)

    def call(self, method: Any, request: Any) -> Any:
        return method(request, metadata=self.metadata, timeout=30)

    def put(self, *blobs: bytes, instance: str = INSTANCE) -> list[Any]:
        response = self.call(
            self.cas.BatchUpdateBlobs,
            re_pb2.BatchUpdateBlobsRequest(
                instance_name=instance,
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b)
                    for b in blobs
                ],
            ),
        )
        return [r.status.code for r in response.responses]

    def missing(self, *digests: Any, instance: str = INSTANCE) -> list[str]:
        response = self.call(
            self.cas.FindMissingBlobs,
            re_pb2.FindMissingBlobsRequest(instance_name=instance, blob_digests=digests),
        )
        return [d.hash for d in response.missing_blob_digests]

    def read(self, name: str, offset: int = 0, limit: int = 0) -> bytes:
        responses = self.bs.Read(
            bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit),
            metadata=self.metadata,
            timeout=30,
        )
        return b"".join(r.data for r in responses)

    def write(self, requests: Iterator[Any]) -> Any:
        return self.bs.Write(requests, metadata=self.metadata, timeout=30)


def chunks(
    name: str, data: bytes, *, start: int = 0, size: int = 64 * 1024, finish: bool = True
) -> Iterator[Any]:
    """WriteRequests for ``data`` from offset ``start`` (the name on the first only)."""
    position = start
    first = True
    while True:
        piece = data[position - start : position - start + size]
        last = position - start + size >= len(data)
        yield bs_pb2.WriteRequest(
            resource_name=name if first else "",
            write_offset=position,
            data=piece,
            finish_write=finish and last,
        )
        first = False
        position += len(piece)
        if last:
            return


def status_of(error: grpc.RpcError) -> Code:
    code: Code = error.code()  # type: ignore[attr-defined]
    return code


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    base = tmp_path_factory.mktemp("reapi")
    started = RealNode(
        str(base / "data"),
        KURA_AUTH_WRITE_TOKENS=WRITER,
        KURA_AUTH_READ_TOKENS=READER,
        KURA_REAPI_MAX_BATCH_BYTES=str(MAX_BATCH),
        KURA_LOG_FORMAT="json",
    ).start(timeout=60)
    yield started
    assert started.stop() == 0, started.log_tail()


@pytest.fixture(scope="module")
def channel(node: RealNode) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(node.grpc_target) as opened:
        yield opened


@pytest.fixture(scope="module")
def writer(channel: grpc.Channel) -> Client:
    return Client(channel, WRITER)


@pytest.fixture(scope="module")
def reader(channel: grpc.Channel) -> Client:
    return Client(channel, READER)


@pytest.fixture(scope="module")
def anonymous(channel: grpc.Channel) -> Client:
    return Client(channel, None)


def fails(code: Code, f: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        result = f(*args)
        if isinstance(result, Iterator):
            list(result)
    assert status_of(raised.value) == code, raised.value
    return raised.value


# -- Capabilities ---------------------------------------------------------------------------


def test_capabilities_advertise_sha256_zstd_and_the_batch_limit(writer: Client) -> None:
    caps = writer.call(
        writer.capabilities.GetCapabilities,
        re_pb2.GetCapabilitiesRequest(instance_name=INSTANCE),
    )
    cache = caps.cache_capabilities
    assert list(cache.digest_functions) == [re_pb2.DigestFunction.SHA256]
    assert re_pb2.Compressor.ZSTD in cache.supported_compressors
    assert re_pb2.Compressor.ZSTD in cache.supported_batch_update_compressors
    assert cache.max_batch_total_size_bytes == MAX_BATCH
    assert cache.action_cache_update_capabilities.update_enabled
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.ALLOWED
    assert (caps.low_api_version.major, caps.high_api_version.major) == (2, 2)


def test_capabilities_report_no_updates_to_a_read_token(reader: Client) -> None:
    caps = reader.call(
        reader.capabilities.GetCapabilities, re_pb2.GetCapabilitiesRequest(instance_name="")
    )
    assert not caps.cache_capabilities.action_cache_update_capabilities.update_enabled


def test_capabilities_without_a_token_are_unauthenticated(anonymous: Client) -> None:
    fails(
        Code.UNAUTHENTICATED,
        anonymous.call,
        anonymous.capabilities.GetCapabilities,
        re_pb2.GetCapabilitiesRequest(),
    )


# -- CAS ------------------------------------------------------------------------------------


def test_batch_update_find_missing_and_batch_read(writer: Client) -> None:
    blobs = [f"blob {i}".encode() * 100 for i in range(5)]
    digests = [digest_of(b) for b in blobs]
    assert sorted(writer.missing(*digests)) == sorted(d.hash for d in digests)
    assert writer.put(*blobs) == [0] * 5
    assert writer.missing(*digests) == []
    unknown = digest_of(b"never stored")
    response = writer.call(
        writer.cas.BatchReadBlobs,
        re_pb2.BatchReadBlobsRequest(instance_name=INSTANCE, digests=[*digests, unknown]),
    )
    assert [r.data for r in response.responses[:5]] == blobs
    assert all(r.status.code == 0 for r in response.responses[:5])
    assert response.responses[5].status.code == Code.NOT_FOUND.value[0]


def test_the_empty_blob_is_never_missing(writer: Client) -> None:
    empty = digest_of(b"")
    assert writer.missing(empty) == []
    assert writer.read(blob_name(empty)) == b""


def test_instances_are_separate_namespaces(writer: Client) -> None:
    data = b"only in one instance"
    assert writer.put(data, instance="team-a") == [0]
    assert writer.missing(digest_of(data), instance="team-a") == []
    assert writer.missing(digest_of(data), instance="team-a/sub") == [digest_of(data).hash]
    assert writer.missing(digest_of(data), instance="") == [digest_of(data).hash]


def test_a_digest_mismatch_in_a_batch_is_invalid_argument_and_stores_nothing(
    writer: Client,
) -> None:
    good, bad = b"good blob", b"bad blob"
    lying = re_pb2.Digest(hash=hashlib.sha256(b"something else").hexdigest(), size_bytes=8)
    response = writer.call(
        writer.cas.BatchUpdateBlobs,
        re_pb2.BatchUpdateBlobsRequest(
            instance_name=INSTANCE,
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(good), data=good),
                re_pb2.BatchUpdateBlobsRequest.Request(digest=lying, data=bad),
            ],
        ),
    )
    codes = [r.status.code for r in response.responses]
    assert codes == [0, Code.INVALID_ARGUMENT.value[0]]
    assert writer.missing(lying, digest_of(good)) == [lying.hash]


def test_batch_update_accepts_zstd(writer: Client) -> None:
    data = b"compressible " * 1000
    response = writer.call(
        writer.cas.BatchUpdateBlobs,
        re_pb2.BatchUpdateBlobsRequest(
            instance_name=INSTANCE,
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(
                    digest=digest_of(data),
                    data=zstandard.ZstdCompressor().compress(data),
                    compressor=re_pb2.Compressor.ZSTD,
                )
            ],
        ),
    )
    assert response.responses[0].status.code == 0
    assert writer.read(blob_name(digest_of(data))) == data


def test_oversized_batches_are_refused(writer: Client) -> None:
    big = b"x" * (MAX_BATCH // 2 + 1)
    other = b"y" * (MAX_BATCH // 2 + 1)
    fails(
        Code.INVALID_ARGUMENT,
        writer.call,
        writer.cas.BatchUpdateBlobs,
        re_pb2.BatchUpdateBlobsRequest(
            instance_name=INSTANCE,
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b)
                for b in (big, other)
            ],
        ),
    )
    assert writer.missing(digest_of(big)) == [digest_of(big).hash]
    # Past the batch limit plus framing, grpcio itself refuses the message.
    huge = b"z" * (MAX_BATCH + (2 << 20))
    fails(
        Code.RESOURCE_EXHAUSTED,
        writer.call,
        writer.cas.BatchUpdateBlobs,
        re_pb2.BatchUpdateBlobsRequest(
            instance_name=INSTANCE,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(huge), data=huge)],
        ),
    )
    fails(
        Code.INVALID_ARGUMENT,
        writer.call,
        writer.cas.BatchReadBlobs,
        re_pb2.BatchReadBlobsRequest(
            instance_name=INSTANCE, digests=[digest_of(big), digest_of(other)]
        ),
    )


def test_invalid_digests_and_instance_names_are_invalid_argument(writer: Client) -> None:
    bad = re_pb2.Digest(hash="not-hex", size_bytes=1)
    fails(
        Code.INVALID_ARGUMENT,
        writer.call,
        writer.cas.FindMissingBlobs,
        re_pb2.FindMissingBlobsRequest(instance_name=INSTANCE, blob_digests=[bad]),
    )
    fails(
        Code.INVALID_ARGUMENT,
        writer.call,
        writer.cas.FindMissingBlobs,
        re_pb2.FindMissingBlobsRequest(instance_name="é" * 200, blob_digests=[]),
    )


def test_batch_writes_need_a_write_token(reader: Client, anonymous: Client) -> None:
    data = b"not from a reader"
    fails(Code.PERMISSION_DENIED, reader.put, data)
    fails(Code.UNAUTHENTICATED, anonymous.put, data)
    assert reader.missing(digest_of(data)) == [digest_of(data).hash]
    fails(Code.UNAUTHENTICATED, anonymous.missing, digest_of(data))


def test_get_tree_returns_every_directory(writer: Client) -> None:
    leaf_file = b"leaf file"
    leaf = re_pb2.Directory(
        files=[re_pb2.FileNode(name="f", digest=digest_of(leaf_file))]
    ).SerializeToString()
    middle = re_pb2.Directory(
        directories=[re_pb2.DirectoryNode(name="leaf", digest=digest_of(leaf))]
    ).SerializeToString()
    root = re_pb2.Directory(
        directories=[
            re_pb2.DirectoryNode(name="a", digest=digest_of(middle)),
            re_pb2.DirectoryNode(name="b", digest=digest_of(leaf)),
        ]
    ).SerializeToString()
    assert writer.put(leaf_file, leaf, middle, root) == [0] * 4
    responses = list(
        writer.cas.GetTree(
            re_pb2.GetTreeRequest(instance_name=INSTANCE, root_digest=digest_of(root)),
            metadata=writer.metadata,
            timeout=30,
        )
    )
    directories = [d.SerializeToString() for r in responses for d in r.directories]
    assert directories == [root, middle, leaf]
    missing_root = re_pb2.GetTreeRequest(
        instance_name=INSTANCE, root_digest=digest_of(b"no such dir")
    )
    fails(
        Code.NOT_FOUND,
        lambda: list(writer.cas.GetTree(missing_root, metadata=writer.metadata, timeout=30)),
    )


# -- ActionCache ----------------------------------------------------------------------------


def action(name: str) -> Any:
    return digest_of(f"action {name} {uuid.uuid4()}".encode())


def test_action_results_round_trip(writer: Client) -> None:
    output = b"an output file"
    assert writer.put(output) == [0]
    key = action("round trip")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out/a", digest=digest_of(output))], exit_code=0
    )
    fails(
        Code.NOT_FOUND,
        writer.call,
        writer.ac.GetActionResult,
        re_pb2.GetActionResultRequest(instance_name=INSTANCE, action_digest=key),
    )
    writer.call(
        writer.ac.UpdateActionResult,
        re_pb2.UpdateActionResultRequest(
            instance_name=INSTANCE, action_digest=key, action_result=result
        ),
    )
    got = writer.call(
        writer.ac.GetActionResult,
        re_pb2.GetActionResultRequest(instance_name=INSTANCE, action_digest=key),
    )
    assert got == result


def test_an_action_result_with_missing_outputs_is_a_miss(writer: Client) -> None:
    present = b"present output"
    assert writer.put(present) == [0]
    tree_file = b"a file inside the tree, never uploaded"
    tree = re_pb2.Tree(
        root=re_pb2.Directory(files=[re_pb2.FileNode(name="x", digest=digest_of(tree_file))])
    ).SerializeToString()
    assert writer.put(tree) == [0]
    cases = {
        "missing file": re_pb2.ActionResult(
            output_files=[
                re_pb2.OutputFile(path="a", digest=digest_of(present)),
                re_pb2.OutputFile(path="b", digest=digest_of(b"gone")),
            ]
        ),
        "missing stdout": re_pb2.ActionResult(stdout_digest=digest_of(b"stdout never stored")),
        "missing tree": re_pb2.ActionResult(
            output_directories=[re_pb2.OutputDirectory(path="d", tree_digest=digest_of(b"no tree"))]
        ),
        "file missing inside a tree": re_pb2.ActionResult(
            output_directories=[re_pb2.OutputDirectory(path="d", tree_digest=digest_of(tree))]
        ),
    }
    for name, result in cases.items():
        key = action(name)
        writer.call(
            writer.ac.UpdateActionResult,
            re_pb2.UpdateActionResultRequest(
                instance_name=INSTANCE, action_digest=key, action_result=result
            ),
        )
        fails(
            Code.NOT_FOUND,
            writer.call,
            writer.ac.GetActionResult,
            re_pb2.GetActionResultRequest(instance_name=INSTANCE, action_digest=key),
        )
    assert writer.put(tree_file) == [0]
    key = action("complete tree")
    writer.call(
        writer.ac.UpdateActionResult,
        re_pb2.UpdateActionResultRequest(
            instance_name=INSTANCE,
            action_digest=key,
            action_result=cases["file missing inside a tree"],
        ),
    )
    writer.call(
        writer.ac.GetActionResult,
        re_pb2.GetActionResultRequest(instance_name=INSTANCE, action_digest=key),
    )


def test_action_cache_authorization(reader: Client, anonymous: Client, writer: Client) -> None:
    key = action("auth")
    update = re_pb2.UpdateActionResultRequest(
        instance_name=INSTANCE, action_digest=key, action_result=re_pb2.ActionResult()
    )
    fails(Code.PERMISSION_DENIED, reader.call, reader.ac.UpdateActionResult, update)
    fails(Code.UNAUTHENTICATED, anonymous.call, anonymous.ac.UpdateActionResult, update)
    writer.call(writer.ac.UpdateActionResult, update)
    get = re_pb2.GetActionResultRequest(instance_name=INSTANCE, action_digest=key)
    assert reader.call(reader.ac.GetActionResult, get) == re_pb2.ActionResult()
    fails(Code.UNAUTHENTICATED, anonymous.call, anonymous.ac.GetActionResult, get)


# -- ByteStream -----------------------------------------------------------------------------


def test_bytestream_write_then_read_with_offsets(writer: Client) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: more than one read chunk
    digest = digest_of(data)
    response = writer.write(chunks(upload_name(digest, str(uuid.uuid4())), data))
    assert response.committed_size == len(data)
    assert writer.read(blob_name(digest)) == data
    assert writer.read(blob_name(digest), offset=1000, limit=5000) == data[1000:6000]
    assert writer.read(blob_name(digest), offset=len(data)) == b""
    assert writer.read(blob_name(digest), offset=len(data) - 2, limit=100) == b"il"
    fails(Code.OUT_OF_RANGE, writer.read, blob_name(digest), len(data) + 1)
    fails(Code.OUT_OF_RANGE, writer.read, blob_name(digest), -1)
    fails(Code.INVALID_ARGUMENT, writer.read, blob_name(digest), 0, -1)
    fails(Code.NOT_FOUND, writer.read, blob_name(digest_of(b"absent")))
    fails(Code.INVALID_ARGUMENT, writer.read, f"{INSTANCE}/blobs/xyz/12")
    fails(Code.INVALID_ARGUMENT, writer.read, f"{INSTANCE}/compressed-blobs/lz4/{digest.hash}/1")


def test_bytestream_zstd_both_ways(writer: Client) -> None:
    data = b"zstd over bytestream " * 50000
    digest = digest_of(data)
    compressed = zstandard.ZstdCompressor(level=3).compress(data)
    response = writer.write(
        chunks(upload_name(digest, str(uuid.uuid4()), compressed=True), compressed, size=4096)
    )
    assert response.committed_size == len(compressed)
    # Stored in one canonical (uncompressed) form: readable both ways.
    assert writer.read(blob_name(digest)) == data
    got = writer.read(blob_name(digest, compressed=True))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(got) == data
    tail = writer.read(blob_name(digest, compressed=True), offset=len(data) - 10)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(tail) == data[-10:]
    fails(Code.INVALID_ARGUMENT, writer.read, blob_name(digest, compressed=True), 0, 10)
    # Writing it again finishes at once, with -1 for a compressed upload.
    again = writer.write(
        chunks(upload_name(digest, str(uuid.uuid4()), compressed=True), compressed)
    )
    assert again.committed_size == -1


def test_bytestream_digest_mismatches_store_nothing(writer: Client) -> None:
    data = b"the real bytes" * 1000
    lying = re_pb2.Digest(hash=hashlib.sha256(b"other").hexdigest(), size_bytes=len(data))
    fails(Code.INVALID_ARGUMENT, writer.write, chunks(upload_name(lying, str(uuid.uuid4())), data))
    short = re_pb2.Digest(hash=digest_of(data).hash, size_bytes=len(data) - 1)
    fails(Code.INVALID_ARGUMENT, writer.write, chunks(upload_name(short, str(uuid.uuid4())), data))
    long = re_pb2.Digest(hash=digest_of(data).hash, size_bytes=len(data) + 1)
    fails(Code.INVALID_ARGUMENT, writer.write, chunks(upload_name(long, str(uuid.uuid4())), data))
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 100000)
    small = re_pb2.Digest(hash=hashlib.sha256(b"\0" * 10).hexdigest(), size_bytes=10)
    fails(
        Code.INVALID_ARGUMENT,
        writer.write,
        chunks(upload_name(small, str(uuid.uuid4()), compressed=True), bomb),
    )
    assert writer.missing(lying, short, long, small) == [
        lying.hash,
        short.hash,
        long.hash,
        small.hash,
    ]


def test_bytestream_write_resumes_at_the_committed_size(writer: Client) -> None:
    data = bytes(reversed(range(256))) * 8192  # 2 MiB
    digest = digest_of(data)
    name = upload_name(digest, str(uuid.uuid4()))
    half = len(data) // 2
    query = bs_pb2.QueryWriteStatusRequest(resource_name=name)
    fails(Code.NOT_FOUND, writer.call, writer.bs.QueryWriteStatus, query)
    # The stream ends without finish_write: what arrived is kept.
    fails(Code.INVALID_ARGUMENT, writer.write, chunks(name, data[:half], finish=False))
    status = writer.call(writer.bs.QueryWriteStatus, query)
    assert (status.committed_size, status.complete) == (half, False)
    # A resumed write must start at the committed size.
    fails(Code.INVALID_ARGUMENT, writer.write, chunks(name, data[half + 1 :], start=half + 1))
    response = writer.write(chunks(name, data[half:], start=half))
    assert response.committed_size == len(data)
    status = writer.call(writer.bs.QueryWriteStatus, query)
    assert (status.committed_size, status.complete) == (len(data), True)
    assert writer.read(blob_name(digest)) == data


def test_writing_a_stored_blob_finishes_early(writer: Client) -> None:
    data = b"already here" * 100
    assert writer.put(data) == [0]
    sent: list[int] = []

    def requests() -> Iterator[Any]:
        for request in chunks(upload_name(digest_of(data), str(uuid.uuid4())), data, size=100):
            sent.append(1)
            yield request

    assert writer.write(requests()).committed_size == len(data)


def test_bytestream_authorization(reader: Client, anonymous: Client, writer: Client) -> None:
    data = b"bytestream auth"
    digest = digest_of(data)
    fails(Code.PERMISSION_DENIED, reader.write, chunks(upload_name(digest, "u1"), data))
    fails(Code.UNAUTHENTICATED, anonymous.write, chunks(upload_name(digest, "u2"), data))
    writer.write(chunks(upload_name(digest, str(uuid.uuid4())), data))
    assert reader.read(blob_name(digest)) == data
    fails(Code.UNAUTHENTICATED, anonymous.read, blob_name(digest))
    fails(
        Code.PERMISSION_DENIED,
        reader.call,
        reader.bs.QueryWriteStatus,
        bs_pb2.QueryWriteStatusRequest(resource_name=upload_name(digest, "u3")),
    )


# -- metrics --------------------------------------------------------------------------------


def test_metrics_count_rpcs_by_method_and_code(node: RealNode, writer: Client) -> None:
    writer.missing(digest_of(b"metrics"))
    fails(Code.NOT_FOUND, writer.read, blob_name(digest_of(b"metrics")))
    time.sleep(0.2)  # metrics are recorded on the reactor thread after the status
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {
        (s.labels["method"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "kura_grpc_requests"
        for s in family.samples
        if s.name.endswith("_total")
    }
    find = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
    assert counts[(find, "OK")] >= 1
    assert counts[("/google.bytestream.ByteStream/Read", "NOT_FOUND")] >= 1
    assert counts[(find, "UNAUTHENTICATED")] >= 1


# -- draining -------------------------------------------------------------------------------


def test_a_draining_node_answers_unavailable_with_retry_info(tmp_path: Path) -> None:
    node = RealNode(str(tmp_path / "data")).start(timeout=60)
    try:
        with grpc.insecure_channel(node.grpc_target) as channel:
            client = Client(channel, None)
            assert client.put(b"open mode") == [0]
            node.signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.missing(digest_of(b"x"))
                except grpc.RpcError as error:
                    assert status_of(error) == Code.UNAVAILABLE
                    trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
                    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
                    info = error_details_pb2.RetryInfo()
                    assert status.details[0].Unpack(info)
                    assert info.retry_delay.seconds == 1
                    break
                assert time.monotonic() < deadline, "never started draining"
                time.sleep(0.05)
    finally:
        assert node.stop() == 0, node.log_tail()
