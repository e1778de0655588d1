"""Gradle's build cache: the Tuist plugin's query form and stock Gradle's path forms.

* ``/api/cache/gradle/{key}?tenant_id=&namespace_id=``: the Tuist Gradle plugin.
* ``/api/cache/gradle/{tenant}/{namespace}/{key}`` and
  ``/api/cache/gradle/{tenant}/{key}``: stock ``HttpBuildCache`` drops the
  URL's query string, so tenant and namespace travel in the path. All forms
  address the same artifact for the same tenant, namespace and key.

A PUT answers 201 when it stored the entry, 200 when it was already stored.
Gradle turns its remote cache off for the rest of a build on a 5xx read, so
reads miss on storage faults; the statuses it treats as fatal are never
used for cache trouble (see docs/clients.md).
"""

from __future__ import annotations

from kura.api.artifacts import ArtifactService
from kura.api.handling import empty
from kura.api.routes import tenant_in_path, tenant_scoped
from kura.api.table import Route, artifact_read, artifact_write
from kura.domain.artifacts import Producer
from kura.web.request import KuraRequest
from kura.web.routing import MiB

#: The largest Gradle cache entry (the same for every form).
GRADLE_BODY_LIMIT = 100 * MiB

QUERY_FORM = "/api/cache/gradle/<cache_key>"
PATH_FORM = "/api/cache/gradle/<tenant>/<namespace>/<cache_key>"
TENANT_PATH_FORM = "/api/cache/gradle/<tenant>/<cache_key>"

gradle_query = tenant_scoped(Producer.GRADLE, "cache_key")
gradle_in_path = tenant_in_path(Producer.GRADLE, "cache_key", namespace_arg="namespace")
gradle_tenant_in_path = tenant_in_path(Producer.GRADLE, "cache_key")


class GradleRoutes:
    """Gradle's routes (see the module docstring).

    Args:
        artifacts: the shared artifact steps.
    """

    def __init__(self, artifacts: ArtifactService) -> None:
        self._artifacts = artifacts

    def routes(self) -> tuple[Route, ...]:
        """This protocol's rows of the route table."""
        download = self._artifacts.download
        return (
            artifact_read(
                "gradle_get",
                QUERY_FORM,
                download,
                producer=Producer.GRADLE,
                address=gradle_query,
            ),
            artifact_write(
                "gradle_put",
                QUERY_FORM,
                "PUT",
                self.put,
                producer=Producer.GRADLE,
                address=gradle_query,
                body_limit=GRADLE_BODY_LIMIT,
            ),
            artifact_read(
                "gradle_path_get",
                PATH_FORM,
                download,
                producer=Producer.GRADLE,
                address=gradle_in_path,
                tenant_arg="tenant",
            ),
            artifact_write(
                "gradle_path_put",
                PATH_FORM,
                "PUT",
                self.put,
                producer=Producer.GRADLE,
                address=gradle_in_path,
                tenant_arg="tenant",
                body_limit=GRADLE_BODY_LIMIT,
            ),
            artifact_read(
                "gradle_tenant_get",
                TENANT_PATH_FORM,
                download,
                producer=Producer.GRADLE,
                address=gradle_tenant_in_path,
                tenant_arg="tenant",
            ),
            artifact_write(
                "gradle_tenant_put",
                TENANT_PATH_FORM,
                "PUT",
                self.put,
                producer=Producer.GRADLE,
                address=gradle_tenant_in_path,
                tenant_arg="tenant",
                body_limit=GRADLE_BODY_LIMIT,
            ),
        )

    async def put(self, request: KuraRequest) -> bytes:
        stored = await self._artifacts.publish(request)
        return empty(request, 201 if stored else 200)
