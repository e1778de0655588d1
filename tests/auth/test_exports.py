"""The public surface of kura.auth."""

from __future__ import annotations

import importlib

import kura.auth


def test_every_export_is_the_defining_modules_object() -> None:
    """Each name in kura.auth.__all__ is the very object its home module defines."""
    homes = {
        "kura.auth.authorizer",
        "kura.auth.builtin",
        "kura.config.access",
        "kura.config.extension",
        "kura.auth.context",
        "kura.auth.errors",
        "kura.auth.factory",
        "kura.auth.host",
        "kura.auth.http_client",
        "kura.auth.interfaces",
        "kura.auth.loader",
        "kura.auth.oidc",
        "kura.auth.results",
        "kura.auth.signing",
        "kura.auth.tokens",
    }
    defined = {}
    for home in homes:
        module = importlib.import_module(home)
        defined.update({name: getattr(module, name) for name in vars(module)})
    for name in kura.auth.__all__:
        assert getattr(kura.auth, name) is defined[name], name
