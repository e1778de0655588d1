"""``KURA_TRUSTED_PROXIES``: the proxies whose ``X-Forwarded-For`` is believed.

Parsed here with the rest of the configuration; :mod:`kura.web.client_address`
applies it.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: The parsed ``KURA_TRUSTED_PROXIES``.
TrustedProxies = tuple[IPNetwork, ...]


def parse_trusted_proxies(text: str) -> TrustedProxies:
    """Parse a comma-separated list of IP addresses and CIDR networks.

    Blank entries are ignored; an empty text trusts nobody.

    Raises:
        ValueError: naming the first entry that is not an address or a
            network (a network with host bits set, such as ``10.0.0.1/8``,
            is refused rather than silently widened).
    """
    networks: list[IPNetwork] = []
    for entry in (item.strip() for item in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as error:
            raise ValueError(
                f"entry {entry!r} is not an IP address or CIDR network ({error})"
            ) from None
    return tuple(networks)
