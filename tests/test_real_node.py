"""``twistd kura`` as a real process on loopback (marker ``realnode``)."""

from __future__ import annotations

import urllib.request

import pytest

from kura.testing import RealNode

pytestmark = pytest.mark.realnode


def test_twistd_round_trip(tmp_path: object) -> None:
    """A real node stores a CAS blob and serves it back over a real socket."""
    node = RealNode(f"{tmp_path}/data").start()
    try:
        url = f"{node.url}/api/cache/cas/abc?tenant_id=default"
        put = urllib.request.Request(url, data=b"payload", method="POST")
        with urllib.request.urlopen(put) as response:
            assert response.status == 204
        with urllib.request.urlopen(url) as response:
            assert response.read() == b"payload"
    finally:
        assert node.stop() == 0
