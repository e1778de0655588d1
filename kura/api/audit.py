"""The audit trail: every clean and delete, with who asked for it.

One structured log event per destructive request that succeeded (namespace
cleans and single-entry deletes), naming the principal (the token's or
extension principal's id, or ``anonymous``), the tenant, namespace and key
acted on, the client address and the request id. It is logged through
``twisted.logger`` like every other event (JSON lines by default), in the
``kura.audit`` namespace, so it can be shipped or filtered on its own.
Credentials never appear in it: only the principal's id.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from kura.auth.results import Principal
from kura.web.admission import Admission

log = Logger(namespace="kura.audit")

DELETED = (
    "audit: {action} of tenant {tenant!r} namespace {namespace!r} key {key!r} "
    "by {principal} from {client} ({request_id})"
)


def principal_name(admission: Admission) -> str:
    """``kind:id`` of the caller, or ``anonymous``."""
    caller = admission.caller
    if isinstance(caller, Principal):
        return f"{caller.kind}:{caller.id}"
    return "anonymous"


def audit_delete(request: Any, admission: Admission, action: str) -> None:
    """Log one destructive request that was carried out."""
    target = admission.target
    log.info(
        DELETED,
        action=action,
        tenant=target.tenant,
        namespace=target.namespace,
        key=target.key,
        principal=principal_name(admission),
        client=getattr(request, "client_address", "unknown"),
        request_id=getattr(request, "request_id", ""),
        audit=True,
    )
