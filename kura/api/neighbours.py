"""Routes for the neighbouring cache protocols, on the same store as kura's own.

Stock clients that were not written for kura get a plain content cache here:

* **Gradle, path form**: ``/api/cache/gradle/{tenant}/{namespace}/{key}`` and
  ``/api/cache/gradle/{tenant}/{key}``. Stock ``HttpBuildCache`` drops the
  URL's query string, so tenant and namespace travel in the path; both forms
  address the same artifact as ``/api/cache/gradle/{key}?tenant_id=...``.
* **Bazel HTTP cache**: ``/bazel/ac/{sha256}``, ``/bazel/cas/{sha256}`` and
  ``/bazel/{instance}/ac|cas/{sha256}``. CAS uploads are verified against
  their digest; the empty blob is always present.
* **ccache HTTP storage**: ``/ccache/{key}`` (``layout=flat``),
  ``/ccache/{2 chars}/{rest}`` (``subdirs``, the default) and
  ``/ccache/ac/{64 hex}`` (``bazel``); all three name the same entry.
* **sccache WebDAV**: ``/sccache/...`` with ``PROPFIND`` answering that every
  collection exists (so sccache keeps writing) and ``MKCOL`` a no-op 201.
* **Turborepo remote cache (v8)**: ``/v8/artifacts/{hash}``,
  ``/v8/artifacts/status`` and ``POST /v8/artifacts/events``.

Each protocol writes its own producer and namespace (``bazel-ac``,
``bazel-cas``, ``ccache``, ``sccache``, ``turbo`` or ``turbo-{team}``). None
of these clients can name a tenant, so their artifacts belong to the node's
tenant and the hooks see tenant ``default`` (as for Nx and Metro). Every
route goes through admission, the extension hooks, the accelerator (GETs)
and replication like kura's own routes. Reads answer a miss (404) on
storage trouble: a cache in trouble must never fail a build.

Keys are validated strictly (a clear 400 names what is wrong); they are
only ever hashed into artifact ids, never used as file names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol
from xml.sax.saxutils import escape

from twisted.internet.defer import Deferred
from twisted.web.http import datetimeToString

from kura.defer import shielded
from kura.domain.artifacts import (
    ArtifactAddress,
    Producer,
    is_valid_key,
    is_valid_namespace,
)
from kura.domain.errors import BadRequest
from kura.storage.store import ArtifactStore
from kura.web.http import KuraRequest
from kura.web.routing import BodyKind, GiB, MiB, Operation, Query

from .artifacts import ArtifactService
from .audit import audit_delete
from .handling import admission_of, empty, json_response
from .registry import route
from .routes import tenant_in_path

#: Uploads larger than this are refused with 413 (every neighbour client
#: treats a failed store as "not stored" and carries on).
NEIGHBOUR_BODY_LIMIT = 2 * GiB
#: The same limit as the query form of the Gradle route.
GRADLE_BODY_LIMIT = 100 * MiB
#: Turborepo's analytics events are small JSON batches.
EVENTS_BODY_LIMIT = 1 * MiB

#: SHA-256 of the empty string: Bazel's health probe, present on every cache.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

BAZEL_AC = "bazel-ac"
BAZEL_CAS = "bazel-cas"
CCACHE = "ccache"
SCCACHE = "sccache"
TURBO = "turbo"

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: ccache keys: 40 hex digits (4.14 seen) or, in older 4.x (4.7 seen), 4 hex digits
#: then 29 base32hex characters.
_CCACHE_KEY = re.compile(r"[0-9a-f]{40}|[0-9a-v]{33}")
#: sccache names objects by a hex digest (64 digits today).
_SCCACHE_OBJECT = re.compile(r"[0-9a-f]{32,128}")
SCCACHE_CHECK = ".sccache_check"
_SCCACHE_MAX_DEPTH = 16
#: Turborepo task hashes are 16 hex digits; allow longer ones.
_TURBO_HASH = re.compile(r"[0-9a-f]{16,128}")


# -- keys and addresses -----------------------------------------------------------------


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


def _sccache_segments(location: str) -> list[str]:
    """The validated segments of a WebDAV path below ``/sccache/`` (may be empty)."""
    parts = [part for part in location.split("/") if part]
    if len(parts) > _SCCACHE_MAX_DEPTH or not all(is_valid_key(part) for part in parts):
        raise BadRequest("Invalid sccache path")
    return parts


def sccache_key(location: str) -> str:
    """The entry key of an sccache object path (its segments, joined).

    The last segment is a hex digest or ``.sccache_check``; the segments
    before it are sccache's fan-out directories (and any key prefix).

    Raises:
        BadRequest: an empty path, a collection path, or a bad segment.
    """
    if location.endswith("/"):
        raise BadRequest("Invalid sccache object path: it names a collection")
    parts = _sccache_segments(location)
    if not parts or not (parts[-1] == SCCACHE_CHECK or _SCCACHE_OBJECT.fullmatch(parts[-1])):
        raise BadRequest("Invalid sccache object name: expected a hex digest")
    return "/".join(parts)


def sccache_address(path: Mapping[str, str], query: Query, node_tenant: str) -> ArtifactAddress:
    return ArtifactAddress(Producer.SCCACHE, SCCACHE, sccache_key(path.get("location") or ""))


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


gradle_in_path = tenant_in_path(Producer.GRADLE, "cache_key", namespace_arg="namespace")
gradle_tenant_in_path = tenant_in_path(Producer.GRADLE, "cache_key")


# -- the routes -------------------------------------------------------------------------


class _Host(Protocol):
    """What these routes use of :class:`kura.api.app.PublicAPI`."""

    _store: ArtifactStore
    _artifacts: ArtifactService

    async def _download(self, request: KuraRequest) -> bytes: ...

    async def _upload(
        self, request: KuraRequest, *, new_status: int, existing_status: int
    ) -> bytes: ...


_READ = {
    "operation": Operation.READ,
    "accelerable": True,
    "misses_on_fault": True,
    "tenantless": True,
}
_WRITE = {
    "operation": Operation.WRITE,
    "body": BodyKind.STAGED,
    "body_limit": NEIGHBOUR_BODY_LIMIT,
    "tenantless": True,
}


# -- shared steps (module functions: the mixin's self is the PublicAPI) ----------------


async def _overwrite(api: _Host, request: KuraRequest, *, status: int) -> bytes:
    """Store the upload, replacing what is stored under its key (last writer wins)."""
    await api._artifacts.publish(request)
    return empty(request, status)


async def _bazel_read(api: _Host, request: KuraRequest, kind: str, hash: str) -> bytes:
    admission = await admission_of(request)
    if kind == "cas" and hash == EMPTY_SHA256:
        # Always present, stored or not: Bazel probes the cache with it.
        api._artifacts.count_read(admission.spec.producer, "ok")
        return empty(request, 200)
    return await api._download(request)


async def _bazel_cas_write(api: _Host, request: KuraRequest, hash: str) -> bytes:
    if hash == EMPTY_SHA256:
        await admission_of(request)
        if request.staging is not None:
            # Nothing to keep: the empty blob is always present.
            await request.staging.abort()
        api._artifacts.count_write(Producer.BAZEL, "ok")
        return empty(request, 200)
    return await api._upload(request, new_status=200, existing_status=200)


async def _propfind(api: _Host, request: KuraRequest, location: str) -> bytes:
    """Every collection exists (they are implicit); objects are not described.

    A 207 with ``resourcetype/collection`` and ``getlastmodified`` is what
    opendal (sccache) needs to skip ``MKCOL`` and keep the cache writable.
    Objects are only ever read with ``GET``, so any other path is a 404.
    """
    await admission_of(request)
    _sccache_segments(location)
    if location and not location.endswith("/"):
        return empty(request, 404)
    href = escape(request.path.decode("latin-1"))
    modified = datetimeToString(int(request.kura_site.clock.seconds())).decode("ascii")
    body = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<D:multistatus xmlns:D="DAV:"><D:response>'
        f"<D:href>{href}</D:href><D:propstat><D:prop>"
        "<D:resourcetype><D:collection/></D:resourcetype>"
        f"<D:getlastmodified>{modified}</D:getlastmodified>"
        "</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>"
        "</D:response></D:multistatus>\n"
    ).encode()
    request.setResponseCode(207, b"Multi-Status")
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Type", [b"application/xml; charset=utf-8"])
    headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    return body


class NeighbourRoutes:
    """Route handlers for the neighbouring protocols (a mixin of ``PublicAPI``).

    Handlers are registered on the shared app by :func:`route`, so Klein
    calls them with the ``PublicAPI`` instance as ``self``.
    """

    # -- Gradle, tenant and namespace in the path ------------------------------------------

    @route(
        "/api/cache/gradle/<tenant>/<namespace>/<cache_key>",
        methods=["GET"],
        operation=Operation.READ,
        producer=Producer.GRADLE,
        address=gradle_in_path,
        tenant_arg="tenant",
        accelerable=True,
        misses_on_fault=True,
    )
    async def gradle_path_get(
        self: _Host, request: KuraRequest, tenant: str, namespace: str, cache_key: str
    ) -> bytes:
        return await self._download(request)

    @route(
        "/api/cache/gradle/<tenant>/<namespace>/<cache_key>",
        methods=["PUT"],
        operation=Operation.WRITE,
        producer=Producer.GRADLE,
        address=gradle_in_path,
        tenant_arg="tenant",
        body=BodyKind.STAGED,
        body_limit=GRADLE_BODY_LIMIT,
    )
    async def gradle_path_put(
        self: _Host, request: KuraRequest, tenant: str, namespace: str, cache_key: str
    ) -> bytes:
        return await self._upload(request, new_status=201, existing_status=200)

    @route(
        "/api/cache/gradle/<tenant>/<cache_key>",
        methods=["GET"],
        operation=Operation.READ,
        producer=Producer.GRADLE,
        address=gradle_tenant_in_path,
        tenant_arg="tenant",
        accelerable=True,
        misses_on_fault=True,
    )
    async def gradle_tenant_get(
        self: _Host, request: KuraRequest, tenant: str, cache_key: str
    ) -> bytes:
        return await self._download(request)

    @route(
        "/api/cache/gradle/<tenant>/<cache_key>",
        methods=["PUT"],
        operation=Operation.WRITE,
        producer=Producer.GRADLE,
        address=gradle_tenant_in_path,
        tenant_arg="tenant",
        body=BodyKind.STAGED,
        body_limit=GRADLE_BODY_LIMIT,
    )
    async def gradle_tenant_put(
        self: _Host, request: KuraRequest, tenant: str, cache_key: str
    ) -> bytes:
        return await self._upload(request, new_status=201, existing_status=200)

    # -- Bazel HTTP cache --------------------------------------------------------------------

    @route(
        "/bazel/<any(ac,cas):kind>/<hash>",
        methods=["GET"],
        producer=Producer.BAZEL,
        address=bazel_any,
        **_READ,
    )
    async def bazel_get(self: _Host, request: KuraRequest, kind: str, hash: str) -> bytes:
        return await _bazel_read(self, request, kind, hash)

    @route(
        "/bazel/<instance_name>/<any(ac,cas):kind>/<hash>",
        methods=["GET"],
        producer=Producer.BAZEL,
        address=bazel_any,
        **_READ,
    )
    async def bazel_instance_get(
        self: _Host, request: KuraRequest, instance_name: str, kind: str, hash: str
    ) -> bytes:
        return await _bazel_read(self, request, kind, hash)

    @route("/bazel/ac/<hash>", methods=["PUT"], producer=Producer.BAZEL, address=bazel_ac, **_WRITE)
    async def bazel_ac_put(self: _Host, request: KuraRequest, hash: str) -> bytes:
        return await self._upload(request, new_status=200, existing_status=200)

    @route(
        "/bazel/cas/<hash>",
        methods=["PUT"],
        producer=Producer.BAZEL,
        address=bazel_cas,
        verify_digest=True,
        **_WRITE,
    )
    async def bazel_cas_put(self: _Host, request: KuraRequest, hash: str) -> bytes:
        return await _bazel_cas_write(self, request, hash)

    @route(
        "/bazel/<instance_name>/ac/<hash>",
        methods=["PUT"],
        producer=Producer.BAZEL,
        address=bazel_ac,
        **_WRITE,
    )
    async def bazel_instance_ac_put(
        self: _Host, request: KuraRequest, instance_name: str, hash: str
    ) -> bytes:
        return await self._upload(request, new_status=200, existing_status=200)

    @route(
        "/bazel/<instance_name>/cas/<hash>",
        methods=["PUT"],
        producer=Producer.BAZEL,
        address=bazel_cas,
        verify_digest=True,
        **_WRITE,
    )
    async def bazel_instance_cas_put(
        self: _Host, request: KuraRequest, instance_name: str, hash: str
    ) -> bytes:
        return await _bazel_cas_write(self, request, hash)

    # -- ccache HTTP storage -----------------------------------------------------------------

    @route(
        "/ccache/<path:location>",
        methods=["GET"],
        producer=Producer.CCACHE,
        address=ccache_address,
        **_READ,
    )
    async def ccache_get(self: _Host, request: KuraRequest, location: str) -> bytes:
        return await self._download(request)

    @route(
        "/ccache/<path:location>",
        methods=["PUT"],
        producer=Producer.CCACHE,
        address=ccache_address,
        overwrites=True,
        **_WRITE,
    )
    async def ccache_put(self: _Host, request: KuraRequest, location: str) -> bytes:
        # ccache rewrites its manifests under the same key: last writer wins.
        return await _overwrite(self, request, status=200)

    @route(
        "/ccache/<path:location>",
        methods=["DELETE"],
        operation=Operation.DELETE,
        producer=Producer.CCACHE,
        address=ccache_address,
        tenantless=True,
    )
    async def ccache_delete(self: _Host, request: KuraRequest, location: str) -> bytes:
        admission = await admission_of(request)
        assert admission.address is not None
        manifest = await self._store.manifest(self._store.artifact_id(admission.address))
        if manifest is not None:
            # Local only: the replication protocol has no single-artifact
            # delete (see docs/clients.md); peers keep their copies.
            await shielded(Deferred.fromCoroutine(self._store.remove_local(manifest)))
            audit_delete(request, admission, "delete")
        # Idempotent, as object stores answer it: absent afterwards either way.
        return empty(request, 204)

    # -- sccache WebDAV ----------------------------------------------------------------------

    @route(
        "/sccache/<path:location>",
        methods=["GET"],
        producer=Producer.SCCACHE,
        address=sccache_address,
        **_READ,
    )
    async def sccache_get(self: _Host, request: KuraRequest, location: str) -> bytes:
        return await self._download(request)

    @route(
        "/sccache/<path:location>",
        methods=["PUT"],
        producer=Producer.SCCACHE,
        address=sccache_address,
        **_WRITE,
    )
    async def sccache_put(self: _Host, request: KuraRequest, location: str) -> bytes:
        return await self._upload(request, new_status=201, existing_status=204)

    @route(
        "/sccache/",
        methods=["PROPFIND"],
        producer=Producer.SCCACHE,
        tenantless=True,
        body=BodyKind.MEMORY,
    )
    async def sccache_root_propfind(self: _Host, request: KuraRequest) -> bytes:
        return await _propfind(self, request, "")

    @route(
        "/sccache/<path:location>",
        methods=["PROPFIND"],
        producer=Producer.SCCACHE,
        tenantless=True,
        body=BodyKind.MEMORY,
    )
    async def sccache_propfind(self: _Host, request: KuraRequest, location: str) -> bytes:
        return await _propfind(self, request, location)

    @route("/sccache/", methods=["MKCOL"], producer=Producer.SCCACHE, tenantless=True)
    async def sccache_root_mkcol(self: _Host, request: KuraRequest) -> bytes:
        await admission_of(request)
        return empty(request, 201)

    @route(
        "/sccache/<path:location>", methods=["MKCOL"], producer=Producer.SCCACHE, tenantless=True
    )
    async def sccache_mkcol(self: _Host, request: KuraRequest, location: str) -> bytes:
        # Collections are implicit: creating one stores nothing.
        await admission_of(request)
        _sccache_segments(location)
        return empty(request, 201)

    # -- Turborepo remote cache --------------------------------------------------------------

    @route("/v8/artifacts/status", methods=["GET"], producer=Producer.TURBO, tenantless=True)
    async def turbo_status(self: _Host, request: KuraRequest) -> bytes:
        await admission_of(request)
        return json_response(request, 200, {"status": "enabled"})

    @route(
        "/v8/artifacts/events",
        methods=["POST"],
        producer=Producer.TURBO,
        tenantless=True,
        body=BodyKind.MEMORY,
        body_limit=EVENTS_BODY_LIMIT,
    )
    async def turbo_events(self: _Host, request: KuraRequest) -> bytes:
        # Usage analytics: accepted and dropped (kura counts hits itself).
        await admission_of(request)
        return empty(request, 204)

    @route(
        "/v8/artifacts/<hash>",
        methods=["GET"],
        producer=Producer.TURBO,
        address=turbo_address,
        **_READ,
    )
    async def turbo_get(self: _Host, request: KuraRequest, hash: str) -> bytes:
        return await self._download(request)

    @route(
        "/v8/artifacts/<hash>",
        methods=["PUT"],
        producer=Producer.TURBO,
        address=turbo_address,
        **_WRITE,
    )
    async def turbo_put(self: _Host, request: KuraRequest, hash: str) -> bytes:
        # One answer, whether stored now or already there.
        await self._artifacts.publish(request)
        return json_response(request, 200, {"urls": []})
