"""Building the node's authorizer from its configuration."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent
from twisted.web.iweb import IAgent

from kura.config.access import AccessConfig
from kura.config.extension import ExtensionConfig, HttpClientConfig
from kura.telemetry.metrics import KuraMetrics

from .authorizer import ExtensionAuthorizer
from .builtin import OpenAccess, TokenAccess
from .host import AgentFactory, ExtensionHost
from .loader import load_extension
from .oidc import OidcAccess


def build_authorizer(
    config: ExtensionConfig,
    *,
    reactor: IReactorTime,
    metrics: KuraMetrics,
    access: AccessConfig | None = None,
    agent_for: AgentFactory | None = None,
) -> ExtensionAuthorizer | OidcAccess | TokenAccess | OpenAccess:
    """The public port's authorizer: the extension, else OIDC (with any static
    tokens), else tokens, else open access.

    An extension replaces the built-in rules entirely. Loads (imports and
    sets up) the extension now, so call it while the node is being built: a
    broken extension stops start-up.

    Raises:
        ExtensionLoadError: the extension cannot be loaded (a ``ConfigError``).
    """
    if not config.enabled:
        access = access or AccessConfig()
        if access.oidc is not None:
            oidc_url = access.oidc.jwks_url or access.oidc.issuer
            client = HttpClientConfig(oidc_url, connect_timeout_ms=5_000, request_timeout_ms=10_000)

            def agent() -> IAgent:
                if agent_for is not None:
                    return agent_for(client)
                return Agent(reactor, connectTimeout=client.connect_timeout_ms / 1000)

            return OidcAccess(
                access,
                clock=reactor,
                agent=agent,
                on_fetched=lambda result: metrics.jwks_fetches.labels("oidc", result).inc(),
            )
        if access.uses_tokens:
            return TokenAccess(access)
        return OpenAccess(allow_anonymous_delete=access.allow_anonymous_delete)
    host = ExtensionHost(config, reactor=reactor, metrics=metrics, agent_for=agent_for)
    extension = load_extension(config, host)
    return ExtensionAuthorizer(extension, config, clock=reactor, metrics=metrics, host=host)
