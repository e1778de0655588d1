"""examples/extensions/tuist.py against signed JWTs and a fake Tuist server.

The fake server is a real Klein app on a loopback port and the extension
talks to it through the real host HTTP client (treq), on the real reactor.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import attrs
import jwt
import pytest
import pytest_twisted
from klein import Klein
from prometheus_client import CollectorRegistry
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from kura.auth import (
    ExtensionAuthorizer,
    ExtensionConfig,
    HookContext,
    Principal,
    build_authorizer,
)
from kura.domain.errors import BadRequest, Forbidden, KuraError, ServiceUnavailable, Unauthorized
from kura.telemetry.metrics import KuraMetrics
from tests.auth.support import context
from tests.support.real import free_port

EXAMPLE = os.path.join(
    os.path.dirname(__file__), os.pardir, os.pardir, "examples", "extensions", "tuist.py"
)
SECRET = "tuist-guardian-secret-key-of-sufficient-length!"
CLIENT_ID, CLIENT_SECRET = "kura-node", "kura-node-secret"


@attrs.define
class FakeTuist:
    """The Tuist endpoints the extension calls, with what they saw."""

    introspections: list[dict[str, Any]] = attrs.field(factory=list)
    accesses: list[str] = attrs.field(factory=list)
    introspect_status: int = 200
    active: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    access: dict[str, list[Any]] = attrs.field(factory=dict)
    app: Klein = attrs.field(factory=Klein)

    def __attrs_post_init__(self) -> None:
        @self.app.route("/oauth2/introspect", methods=["POST"])
        def introspect(request: IRequest) -> bytes:
            form = json.loads(request.content.read())
            self.introspections.append(form)
            request.setHeader(b"content-type", b"application/json")
            request.setResponseCode(self.introspect_status)
            if self.introspect_status != 200:
                return b"<html>oops</html>"
            if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
                request.setResponseCode(401)
                return b"{}"
            answer = self.active.get(form.get("token"), {"active": False})
            return json.dumps(answer).encode()

        @self.app.route("/api/cache/access", methods=["GET"])
        def access(request: IRequest) -> bytes:
            authorization = (request.getHeader(b"authorization") or b"").decode()
            self.accesses.append(authorization)
            request.setHeader(b"content-type", b"application/json")
            projects = self.access.get(authorization)
            if projects is None:
                request.setResponseCode(401)
                return b'{"message": "unauthorized"}'
            return json.dumps({"projects": projects}).encode()


@pytest.fixture
def tuist() -> Iterator[tuple[FakeTuist, str]]:
    """The fake Tuist server listening on loopback; yields it and its base URL."""
    from twisted.internet import reactor

    server = FakeTuist()
    port: Any = reactor.listenTCP(0, Site(server.app.resource()), interface="127.0.0.1")
    yield server, f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


def policy(base_url: str, *, introspection: bool = True) -> ExtensionAuthorizer:
    """The example extension, loaded from its file as an operator would."""
    from twisted.internet import reactor

    environ = {
        "KURA_EXTENSION_SCRIPT_PATH": EXAMPLE,
        "KURA_EXTENSION_JWT_VERIFIER_TUIST_SECRET": SECRET,
        "KURA_EXTENSION_HTTP_CLIENT_TUIST_BASE_URL": base_url,
    }
    if introspection:
        environ["KURA_EXTENSION_TUIST_INTROSPECT_CLIENT_ID"] = CLIENT_ID
        environ["KURA_EXTENSION_TUIST_INTROSPECT_CLIENT_SECRET"] = CLIENT_SECRET
    auth = build_authorizer(
        ExtensionConfig.from_environ(environ),
        reactor=reactor,
        metrics=KuraMetrics(CollectorRegistry()),
    )
    assert isinstance(auth, ExtensionAuthorizer)
    return auth


def bearer(claims: dict[str, Any], secret: str = SECRET) -> dict[str, str]:
    payload = {"sub": "user-1", "type": "user", "exp": int(time.time()) + 600, **claims}
    return {"authorization": "Bearer " + jwt.encode(payload, secret, algorithm="HS256")}


def known_token(server: FakeTuist, grants: dict[str, Any]) -> dict[str, str]:
    """A JWT with ``grants`` that Tuist's introspection also confirms (active)."""
    headers = bearer({"cache_grants": grants})
    token = headers["authorization"].split(" ", 1)[1]
    server.active[token] = {"active": True, "sub": "user-1", "cache_grants": grants}
    return headers


