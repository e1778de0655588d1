"""The public route table is data each node builds: its rows, specs and Klein app are its own."""

from __future__ import annotations

import pytest

from kura.api.table import Route, route, specs_of
from kura.service import KuraNode
from kura.web.routing import Operation
from tests.api.route_table import public_api
from tests.conftest import Nodes


async def _answer(request: object) -> bytes:
    return b""


def test_the_klein_app_serves_exactly_the_table() -> None:
    """Every row is one rule of the app's url_map, under its spec's endpoint, and nothing else."""
    api = public_api()
    rules = {
        (rule.rule, frozenset(rule.methods or ()), rule.endpoint)
        for rule in api.app.url_map.iter_rules()
    }
    # werkzeug answers HEAD on every GET rule.
    rows = {
        (
            row.rule,
            frozenset({row.method, "HEAD"} if row.method == "GET" else {row.method}),
            row.spec.endpoint,
        )
        for row in api.routes
    }
    assert rules == rows
    assert set(api.specs) == {row.spec.endpoint for row in api.routes}
    assert all(api.specs[row.spec.endpoint] is row.spec for row in api.routes)


def test_nodes_share_no_route_state(nodes: Nodes) -> None:
    """Two nodes in one process have their own app and specs, each from its own configuration."""
    small: KuraNode = nodes.start("small", KURA_MAX_KEYVALUE_BYTES="64")
    large: KuraNode = nodes.start("large")
    assert small.api.app is not large.api.app
    assert small.api.app.url_map is not large.api.app.url_map
    assert small.api.specs["keyvalue_put"].body_limit == 64
    assert large.api.specs["keyvalue_put"].body_limit == large.config.max_keyvalue_bytes


def test_route_derives_the_spec_template_from_the_rule() -> None:
    """A row's spec is named by its endpoint and labelled by the rule's template."""
    row = route("thing_get", "/things/<path:name>", "GET", _answer, operation=Operation.READ)
    assert row == Route("/things/<path:name>", "GET", row.spec, _answer)
    assert (row.spec.endpoint, row.spec.template) == ("thing_get", "/things/{name}")
    assert row.spec.operation is Operation.READ


def test_an_endpoint_declared_twice_is_refused() -> None:
    """Two rows with one endpoint name cannot both be looked up: building the specs fails."""
    rows = [route("same", "/a", "GET", _answer), route("same", "/b", "PUT", _answer)]
    with pytest.raises(ValueError, match="'same' is declared twice"):
        specs_of(rows)
