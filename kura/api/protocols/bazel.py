"""Bazel's HTTP cache: ``/bazel/ac/{sha256}``, ``/bazel/cas/{sha256}``, and per instance.

Action results (``ac``) get one keyspace per instance name
(``/bazel/{instance}/ac/...``, namespace ``bazel-ac``); content-addressed
blobs (``cas``, namespace ``bazel-cas``) are shared by all instances. CAS
uploads are verified: the body is hashed while it is staged and a mismatch
with its digest is a 400 that stores nothing. The empty blob is always
present, stored or not (Bazel probes the cache with it). Uploads answer 200
whether stored now or already.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from kura.api.artifacts import ArtifactService, Body
from kura.api.handling import admission_of, empty
from kura.api.table import Route, artifact_read, artifact_write
from kura.domain.artifacts import ArtifactAddress, Producer, is_valid_key
from kura.domain.errors import BadRequest
from kura.web.request import KuraRequest
from kura.web.routing import Query

from .neighbour import NEIGHBOUR_BODY_LIMIT

#: SHA-256 of the empty string: Bazel's health probe, present on every cache.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

BAZEL_AC = "bazel-ac"
BAZEL_CAS = "bazel-cas"

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sha256(value: str | None, what: str) -> str:
    if value is None or not _SHA256.fullmatch(value):
        raise BadRequest(f"Invalid {what}: expected 64 lowercase hex digits (SHA-256)")
    return value


def _instance(path: Mapping[str, str]) -> str | None:
    instance = path.get("instance_name")
    if instance is not None and not is_valid_key(instance):
        raise BadRequest("Invalid instance name")
    return instance


def bazel_ac(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    """``[/{instance}]/ac/{sha256}``: action results, one keyspace per instance."""
    digest = _sha256(path.get("hash"), "action digest")
    instance = _instance(path)
    key = digest if instance is None else f"{instance}/{digest}"
    return ArtifactAddress(Producer.BAZEL, BAZEL_AC, key)


def bazel_cas(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    """``[/{instance}]/cas/{sha256}``: content-addressed, shared by all instances."""
    _instance(path)
    return ArtifactAddress(Producer.BAZEL, BAZEL_CAS, _sha256(path.get("hash"), "CAS digest"))


def bazel_any(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    """Reads of either keyspace (``kind`` is ``ac`` or ``cas``)."""
    return (
        bazel_cas(path, query, node_tenant)
        if path.get("kind") == "cas"
        else bazel_ac(path, query, node_tenant)
    )


def _is_empty_blob(address: ArtifactAddress | None) -> bool:
    return address is not None and address.namespace == BAZEL_CAS and address.key == EMPTY_SHA256


class BazelRoutes:
    """Bazel's routes (see the module docstring).

    Args:
        artifacts: the shared artifact steps.
    """

    def __init__(self, artifacts: ArtifactService) -> None:
        self._artifacts = artifacts

    def routes(self) -> tuple[Route, ...]:
        """This protocol's rows of the route table."""
        bazel = Producer.BAZEL
        return (
            artifact_read(
                "bazel_get",
                "/bazel/<any(ac,cas):kind>/<hash>",
                self.get,
                producer=bazel,
                address=bazel_any,
                tenantless=True,
            ),
            artifact_read(
                "bazel_instance_get",
                "/bazel/<instance_name>/<any(ac,cas):kind>/<hash>",
                self.get,
                producer=bazel,
                address=bazel_any,
                tenantless=True,
            ),
            artifact_write(
                "bazel_ac_put",
                "/bazel/ac/<hash>",
                "PUT",
                self.put,
                producer=bazel,
                address=bazel_ac,
                tenantless=True,
                body_limit=NEIGHBOUR_BODY_LIMIT,
            ),
            artifact_write(
                "bazel_cas_put",
                "/bazel/cas/<hash>",
                "PUT",
                self.put,
                producer=bazel,
                address=bazel_cas,
                verify_digest=True,
                tenantless=True,
                body_limit=NEIGHBOUR_BODY_LIMIT,
            ),
            artifact_write(
                "bazel_instance_ac_put",
                "/bazel/<instance_name>/ac/<hash>",
                "PUT",
                self.put,
                producer=bazel,
                address=bazel_ac,
                tenantless=True,
                body_limit=NEIGHBOUR_BODY_LIMIT,
            ),
            artifact_write(
                "bazel_instance_cas_put",
                "/bazel/<instance_name>/cas/<hash>",
                "PUT",
                self.put,
                producer=bazel,
                address=bazel_cas,
                verify_digest=True,
                tenantless=True,
                body_limit=NEIGHBOUR_BODY_LIMIT,
            ),
        )

    async def get(self, request: KuraRequest) -> Body:
        admission = await admission_of(request)
        if _is_empty_blob(admission.address):
            # Always present, stored or not: Bazel probes the cache with it.
            self._artifacts.count_read(admission.spec.producer, "ok")
            return empty(request, 200)
        return await self._artifacts.download(request)

    async def put(self, request: KuraRequest) -> bytes:
        admission = await admission_of(request)
        if _is_empty_blob(admission.address):
            if request.staging is not None:
                # Nothing to keep: the empty blob is always present.
                await request.staging.abort()
            self._artifacts.count_write(Producer.BAZEL, "ok")
            return empty(request, 200)
        await self._artifacts.publish(request)
        return empty(request, 200)
