"""Authorization extensions: upstream Kura's hook contract for Python code.

An extension provides any of ``authenticate(ctx)``, ``authorize(ctx,
principal)`` and ``response_headers(ctx, principal)`` and returns the typed
results below; see ``docs/extensions.md``. Extensions import what they need
from here::

    from kura.auth import Allow, Deny, HookContext, Principal
"""

from __future__ import annotations

from kura.config.access import AccessConfig
from kura.config.extension import EXTENSION_VARIABLES, ExtensionConfig

from .authorizer import ExtensionAuthorizer
from .builtin import OpenAccess, TokenAccess
from .context import HookContext, header_map
from .errors import ExtensionLoadError, HostError, UnknownResource
from .factory import build_authorizer
from .host import ExtensionHost
from .http_client import HttpClientError, JsonResponse
from .interfaces import IExtension, IRequestAuthorizer
from .loader import LoadedExtension, load_extension
from .oidc import OidcAccess
from .results import ALLOW, ANONYMOUS, Allow, Anonymous, Deny, Headers, Principal, SignRequest
from .signing import constant_time_equals
from .tokens import AwaitRequired, TokenInvalid

__all__ = [
    "ALLOW",
    "ANONYMOUS",
    "EXTENSION_VARIABLES",
    "AccessConfig",
    "Allow",
    "Anonymous",
    "AwaitRequired",
    "Deny",
    "ExtensionAuthorizer",
    "ExtensionConfig",
    "ExtensionHost",
    "ExtensionLoadError",
    "Headers",
    "HookContext",
    "HostError",
    "HttpClientError",
    "IExtension",
    "IRequestAuthorizer",
    "JsonResponse",
    "LoadedExtension",
    "OidcAccess",
    "OpenAccess",
    "Principal",
    "SignRequest",
    "TokenAccess",
    "TokenInvalid",
    "UnknownResource",
    "build_authorizer",
    "constant_time_equals",
    "header_map",
    "load_extension",
]
