"""Turborepo's remote cache (v8): ``/v8/artifacts/{hash}``, ``status`` and ``events``.

Artifacts are kept per team: ``?slug=`` (or ``?teamId=``) selects the
namespace ``turbo-{team}``, ``turbo`` without one. A PUT answers 200 with
``{"urls": []}`` whether stored now or already. ``status`` reports the cache
enabled; analytics ``events`` are accepted with 204 and dropped (kura's
metrics count hits). Artifact signatures (``x-artifact-tag``) are not stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from kura.api.artifacts import ArtifactService
from kura.api.handling import admission_of, empty, json_response
from kura.api.table import Route, artifact_read, artifact_write, route
from kura.domain.artifacts import ArtifactAddress, Producer, is_valid_namespace
from kura.domain.errors import BadRequest
from kura.web.request import KuraRequest
from kura.web.routing import BodyKind, MiB, Query

from .neighbour import NEIGHBOUR_BODY_LIMIT

TURBO = "turbo"
#: Turborepo's analytics events are small JSON batches.
EVENTS_BODY_LIMIT = 1 * MiB
ARTIFACT = "/v8/artifacts/<hash>"

#: Turborepo task hashes are 16 hex digits; allow longer ones.
_TURBO_HASH = re.compile(r"[0-9a-f]{16,128}")


def turbo_namespace(query: Query) -> str:
    """``turbo-{team}`` for ``?slug=`` (or ``?teamId=``), ``turbo`` without one."""
    team = query.single("slug", alias="teamId")
    if team is None:
        return TURBO
    namespace = f"{TURBO}-{team}"
    if not is_valid_namespace(namespace):
        raise BadRequest("Invalid team slug")
    return namespace


def turbo_address(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    value = path.get("hash") or ""
    if not _TURBO_HASH.fullmatch(value):
        raise BadRequest("Invalid artifact hash: expected 16 or more lowercase hex digits")
    return ArtifactAddress(Producer.TURBO, turbo_namespace(query), value)


class TurboRoutes:
    """Turborepo's routes (see the module docstring).

    Args:
        artifacts: the shared artifact steps.
    """

    def __init__(self, artifacts: ArtifactService) -> None:
        self._artifacts = artifacts

    def routes(self) -> tuple[Route, ...]:
        """This protocol's rows of the route table."""
        turbo = Producer.TURBO
        return (
            route(
                "turbo_status",
                "/v8/artifacts/status",
                "GET",
                self.status,
                producer=turbo,
                tenantless=True,
            ),
            route(
                "turbo_events",
                "/v8/artifacts/events",
                "POST",
                self.events,
                producer=turbo,
                tenantless=True,
                body=BodyKind.MEMORY,
                body_limit=EVENTS_BODY_LIMIT,
            ),
            artifact_read(
                "turbo_get",
                ARTIFACT,
                self._artifacts.download,
                producer=turbo,
                address=turbo_address,
                tenantless=True,
            ),
            artifact_write(
                "turbo_put",
                ARTIFACT,
                "PUT",
                self.put,
                producer=turbo,
                address=turbo_address,
                tenantless=True,
                body_limit=NEIGHBOUR_BODY_LIMIT,
            ),
        )

    async def status(self, request: KuraRequest) -> bytes:
        await admission_of(request)
        return json_response(request, 200, {"status": "enabled"})

    async def events(self, request: KuraRequest) -> bytes:
        # Usage analytics: accepted and dropped (kura counts hits itself).
        await admission_of(request)
        return empty(request, 204)

    async def put(self, request: KuraRequest) -> bytes:
        # One answer, whether stored now or already there.
        await self._artifacts.publish(request)
        return json_response(request, 200, {"urls": []})
