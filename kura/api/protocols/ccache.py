"""ccache's HTTP storage: ``/ccache/{key}``, ``/ccache/{ab}/{rest}``, ``/ccache/ac/{64 hex}``.

The three layouts (``flat``, ``subdirs``, the default, and ``bazel``) name
the same entry, so changing layouts keeps the cache. ccache rewrites its
manifests under the same key, so its PUTs are last-writer-wins
(``RouteSpec.overwrites``). ``DELETE`` is idempotent and deletes the entry
mesh-wide: it leaves a tombstone that replicates, so no peer and no
catch-up brings the entry back, while a later ``PUT`` of the key wins over
it (see docs/clients.md and docs/replication.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from twisted.internet.defer import Deferred

from kura.api.artifacts import ArtifactService
from kura.api.audit import audit_delete
from kura.api.handling import admission_of, empty
from kura.api.table import Route, artifact_read, artifact_write, route
from kura.defer import shielded
from kura.domain.artifacts import ArtifactAddress, Producer
from kura.domain.errors import BadRequest
from kura.storage.metadata import Outcome
from kura.storage.store import ArtifactStore
from kura.web.request import KuraRequest
from kura.web.routing import Operation, Query

from .neighbour import NEIGHBOUR_BODY_LIMIT

CCACHE = "ccache"
RULE = "/ccache/<path:location>"

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: ccache keys: 40 hex digits (4.14 seen) or, in older 4.x (4.7 seen), 4 hex digits
#: then 29 base32hex characters.
_CCACHE_KEY = re.compile(r"[0-9a-f]{40}|[0-9a-v]{33}")


def ccache_key(location: str) -> str:
    """The entry key of a ccache storage path, whatever the layout.

    ``{key}`` (flat), ``{key[:2]}/{key[2:]}`` (subdirs) and ``ac/{64 hex}``
    (bazel: a 40-hex key padded with its own first 24 digits) all name the
    same entry, so switching layouts keeps the cache.

    Raises:
        BadRequest: the path is not one of those forms.
    """
    parts = location.split("/")
    if len(parts) == 1:
        key = parts[0]
    elif len(parts) == 2 and parts[0] == "ac" and _SHA256.fullmatch(parts[1]):
        padded = parts[1]
        if padded[40:] != padded[:24]:
            raise BadRequest("Invalid ccache key: a bazel-layout key pads 40 hex digits")
        key = padded[:40]
    elif len(parts) == 2 and len(parts[0]) == 2:
        key = parts[0] + parts[1]
    else:
        raise BadRequest("Invalid ccache path: expected {key}, {ab}/{rest} or ac/{sha256}")
    if not _CCACHE_KEY.fullmatch(key):
        raise BadRequest("Invalid ccache key: expected 40 hex digits (or 33 base32hex)")
    return key


def ccache_address(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    return ArtifactAddress(Producer.CCACHE, CCACHE, ccache_key(path.get("location") or ""))


class CcacheRoutes:
    """ccache's routes (see the module docstring).

    Args:
        artifacts: the shared artifact steps.
        store: for deletes.
    """

    def __init__(self, artifacts: ArtifactService, *, store: ArtifactStore) -> None:
        self._artifacts = artifacts
        self._store = store

    def routes(self) -> tuple[Route, ...]:
        """This protocol's rows of the route table."""
        ccache = Producer.CCACHE
        return (
            artifact_read(
                "ccache_get",
                RULE,
                self._artifacts.download,
                producer=ccache,
                address=ccache_address,
                tenantless=True,
            ),
            artifact_write(
                "ccache_put",
                RULE,
                "PUT",
                self.put,
                producer=ccache,
                address=ccache_address,
                overwrites=True,
                tenantless=True,
                body_limit=NEIGHBOUR_BODY_LIMIT,
            ),
            route(
                "ccache_delete",
                RULE,
                "DELETE",
                self.delete,
                operation=Operation.DELETE,
                producer=ccache,
                address=ccache_address,
                tenantless=True,
            ),
        )

    async def put(self, request: KuraRequest) -> bytes:
        # ccache rewrites its manifests under the same key: last writer wins.
        await self._artifacts.publish(request)
        return empty(request, 200)

    async def delete(self, request: KuraRequest) -> bytes:
        admission = await admission_of(request)
        address = admission.address
        assert address is not None
        # Tombstoned even when this node has no copy: one may still be on its
        # way from a peer, and must not land after the delete.
        outcome = await shielded(
            Deferred.fromCoroutine(
                self._store.delete_artifact(self._store.artifact_id(address), address.namespace)
            )
        )
        if outcome is Outcome.APPLIED:
            audit_delete(request, admission, "delete")
        # Idempotent, as object stores answer it: absent afterwards either way.
        return empty(request, 204)
