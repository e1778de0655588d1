"""Building the node's authorizer from its configuration."""

from __future__ import annotations

from typing import Any

from kura.metrics import KuraMetrics

from .authorizer import ExtensionAuthorizer, NoExtension
from .config import ExtensionConfig
from .host import AgentFactory, ExtensionHost
from .loader import load_extension


def build_authorizer(
    config: ExtensionConfig,
    *,
    reactor: Any,
    metrics: KuraMetrics,
    agent_for: AgentFactory | None = None,
) -> ExtensionAuthorizer | NoExtension:
    """The authorizer for ``config``: the loaded extension, or :class:`NoExtension`.

    Loads (imports and sets up) the extension now, so call it while the
    node is being built: a broken extension stops start-up.

    Raises:
        ExtensionLoadError: the extension cannot be loaded (a ``ConfigError``).
    """
    if not config.enabled:
        return NoExtension()
    host = ExtensionHost(config, reactor=reactor, metrics=metrics, agent_for=agent_for)
    extension = load_extension(config, host)
    return ExtensionAuthorizer(extension, config, clock=reactor, metrics=metrics, host=host)
