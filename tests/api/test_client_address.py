"""Client addresses: X-Forwarded-For is believed only from trusted proxies, right to left."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kura.config.proxies import parse_trusted_proxies
from kura.web.client_address import client_address

PROXIES = parse_trusted_proxies("10.0.0.0/8, 192.168.1.7, 2001:db8::/32")


def test_parse_trusted_proxies_accepts_addresses_and_networks() -> None:
    """Single addresses, CIDR networks of both families and blank entries parse."""
    parsed = parse_trusted_proxies(" 10.0.0.0/8,,192.168.1.7 , 2001:db8::/32, ::1")
    assert [str(n) for n in parsed] == [
        "10.0.0.0/8",
        "192.168.1.7/32",
        "2001:db8::/32",
        "::1/128",
    ]
    assert parse_trusted_proxies("") == ()


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "10.0.0.300", "proxy.local", "10.0.0.0/33", "*"])
def test_parse_trusted_proxies_refuses_bad_entries(entry: str) -> None:
    """An entry that is not an address or an exact network is an error naming it."""
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        parse_trusted_proxies(f"10.1.2.3, {entry}")


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    """With no trusted proxies X-Forwarded-For is ignored."""
    assert client_address("203.0.113.9", ["198.51.100.1"], ()) == "203.0.113.9"


def test_untrusted_peer_cannot_spoof_its_address() -> None:
    """A peer that is not a trusted proxy is the client, whatever it claims to forward."""
    for claimed in (["198.51.100.1"], ["10.0.0.5"], ["198.51.100.1, 10.0.0.5"], ["garbage"]):
        assert client_address("203.0.113.9", claimed, PROXIES) == "203.0.113.9"


def test_trusted_proxy_reports_the_right_most_untrusted_address() -> None:
    """Behind a trusted proxy the client is the right-most hop that is not a trusted proxy."""
    assert client_address("10.0.0.5", ["198.51.100.1"], PROXIES) == "198.51.100.1"
    assert client_address("10.0.0.5", ["198.51.100.1, 192.168.1.7"], PROXIES) == "198.51.100.1"
    assert (
        client_address("10.0.0.5", ["198.51.100.1", "10.9.9.9, 192.168.1.7"], PROXIES)
        == "198.51.100.1"
    )


def test_values_a_client_prepends_are_never_read() -> None:
    """What the client itself put in X-Forwarded-For (left of its real address) changes
    nothing, not even when it is malformed or names another client."""
    for forged in ("1.2.3.4", "10.0.0.1", "not-an-ip", "", "1.2.3.4, 5.6.7.8"):
        header = [f"{forged}, 198.51.100.1, 10.1.1.1"]
        assert client_address("10.0.0.5", header, PROXIES) == "198.51.100.1"


def test_malformed_hop_falls_back_to_the_peer() -> None:
    """A malformed or empty entry where the client should be yields the TCP peer."""
    for header in (["not-an-ip"], ["198.51.100.1:4711"], ["198.51.100.1,"], [""], ["[::1]"]):
        assert client_address("10.0.0.5", header, PROXIES) == "10.0.0.5"


def test_trusted_peer_without_forwarded_for_is_the_client() -> None:
    """A trusted proxy that forwards nothing is itself the client."""
    assert client_address("10.0.0.5", [], PROXIES) == "10.0.0.5"


def test_only_trusted_hops_gives_the_left_most() -> None:
    """When every forwarded hop is a trusted proxy, the farthest one is the client."""
    assert client_address("10.0.0.5", ["10.2.2.2, 192.168.1.7"], PROXIES) == "10.2.2.2"


def test_addresses_are_canonical() -> None:
    """IPv6 addresses come back compressed and IPv4-mapped ones as IPv4: one client, one key."""
    assert client_address("::ffff:203.0.113.9", [], ()) == "203.0.113.9"
    assert client_address("2001:DB8:0:0::1", [], ()) == "2001:db8::1"
    assert client_address("10.0.0.5", ["2001:0db9::0001"], PROXIES) == "2001:db9::1"
    assert client_address("unix:/run/kura.sock", ["198.51.100.1"], PROXIES) == "unix:/run/kura.sock"


@given(st.lists(st.text(max_size=40), max_size=4))
def test_untrusted_peer_is_the_client_for_any_header(header: list[str]) -> None:
    """No X-Forwarded-For value changes the client of an untrusted peer."""
    assert client_address("203.0.113.9", header, PROXIES) == "203.0.113.9"


@given(st.text(max_size=60))
def test_any_prefix_leaves_the_client_alone(prefix: str) -> None:
    """Whatever precedes the client's real address in the header is ignored."""
    header = [prefix, "198.51.100.1, 10.3.3.3"]
    assert client_address("192.168.1.7", header, PROXIES) == "198.51.100.1"
