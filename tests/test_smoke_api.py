"""A first round trip through the real channel, request and Klein app."""

from kura.testing import Exchange

CAS = "/api/cache/cas/abc?tenant_id=default"


def test_cas_round_trip(client: Exchange) -> None:
    """A CAS POST is acknowledged with 204 and served back byte-exact."""
    assert client.request("POST", CAS, b"hello world").status == 204
    response = client.request("GET", CAS)
    assert response.status == 200
    assert response.body == b"hello world"
    assert response.headers["content-type"] == "application/octet-stream"
