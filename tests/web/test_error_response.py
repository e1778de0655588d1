"""Closing error responses written below twisted.web's ``Request``.

The accelerator's deny and the channel's 408 (which the accelerator's head
deadline also ends in) are both serialized by
:func:`kura.web.errors.render_error_response`, from the same body and header
rules the twisted.web path applies to its requests.
"""

from __future__ import annotations

from kura.domain.errors import ServiceUnavailable, Unauthorized
from kura.web.errors import RequestTimeout, render_error_response
from kura.web.routing import RouteSpec

CAS = RouteSpec("xcode_cas_get", "/api/cache/cas/{id}")
NX = RouteSpec("nx_get", "/v1/cache/{hash}", plain_auth_errors=True)


def test_a_head_deadline_is_a_json_408_that_closes() -> None:
    """Before routing there is no spec: the 408 is JSON, with no Server or Date."""
    assert render_error_response(RequestTimeout("Request head not received in time")) == (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        b"Content-Length: 48\r\nConnection: close\r\n\r\n"
        b'{"message": "Request head not received in time"}'
    )


def test_headers_go_before_and_after_the_error_headers_in_that_order() -> None:
    """``before`` leads, then the error's own headers, the length, the close, ``after``."""
    error = ServiceUnavailable("Draining", retry_after=5)
    response = render_error_response(
        error,
        CAS,
        before=((b"Server", b"kura"), (b"Date", b"today")),
        after=((b"X-Request-Id", b"r1"),),
    )
    assert response == (
        b"HTTP/1.1 503 Service Unavailable\r\nServer: kura\r\nDate: today\r\n"
        b"Content-Type: application/json\r\nRetry-After: 5\r\nContent-Length: 23\r\n"
        b"Connection: close\r\nX-Request-Id: r1\r\n\r\n"
        b'{"message": "Draining"}'
    )


def test_plain_auth_routes_get_a_plain_text_401_with_its_challenge() -> None:
    """Nx's 401 is text/plain and carries the challenge, as on the twisted.web path."""
    response = render_error_response(Unauthorized("Invalid token", challenge="Bearer"), NX)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 401 Unauthorized",
        b"Content-Type: text/plain",
        b"WWW-Authenticate: Bearer",
        b"Content-Length: 13",
        b"Connection: close",
    ]
    assert body == b"Invalid token"
