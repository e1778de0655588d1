"""The web layer's seams: every gate provides IGate (checked with verifyObject)."""

from __future__ import annotations

from typing import Any

from zope.interface.verify import verifyObject

from kura.web.interfaces import IGate


def test_the_public_and_internal_gates_provide_igate(node: Any) -> None:
    """The public API's gate and the internal plane's both provide IGate, as sites expect."""
    assert verifyObject(IGate, node.gate)
    assert verifyObject(IGate, node.replication.gate)
    assert IGate.providedBy(node.site.gate)
