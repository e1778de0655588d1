"""sccache's WebDAV storage: objects under ``/sccache/...``, collections that always exist.

sccache (through opendal) reads and writes objects with ``GET``/``PUT``; an
object path is fan-out directories (and any key prefix) then a hex digest
or ``.sccache_check``. ``PROPFIND`` on any collection answers 207 with
``resourcetype/collection`` and ``getlastmodified``, so opendal skips
``MKCOL`` and never falls back to read-only; ``MKCOL`` is a 201 that stores
nothing (collections are implicit); ``PROPFIND`` on an object is a 404.
A PUT answers 201 when it stored the object, 204 when it was already stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from xml.sax.saxutils import escape

from twisted.web.http import datetimeToString

from kura.api.artifacts import ArtifactService
from kura.api.handling import admission_of, empty
from kura.api.table import Route, artifact_read, artifact_write, route
from kura.domain.artifacts import ArtifactAddress, Producer, is_valid_key
from kura.domain.errors import BadRequest
from kura.web.request import KuraRequest
from kura.web.routing import BodyKind, Query

from .neighbour import NEIGHBOUR_BODY_LIMIT

SCCACHE = "sccache"
SCCACHE_CHECK = ".sccache_check"
ROOT = "/sccache/"
RULE = "/sccache/<path:location>"

#: sccache names objects by a hex digest (64 digits today).
_SCCACHE_OBJECT = re.compile(r"[0-9a-f]{32,128}")
_SCCACHE_MAX_DEPTH = 16


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


class SccacheRoutes:
    """sccache's routes (see the module docstring).

    Args:
        artifacts: the shared artifact steps.
    """

    def __init__(self, artifacts: ArtifactService) -> None:
        self._artifacts = artifacts

    def routes(self) -> tuple[Route, ...]:
        """This protocol's rows of the route table."""
        sccache = Producer.SCCACHE
        return (
            artifact_read(
                "sccache_get",
                RULE,
                self._artifacts.download,
                producer=sccache,
                address=sccache_address,
                tenantless=True,
            ),
            artifact_write(
                "sccache_put",
                RULE,
                "PUT",
                self.put,
                producer=sccache,
                address=sccache_address,
                tenantless=True,
                body_limit=NEIGHBOUR_BODY_LIMIT,
            ),
            route(
                "sccache_root_propfind",
                ROOT,
                "PROPFIND",
                self.propfind,
                producer=sccache,
                tenantless=True,
                body=BodyKind.MEMORY,
            ),
            route(
                "sccache_propfind",
                RULE,
                "PROPFIND",
                self.propfind,
                producer=sccache,
                tenantless=True,
                body=BodyKind.MEMORY,
            ),
            route(
                "sccache_root_mkcol",
                ROOT,
                "MKCOL",
                self.mkcol,
                producer=sccache,
                tenantless=True,
            ),
            route(
                "sccache_mkcol",
                RULE,
                "MKCOL",
                self.mkcol,
                producer=sccache,
                tenantless=True,
            ),
        )

    async def put(self, request: KuraRequest) -> bytes:
        stored = await self._artifacts.publish(request)
        return empty(request, 201 if stored else 204)

    async def propfind(self, request: KuraRequest) -> bytes:
        """Every collection exists (they are implicit); objects are not described.

        A 207 with ``resourcetype/collection`` and ``getlastmodified`` is what
        opendal (sccache) needs to skip ``MKCOL`` and keep the cache writable.
        Objects are only ever read with ``GET``, so any other path is a 404.
        """
        admission = await admission_of(request)
        location = admission.path_args.get("location", "")
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

    async def mkcol(self, request: KuraRequest) -> bytes:
        # Collections are implicit: creating one stores nothing.
        admission = await admission_of(request)
        _sccache_segments(admission.path_args.get("location", ""))
        return empty(request, 201)
