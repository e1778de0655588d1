"""The neighbouring protocols' routes on the twisted.web path.

Bazel, ccache, sccache and Turborepo (kura/api/protocols/), and Gradle's path forms.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kura.accel.classify import Candidate, Classifier
from kura.accel.head import parse_head
from kura.domain.errors import StorageFault
from kura.service import KuraNode
from kura.testing import Exchange, Response, request
from tests.conftest import anonymous_deletes

EMPTY = hashlib.sha256(b"").hexdigest()
CCACHE_KEY = "89178b0daf" + "0" * 30
#: Statuses current Gradle treats as fatal (the build fails), from its HttpBuildCacheService.
GRADLE_FATAL = {305, 400, 401, 403, 405, 406, 407, 411, 415, 417, 426, 505, 511}


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def message(response: Response) -> str:
    assert response.headers["content-type"] == "application/json"
    return str(response.json()["message"])


def head_only(node: KuraNode, method: str, target: str, length: int) -> Response:
    """A request whose head declares ``length`` body bytes, none of them sent."""
    client = Exchange(node)
    client.send(
        f"{method} {target} HTTP/1.1\r\nHost: kura\r\nContent-Length: {length}\r\n\r\n".encode()
    )
    [response] = client.responses()
    return response


# -- Bazel HTTP cache ------------------------------------------------------------------------


def test_bazel_cas_upload_is_verified_against_its_digest(node: KuraNode) -> None:
    """A CAS PUT whose body hashes to its key is stored; a mismatch is a 400 and stores nothing."""
    body = b"output bytes"
    assert request(node, "PUT", f"/bazel/cas/{sha(body)}", body).status == 200
    assert request(node, "GET", f"/bazel/cas/{sha(body)}").body == body

    wrong = sha(b"something else")
    refused = request(node, "PUT", f"/bazel/cas/{wrong}", body)
    assert refused.status == 400
    assert "SHA-256" in message(refused)
    assert request(node, "GET", f"/bazel/cas/{wrong}").status == 404


def test_bazel_empty_blob_is_always_present(node: KuraNode) -> None:
    """The empty CAS blob answers 200 with no body before anyone stored it, and PUT is 200."""
    for method in ("GET", "HEAD"):
        response = request(node, method, f"/bazel/cas/{EMPTY}")
        assert response.status == 200
        assert response.body == b"" and response.headers["content-length"] == "0"
    assert request(node, "PUT", f"/bazel/cas/{EMPTY}", b"").status == 200


def test_bazel_head_answers_presence(node: KuraNode) -> None:
    """HEAD is 200 with the length for a stored entry and 404 for a missing one."""
    request(node, "PUT", f"/bazel/ac/{'a' * 64}", b"action result")
    found = request(node, "HEAD", f"/bazel/ac/{'a' * 64}")
    assert found.status == 200 and found.headers["content-length"] == "13"
    assert request(node, "HEAD", f"/bazel/ac/{'b' * 64}").status == 404


def test_bazel_instances_partition_action_results_but_share_cas(node: KuraNode) -> None:
    """An instance prefix is its own action-result keyspace; CAS blobs are shared."""
    key = "c" * 64
    assert request(node, "PUT", f"/bazel/main/ac/{key}", b"main result").status == 200
    assert request(node, "GET", f"/bazel/ac/{key}").status == 404
    assert request(node, "GET", f"/bazel/main/ac/{key}").body == b"main result"

    blob = b"shared blob"
    assert request(node, "PUT", f"/bazel/main/cas/{sha(blob)}", blob).status == 200
    assert request(node, "GET", f"/bazel/cas/{sha(blob)}").body == blob
    assert request(node, "GET", f"/bazel/other/cas/{sha(blob)}").body == blob


@pytest.mark.parametrize(
    "target",
    ["/bazel/ac/abc", f"/bazel/cas/{'A' * 64}", f"/bazel/ac/{'a' * 63}", f"/bazel/cas/{'g' * 64}"],
)
def test_bazel_rejects_malformed_digests(node: KuraNode, target: str) -> None:
    """A key that is not 64 lowercase hex digits is a 400 that says so."""
    response = request(node, "GET", target)
    assert response.status == 400
    assert "64 lowercase hex" in message(response)


# -- ccache HTTP storage -------------------------------------------------------------------


def test_ccache_layouts_name_the_same_entry(node: KuraNode) -> None:
    """subdirs, flat and bazel layouts of one key read the same stored entry."""
    subdirs = f"/ccache/{CCACHE_KEY[:2]}/{CCACHE_KEY[2:]}"
    assert request(node, "PUT", subdirs, b"result").status == 200
    for target in (subdirs, f"/ccache/{CCACHE_KEY}", f"/ccache/ac/{CCACHE_KEY}{CCACHE_KEY[:24]}"):
        response = request(node, "GET", target)
        assert response.status == 200 and response.body == b"result"


def test_ccache_accepts_older_base32_keys(node: KuraNode) -> None:
    """ccache before 4.10 names entries by 33 base32hex characters (subdirs layout)."""
    assert request(node, "PUT", "/ccache/45/78ksg2utcunjpos8moq8lbr7jussam4", b"m").status == 200
    assert request(node, "GET", "/ccache/4578ksg2utcunjpos8moq8lbr7jussam4").body == b"m"


@pytest.mark.parametrize(
    "target",
    [
        "/ccache/../etc/passwd",
        "/ccache/a/b/c",
        f"/ccache/{CCACHE_KEY}x",
        f"/ccache/ac/{'0' * 40}{'1' * 24}",
        "/ccache/zz/" + "z" * 31,
    ],
)
def test_ccache_rejects_paths_that_are_no_key(node: KuraNode, target: str) -> None:
    """Anything but a ccache key in one of the three layouts is a 400."""
    response = request(node, "GET", target)
    assert response.status == 400
    assert "ccache" in message(response)


@anonymous_deletes
def test_ccache_delete_removes_the_entry_idempotently(node: KuraNode) -> None:
    """DELETE answers 204 and the entry is gone; deleting again is 204 too."""
    request(node, "PUT", f"/ccache/{CCACHE_KEY}", b"result")
    assert request(node, "DELETE", f"/ccache/{CCACHE_KEY}").status == 204
    assert request(node, "GET", f"/ccache/{CCACHE_KEY}").status == 404
    assert request(node, "DELETE", f"/ccache/{CCACHE_KEY}").status == 204


@anonymous_deletes
def test_ccache_put_after_a_delete_is_served(node: KuraNode) -> None:
    """The delete leaves a tombstone; a later PUT of the key wins over it."""
    request(node, "PUT", f"/ccache/{CCACHE_KEY}", b"result")
    assert request(node, "DELETE", f"/ccache/{CCACHE_KEY}").status == 204
    assert request(node, "PUT", f"/ccache/{CCACHE_KEY}", b"rebuilt").status == 200
    assert request(node, "GET", f"/ccache/{CCACHE_KEY}").body == b"rebuilt"


def test_ccache_put_replaces_an_existing_entry(node: KuraNode) -> None:
    """ccache rewrites manifests in place: a second PUT of a key replaces the first."""
    request(node, "PUT", f"/ccache/{CCACHE_KEY}", b"manifest v1")
    assert request(node, "PUT", f"/ccache/{CCACHE_KEY}", b"manifest v2").status == 200
    assert request(node, "GET", f"/ccache/{CCACHE_KEY}").body == b"manifest v2"


# -- sccache WebDAV ------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/sccache/", "/sccache/8/8/0/"])
def test_sccache_propfind_reports_collections_that_keep_writes_enabled(
    node: KuraNode, target: str
) -> None:
    """PROPFIND on a collection is a 207 naming it a collection, with getlastmodified."""
    response = request(node, "PROPFIND", target, b"<propfind/>", {"Depth": "0"})
    assert response.status == 207
    assert response.headers["content-type"].startswith("application/xml")
    body = response.body.decode()
    assert f"<D:href>{target}</D:href>" in body
    assert "<D:collection/>" in body and "<D:getlastmodified>" in body


def test_sccache_objects_are_written_and_read_without_mkcol(node: KuraNode) -> None:
    """An object PUT needs no MKCOL; GET reads it back; MKCOL is a harmless 201."""
    path = "/sccache/2/7/8/" + "27" * 32
    assert request(node, "GET", path).status == 404
    assert request(node, "PUT", path, b"object").status == 201
    assert request(node, "PUT", path, b"object").status == 204
    assert request(node, "GET", path).body == b"object"
    assert request(node, "PROPFIND", path).status == 404
    assert request(node, "MKCOL", "/sccache/2/").status == 201
    assert request(node, "MKCOL", "/sccache/").status == 201


def test_sccache_check_file_round_trips(node: KuraNode) -> None:
    """sccache's start-up probe (.sccache_check) can be written and read back."""
    assert request(node, "GET", "/sccache/.sccache_check").status == 404
    assert request(node, "PUT", "/sccache/.sccache_check", b"Hello, World!").status == 201
    assert request(node, "GET", "/sccache/.sccache_check").body == b"Hello, World!"


