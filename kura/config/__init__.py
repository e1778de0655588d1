"""Configuration: the ``KURA_*`` contract (``environ``) and the node's settings (``node``).

``KuraConfig.from_environ`` is the only way a node is configured; every
variable is declared once, with its default, in :mod:`kura.config.node` (or,
for the public access rules' and the extension's, in :mod:`kura.config.access`
and :mod:`kura.config.extension`); :data:`VARIABLES` lists them all.
``python -m kura.config`` prints ``docs/configuration.md``.
"""

from __future__ import annotations

from .environ import ConfigError, Variable
from .node import (
    MIN_PEER_SECRET_BYTES,
    VARIABLES,
    AcceleratorConfig,
    KuraConfig,
    PeerAuthConfig,
    ReplicationConfig,
    TlsFiles,
    derive_capacity,
    filesystem_size,
    render_markdown,
)

__all__ = [
    "MIN_PEER_SECRET_BYTES",
    "VARIABLES",
    "AcceleratorConfig",
    "ConfigError",
    "KuraConfig",
    "PeerAuthConfig",
    "ReplicationConfig",
    "TlsFiles",
    "Variable",
    "derive_capacity",
    "filesystem_size",
    "render_markdown",
]
