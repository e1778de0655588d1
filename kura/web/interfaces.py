"""The web layer's seams, as zope interfaces (``verifyObject`` tests keep the
implementations honest: see ``tests/web/test_interfaces.py``)."""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from .admission import Admission, RequestHead
from .routing import RouteSpec


class IGate(Interface):
    """Head-time admission for one Klein app."""

    routes = Attribute("The :class:`RouteMatch` of the app's ``url_map``.")

    def classify(head: RequestHead) -> tuple[RouteSpec, Mapping[str, str]]:
        """The route ``head`` addresses (``UNMATCHED`` when none)."""

    def admit(head: RequestHead) -> Deferred[Admission]:
        """The admission of ``head``, or a failure carrying the ``KuraError`` to answer."""
