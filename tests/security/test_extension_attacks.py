"""Attacks on an extension's decisions, against a real node running the Tuist example.

A token granted one project (``acme/mine``) used to reach other projects:
through a clean whose query also carried a decoy ``?project_handle=mine``,
through Gradle's account-level path form with a stray ``namespace_id=mine``,
and through the authorize cache, which kept one project's allow for every
project. The extension now sees what each request acts on, and its allows
are cached per namespace, so every one of these is refused and the victim's
artifacts are untouched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from tests.support.mesh import metrics, request
from tests.support.real import REPO_ROOT, RealNode

pytestmark = pytest.mark.realnode

SECRET = "tuist-guardian-secret-key-of-sufficient-length!"
EXAMPLE = os.path.join(REPO_ROOT, "examples", "extensions", "tuist.py")


def token(project_write: list[str], account_read: list[str] | None = None) -> dict[str, str]:
    claims = {
        "sub": "user-1",
        "type": "user",
        "exp": int(time.time()) + 600,
        "cache_grants": {
            "project": {"read": [], "write": project_write},
            "account": {"read": account_read or [], "write": []},
        },
    }
    return {"Authorization": "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")}


MINE = token(["acme/mine"])
VICTIM = token(["acme/victim"], account_read=["acme"])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """A node of tenant ``acme`` guarded by examples/extensions/tuist.py."""
    started = RealNode(
        str(tmp_path_factory.mktemp("tuist") / "data"),
        KURA_TENANT_ID="acme",
        KURA_EXTENSION_SCRIPT_PATH=EXAMPLE,
        KURA_EXTENSION_JWT_VERIFIER_TUIST_SECRET=SECRET,
        # An unreachable Tuist server: what local JWT grants do not allow is refused.
        KURA_EXTENSION_HTTP_CLIENT_TUIST_BASE_URL="http://127.0.0.1:9",
    ).start()
    yield started
    started.stop()


def refused(status: int) -> bool:
    return status in (401, 403, 503)


def test_a_decoy_project_handle_cannot_clean_another_project(node: RealNode) -> None:
    """``??project_handle=mine&namespace_id=victim`` acts on victim, so mine's grant is no use."""
    victim = node.url + "/api/cache/cas/v1?tenant_id=acme&namespace_id=victim"
    assert request("POST", victim, b"victim's artifact", VICTIM)[0] == 204
    clean = node.url + "/api/cache/clean??project_handle=mine&namespace_id=victim&tenant_id=acme"
    assert refused(request("DELETE", clean, headers=MINE)[0])
    assert request("GET", victim, headers=VICTIM)[2] == b"victim's artifact"
    own = node.url + "/api/cache/clean?tenant_id=acme&namespace_id=mine"
    assert request("DELETE", own, headers=MINE)[0] == 204


def test_a_stray_namespace_cannot_write_at_account_level(node: RealNode) -> None:
    """The account-level Gradle path ignores ``namespace_id``; so does the decision."""
    target = node.url + "/api/cache/gradle/acme/shared-key?namespace_id=mine"
    assert refused(request("PUT", target, b"poison", MINE)[0])
    status, _, _ = request("GET", node.url + "/api/cache/gradle/acme/shared-key", headers=VICTIM)
    assert status == 404


def test_one_projects_allow_is_not_cached_for_another(node: RealNode) -> None:
    """An allowed write to mine, cached, never answers a write to victim."""
    for key in ("k1", "k2"):
        own = node.url + f"/api/cache/gradle/acme/mine/{key}"
        assert request("PUT", own, b"mine", MINE)[0] == 201
    theirs = node.url + "/api/cache/gradle/acme/victim/k1"
    assert refused(request("PUT", theirs, b"poison", MINE)[0])
    assert request("GET", theirs, headers=VICTIM)[0] == 404


def test_the_accelerated_path_decides_the_same(node: RealNode, tmp_path: Any) -> None:
    """A download of victim's artifact with mine's token is refused by the
    accelerator too, for a small body (kept in the database, sent from memory)
    and a large one (a file, sent by the kernel)."""
    for key, body in (("v2", b"x" * 4096), ("v3", b"y" * 100 * 1024)):
        victim = node.url + f"/api/cache/gradle/{key}?tenant_id=acme&namespace_id=victim"
        assert request("PUT", victim, body, VICTIM)[0] == 201
        before = accelerated(node)
        assert refused(request("GET", victim, headers=MINE)[0])
        assert request("GET", victim, headers=VICTIM)[2] == body
        assert accelerated(node) == before + 1  # the allowed download took that path


def accelerated(node: RealNode) -> float:
    samples = metrics(node)
    return sum(
        samples.get(f'kura_artifact_serving_paths_total{{path="{path}"}}', 0.0)
        for path in ("splice", "sendfile", "memory")
    )