@pytest.mark.parametrize(
    "target", ["/sccache/8/8/0/not-hex", "/sccache/../" + "a" * 64, "/sccache/8/8/0/"]
)
def test_sccache_rejects_bad_object_paths(node: KuraNode, target: str) -> None:
    """Object names must be hex digests (or .sccache_check) under token segments."""
    assert request(node, "PUT", target, b"x").status == 400


# -- Turborepo -------------------------------------------------------------------------------


def test_turbo_status_and_events(node: KuraNode) -> None:
    """status reports the cache enabled; analytics events are accepted with 204."""
    status = request(node, "GET", "/v8/artifacts/status?slug=team")
    assert status.status == 200 and status.json() == {"status": "enabled"}
    events = request(node, "POST", "/v8/artifacts/events?slug=team", b'[{"event":"HIT"}]')
    assert events.status == 204


def test_turbo_artifacts_are_kept_per_team(node: KuraNode) -> None:
    """An artifact stored for one team slug is invisible to another team and to no team."""
    target = "/v8/artifacts/0123456789abcdef"
    stored = request(node, "PUT", f"{target}?slug=alpha", b"tarball")
    assert stored.status == 200 and stored.json() == {"urls": []}
    assert request(node, "GET", f"{target}?slug=alpha").body == b"tarball"
    assert request(node, "HEAD", f"{target}?slug=alpha").status == 200
    assert request(node, "GET", f"{target}?slug=beta").status == 404
    assert request(node, "GET", target).status == 404
    assert request(node, "GET", f"{target}?teamId=alpha").body == b"tarball"


