"""Nx's and Metro's remote caches: ``/v1/cache/{hash}`` and ``/api/metro/cache/{key}``.

Neither can name a tenant: their artifacts are the node's (the hooks see
tenant ``default``), in the fixed namespaces ``nx`` and ``metro``. Both fail
a whole build on a 5xx read, so reads miss on storage faults. Nx also fails
a task on any upload status but 200, 403 and 409: its PUT answers exactly
200, cache trouble on a write is a 409 (``trouble_status``), and its 401/403
bodies are plain text.
"""

from __future__ import annotations

from kura.api.artifacts import ArtifactService
from kura.api.handling import empty
from kura.api.routes import fixed_namespace
from kura.api.table import Route, artifact_read, artifact_write
from kura.domain.artifacts import Producer
from kura.web.request import KuraRequest
from kura.web.routing import GiB

BODY_LIMIT = 2 * GiB

nx_address = fixed_namespace(Producer.NX, "nx", "hash")
metro_address = fixed_namespace(Producer.METRO, "metro", "cache_key")


class NxMetroRoutes:
    """Nx's and Metro's routes (see the module docstring).

    Args:
        artifacts: the shared artifact steps.
    """

    def __init__(self, artifacts: ArtifactService) -> None:
        self._artifacts = artifacts

    def routes(self) -> tuple[Route, ...]:
        """These protocols' rows of the route table."""
        download = self._artifacts.download
        return (
            artifact_read(
                "nx_get",
                "/v1/cache/<hash>",
                download,
                producer=Producer.NX,
                address=nx_address,
                tenantless=True,
                plain_auth_errors=True,
            ),
            artifact_write(
                "nx_put",
                "/v1/cache/<hash>",
                "PUT",
                self.put,
                producer=Producer.NX,
                address=nx_address,
                tenantless=True,
                body_limit=BODY_LIMIT,
                plain_auth_errors=True,
                trouble_status=409,
            ),
            artifact_read(
                "metro_get",
                "/api/metro/cache/<cache_key>",
                download,
                producer=Producer.METRO,
                address=metro_address,
                tenantless=True,
            ),
            artifact_write(
                "metro_put",
                "/api/metro/cache/<cache_key>",
                "PUT",
                self.put,
                producer=Producer.METRO,
                address=metro_address,
                tenantless=True,
                body_limit=BODY_LIMIT,
            ),
        )

    async def put(self, request: KuraRequest) -> bytes:
        # Nx stores only on exactly 200 (any other 2xx fails the task).
        await self._artifacts.publish(request)
        return empty(request, 200)