def read(headers: dict[str, str], **fields: Any) -> HookContext:
    return context(headers=headers, **fields)


def write(headers: dict[str, str], **fields: Any) -> HookContext:
    return context(headers=headers, method="PUT", operation="artifact.write", **fields)


async def denied(auth: ExtensionAuthorizer, ctx: HookContext) -> KuraError:
    try:
        await auth.check(ctx)
    except KuraError as error:
        return error
    raise AssertionError("the request was allowed")


GRANTS = {"project": {"read": ["ACME/iOS"], "write": []}, "account": {"read": [], "write": []}}


@pytest_twisted.ensureDeferred
async def test_jwt_cache_grants_authorize_without_the_server(tuist: tuple[FakeTuist, str]) -> None:
    """A JWT whose cache_grants cover the target is enough; grants are per action."""
    server, url = tuist
    auth = policy(url)
    try:
        headers = bearer({"cache_grants": GRANTS})
        principal = await auth.check(read(headers))
        assert isinstance(principal, Principal) and principal.id == "user-1"
        assert principal.attributes["projects"] == ["acme/ios"]
        error = await denied(auth, write(headers))
        assert isinstance(error, Forbidden)
        assert error.message == (
            "Forbidden: project 'acme/ios' is not granted to this principal for write"
        )
        assert server.introspections == [] and server.accesses == []
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_account_write_grant_implies_read(tuist: tuple[FakeTuist, str]) -> None:
    """An account write grant allows reads and writes on account-scoped requests."""
    _, url = tuist
    auth = policy(url)
    try:
        headers = bearer({"cache_grants": {"account": {"write": ["acme"]}}})
        for ctx in (read(headers, namespace_id=None), write(headers, namespace_id=None)):
            assert isinstance(await auth.check(ctx), Principal)
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_legacy_jwt_projects_claim(tuist: tuple[FakeTuist, str]) -> None:
    """A scope-less JWT may prove a project target through its projects claim."""
    server, url = tuist
    auth = policy(url)
    try:
        principal = await auth.check(read(bearer({"projects": ["acme/ios"]})))
        assert isinstance(principal, Principal)
        assert server.introspections == []
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_introspection_fallback_and_caching(tuist: tuple[FakeTuist, str]) -> None:
    """An opaque token is introspected once; the principal is cached for later requests."""
    server, url = tuist
    server.active["opaque-1"] = {
        "active": True,
        "sub": "account-7",
        "principal_kind": "account",
        "cache_grants": {"project": {"write": ["acme/ios"]}},
    }
    auth = policy(url)
    try:
        headers = {"authorization": "Bearer opaque-1"}
        principal = await auth.check(write(headers))
        assert isinstance(principal, Principal)
        assert (principal.id, principal.kind) == ("account-7", "account")
        assert await auth.check(read(headers)) == principal
        assert server.introspections == [
            {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token": "opaque-1"}
        ]
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_introspection_denies(tuist: tuple[FakeTuist, str]) -> None:
    """Inactive tokens are 401; a failing introspection endpoint is 503."""
    server, url = tuist
    auth = policy(url)
    try:
        error = await denied(auth, read({"authorization": "Bearer revoked"}))
        assert isinstance(error, Unauthorized) and error.message == "Invalid or expired token"
        server.introspect_status = 500
        error = await denied(auth, read({"authorization": "Bearer other"}))
        assert isinstance(error, ServiceUnavailable)
        assert error.message == "Authentication backend unavailable"
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_tenant_routing_does_not_poison_the_token(tuist: tuple[FakeTuist, str]) -> None:
    """A request for another tenant is 403 naming both; the same token then works for ours."""
    _, url = tuist
    auth = policy(url)
    try:
        headers = bearer({"cache_grants": GRANTS})
        error = await denied(auth, read(headers, tenant_id="Other"))
        assert isinstance(error, Forbidden)
        assert error.message == "Forbidden: tenant 'other' is routed to server for 'acme'"
        assert isinstance(await auth.check(read(headers)), Principal)
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_only_the_derived_fields_decide(tuist: tuple[FakeTuist, str]) -> None:
    """Query parameters the request does not act on grant nothing.

    These are the contexts kura builds for two former bypasses: a clean of
    ``??project_handle=mine&namespace_id=victim`` acts on ``victim``, and an
    account-level Gradle PUT with a stray ``namespace_id=ios`` acts on the
    account; the query map still carries the decoys.
    """
    server, url = tuist
    auth = policy(url)
    try:
        headers = known_token(server, {"project": {"read": [], "write": ["acme/ios"]}})
        clean = context(
            headers=headers,
            method="DELETE",
            operation="namespace.delete",
            route="/api/cache/clean",
            namespace_id="victim",
            artifact_key=None,
            query={"?project_handle": "ios", "namespace_id": "victim", "tenant_id": "acme"},
        )
        assert isinstance(await denied(auth, clean), Forbidden)
        account_put = write(
            headers,
            route="/api/cache/gradle/{tenant}/{cache_key}",
            producer="gradle",
            namespace_id=None,
            artifact_key="k1",
            query={"namespace_id": "ios"},
        )
        assert isinstance(await denied(auth, account_put), Forbidden)
        no_tenant = read(headers, tenant_id=None, query={"account_handle": "acme"})
        assert isinstance(await denied(auth, no_tenant), BadRequest)
        assert isinstance(await auth.check(write(headers, namespace_id="ios")), Principal)
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_one_projects_allow_never_answers_for_another(tuist: tuple[FakeTuist, str]) -> None:
    """Allows are cached per namespace: a grant for one project is not one for the next."""
    server, url = tuist
    auth = policy(url)
    try:
        headers = known_token(server, {"project": {"read": [], "write": ["acme/ios"]}})
        assert isinstance(await auth.check(write(headers, namespace_id="ios")), Principal)
        assert isinstance(
            await auth.check(write(headers, namespace_id="ios", artifact_key="blob/2")), Principal
        )
        error = await denied(auth, write(headers, namespace_id="android"))
        assert isinstance(error, Forbidden)
        assert error.message.startswith("Forbidden: project 'acme/android' is not granted")
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_missing_or_malformed_credentials(tuist: tuple[FakeTuist, str]) -> None:
    """No Authorization is 401, no tenant 400, a malformed token 401 without a server call."""
    server, url = tuist
    auth = policy(url)
    try:
        error = await denied(auth, read({}))
        assert isinstance(error, Unauthorized)
        assert error.message == "Missing Authorization header"
        error = await denied(auth, read(bearer({}), tenant_id=None))
        assert isinstance(error, BadRequest)
        assert error.message == "Missing tenant_id/account_handle"
        for value in ("Bearer t\xe9", "Basic dXNlcjpw", "Bearer a, Bearer b", "Bearer "):
            error = await denied(auth, read({"authorization": value}))
            assert isinstance(error, Unauthorized), value
        forged = bearer({"cache_grants": GRANTS}, secret="x" * 48)
        error = await denied(auth, read(forged))
        assert isinstance(error, Unauthorized)
        assert len(server.introspections) == 1  # only the forged JWT was introspected
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_cache_access_endpoint_without_introspection(tuist: tuple[FakeTuist, str]) -> None:
    """Without an introspection client, projects use /api/cache/access and accounts get 503."""
    server, url = tuist
    server.access["Bearer legacy"] = [{"full_name": "Acme/iOS"}, "acme/other"]
    auth = policy(url, introspection=False)
    try:
        principal = await auth.check(read({"authorization": "Bearer legacy"}))
        assert isinstance(principal, Principal)
        assert principal.attributes["projects"] == ["acme/ios", "acme/other"]
        assert server.accesses == ["Bearer legacy"]
        error = await denied(auth, read({"authorization": "Bearer unknown"}))
        assert isinstance(error, Unauthorized) and error.message == "Invalid or expired token"
        error = await denied(auth, read({"authorization": "Bearer x"}, namespace_id=None))
        assert isinstance(error, ServiceUnavailable)
    finally:
        await auth.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_server_is_503() -> None:
    """When the Tuist server refuses connections (after one retry) the answer is 503."""
    auth = policy(f"http://127.0.0.1:{free_port()}")
    try:
        started = time.monotonic()
        error = await denied(auth, read({"authorization": "Bearer opaque"}))
        assert isinstance(error, ServiceUnavailable)
        assert time.monotonic() - started >= 0.1  # the one retry waited 100 ms
    finally:
        await auth.close()
