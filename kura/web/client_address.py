"""Who the client is: the TCP peer, or what trusted proxies say it is.

``X-Forwarded-For`` is written by whoever sends the request, so it is only
believed when the TCP peer is one of the operator's own proxies
(``KURA_TRUSTED_PROXIES``). Each proxy appends the address it received the
request from, so the list reads left to right from the farthest hop to the
nearest, and only its right-hand end was written by trusted hands. The client
is the right-most address that is not itself a trusted proxy (nginx's
``real_ip_recursive``; MDN's "trusted proxy list" selection): whatever a
client prepends is never reached. A malformed value in the part that is read
falls back to the TCP peer.

Pure functions only; :class:`kura.web.request.KuraRequest` exposes the result as
``request.client_address``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from kura.config.proxies import IPAddress, TrustedProxies

#: A node sees the same few peers (and proxies) again and again: parsing an
#: address costs more than the rest of the decision.
_PARSED = 4096


@functools.lru_cache(maxsize=_PARSED)
def _parse(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; one client,
    # one address, whichever socket family carried it.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=_PARSED)
def _text(address: IPAddress) -> str:
    return str(address)


def _trusted(address: IPAddress, trusted: TrustedProxies) -> bool:
    return any(address in network for network in trusted)


def _entries(forwarded_for: Iterable[str]) -> list[str]:
    # Several X-Forwarded-For lines are one list, in order (RFC 9110 5.3).
    return [entry for line in forwarded_for for entry in line.split(",")]


def client_address(peer: str, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """The address a request is accounted to.

    Args:
        peer: the TCP peer's address (not necessarily an IP: anything that
            does not parse as one is returned as it is).
        forwarded_for: the request's ``X-Forwarded-For`` header values, in
            the order they arrived.
        trusted: the proxies whose ``X-Forwarded-For`` is believed.

    Returns:
        The right-most ``X-Forwarded-For`` address that is not a trusted
        proxy when ``peer`` is one (the left-most address when every hop is
        trusted); otherwise ``peer``. IP addresses come back in their
        canonical text form. An empty or malformed entry among those read
        yields ``peer``.
    """
    tcp_peer = _parse(peer)
    if tcp_peer is None:
        return peer
    if not trusted or not forwarded_for or not _trusted(tcp_peer, trusted):
        return _text(tcp_peer)
    # Only entries right of (and including) the first untrusted one are read:
    # the client cannot make a value it prepends matter, neither as its
    # address nor by being malformed.
    address = tcp_peer
    for entry in reversed(_entries(forwarded_for)):
        hop = _parse(entry)
        if hop is None:
            return _text(tcp_peer)
        address = hop
        if not _trusted(hop, trusted):
            break
    return _text(address)