def test_turbo_put_answers_one_json_body_stored_or_not(node: KuraNode) -> None:
    """A PUT is answered 200 with ``{"urls": []}`` whether it stored the artifact or found it."""
    target = "/v8/artifacts/0123456789abcdef?slug=alpha"
    for _ in range(2):
        answer = request(node, "PUT", target, b"tarball")
        assert answer.status == 200 and answer.json() == {"urls": []}
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["content-length"] == str(len(answer.body))


@pytest.mark.parametrize(
    "target", ["/v8/artifacts/abc", "/v8/artifacts/XYZ0123456789abc", "/v8/artifacts/a?slug=a/b"]
)
def test_turbo_rejects_bad_hashes_and_slugs(node: KuraNode, target: str) -> None:
    """Short or non-hex hashes and slugs that are no namespace token are 400s."""
    assert request(node, "GET", target).status == 400


# -- Gradle, path form -----------------------------------------------------------------------


def test_gradle_path_forms_address_the_query_forms_artifacts(node: KuraNode) -> None:
    """``/{tenant}/{namespace}/{key}`` and ``/{tenant}/{key}`` are the query form's artifacts."""
    key = "a" * 32
    assert request(node, "PUT", f"/api/cache/gradle/default/proj/{key}", b"project").status == 201
    assert request(node, "PUT", f"/api/cache/gradle/default/proj/{key}", b"again").status == 200
    query = f"/api/cache/gradle/{key}?tenant_id=default&namespace_id=proj"
    assert request(node, "GET", query).body == b"project"

    assert request(node, "PUT", f"/api/cache/gradle/{key}?tenant_id=default", b"tenant").status
    assert request(node, "GET", f"/api/cache/gradle/DEFAULT/{key}").body == b"tenant"


def test_gradle_path_form_checks_the_tenant(node: KuraNode) -> None:
    """A tenant this node does not serve is a 403 (a configuration error, not cache trouble)."""
    response = request(node, "GET", f"/api/cache/gradle/other/proj/{'a' * 32}")
    assert response.status == 403
    assert "routed to server for 'default'" in message(response)


