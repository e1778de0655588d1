"""What every public handler does with its request: its admission, a header, a plain answer.

Handlers run after the head was admitted (:mod:`kura.api.gate`) and any body
was received (:mod:`kura.web.request`); :func:`admission_of` hands them that verdict
or raises what refused the request. :func:`empty` and :func:`json_response`
set a whole response (status, ``Content-Type``, ``Content-Length``) and return
its body.
"""

from __future__ import annotations

import json

from kura.domain.artifacts import JSON
from kura.web.admission import Admission
from kura.web.request import KuraRequest


async def admission_of(request: KuraRequest) -> Admission:
    """The request's admission.

    Raises:
        KuraError: what refused the request at its head or while its body
            arrived (too large, budget exhausted, denied, ...).
    """
    admitted = request.admitted
    if admitted is None:
        # Still deciding (a hook or a lookup waits), or refused.
        assert request.admission is not None
        admitted = await request.admission
    if request.rejection is not None:
        raise request.rejection
    return admitted


def header(request: KuraRequest, name: bytes) -> str | None:
    """A request header as text (latin-1, as HTTP header bytes are)."""
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def empty(request: KuraRequest, status: int) -> bytes:
    """A response without a body (``Content-Length: 0`` unless 204)."""
    request.setResponseCode(status)
    if status != 204:
        request.setHeader(b"Content-Length", b"0")
    return b""


def json_response(request: KuraRequest, status: int, payload: object) -> bytes:
    """A compact JSON response."""
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON.encode())
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body
