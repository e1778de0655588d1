"""Exceptions the host raises to extensions (hooks may catch them)."""

from __future__ import annotations

from kura.config.environ import ConfigError


class HostError(Exception):
    """Base of every error a host helper raises."""


class UnknownResource(HostError, LookupError):
    """No verifier, HTTP client or signer is configured under that id."""


class ExtensionLoadError(ConfigError):
    """The extension could not be loaded; the node must not start.

    The message names the variable, the file or module, and the exception.
    A ``ConfigError``, so start-up reports it like any bad variable.
    """
