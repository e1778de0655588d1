"""What a route means, beyond its URL rule: :class:`RouteSpec` and its vocabulary.

A Klein app's ``url_map`` is its one route table; each endpoint in it has a
:class:`RouteSpec` (keyed by endpoint name) saying what the request acts on,
how its body is received and what it may do. The public API, the internal
plane and the accelerator all admit requests through these specs.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping

import attrs

from kura.domain.artifacts import ArtifactAddress, Producer
from kura.domain.errors import BadRequest

MiB = 1024 * 1024
GiB = 1024 * MiB


class Operation(enum.StrEnum):
    """What a request does, as the extension hooks see it."""

    READ = "artifact.read"
    WRITE = "artifact.write"
    #: Removes one entry (ccache's DELETE).
    DELETE = "artifact.delete"
    DELETE_NAMESPACE = "namespace.delete"
    REQUEST = "request"

    @property
    def destructive(self) -> bool:
        """Cleans and deletes: refused to anonymous callers unless allowed."""
        return self in (Operation.DELETE, Operation.DELETE_NAMESPACE)


class BodyKind(enum.Enum):
    """How a route receives its request body."""

    #: No body is expected; a small one is read and ignored (as twisted.web would).
    NONE = "none"
    #: A small body kept in memory (JSON payloads).
    MEMORY = "memory"
    #: An artifact body streamed into a staging file.
    STAGED = "staged"


#: A route without a body policy reads at most this much of a stray body.
STRAY_BODY_LIMIT = 64 * 1024


class Query:
    """A request's query parameters, with kura's strictness rules.

    A parameter given twice, or given under both its name and its alias with
    different values, is ambiguous (two parsers could each pick a different
    one: a tenant confusion) and is a 400 on every serving path.
    """

    def __init__(self, params: Mapping[str, list[str]]) -> None:
        self._params = params

    def single(self, name: str, alias: str | None = None) -> str | None:
        """The one value of ``name`` (or ``alias``); empty counts as missing.

        Raises:
            BadRequest: the parameter is repeated or conflicts with its alias.
        """
        primary = self._params.get(name, [])
        secondary = self._params.get(alias, []) if alias is not None else []
        distinct = {v for v in (*primary, *secondary) if v != ""}
        if len(primary) > 1 or len(secondary) > 1 or len(distinct) > 1:
            shown = f"{name}/{alias}" if alias else name
            raise BadRequest(f"Ambiguous query parameter {shown}: give it once")
        return distinct.pop() if distinct else None


AddressResolver = Callable[[Mapping[str, str], Query, str], ArtifactAddress]


@attrs.frozen
class RouteSpec:
    """The meaning of one endpoint.

    Attributes:
        endpoint: the Klein endpoint name (the key of this spec).
        template: the route template used as the metric label.
        operation: what the request does (for authorization).
        producer: the cache protocol, when the route addresses artifacts.
        address: resolves ``(path args, query, node tenant)`` to the
            artifact; raises :class:`BadRequest`/:class:`Forbidden` on bad
            ids or tenants. ``None`` when the route has no single artifact.
        tenant_required: the route carries ``tenant_id`` (checked even when
            ``address`` is ``None``).
        namespaced: the route acts on the namespace of its query as a whole
            (clean) or on a key it may learn only from the body (key-value
            PUT): its target names that namespace.
        body: how the request body is received.
        body_limit: the largest accepted body, in bytes.
        too_large_message: the 413 message for this route.
        accelerable: GETs may be served by the accelerator.
        probe: liveness/readiness/metrics (no auth, no draining, no
            public accounting).
        misses_on_fault: reads answer 404 instead of 5xx on storage
            trouble (clients that fail a whole build on any other status).
        plain_auth_errors: 401/403 bodies are ``text/plain`` (Nx).
        public: counts as public traffic (in-flight slot, time to first
            byte) that replication backs off against; false for the peer plane.
        needs_upload: admission loads the multipart upload named by
            ``upload_id`` (404 before the body when it is unknown).
        verify_digest: the key is the SHA-256 of the body (Bazel CAS); the
            staged body is hashed and a mismatch is a 400.
        head_check: extra validation of the query at admission (raises
            :class:`BadRequest`).
        not_found_message: the 404 message of reads.
        tenantless: the protocol carries no tenant (Nx, Metro); hooks see
            tenant ``default``.
        key_in_body: the artifact key may come only in the (small) body
            (key-value PUT's ``cas_id``), so hooks run once it is read.
        tenant_arg: the path argument that carries the tenant (Gradle's
            path form, for clients that drop the query string); the
            address resolver checks it and the hooks see it.
        overwrites: a PUT replaces an existing artifact (last writer wins)
            instead of being answered as already stored: ccache rewrites
            its manifests under the same key.
        trouble_status: answers *cache trouble* on writes (too large, budget
            or disk full, draining, storage faults) for clients that fail a
            task on any other status (Nx fails on all but 200/403/409).
    """

    endpoint: str
    template: str
    operation: Operation = Operation.REQUEST
    producer: Producer | None = None
    address: AddressResolver | None = None
    tenant_required: bool = False
    namespaced: bool = False
    body: BodyKind = BodyKind.NONE
    body_limit: int = STRAY_BODY_LIMIT
    too_large_message: str = "Request body exceeded allowed size"
    accelerable: bool = False
    probe: bool = False
    misses_on_fault: bool = False
    plain_auth_errors: bool = False
    public: bool = True
    needs_upload: bool = False
    verify_digest: bool = False
    head_check: Callable[[Query], None] | None = None
    tenantless: bool = False
    key_in_body: bool = False
    not_found_message: str = "Artifact not found"
    tenant_arg: str | None = None
    overwrites: bool = False
    trouble_status: int | None = None


_WERKZEUG_ARG = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def template_of(rule: str) -> str:
    """``/api/cache/cas/<id>`` → ``/api/cache/cas/{id}`` (the metric label)."""
    return _WERKZEUG_ARG.sub(r"{\1}", rule)
