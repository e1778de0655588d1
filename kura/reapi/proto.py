"""The generated protobuf modules, behind one typed import (:mod:`kura.reapi.gen`).

The modules under ``kura/reapi/gen`` are generated (``make protos``) and left
out of ruff and of mypy's own checks; their ``.pyi`` stubs, also generated,
type every message used here. The gRPC service stubs (``*_pb2_grpc``) are
for clients (tests, benchmarks): the server builds its method handlers
itself (:mod:`kura.reapi.server`).
"""

from __future__ import annotations

from google.rpc import code_pb2, error_details_pb2, status_pb2

from kura.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from kura.reapi.gen.build.bazel.semver import semver_pb2
from kura.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2

__all__ = ["bs_pb2", "code_pb2", "error_details_pb2", "re_pb2", "semver_pb2", "status_pb2"]
