"""Building the node's authorizer from its configuration."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from kura.config.access import AccessConfig
from kura.config.extension import ExtensionConfig
from kura.telemetry.metrics import KuraMetrics

from .authorizer import ExtensionAuthorizer
from .builtin import OpenAccess, TokenAccess
from .host import AgentFactory, ExtensionHost
from .loader import load_extension


def build_authorizer(
    config: ExtensionConfig,
    *,
    reactor: IReactorTime,
    metrics: KuraMetrics,
    access: AccessConfig | None = None,
    agent_for: AgentFactory | None = None,
) -> ExtensionAuthorizer | TokenAccess | OpenAccess:
    """The public port's authorizer: the extension, else tokens, else open access.

    An extension replaces the built-in rules entirely. Loads (imports and
    sets up) the extension now, so call it while the node is being built: a
    broken extension stops start-up.

    Raises:
        ExtensionLoadError: the extension cannot be loaded (a ``ConfigError``).
    """
    if not config.enabled:
        access = access or AccessConfig()
        if access.uses_tokens:
            return TokenAccess(access)
        return OpenAccess(allow_anonymous_delete=access.allow_anonymous_delete)
    host = ExtensionHost(config, reactor=reactor, metrics=metrics, agent_for=agent_for)
    extension = load_extension(config, host)
    return ExtensionAuthorizer(extension, config, clock=reactor, metrics=metrics, host=host)
