"""Packaging for kura, a build-artifact cache node on Twisted."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="kura",
    version="0.1.0",
    description="Build-artifact cache node with a same-port sendfile/splice accelerator",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[*find_packages(include=["kura", "kura.*"]), "twisted.plugins"],
    package_data={
        "kura": [
            "py.typed",
            "reapi/protos/**/*.proto",
            "reapi/protos/LICENSE",
            "reapi/gen/LICENSE",
            "reapi/gen/**/*.pyi",
        ],
        "twisted": ["plugins/kura_plugin.py"],
    },
    include_package_data=True,
    install_requires=[
        # 26.10 rejects a bare LF inside a header value; older releases let
        # "Foo: x\nContent-Length: N" smuggle a second request (#12754).
        "twisted[tls]>=26.10.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "zope.interface>=6.0",
        "prometheus-client>=0.20.0",
        "attrs>=23.1.0",
        # JWT verification (extension host, built-in OIDC): explicit algorithm
        # allow-lists, constant-time signature checks, issuer/audience
        # validation; the crypto extra brings RS*/PS*/ES*/EdDSA and JWKS
        # parsing (cryptography is in the closure anyway, through twisted[tls]).
        # 2.10.0 matched `iss` partially (CVE-2024-53861).
        "PyJWT[crypto]>=2.10.1",
        # REAPI v2 over gRPC (kura.reapi): the server, the generated messages
        # (kura/reapi/gen, made by `make protos` with the matching grpcio-tools),
        # google.rpc/longrunning/api messages, and zstd compressed-blobs.
        "grpcio>=1.85.1",
        "protobuf>=7.35.1",
        "googleapis-common-protos>=1.70",
        "zstandard>=0.22",
        # The object-store tier (kura.objectstore): AWS's own maintained
        # client core -- SigV4 signing, the standard credential chain
        # (environment, shared files, web identity for IRSA pods), retries,
        # checksum headers and multipart -- without boto3's resource layer.
        "botocore>=1.34",
    ],
    extras_require={
        # Twisted's HTTP/2 support (ALPN h2 on TLS, prior-knowledge h2c).
        "h2": ["twisted[http2]>=26.10.0"],
        "test": [
            "twisted[http2]>=26.10.0",
            "pytest>=8.0",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "h11>=0.14",
            "httptools>=0.6",
            "psutil>=5.9",
            "mypy>=1.10",
            "mypy-zope>=1.0.5",
            "ruff>=0.6",
            # Helm's own template engine as a wheel, to render helm/kura in
            # tests (pinned: an alpha release).
            "helm-python-sdk==0.2.2",
            # The Kubernetes OpenAPI schemas, bundled: the rendered chart is
            # validated offline against the releases it supports.
            "kubernetes-validate>=1.30",
            "types-grpcio>=1.0",
            "types-protobuf>=5.0",
            # A real S3 API for tests/objectstore: moto's standalone server,
            # started on loopback by a fixture.
            "moto[server]>=5.0",
        ],
        # `make protos`: regenerate kura/reapi/gen from kura/reapi/protos.
        "protos": ["grpcio-tools>=1.85.1"],
        # Coverage-guided fuzzing of the accelerator's parser (make fuzz),
        # off the default test run: libFuzzer finds inputs Hypothesis will not.
        "fuzz": ["atheris>=2.3"],
    },
    zip_safe=False,
)
