"""Cache keys for hook results.

Results are cached per *credentials*, so the authenticate key covers only
the headers that can carry them: hashing every header would key the cache
on per-request noise (``traceparent``, deadlines) and turn nearly every
request into a miss and a call to the authentication backend. Credential
headers stay the only headers in any key. The authorize key adds
everything ``authorize`` may decide on, the artifact key included, so by
default one result answers exactly one kind of request on one artifact; a
hook widens that to a namespace only by saying so (``scope="namespace"``).

Keys are hex SHA-256 digests of a canonical JSON encoding, so no value
(non-ASCII, control characters, odd attribute types) can make building a
key fail or two different inputs collide by concatenation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from .context import HookContext
from .results import Anonymous, Principal

#: The headers that can carry credentials (upstream's list).
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")


def _digest(value: object) -> str:
    try:
        encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        # Attributes whose keys cannot be sorted together (mixed types) or
        # that refer to themselves: still a stable description, just not a
        # canonical one (at worst a cache miss).
        encoded = repr(value)
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()


def credential_fingerprint(headers: Mapping[str, str]) -> str:
    """A digest of the credential headers present in ``headers``."""
    return _digest({name: headers[name] for name in CREDENTIAL_HEADERS if name in headers})


def authenticate_key(extension: str, credentials: str) -> str:
    """The authenticate cache key: the extension and the credentials."""
    return _digest(["authenticate", extension, credentials])


def _principal_part(principal: Principal | Anonymous) -> object:
    if not isinstance(principal, Principal):
        return None
    return [principal.id, principal.kind, dict(principal.attributes)]


def authorize_key(
    extension: str,
    credentials: str,
    ctx: HookContext,
    principal: Principal | Anonymous,
    *,
    scope: str = "request",
) -> str:
    """The authorize cache key.

    A ``request`` key covers everything ``authorize`` may decide on: the
    authenticate key's inputs plus the principal (id, kind, attributes), the
    server tenant, tenant, namespace, operation, producer, route, method,
    transport and artifact key. A ``namespace`` key leaves the artifact key
    out: it is where results a hook declared per namespace
    (``Allow(scope="namespace")``) are kept, shared by every key of the
    namespace.
    """
    return _digest(
        [
            "authorize",
            scope,
            extension,
            credentials,
            _principal_part(principal),
            ctx.server_tenant_id,
            ctx.tenant_id,
            ctx.namespace_id,
            ctx.operation,
            ctx.producer,
            ctx.route,
            ctx.method,
            ctx.transport,
            ctx.artifact_key if scope == "request" else None,
        ]
    )
