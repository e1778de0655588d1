"""An extension that adds a response header naming each response's status, and records them.

Loaded with ``KURA_EXTENSION_MODULE=tests.api.header_policy:POLICY`` by the
response-header tests (in-process nodes, so the test reads the same object).
Everything is allowed and nothing is cached (TTL 0).
"""

from __future__ import annotations

from kura.auth import Allow, Headers, HookContext, Principal


class HeaderPolicy:
    """Adds ``x-policy: {status}``; ``failing`` makes ``response_headers`` raise."""

    def __init__(self) -> None:
        self.statuses: list[int | None] = []
        self.failing = False

    def authenticate(self, ctx: HookContext) -> Principal:
        return Principal("policy", ttl_seconds=0)

    def authorize(self, ctx: HookContext, principal: Principal | None) -> Allow:
        return Allow(ttl_seconds=0)

    def response_headers(self, ctx: HookContext, principal: Principal | None) -> Headers:
        self.statuses.append(ctx.status_code)
        if self.failing:
            raise RuntimeError("the policy service is down")
        return Headers({"x-policy": str(ctx.status_code)})


POLICY = HeaderPolicy()