def test_gradle_cache_trouble_never_answers_a_fatal_status(
    node: KuraNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage faults and oversized stores map to statuses Gradle survives (miss, 413)."""

    async def broken(artifact_id: str) -> Any:
        raise StorageFault("disk on fire")

    too_large = head_only(node, "PUT", f"/api/cache/gradle/default/proj/{'b' * 32}", 200 << 20)
    assert too_large.status == 413
    monkeypatch.setattr(node.store, "manifest", broken)
    read = request(node, "GET", f"/api/cache/gradle/default/proj/{'b' * 32}")
    assert read.status == 404
    assert {too_large.status, read.status}.isdisjoint(GRADLE_FATAL)


# -- every neighbour ------------------------------------------------------------------------


READS = [
    f"/bazel/cas/{'d' * 64}",
    f"/bazel/main/ac/{'d' * 64}",
    f"/ccache/{CCACHE_KEY}",
    "/sccache/8/8/0/" + "8" * 64,
    "/v8/artifacts/0123456789abcdef?slug=team",
    f"/api/cache/gradle/default/{'d' * 32}",
]


@pytest.mark.parametrize("target", READS)
def test_reads_miss_on_storage_faults(
    node: KuraNode, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """A storage fault on a read is a miss (404), never a 5xx a build could die of."""

    async def broken(artifact_id: str) -> Any:
        raise StorageFault("disk on fire")

    monkeypatch.setattr(node.store, "manifest", broken)
    assert request(node, "GET", target).status == 404


@pytest.mark.parametrize("target", READS)
def test_reads_are_accelerable(node: KuraNode, target: str) -> None:
    """The accelerator may serve every neighbour GET (the spec resolves its address)."""
    head = parse_head(f"GET {target} HTTP/1.1\r\nHost: kura\r\n\r\n".encode())
    assert head is not None
    decision = Classifier(node.gate.routes, "default").classify(head)
    assert isinstance(decision, Candidate), decision


@pytest.mark.parametrize(
    "target",
    [f"/bazel/cas/{'e' * 64}", f"/ccache/{CCACHE_KEY}", "/sccache/1/2/3/" + "e" * 64],
)
def test_oversized_uploads_are_refused_from_the_head(node: KuraNode, target: str) -> None:
    """A declared body over the limit is a 413 before any byte (clients count it as not stored)."""
    response = head_only(node, "PUT", target, 3 << 30)
    assert response.status == 413
    assert response.headers["connection"] == "close"


EXTENSION = """
import json

LOG = {log!r}


def authenticate(ctx):
    with open(LOG, "a") as handle:
        handle.write(json.dumps([ctx.route, ctx.tenant_id, ctx.namespace_id, ctx.producer,
                                 ctx.artifact_key, ctx.header("authorization")]) + "\\n")
    from kura.auth import Principal
    return Principal("ci", kind="service", ttl_seconds=0)


def authorize(ctx, principal):
    from kura.auth import Allow
    return Allow(ttl_seconds=0)
"""


def hooked_node(nodes: Any, tmp_path: Path) -> tuple[KuraNode, Path]:
    log = tmp_path / "hooks.log"
    script = tmp_path / "policy.py"
    script.write_text(textwrap.dedent(EXTENSION.format(log=str(log))))
    return nodes.start(KURA_EXTENSION_SCRIPT_PATH=str(script)), log


def test_hooks_see_gradle_basic_credentials_and_the_artifact(nodes: Any, tmp_path: Path) -> None:
    """Gradle's Basic credentials reach the hooks as the authorization header."""
    node, log = hooked_node(nodes, tmp_path)
    basic = "Basic Y2k6c2VjcmV0"
    response = request(
        node, "GET", f"/api/cache/gradle/default/proj/{'a' * 32}", headers={"Authorization": basic}
    )
    assert response.status == 404
    route, _, namespace, producer, key, authorization = json.loads(log.read_text().splitlines()[-1])
    assert route == "/api/cache/gradle/{tenant}/{namespace}/{cache_key}"
    assert (namespace, producer, key, authorization) == ("proj", "gradle", "a" * 32, basic)


def test_hooks_see_the_tenant_named_in_the_gradle_path(nodes: Any, tmp_path: Path) -> None:
    """The tenant segment of the path form is the hooks' tenant_id, as the query form's is."""
    node, log = hooked_node(nodes, tmp_path)
    request(node, "GET", f"/api/cache/gradle/default/proj/{'a' * 32}")
    assert json.loads(log.read_text().splitlines()[-1])[1] == "default"


def test_hooks_see_neighbours_as_tenantless(nodes: Any, tmp_path: Path) -> None:
    """Clients that cannot name a tenant run as tenant default, with their producer."""
    node, log = hooked_node(nodes, tmp_path)
    request(node, "GET", f"/bazel/cas/{'f' * 64}", headers={"Authorization": "Bearer t"})
    _, tenant, namespace, producer, key, _ = json.loads(log.read_text().splitlines()[-1])
    assert (tenant, namespace, producer, key) == ("default", "bazel-cas", "bazel", "f" * 64)
