"""OIDC over real sockets: a Twisted JWKS server on loopback, an extension on the
real reactor, and a ``twistd kura`` node in the built-in OIDC mode."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.web.server import Site

from kura.auth import ExtensionAuthorizer, ExtensionConfig, build_authorizer
from kura.domain.errors import KuraError
from kura.telemetry.metrics import KuraMetrics
from tests.auth.jwks_support import (
    AUDIENCE,
    ISSUER,
    JwksResource,
    ed_key,
    forged_hs256,
    jwks,
    rsa_key,
    unsigned,
)
from tests.auth.support import context
from tests.support.mesh import metrics, request
from tests.support.real import RealNode

EXAMPLE = str(Path(__file__).parents[2] / "examples" / "extensions" / "ci_oidc.py")

RSA = rsa_key()
ED = ed_key()


@pytest.fixture
def jwks_server() -> Iterator[tuple[JwksResource, str]]:
    """The key set served by twisted.web on a loopback port."""
    from twisted.internet import reactor

    resource = JwksResource(jwks([RSA]))
    port: Any = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    resource.base_url = resource.issuer = url
    yield resource, url
    pytest_twisted.blockon(port.stopListening())


def extension(url: str) -> ExtensionAuthorizer:
    from twisted.internet import reactor

    auth = build_authorizer(
        ExtensionConfig.from_environ(
            {
                "KURA_EXTENSION_SCRIPT_PATH": EXAMPLE,
                "KURA_EXTENSION_JWT_VERIFIER_CI_JWKS_URL": url + "/jwks",
                "KURA_EXTENSION_JWT_VERIFIER_CI_ISSUER": ISSUER,
                "KURA_EXTENSION_JWT_VERIFIER_CI_AUDIENCES": AUDIENCE,
                "KURA_EXTENSION_CI_OWNER": "acme",
            }
        ),
        reactor=reactor,
        metrics=KuraMetrics(CollectorRegistry()),
    )
    assert isinstance(auth, ExtensionAuthorizer)
    return auth


async def denied(auth: ExtensionAuthorizer, **fields: Any) -> int:
    try:
        await auth.check(context(**fields))
    except KuraError as error:
        return error.status
    raise AssertionError("allowed")


@pytest_twisted.ensureDeferred
async def test_extension_verifies_ci_tokens_with_the_async_host_call(
    jwks_server: tuple[JwksResource, str],
) -> None:
    """The example extension awaits host.jwt_verify_async: keys fetched over loopback."""
    import time

    server, url = jwks_server
    auth = extension(url)
    auth.start()
    try:
        now = time.time()
        token = RSA.sign(now, repository="acme/ios")
        headers = {"authorization": f"Bearer {token}"}
        principal = await auth.check(context(headers=headers))
        assert principal.kind == "oidc" and principal.attributes["repository"] == "ios"
        write = {"method": "PUT", "operation": "artifact.write"}
        assert (await auth.check(context(headers=headers, **write))).id == principal.id
        other_ns = {**write, "namespace_id": "android"}
        assert await denied(auth, headers=headers, **other_ns) == 403
        stranger = RSA.sign(now, repository_owner="mallory", repository="mallory/x")
        assert await denied(auth, headers={"authorization": f"Bearer {stranger}"}) == 403
        unknown = ED.sign(now)  # a kid the server does not have
        assert await denied(auth, headers={"authorization": f"Bearer {unknown}"}) == 401
        assert server.hits <= 2
    finally:
        await auth.close()


# -- a real node in the built-in OIDC mode ----------------------------------------


class _Jwks(BaseHTTPRequestHandler):
    document: bytes = b"{}"
    up = True

    def do_GET(self) -> None:
        if self.path != "/jwks" or not type(self).up:
            self.send_response(503 if self.path == "/jwks" else 404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.document)))
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_thread() -> Iterator[str]:
    """A JWKS server in a thread (the node is another process; this test blocks)."""
    _Jwks.document = json.dumps(jwks([RSA, ED])).encode()
    _Jwks.up = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks"
    server.shutdown()
    server.server_close()


@pytest.mark.realnode
def test_real_node_in_oidc_mode(tmp_path: Path, jwks_thread: str) -> None:
    """A write with a main-branch token is stored; a foreign, forged (HS256 with the
    public key, alg none, another key), wrong-audience or read-only one is not."""
    import time

    node = RealNode(
        str(tmp_path / "data"),
        KURA_AUTH_OIDC_ISSUER=ISSUER,
        KURA_AUTH_OIDC_AUDIENCE=AUDIENCE,
        KURA_AUTH_OIDC_JWKS_URL=jwks_thread,
        KURA_AUTH_OIDC_READ_CLAIMS="repository_owner=acme",
        KURA_AUTH_OIDC_WRITE_CLAIMS="repository_owner=acme,ref=refs/heads/main",
    ).start()
    try:
        url = node.url + "/api/cache/gradle/oidc-key?tenant_id=default"

        def put(token: str, body: bytes = b"built by CI") -> int:
            return request("PUT", url, body, {"Authorization": f"Bearer {token}"})[0]

        now = time.time()
        main = RSA.sign(now)
        assert put(main) in (200, 201, 204)
        status, _, body = request("GET", url, headers={"Authorization": f"Bearer {main}"})
        assert (status, body) == (200, b"built by CI")
        branch = ED.sign(now, ref="refs/heads/feature")
        assert request("GET", url, headers={"Authorization": f"Bearer {branch}"})[0] == 200
        assert put(branch, b"poisoned") == 403
        assert put(RSA.sign(now, repository_owner="mallory"), b"poisoned") == 403
        assert put(RSA.sign(now, aud="https://elsewhere"), b"poisoned") == 401
        assert put(main[:-4] + ("AAAA" if not main.endswith("AAAA") else "BBBB"), b"x") == 401
        assert put(rsa_key().sign(now), b"poisoned") == 401  # same kid, another key
        assert request("PUT", url, b"poisoned")[0] == 401
        claims = {"iss": ISSUER, "aud": AUDIENCE, "repository_owner": "acme", "exp": now + 60}
        claims["ref"] = "refs/heads/main"
        assert put(forged_hs256(RSA.public_pem(), claims, RSA.kid), b"poisoned") == 401
        assert put(unsigned(claims, RSA.kid), b"poisoned") == 401
        assert request("GET", url, headers={"Authorization": f"Bearer {main}"})[2] == b"built by CI"
        rollout = json.loads(request("GET", node.url + "/status/rollout")[2])
        assert rollout["auth_mode"] == "oidc"
        assert "JWKS oidc fetched" in node.log()
        fetched = metrics(node)['kura_jwks_fetches_total{result="ok",verifier="oidc"}']
        assert fetched == 1
    finally:
        node.stop()


@pytest.mark.realnode
def test_real_node_with_the_jwks_server_down_at_start(tmp_path: Path, jwks_thread: str) -> None:
    """The node gets ready without keys, refuses ID tokens (401), and recovers by itself."""
    import time

    _Jwks.up = False
    node = RealNode(
        str(tmp_path / "data"),
        KURA_AUTH_OIDC_ISSUER=ISSUER,
        KURA_AUTH_OIDC_AUDIENCE=AUDIENCE,
        KURA_AUTH_OIDC_JWKS_URL=jwks_thread,
        KURA_AUTH_OIDC_WRITE_CLAIMS="repository_owner=acme",
    ).start()
    try:
        node.wait_until_swept()  # readiness waits for the start-up sweep, not for keys
        assert request("GET", node.url + "/ready")[0] == 200
        url = node.url + "/api/cache/gradle/down-key?tenant_id=default"
        headers = {"Authorization": f"Bearer {RSA.sign(time.time())}"}
        assert request("PUT", url, b"early", headers)[0] == 401
        assert "JWKS oidc fetch failed" in node.log()
        _Jwks.up = True
        deadline = time.monotonic() + 20
        status = 401
        while status == 401 and time.monotonic() < deadline:
            time.sleep(0.5)
            status = request("PUT", url, b"later", headers)[0]
        assert status in (200, 201, 204)
        assert request("GET", url, headers=headers)[2] == b"later"
    finally:
        node.stop()
