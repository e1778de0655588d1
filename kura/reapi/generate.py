"""Regenerate :mod:`kura.reapi.gen` from the vendored ``.proto`` files (``make protos``).

The REAPI, semver and ByteStream protos live under ``kura/reapi/protos``
(Apache-2.0, see the LICENSE there); the ``google.api``, ``google.rpc`` and
``google.longrunning`` protos they import come from ``googleapis-common-protos``
(a runtime dependency, whose wheel carries both the ``.proto`` files and the
compiled modules). ``grpcio-tools`` compiles them; its imports are then
rewritten to live under ``kura.reapi.gen`` so nothing is added to the
top-level ``build``/``google`` packages.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = os.path.join(HERE, "protos")
GEN = os.path.join(HERE, "gen")
SOURCES = (
    "build/bazel/semver/semver.proto",
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "google/bytestream/bytestream.proto",
)
_IMPORT = re.compile(r"^(from|import) (build\.bazel|google\.bytestream)", re.MULTILINE)


def _googleapis_root() -> str:
    status = importlib.import_module("google.rpc.status_pb2")
    return os.path.dirname(os.path.dirname(os.path.dirname(str(status.__file__))))


def main() -> int:
    protoc = importlib.import_module("grpc_tools.protoc")
    grpc_tools = importlib.import_module("grpc_tools")
    well_known = os.path.join(os.path.dirname(str(grpc_tools.__file__)), "_proto")
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{_googleapis_root()}",
        f"-I{well_known}",
        f"--python_out={GEN}",
        f"--pyi_out={GEN}",
        f"--grpc_python_out={GEN}",
        *SOURCES,
    ]
    status = int(protoc.main(args))
    if status:
        return status
    for directory, _, files in os.walk(GEN):
        if "__pycache__" in directory:
            continue
        init = os.path.join(directory, "__init__.py")
        if not os.path.exists(init):
            with open(init, "w", encoding="utf-8"):
                pass
        for name in files:
            if name.endswith((".py", ".pyi")) and name != "__init__.py":
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
                text = _IMPORT.sub(r"\1 kura.reapi.gen.\2", text)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
