"""Authorization extensions: upstream Kura's hook contract for Python code.

An extension provides any of ``authenticate(ctx)``, ``authorize(ctx,
principal)`` and ``response_headers(ctx, principal)`` and returns the typed
results below; see ``docs/extensions.md``. Extensions import what they need
from here::

    from kura.auth import Allow, Deny, HookContext, Principal
"""

from __future__ import annotations

from .authorizer import ExtensionAuthorizer, NoExtension
from .config import EXTENSION_VARIABLES, ExtensionConfig
from .context import HookContext, header_map, raw_query
from .errors import ExtensionLoadError, HostError, UnknownResource
from .factory import build_authorizer
from .host import ExtensionHost
from .http_client import HttpClientError, JsonResponse
from .interfaces import IExtension, IRequestAuthorizer
from .loader import LoadedExtension, load_extension
from .results import ALLOW, ANONYMOUS, Allow, Anonymous, Deny, Headers, Principal, SignRequest
from .signing import constant_time_equals
from .tokens import TokenInvalid

__all__ = [
    "ALLOW",
    "ANONYMOUS",
    "EXTENSION_VARIABLES",
    "Allow",
    "Anonymous",
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
    "NoExtension",
    "Principal",
    "SignRequest",
    "TokenInvalid",
    "UnknownResource",
    "build_authorizer",
    "constant_time_equals",
    "header_map",
    "load_extension",
    "raw_query",
]
